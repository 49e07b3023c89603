"""Training throughput, side by side: minimamba (NumPy + Numba) vs transformers (PyTorch CPU).

    python -m minimamba.training.bench_train                       # the built-in model's shape
    python -m minimamba.training.bench_train --hidden-size 768 --layers 2 --batch-size 4

Needs numba, and torch + transformers for the comparison (from the repository:
pip install -e '.[fast,crosscheck]'); --skip-torch times minimamba alone.

One training step on each side is the same work: forward, next-token loss,
backward through every parameter, AdamW update, for the same model shape and
the same batch of random token ids. Steps alternate between the two (one of
ours, one of theirs), so both see the same load on a shared machine; the median
step time gives tokens/s. Both use the same number of threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-torch", action="store_true", help="time minimamba only")
    return p.parse_args(argv)


def minimamba_step_fn(config, ids):
    from ..model import init_weights
    from .grad import TrainingModel
    from .optim import AdamW, clip_grad_norm

    params = {k: np.array(v, dtype=np.float32) for k, v in init_weights(config, 0).items()}
    model = TrainingModel(config, params)
    opt = AdamW(model.trainable(), lr=1e-3)

    def step():
        loss, grads = model.loss_and_grad(ids)
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        return loss

    return step


def torch_step_fn(config, ids):
    import torch
    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(HFConfig(**config.to_dict())).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.from_numpy(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step


def main(argv=None):
    args = parse_args(argv)
    from ..config import MambaConfig
    from ..weights import expected_shapes

    config = MambaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         state_size=args.state_size, initializer_range=0.02)
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (args.batch_size, args.seq_len))
    tokens = args.batch_size * args.seq_len
    n_params = sum(int(np.prod(s)) for s in expected_shapes(config).values())
    print(f"model: d={args.hidden_size} layers={args.layers} n={args.state_size} V={args.vocab_size} "
          f"({n_params:,} parameters); batch {args.batch_size} x {args.seq_len} = {tokens} tokens per step; "
          f"{args.threads} threads")
    missing = [m for m in ("numba",) + (() if args.skip_torch else ("torch", "transformers"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench_train needs {', '.join(missing)}: pip install {' '.join(missing)} (from the "
                         "repository: pip install -e '.[fast,crosscheck]'); --skip-torch times minimamba alone")
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    sides = {"minimamba (NumPy + Numba)": minimamba_step_fn(config, ids)}
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        sides[f"transformers {transformers.__version__} (PyTorch {torch.__version__} CPU)"] = torch_step_fn(config, ids)
    times = {name: [] for name in sides}
    for name, step in sides.items():  # warm-up: JIT compilation, allocator, first-touch
        step()
    for _ in range(args.steps):
        for name, step in sides.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = tokens / med
        print(f"{name:50s} {med:8.3f} s/step  {tokens / med:10,.0f} tokens/s  (steps: "
              + ", ".join(f"{t:.2f}" for t in ts) + ")")
    if len(results) == 2:
        ours, theirs = results.values()
        print(f"speed-up: {ours / theirs:.2f}x")
    return results


if __name__ == "__main__":
    main()
