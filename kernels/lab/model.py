"""The whole model on the GPU: logits against the CPU float64 path, prefill and decode beside transformers.

    python -m minimamba.kernels.lab.model [--quick] [--skip-transformers]     (a GPU with CuPy)

A random model of the 130m shape (float32 on the GPU, float64 on the CPU; nothing is downloaded):

- logits of a prefill and 4 decode steps through the cache, impl="cuda" and impl="numpy" on CuPy,
  against the CPU float64 path (the cross-checking issue's float32 envelope: no worse than
  transformers' own float32 error on the same weights);
- prefill tokens/s (512 and 8192 tokens, batch 1);
- decode tokens/s at batch 1 and 64: eager, and replayed from a CUDA graph (kernels/cuda_graph.py)
  with each version of lab/linear.py for the projections;
- transformers' PyTorch path on the same GPU and weights (saved with save_pretrained to a temporary
  folder): its logits error, prefill and decode (generate, greedy).

Results go into a dict whose keys kernels/gpu_check.py's table reads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from minimamba.kernels.lab.common import elapsed, say, wall

TORCH_DEVICE = "cuda"  # transformers runs here
SHAPE_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, conv_kernel=4, expand=2)


def torch_sync():
    import torch

    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def torch_wall(fn, reps, warmup=1):
    import torch

    with torch.no_grad():
        return wall(fn, reps, warmup, synchronize=torch_sync)


# ---------------------------------------------------------------- sections


def build_models(results):
    from minimamba import MambaConfig, MambaForCausalLM

    config = MambaConfig(**SHAPE_130M)
    t = time.perf_counter()
    host = MambaForCausalLM(config, seed=0, impl="numpy")  # float32 random weights, transformers' init
    say(f"random 130m-shape model: {host.num_parameters() / 1e6:.1f}M parameters ({time.perf_counter() - t:.1f}s)")
    state = host.state_dict()
    ref = MambaForCausalLM(config, dtype="float64", impl="numpy", init=False).load_state_dict(state)
    gpu = MambaForCausalLM(config, backend="cupy", impl="cuda", init=False).load_state_dict(state)
    folder = tempfile.mkdtemp(prefix="minimamba_gpu_check_")
    host.save_pretrained(folder)
    return dict(config=config, ref=ref, gpu=gpu, folder=folder)


def relative_error(got, ref):
    got = np.asarray(got, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max()), float(np.abs(got - ref).max())


def accuracy(models, results):
    import cupy

    from minimamba import MambaCache
    from minimamba.impl import resolve_impl

    config, ref, gpu = models["config"], models["ref"], models["gpu"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, 16))
    t = time.perf_counter()
    ref_cache = MambaCache(config, 2, dtype="float64")
    ref_logits = [ref(ids, cache_params=ref_cache, use_cache=True).logits]
    tokens = [ref_logits[0][:, -1].argmax(-1)[:, None]]
    for _ in range(4):
        ref_logits.append(ref(tokens[-1], cache_params=ref_cache, use_cache=True).logits)
        tokens.append(ref_logits[-1][:, -1].argmax(-1)[:, None])
    say(f"CPU float64 reference: prefill 2x16 + 4 decode steps ({time.perf_counter() - t:.1f}s)")
    models["ids"], models["ref_logits"] = ids, ref_logits

    for impl in ("cuda", "numpy"):
        kernels = resolve_impl(impl, "cupy")
        gpu.kernels = kernels
        cache = MambaCache(config, 2, backend=gpu.backend)
        got = [gpu(ids, cache_params=cache, use_cache=True).logits]
        for step in tokens[:-1]:
            got.append(gpu(step, cache_params=cache, use_cache=True).logits)
        errors = [relative_error(cupy.asnumpy(g), r) for g, r in zip(got, ref_logits)]
        rel, abs_ = max(e[0] for e in errors), max(e[1] for e in errors)
        no_cache = relative_error(cupy.asnumpy(gpu(ids).logits), ref(ids).logits)[0]
        say(f"GPU float32 impl={impl:5s} vs CPU float64: max rel err {rel:.2e} (max abs {abs_:.2e}) over "
            f"prefill + 4 decode steps; no-cache forward {no_cache:.2e}")
        results[f"err_{impl}"], results[f"err_{impl}_nocache"] = rel, no_cache
    gpu.kernels = resolve_impl("cuda", "cupy")


def prefill_bench(models, results, lengths):
    gpu, config = models["gpu"], models["config"]
    rng = np.random.default_rng(1)
    for length in lengths:
        ids = rng.integers(0, config.vocab_size, (1, length))
        reps = 3 if length <= 1024 else 2
        seconds = wall(lambda: gpu(ids, use_cache=True, logits_to_keep=1), reps=reps, warmup=1)
        results[f"prefill_{length}"] = length / seconds
        say(f"minimamba prefill {length:5d} tokens: {seconds * 1e3:8.2f} ms = {length / seconds:10.0f} tok/s")


def decode_bench(models, results, batch, eager_steps, graph_steps, linear=None):
    """Eager and CUDA-graph decode; with `linear` (a version name of lab/linear.py) the graph only, its
    projections on that version (the eager path uses cuBLAS, which no linear version touches)."""
    import cupy

    from minimamba import MambaCache
    from minimamba.kernels import cuda as kc
    from minimamba.kernels.cuda_graph import GraphDecodeStep
    from minimamba.kernels.lab.linear import VERSIONS

    gpu, config = models["gpu"], models["config"]
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, config.vocab_size, (batch, 16))
    weights = gpu.backbone.embeddings_weight

    def prefilled():
        cache = MambaCache(config, batch, backend=gpu.backend)
        logits = gpu(prompt, cache_params=cache, use_cache=True, logits_to_keep=1).logits
        return cache, logits[:, -1].argmax(axis=-1)

    def eager_step(cache, box):  # the graph's work, eagerly: tokens stay on the GPU, greedy pick
        logits = gpu(inputs_embeds=weights[box[0]][:, None, :], cache_params=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]
        box[0] = logits.argmax(axis=-1)
        return logits

    if linear is None:
        cache, tokens = prefilled()
        box = [tokens]
        seconds = wall(lambda: eager_step(cache, box), reps=eager_steps, warmup=2)
        results[f"decode_b{batch}_eager"] = batch / seconds
        say(f"minimamba decode batch {batch:2d}, eager: {seconds * 1e3:7.2f} ms/step = {batch / seconds:9.0f} tok/s")

    # graph replay, checked against eager steps from the same prefilled state
    key = f"b{batch}" + (f"_{linear}" if linear else "")
    label = f"CUDA graph, linear {linear or 'of the library'}"
    eager_cache, eager_tokens = prefilled()
    graph_cache, graph_tokens = prefilled()
    saved = kc.linear
    if linear:  # decode_logits looks kc.linear up at each call: this version is the one captured
        kc.linear = next(func for _, name, _, func in VERSIONS if name == linear)
    try:
        step = GraphDecodeStep(gpu, graph_cache, greedy=True)
    except Exception as err:  # noqa: BLE001 - e.g. CuPy refusing cuBLAS calls during capture
        say(f"CUDA graph capture failed: {type(err).__name__}: {err}")
        results[f"decode_{key}_graph_error"] = f"{type(err).__name__}: {err}"
        return
    finally:
        kc.linear = saved
    step.tokens[...] = graph_tokens
    box = [eager_tokens]
    diffs = [float(cupy.abs(step() - eager_step(eager_cache, box)).max()) for _ in range(3)]
    say(f"graph ({label}) vs eager logits over 3 greedy steps: max abs diff {max(diffs):.2e}")
    results[f"graph_diff_{key}"] = max(diffs)
    seconds = wall(step, reps=graph_steps, warmup=2)
    results[f"decode_{key}_graph"] = batch / seconds
    say(f"minimamba decode batch {batch:2d}, {label}: {seconds * 1e3:7.3f} ms/step = {batch / seconds:9.0f} tok/s")


def launch_overhead(models, results):
    import cupy

    from minimamba.kernels import cuda as kc

    d, n = 1536, 16
    state = cupy.zeros((1, d, n), dtype=cupy.float32)
    x = cupy.ones((1, d), dtype=cupy.float32)
    A = -cupy.ones((d, n), dtype=cupy.float32)
    B = cupy.ones((1, n), dtype=cupy.float32)
    D = cupy.ones((d,), dtype=cupy.float32)
    seconds = wall(lambda: kc.selective_state_update(state, x, x, A, B, B, D=D, z=x, dt_bias=D, dt_softplus=True),
                   reps=300, warmup=3)
    say(f"selective_state_update call (b=1, 130m shape), wall: {seconds * 1e6:.1f} us per call")
    seconds_cupy = wall(lambda: x + 1, reps=300, warmup=3)
    say(f"a one-kernel CuPy op (x + 1), wall: {seconds_cupy * 1e6:.1f} us per call")
    # where a numba launch spends its time: building the argument views, then launching
    arrays = [state, x, x, A, B[:, None, :], B[:, None, :], D, x, D, x]
    seconds = wall(lambda: [kc._arg(a) for a in arrays], reps=300, warmup=3)
    say(f"  10 kernel-argument views (_DeviceView): {seconds * 1e6:.1f} us")
    views = [kc._arg(a) for a in arrays]
    kernel = kc._kernel("state_update", n, "float32")
    seconds = wall(lambda: kernel[12, 128, 0](*views, 1, 1, 1, 1), reps=300, warmup=3)
    say(f"  numba launch of state_update with prepared views: {seconds * 1e6:.1f} us")
    from numba import cuda

    @cuda.jit
    def empty(a):
        pass

    seconds = wall(lambda: empty[1, 32, 0](views[0]), reps=300, warmup=3)
    say(f"  numba launch of an empty kernel with one array: {seconds * 1e6:.1f} us")
    results["launch_us"] = seconds * 1e6


def transformers_bench(models, results, lengths, decode_batches, budget):
    import torch
    import transformers

    folder, config, ref = models["folder"], models["config"], models["ref"]
    try:
        model = transformers.MambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except TypeError:
        model = transformers.MambaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model = model.to(TORCH_DEVICE).eval()
    say(f"transformers {transformers.__version__} MambaForCausalLM on {next(model.parameters()).device}, "
        f"fast kernels: {getattr(model.backbone.layers[0].mixer, 'use_fast_kernels', 'n/a')}")

    ids = torch.tensor(models["ids"], device=TORCH_DEVICE)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu().numpy()
    rel, abs_ = relative_error(logits, ref(models["ids"]).logits)
    results["err_torch"] = rel
    say(f"transformers GPU float32 vs CPU float64 (no cache): max rel err {rel:.2e} (max abs {abs_:.2e})")

    def forward(x):
        try:
            return model(x, use_cache=True, logits_to_keep=1)
        except TypeError:
            return model(x, use_cache=True)

    rng = np.random.default_rng(1)
    for length in lengths:
        if elapsed() > budget:
            say(f"transformers prefill {length}: skipped (time budget)")
            continue
        x = torch.tensor(rng.integers(0, config.vocab_size, (1, length)), device=TORCH_DEVICE)
        reps, warmup = (2, 1) if length <= 1024 else (1, 0)
        seconds = torch_wall(lambda: forward(x), reps=reps, warmup=warmup)
        results[f"torch_prefill_{length}"] = length / seconds
        say(f"transformers prefill {length:5d} tokens: {seconds * 1e3:9.1f} ms = {length / seconds:9.0f} tok/s")

    for batch in decode_batches:
        if elapsed() > budget:
            say(f"transformers decode batch {batch}: skipped (time budget)")
            continue
        prompt = torch.tensor(rng.integers(0, config.vocab_size, (batch, 8)), device=TORCH_DEVICE)
        steps = 32

        def gen(new):
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)

        one = torch_wall(lambda: gen(1), reps=2, warmup=1)
        many = torch_wall(lambda: gen(steps + 1), reps=1, warmup=0)
        seconds = (many - one) / steps
        results[f"torch_decode_b{batch}"] = batch / seconds
        say(f"transformers decode batch {batch:2d} (generate, greedy): {seconds * 1e3:7.2f} ms/step = "
            f"{batch / seconds:8.0f} tok/s")


# ---------------------------------------------------------------- table



def run_all(results, quick=False, transformers=True, budget=float("inf"), guard=None):
    """Every section above, in order; `guard(title, func)` runs one (gpu_check's: logs an error and goes on)."""
    guard = guard or (lambda title, func: (say(f"\n=== {title}"), func()))
    models = {}
    lengths = (512,) if quick else (512, 8192)
    guard("random 130m-shape model (float32 on the GPU, float64 on the CPU)",
          lambda: models.update(build_models(results)))
    if not models:
        return models
    guard("logits: GPU float32 vs CPU float64", lambda: accuracy(models, results))
    sections = [
        ("launch overhead", lambda: launch_overhead(models, results)),
        ("minimamba prefill", lambda: prefill_bench(models, results, lengths)),
        ("minimamba decode, batch 1", lambda: decode_bench(models, results, 1, 16 if quick else 48,
                                                           64 if quick else 300)),
        ("minimamba decode, batch 64", lambda: decode_bench(models, results, 64, 8 if quick else 24,
                                                            32 if quick else 100)),
    ]
    from minimamba.kernels.lab.linear import VERSIONS

    for number, name, _, _ in VERSIONS[1:]:  # version 1 is the library's, timed just above
        sections += [(f"minimamba decode, batch {batch}, CUDA graph with lab linear {number} {name}",
                      lambda batch=batch, name=name: decode_bench(models, results, batch, 0,
                                                                  (32 if quick else 100) if batch > 1 else
                                                                  (64 if quick else 300), linear=name))
                     for batch in (64, 1)]
    if transformers:
        sections.append(("transformers (PyTorch path) on the same GPU and weights",
                         lambda: transformers_bench(models, results, lengths, (1, 64), budget + 60)))
    for title, func in sections:
        if elapsed() > budget:
            say(f"\n=== {title}\nskipped: past the time budget ({elapsed():.0f}s > {budget:.0f}s)")
            continue
        guard(title, func)
    return models


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minimamba.kernels.lab.model", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, prefill of 512 tokens only")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    run_all(results, quick=args.quick, transformers=not args.skip_transformers)
    for key, value in sorted(results.items()):
        say(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
