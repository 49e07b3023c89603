"""The float32 error envelope of minimamba on the 130m shape (random weights): docs/figures/error_envelope.png.

    python docs/error_envelope.py [--lengths 16,64,256,1024] [--out docs/figures/error_envelope.png]

The envelope of a tensor is max |float32 run - float64 run| over its elements
(minimamba.compare.error_envelope); it is shown here relative to max |float64|.
Left: every recorded tensor kind across the 24 layers (one prompt of 64 tokens),
i.e. how it grows with depth. Right: the last block's output and the logits
against the prompt length. Prints the figures as a table too.
"""

import argparse
import time

import numpy as np

from minimamba import MambaForCausalLM
from minimamba.bench import shape_config
from minimamba.compare import layer_of
from minimamba.model import init_weights


def relative_envelope(m32, m64, ids, names=True):
    r32, r64 = m32(ids, record=names).record, m64(ids, record=names).record
    return {n: float(np.abs(r32[n] - r64[n]).max() / np.abs(r64[n]).max()) for n in r64}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16,64,256,1024")
    parser.add_argument("--depth-length", type=int, default=64)
    parser.add_argument("--out", default="docs/figures/error_envelope.png")
    args = parser.parse_args()
    config = shape_config("130m")
    weights = init_weights(config, seed=0)
    m32 = MambaForCausalLM(config, dtype="float32", init=False).load_state_dict(weights)
    m64 = MambaForCausalLM(config, dtype="float64", init=False).load_state_dict(weights)
    rng = np.random.default_rng(0)

    t = time.perf_counter()
    ids = rng.integers(0, config.vocab_size, (1, args.depth_length))
    by_name = relative_envelope(m32, m64, ids)
    print(f"130m shape, random weights (seed 0), {args.depth_length} tokens ({time.perf_counter() - t:.0f}s)")
    kinds = {}
    for name, rel in by_name.items():
        layer = layer_of(name)
        if layer is not None:
            kind = name.split(f"layers.{layer}")[1].lstrip(".") or "block output"
            kinds.setdefault(kind, []).append((layer, rel))
    print(f"{'tensor':22s} " + " ".join(f"{'layer ' + str(i):>9s}" for i in (0, 5, 11, 17, 23)))
    for kind, points in kinds.items():
        values = dict(points)
        print(f"{kind:22s} " + " ".join(f"{values[i]:9.1e}" for i in (0, 5, 11, 17, 23)))
    print(f"{'norm_f':22s} {by_name['backbone.norm_f']:9.1e}   logits {by_name['lm_head']:9.1e}")

    lengths = [int(x) for x in args.lengths.split(",")]
    by_length = {"block 23 output": [], "logits": []}
    for length in lengths:
        ids = rng.integers(0, config.vocab_size, (1, length))
        rel = relative_envelope(m32, m64, ids, ["backbone.layers.23", "lm_head"])
        by_length["block 23 output"].append(rel["backbone.layers.23"])
        by_length["logits"].append(rel["lm_head"])
        print(f"length {length:5d}: block 23 output {rel['backbone.layers.23']:.1e}, logits {rel['lm_head']:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for kind, points in kinds.items():
        xs, ys = zip(*sorted(points))
        left.plot(xs, ys, marker=".", linewidth=1, label=kind)
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("max |f32 - f64| / max |f64|")
    left.set_title(f"130m shape, random weights, {args.depth_length} tokens", fontsize=9)
    left.legend(fontsize=6, ncol=2)
    for label, values in by_length.items():
        right.plot(lengths, values, marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("prompt length (tokens)")
    right.set_title("growth with sequence length", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
