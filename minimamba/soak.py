"""Long runs: decode many tokens through one cache, and prefill a very long prompt, watching memory and speed.

    python -m minimamba.soak                          # the built-in model: 20,000 decoded, 100,000 prefilled
    python -m minimamba.soak --shape 130m --decode 5000 --prefill 20000

Decoding carries a constant-size cache, so resident memory must stay flat and
tokens/s steady over the whole run; the report gives both per window of tokens.
Prefill of a long prompt runs through the cache in chunks; the report gives the
peak resident memory it added, once as one call (`logits_to_keep=1`, which still
returns the last hidden state of every position) and once fed chunk by chunk.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .bench import _bench_model, _rss_bytes, peak_rss, reset_peak_rss


def soak_decode(model, tokens, window=1000, seed=0):
    """Greedy decoding of `tokens` tokens, one at a time through one cache.

    Returns [(tokens so far, tok/s by the wall clock, tok/s per CPU-second of this process, RSS MB)] per
    window; the CPU-time rate is the steadier one on a shared machine.
    """
    from .cache import MambaCache

    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, (1, 8))
    for warm_up in (True, False):  # the first pass loads the kernels; only the second is measured
        cache = MambaCache(model.config, 1, dtype=model.dtype, backend=model.backend)
        logits = model(prompt, cache_params=cache, use_cache=True, logits_to_keep=1).logits  # (1, 1, V)
        if warm_up:
            for _ in range(20):
                logits = model(np.asarray(logits)[:, -1].argmax(-1)[:, None], cache_params=cache, use_cache=True).logits
    rows, t, cpu = [], time.perf_counter(), time.process_time()
    for i in range(1, tokens + 1):
        token = np.asarray(logits)[:, -1].argmax(-1)[:, None]  # (1, 1)
        logits = model(token, cache_params=cache, use_cache=True).logits  # (1, 1, V)
        if i % window == 0:
            now, now_cpu = time.perf_counter(), time.process_time()
            rows.append((i, window / (now - t), window / max(now_cpu - cpu, 1e-9), (_rss_bytes("VmRSS") or 0) / 1e6))
            t, cpu = now, now_cpu
    return rows


def soak_prefill(model, length, chunk=2048, seed=0):
    """Peak RSS added (MB) and tokens/s for a `length`-token prompt: one call, then fed chunk by chunk."""
    from .cache import MambaCache

    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, length))
    model(ids[:, :2 * chunk + 1], logits_to_keep=1)  # warm-up: kernels loaded for these shapes
    out = {}
    for how in ("one call", "chunk by chunk"):
        base = _rss_bytes("VmRSS") or 0
        can_reset = reset_peak_rss()
        t = time.perf_counter()
        if how == "one call":
            logits = model(ids, logits_to_keep=1).logits
        else:
            cache = MambaCache(model.config, 1, dtype=model.dtype, backend=model.backend)
            for s in range(0, length, chunk):
                logits = model(ids[:, s:s + chunk], cache_params=cache, use_cache=True, logits_to_keep=1).logits
        seconds = time.perf_counter() - t
        peak = (peak_rss()[0] - base) / 1e6 if can_reset else float("nan")
        out[how] = (peak, length / seconds, np.asarray(logits)[0, -1].copy())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimamba.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the built-in model)")
    p.add_argument("--shape", help="random weights of a checkpoint shape instead (see minimamba bench --shape)")
    p.add_argument("--decode", type=int, default=20000, help="tokens to decode")
    p.add_argument("--prefill", type=int, default=100000, help="prompt length to prefill")
    p.add_argument("--window", type=int, default=1000, help="tokens per reported window")
    p.add_argument("--impl", default=None)
    args = p.parse_args(argv)
    if 0 < args.decode < args.window:
        p.error(f"--decode {args.decode} is shorter than one --window ({args.window}): nothing to report")
    source = f"shape:{args.shape}" if args.shape else (args.model or "builtin")
    model = _bench_model(source, "float32", impl=args.impl)
    print(f"model {source}: {model.num_parameters():,} parameters, impl {args.impl or 'auto'}")
    if args.decode:
        rows = soak_decode(model, args.decode, args.window)
        print(f"decode {args.decode:,} tokens, one cache, windows of {args.window}:")
        for i, speed, cpu_speed, rss in sorted(set(rows[:2] + rows[len(rows) // 2:len(rows) // 2 + 1] + rows[-2:])):
            print(f"  after {i:>7,} tokens  {speed:8.0f} tok/s  {cpu_speed:8.0f} tok/CPU-s  RSS {rss:8.1f} MB")
        for column, name in ((1, "tok/s"), (2, "tok/CPU-s")):
            v = [r[column] for r in rows]
            print(f"  {name}: first window {v[0]:.0f}, last {v[-1]:.0f}, median {np.median(v):.0f}, min {min(v):.0f}, "
                  f"max {max(v):.0f}; last/first {v[-1] / v[0]:.2f}")
        print(f"  RSS: {rows[0][3]:.1f} MB after the first window, {rows[-1][3]:.1f} MB at the end "
              f"({rows[-1][3] - rows[0][3]:+.1f} MB over {args.decode - args.window:,} tokens)")
    if args.prefill:
        result = soak_prefill(model, args.prefill)
        for how, (peak, speed, _) in result.items():
            print(f"prefill {args.prefill:,} tokens, {how:>14}: {speed:8.0f} tok/s, peak RSS added {peak:7.1f} MB")
        a, b = (r[2] for r in result.values())
        print(f"  the two give the same last logits up to {float(np.abs(a - b).max()):.1e} (float32 rounding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
