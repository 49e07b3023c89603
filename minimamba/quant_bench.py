"""`minimamba bench --quantization int8|int4|both`: float32 and quantized weights, side by side.

    minimamba bench --shape 130m --quantization both --block-size 32,128 --repeat 5 --roofline
    minimamba bench --model state-spaces/mamba-130m-hf --quantization int4 --eval-text held_out.txt

Every model is built from the same float32 weights and timed in turn within each
repeat (float32, then each quantized one), so a drift in the machine's load hits all
rows alike. The table gives each row's best decode and prefill, the spread of its
decode over the repeats, and its speed as a ratio to float32 taken repeat by
repeat (median, and min..max). --roofline adds the fraction of the memory-bandwidth
bound each decode reaches (bytes of weights read per token / bandwidth).

Accuracy, printed after the table:
  * logits error against float64 on the same weights (first 64 prompt tokens): max |diff|
    relative to max |logit|, for float32 and each quantized model. NOTE: random weights of
    the 130m shape (initializer_range 0.1) amplify any perturbation through the layers, so
    quantized logits there differ from float64 by O(1); a trained model's perplexity is the
    measure of what quantization costs;
  * with --eval-text PATH (and a checkpoint with a tokenizer, e.g. the built-in model when
    --model is omitted together with --shape): perplexity and mean next-token KL from float32.
"""

from __future__ import annotations

import math

import numpy as np


def _rows(model, schemes, block_sizes):
    from .quant import quantize

    rows = [("float32", model)]
    for block_size in block_sizes:
        for scheme in schemes:
            rows.append((f"{scheme} b{block_size}", quantize(model, scheme, block_size)))
    return rows


def _decode_bytes(model):
    """Bytes a decode step reads: every parameter once, plus the head once more when it is tied
    (the embedding table is read as the head; its single row as embedding is negligible)."""
    from .quant import weight_bytes

    total = weight_bytes(model)
    if model.config.tie_word_embeddings:
        return total
    return total - model.backbone.embeddings_weight.nbytes


def run_quant_bench(args):
    """`minimamba bench --quantization`: run_bench has checked the arguments and tuned the threads."""
    from . import threads
    from .bench import MinimambaRunner, _bench_model, measure_bandwidth, time_runner
    from .quant import SCHEMES, perplexity_table, weight_bytes

    schemes = SCHEMES if args.quantization == "both" else (args.quantization,)
    block_sizes = [int(b) for b in str(args.block_size).split(",")]
    source = args.model if args.model is not None else f"shape:{args.shape}"
    model = _bench_model(source, "float32", args.impl)
    rows = _rows(model, schemes, block_sizes)
    f32_bytes = weight_bytes(model)
    print(f"model      {args.model or 'random weights, ' + args.shape + ' shape'}: "
          f"{model.num_parameters() / 1e6:.1f} M parameters; impl {model.kernels.name}")
    print(f"run        batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.repeat} repeats, rows timed in turn within each repeat")
    print(f"threads    {threads.note()}")

    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, model.config.vocab_size, size=(args.batch, args.prompt_len), dtype=np.int64)
    runners = [(name, MinimambaRunner(m)) for name, m in rows]
    for _, runner in runners:  # compile and warm
        time_runner(runner, ids[:, :16], min(args.new_tokens, 2))
    prefill = {name: [] for name, _ in rows}
    decode = {name: [] for name, _ in rows}
    for _ in range(args.repeat):
        for name, runner in runners:
            t_prefill, t_decode, _, _ = time_runner(runner, ids, args.new_tokens)
            prefill[name].append(t_prefill)
            decode[name].append(t_decode)

    bandwidth = measure_bandwidth() if args.roofline else None
    if bandwidth:
        print(f"machine    memory bandwidth {bandwidth / 1e9:.1f} GB/s (best of a parallel sum and a copy)")
    n_dec = args.batch * args.new_tokens
    n_pre = args.batch * args.prompt_len
    print()
    print(f"{'weights':12}{'MB':>8}{'% f32':>7}{'prefill tok/s':>15}{'x f32':>7}{'decode tok/s':>14}"
          f"{'spread':>16}{'x f32 (median, min..max)':>28}{'% bw bound':>12}")
    for name, m in rows:
        nbytes = weight_bytes(m)
        ratios = sorted(a / b for a, b in zip(decode["float32"], decode[name])) if n_dec else [math.nan]
        pre_ratio = min(prefill["float32"]) / min(prefill[name])
        rates = sorted(n_dec / t for t in decode[name]) if n_dec else [math.nan]
        bound = ""
        if bandwidth and n_dec:
            step = min(decode[name]) / args.new_tokens
            bound = f"{_decode_bytes(m) / bandwidth / step:.0%}"
        print(f"{name:12}{nbytes / 1e6:>8.1f}{nbytes / f32_bytes:>7.1%}{n_pre / min(prefill[name]):>15.0f}"
              f"{pre_ratio:>7.2f}{rates[-1]:>14.1f}{f'{rates[0]:.1f}..{rates[-1]:.1f}':>16}"
              f"{f'{np.median(ratios):.2f} ({ratios[0]:.2f}..{ratios[-1]:.2f})':>28}{bound:>12}")

    print()
    _logits_error(model, rows, ids[:, :64])
    if args.eval_text:
        text_model = model if args.model is not None else _builtin()
        with open(args.eval_text, encoding="utf-8") as f:
            text = f.read()
        for block_size in block_sizes:
            n_tok, table = perplexity_table(text_model, text, schemes, block_size)
            print(f"\naccuracy   {args.eval_text}, {n_tok} tokens, model {text_model.name_or_path}")
            for name, ppl, kl, _ in table:
                rel = ppl / table[0][1] - 1
                print(f"  {name:12} perplexity {ppl:8.3f} ({rel:+.2%} vs float32)  mean KL from float32 {kl:.2e} nats")
    return 0


def _builtin():
    from .model import MambaForCausalLM
    return MambaForCausalLM.from_pretrained("builtin")


def _logits_error(model, rows, ids):
    """Each row's logits against a float64 run of the same float weights (`model`'s, not read again)."""
    from .model import MambaForCausalLM

    ref = MambaForCausalLM(model.config, dtype="float64", init=False).load_state_dict(model.state_dict())
    ref = ref(ids).logits  # (b, l, V)
    scale = np.abs(ref).max()
    print(f"logits vs float64 ({ids.shape[1]} tokens, max |logit| {scale:.2f}):")
    for name, m in rows:
        diff = np.abs(m(ids).logits.astype(np.float64) - ref)
        print(f"  {name:12} max |diff| {diff.max():.2e} ({diff.max() / scale:.2e} relative), "
              f"mean {diff.mean():.2e}")
