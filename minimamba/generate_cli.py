"""`minimamba generate "PROMPT" --model PATH_OR_REPO`: stream a continuation to stdout.

    minimamba generate "ROMEO:" --max-new-tokens 60                 # the built-in model
    minimamba generate "The Mamba" --model state-spaces/mamba-130m-hf --temperature 0
    echo "prompt from a pipe" | minimamba generate - --seed 0

The text appears as it is made; a last line on stderr gives the speed of the
prefill (the prompt, in one pass) and of the decode (one token at a time).
Ctrl-C stops, keeping what was printed (exit code 130).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .helpfmt import DefaultsHelpFormatter


def _number(kind, ok, what):
    """An argparse type: parse with `kind`, then check `ok` (errors become usage errors)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or not ok(value):  # value != value: nan
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="continue a prompt, streaming the text as it is made",
                       description=__doc__.split("\n\n")[0].replace("`", ""), formatter_class=DefaultsHelpFormatter)
    p.add_argument("prompt", help="the text to continue; '-' reads it from stdin")
    p.add_argument("--model", default=None, help="checkpoint folder, Hub repo id, or 'builtin' "
                   "(the default: the 2.3M-parameter Shakespeare model shipped with minimamba)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (e.g. from minimamba finetune) "
                   "applied to the model, unmerged; alone, its base_model_name_or_path names the model")
    p.add_argument("--merge-adapter", action="store_true",
                   help="merge the adapter into the weights (faster; the tied head then changes too)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, or a folder / repo holding one "
                   "(default: the model's)")
    p.add_argument("--max-new-tokens", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=100,
                   help="stop after this many new tokens (or at <|endoftext|>); 0 runs only the prefill")
    p.add_argument("--temperature", type=_number(float, lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=0.8, help="0 means greedy: always the most likely token")
    p.add_argument("--top-k", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=0,
                   help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                   help="sample among the most likely tokens covering this much probability (1: off)")
    p.add_argument("--min-p", type=_number(float, lambda v: 0 <= v <= 1, "in [0, 1]"), default=None,
                   help="drop tokens less likely than min-p times the most likely one (default: off)")
    p.add_argument("--repetition-penalty", type=_number(float, lambda v: 0 < v < float("inf"), "a number > 0"),
                   default=1.0, help="> 1 discourages tokens already in the text (1: off)")
    p.add_argument("--seed", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=None,
                   help="same seed, same text (default: a fresh one each run)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after <|endoftext|>")
    p.add_argument("--no-echo", dest="echo", action="store_false",
                   help="print only the new text (without it, the prompt is printed first)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array library")
    p.add_argument("--impl", choices=("auto", "reference", "numpy", "numba", "cuda"), default="auto",
                   help="which scan and conv kernels to run (auto: NumPy or Numba per call, whichever is faster)")
    p.add_argument("--quantization", choices=("int8", "int4"), default=None,
                   help="quantize the weights as they load (llama.cpp's Q8_0 / Q4_0 blocks; see minimamba.quant)")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args):
    try:
        return _generate(args)
    except KeyboardInterrupt:  # while loading: nothing printed yet
        print("\ninterrupted", file=sys.stderr)
        return 130
    except FloatingPointError as err:
        raise RuntimeError(str(err)) from None


def _generate(args):
    from .pipeline import load

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty" + (" (nothing on stdin)" if args.prompt == "-" else ""))
    model, tokenizer = load(args.model, args.tokenizer, dtype=args.dtype, backend=args.backend,
                            impl=None if args.impl == "auto" else args.impl, adapter=args.adapter,
                            merge_adapter=args.merge_adapter)
    if args.quantization:  # a quantized copy; the float model stays in load()'s cache
        from .quant import quantize
        model = quantize(model, args.quantization)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = [] if args.ignore_eos or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    if args.max_new_tokens == 0:  # the prefill alone: its speed, and nothing to print but the prompt
        start = time.perf_counter()
        model(prompt_ids, use_cache=True, logits_to_keep=1)
        if args.echo:
            print(prompt)
        print(speed_line(len(prompt_ids), start, [time.perf_counter()]) + " | no new tokens (--max-new-tokens 0)",
              file=sys.stderr)
        return 0
    out = sys.stdout
    stream = tokenizer.stream(prompt_ids)
    times = []  # when each new token arrived

    def on_token(next_tokens):  # (1,) the new token
        times.append(time.perf_counter())
        if int(next_tokens[0]) not in eos:
            out.write(stream.put(next_tokens))
            out.flush()

    code = 0
    start = time.perf_counter()
    try:
        if args.echo:
            out.write(prompt)
            out.flush()
        model.generate(prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, eos_token_id=eos, pad_token_id=pad,
                       seed=args.seed, streamer=on_token)
        out.write(stream.flush() + "\n")
        out.flush()
    except KeyboardInterrupt:
        code = 130  # 128 + SIGINT, as a shell reports it; what was printed stays
        out.write(stream.flush() + "\n")
        out.flush()
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit-time flush does not complain
    print(speed_line(len(prompt_ids), start, times) + (" (interrupted)" if code else ""), file=sys.stderr)
    return code


def speed_line(n_prompt, start, times):
    """'prefill 12 tokens 0.010 s (1200 tokens/s) | decode 99 tokens 0.5 s (198 tokens/s)'."""
    if not times:
        return f"prefill {n_prompt} tokens: interrupted before the first new token"
    prefill = times[0] - start  # the prompt's pass plus choosing the first token
    line = f"prefill {n_prompt} tokens {prefill:.3f} s ({n_prompt / max(prefill, 1e-9):.0f} tokens/s)"
    decode = times[-1] - times[0]  # each later token is one step through the cache
    n = len(times) - 1
    if n:
        line += f" | decode {n} tokens {decode:.3f} s ({n / max(decode, 1e-9):.1f} tokens/s)"
    return line
