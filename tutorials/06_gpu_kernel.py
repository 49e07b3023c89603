# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Writing and checking a GPU kernel
#
# The selective scan is the one part of Mamba that is neither a matmul nor elementwise:
# a recurrence over time. The paper's hardware-aware scan (Section 3.3.2) keeps the state
# `h` in fast on-chip memory and never writes the (b, l, d, n) states to HBM. Its simplest
# form: **one GPU thread per (batch, channel)**, looping over `l`, with the `n` state
# values in registers. Here we write that kernel with Numba, run it under Numba's CUDA
# **simulator** (no GPU needed: it runs each thread in Python), check it against the
# reference loop, then check the library's kernel `minimamba.kernels.cuda` the same way.
# Finally: how to check *your own* kernel against minimamba in float64, layer by layer.
#
# The simulator must be switched on before numba is imported.

# %%
import math
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported

import matplotlib.pyplot as plt
import numpy as np
from numba import cuda

import minimamba.kernels.cuda as mm_cuda
from minimamba import MambaConfig, MambaForCausalLM
from minimamba.ops import selective_scan_ref
from _common import EPS32, FIGURES, check  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)
print("CUDA simulator:", os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")


# %% [markdown]
# ## 1. The kernel, step by step
#
# Each thread owns one (batch `i`, channel `c`) pair. Its `n` state values live in a
# `cuda.local.array` (registers on a real GPU). For every time step it reads one `u`,
# one `delta`, the shared `B_t` and `C_t` (n values each), updates its state and writes
# one output. `N_MAX` is a compile-time bound on the state size (local arrays need one).

# %%
N_MAX = 16


@cuda.jit
def scan_kernel(u, delta, A, B, C, D, out):
    """u, delta, out (b, d, l); A (d, n); B, C (b, n, l); D (d,). delta already softplus'ed."""
    tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x  # one thread per (i, c)
    b, d, l = u.shape
    n = A.shape[1]
    if tid >= b * d:  # the grid is rounded up to whole blocks: spare threads do nothing
        return
    i, c = tid // d, tid % d
    h = cuda.local.array(N_MAX, np.float32)  # the state, in registers
    for s in range(n):
        h[s] = 0.0
    for t in range(l):
        dt = delta[i, c, t]
        x = u[i, c, t]
        y = 0.0
        for s in range(n):
            h[s] = math.exp(dt * A[c, s]) * h[s] + dt * B[i, s, t] * x  # ZOH for A, Euler for B
            y += C[i, s, t] * h[s]  # C_t . h_t
        out[i, c, t] = y + D[c] * x  # skip connection

# %% [markdown]
# Launch: `threads` per block, enough blocks to cover `b * d` threads. We pick shapes
# that do **not** divide the block size, so the bounds check matters.

# %%
b, d, l, n = 2, 5, 7, 3  # (b, d, l, n): tiny, the simulator runs every thread in Python
u = rng.standard_normal((b, d, l)).astype(np.float32)  # (b, d, l)
delta = np.log1p(np.exp(rng.standard_normal((b, d, l)))).astype(np.float32)  # (b, d, l) softplus'ed
A = -np.exp(rng.standard_normal((d, n))).astype(np.float32)  # (d, n)
B = rng.standard_normal((b, n, l)).astype(np.float32)  # (b, n, l)
C = rng.standard_normal((b, n, l)).astype(np.float32)  # (b, n, l)
D = rng.standard_normal(d).astype(np.float32)  # (d,)
out = np.zeros((b, d, l), np.float32)  # (b, d, l)
threads = 4
blocks = (b * d + threads - 1) // threads  # 10 threads needed -> 3 blocks of 4
scan_kernel[blocks, threads](u, delta, A, B, C, D, out)

# float32 kernel vs the float64 reference loop: each step adds a few float32 roundings,
# so the error stays within a few hundred eps32 over 7 steps.
ref = selective_scan_ref(u.astype(np.float64), delta.astype(np.float64), A.astype(np.float64),
                         B.astype(np.float64), C.astype(np.float64), D=D.astype(np.float64))
check("our kernel vs selective_scan_ref (float64)", out, ref, rtol=200 * EPS32)

# %% [markdown]
# ## 2. The library's kernel, checked the same way
#
# `minimamba.kernels.cuda.selective_scan_fn` takes the arguments of
# `minimamba.ops.selective_scan_fn` (mamba_ssm's names and layouts) and fuses more:
# softplus of `delta + delta_bias`, the `silu(z)` gate and the final state for the cache.
# Under the simulator it accepts NumPy arrays; on a GPU it takes CuPy arrays zero-copy.

# %%
z = rng.standard_normal((b, d, l)).astype(np.float32)  # (b, d, l)
delta_bias = rng.standard_normal(d).astype(np.float32)  # (d,)
raw_delta = rng.standard_normal((b, d, l)).astype(np.float32)  # before softplus
kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=True)
y_gpu, h_gpu = mm_cuda.selective_scan_fn(u, raw_delta, A, B, C, **kwargs)  # (b, d, l), (b, d, n)
to64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
y_ref, h_ref = selective_scan_ref(u.astype(np.float64), raw_delta.astype(np.float64), A.astype(np.float64),
                                  B.astype(np.float64), C.astype(np.float64), **to64)
check("minimamba.kernels.cuda scan: output", y_gpu, y_ref, rtol=200 * EPS32)
check("minimamba.kernels.cuda scan: final state", h_gpu, h_ref, rtol=200 * EPS32)

# %% [markdown]
# ## 3. Checking your own kernel against minimamba, layer by layer, in float64
#
# A kernel can be right on random inputs and still drift inside a model. The recipe:
# run minimamba in **float64** as ground truth, run the model with your kernel in float32,
# and compare every layer's output (`output_hidden_states=True`). Here "your kernel" is
# the float32 model on the readable NumPy kernels; the figure shows the error per layer,
# which is what a correct float32 kernel should look like: near eps32, growing slowly.

# %%
config = MambaConfig(vocab_size=97, hidden_size=32, state_size=N_MAX, num_hidden_layers=6, conv_kernel=4,
                     initializer_range=0.02)
truth = MambaForCausalLM(config, dtype="float64", impl="reference", seed=0)
mine = MambaForCausalLM(config, dtype="float32", impl="numpy", seed=0)
ids = rng.integers(0, config.vocab_size, (2, 24))  # (b, l)
hs64 = truth(ids, output_hidden_states=True).hidden_states  # 6 layers + norm_f, each (b, l, d)
hs32 = mine(ids, output_hidden_states=True).hidden_states
rel = [float(np.abs(a - b_).max() / np.abs(b_).max()) for a, b_ in zip(hs32, hs64)]
for i, r in enumerate(rel):
    print(f"layer {i if i < len(rel) - 1 else 'norm_f'}: max rel error {r:.2e} ({r / EPS32:.0f} eps32)")
assert max(rel) < 1000 * EPS32, "a float32 model should stay within ~1000 eps32 of float64 over 6 layers"

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(range(len(rel)), rel, "o-", label="float32 model vs float64 truth")
ax.axhline(EPS32, color="gray", ls=":", label="eps32")
ax.set_xticks(range(len(rel)), [str(i) for i in range(len(rel) - 1)] + ["norm_f"])
ax.set_xlabel("layer output")
ax.set_ylabel("max relative error")
ax.set_title("per-layer error against minimamba float64")
ax.legend()
fig.savefig(FIGURES / "06_error_per_layer.png", dpi=110, bbox_inches="tight")
print("saved", FIGURES / "06_error_per_layer.png")

# %% [markdown]
# ![per-layer error of a float32 model against the float64 truth](figures/06_error_per_layer.png)
#
# On a GPU, the same check runs with `MambaForCausalLM(..., backend="cupy", impl="cuda")`
# against the float64 CPU model; `python -m minimamba.kernels.gpu_check` does exactly that
# on a 130m-shape model. A kernel with an indexing bug shows up here as one layer whose
# error jumps by orders of magnitude, which points straight at where to look.
