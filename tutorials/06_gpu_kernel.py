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
# **simulator** (no GPU needed: it runs each thread in Python) and check it against the
# reference loop. Then three things the simulator cannot show, because they are about
# the hardware: where the state really lives (registers or local memory), which
# precision the sum runs in, and how the threads of a warp read memory. Then the
# library's kernel `minimamba.kernels.cuda`, checked the same way, and finally how to
# check *your own* kernel against minimamba in float64, layer by layer, including what
# a buggy kernel looks like there.
#
# The simulator must be switched on before numba is imported.

# %%
import math
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported

import matplotlib.pyplot as plt
import numpy as np
from numba import cuda, njit

import minimamba.kernels.cuda as mm_cuda
from minimamba import MambaConfig, MambaForCausalLM
from minimamba.ops import selective_scan_fn, selective_scan_ref, silu, softplus
from _common import EPS32, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)
print("CUDA simulator:", os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")


# %% [markdown]
# ## 1. The kernel, step by step
#
# Each thread owns one (batch `i`, channel `c`) pair. Its `n` state values live in a
# `cuda.local.array`. For every time step it reads one `u`, one `delta`, the shared
# `B_t` and `C_t` (n values each), updates its state and writes one output. `N_MAX` is
# a compile-time bound on the state size (a local array needs a constant size). This
# first version is the one you would write first; section 2 says what is wrong with it.

# %%
N_MAX = 16


@cuda.jit
def scan_kernel(u, delta, A, B, C, D, out):
    """u, delta, out (b, d, l); A (d, n); B, C (b, n, l); D (d,). delta already softplus'ed."""
    tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x  # one thread per (i, c)
    b, d, l = u.shape
    n = A.shape[1]  # known only at run time
    if tid >= b * d:  # the grid is rounded up to whole blocks: spare threads do nothing
        return
    i, c = tid // d, tid % d
    h = cuda.local.array(N_MAX, np.float32)  # the state
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
to64 = lambda *arrays: [a.astype(np.float64) for a in arrays]  # noqa: E731
ref = selective_scan_ref(*to64(u, delta, A, B, C), D=D.astype(np.float64))  # (b, d, l)
check("our kernel vs selective_scan_ref (float64)", out, ref, rtol=200 * EPS32)

# %% [markdown]
# ## 2. What the simulator does not show
#
# The check passes, and on a GPU this kernel would give the same numbers. It would
# still be slow, for three reasons that only the hardware sees.
#
# **Registers or local memory.** Registers cannot be indexed at run time: the compiler
# keeps `h[s]` in registers only if it can unroll every loop over `s` and turn each
# `h[s]` into a fixed register. Here the loops run to `n = A.shape[1]`, known only at
# run time, so the array goes to *local memory* — per-thread memory that lives in the
# same DRAM as everything else (cached in L1) — and every step of every state does a
# load and a store there. The library builds **one kernel per `n`** (and dtype) from a
# factory, in which `n` is a constant of the closure: the loops have a compile-time
# trip count, unroll, and the state stays in registers (`kernels/cuda.py`,
# `_scan_functions(n, dtype)`). On a machine with the CUDA toolkit,
# `cuda.compile_ptx` shows the difference: `.local` declarations and `ld.local` /
# `st.local` in the PTX of the first kind, none in the second.
#
# **The precision of `y`.** `y = 0.0` is a Python float, which Numba types as float64;
# `y += C * h` with float32 operands then stays float64 (Numba unifies a variable's
# type over all its assignments). So the sum runs in float64: harmless for accuracy,
# but on most GPUs float64 arithmetic is 2x (data-centre parts) to 64x (consumer
# parts) slower than float32. Numba's CUDA target types code as its CPU target does, so
# `njit` shows the typing without a GPU: the same loop returns a float64 for float32
# inputs, unless the accumulator starts as a float32 zero (the library's kernels take
# their constants from the dtype, `np.float32(0.0)`).

# %%
def dot_python_zero(c, h):
    y = 0.0  # a float64 literal
    for s in range(h.shape[0]):
        y += c[s] * h[s]
    return y


def dot_typed_zero(c, h):
    y = np.float32(0.0)  # a float32 zero: the sum stays float32
    for s in range(h.shape[0]):
        y += c[s] * h[s]
    return y


c32, h32 = np.ones(4, np.float32), np.ones(4, np.float32)
typed = {}
for func in (dot_python_zero, dot_typed_zero):
    jitted = njit(func)
    jitted(c32, h32)  # compile for float32 arrays
    typed[func.__name__] = str(jitted.nopython_signatures[0].return_type)
    print(f"{func.__name__}(float32[:], float32[:]) -> {typed[func.__name__]}")
assert typed == {"dot_python_zero": "float64", "dot_typed_zero": "float32"}

# %% [markdown]
# **How a warp reads memory.** A GPU runs threads in warps of 32 that execute each load
# together; the memory system serves a warp's load in 32-byte *sectors*, so a load is
# cheap when the 32 threads read neighbouring addresses (*coalesced*: 32 float32 = 128
# bytes = 4 sectors) and 8x dearer when each thread needs its own sector. Our threads
# are consecutive channels `c` at the same step `t`. In a (b, d, l) array those reads
# are `l` floats apart: one sector per thread. The library's model keeps its
# activations in (b, l, d) memory (the layout the matmuls produce) and hands the kernel
# (b, d, l) *views* of them (a transpose changes the strides, not the memory), so the
# same indexing `u[i, c, t]` reads 32 neighbouring floats. `B[i, s, t]` and
# `C[i, s, t]` are the same address for the whole warp (one sector, broadcast).
#
# Counting sectors from the strides, for a warp of channels 0..31 at one step:

# %%
def sectors_per_warp(array, t=0):
    """32-byte sectors touched when threads c = 0..31 each read array[0, c, t] (offsets from the strides)."""
    offsets = np.arange(32) * array.strides[1] + t * array.strides[2]  # bytes from array[0, 0, 0]
    return len(set(offsets // 32))


d_big, l_big = 1536, 4096  # the channels and a prompt length of a 1.4B-class model
u_bdl = np.zeros((1, d_big, l_big), np.float32)  # (b, d, l) memory, as in section 1
u_bld = np.zeros((1, l_big, d_big), np.float32).transpose(0, 2, 1)  # (b, d, l) view of (b, l, d) memory
print(f"(b, d, l) memory: strides {u_bdl.strides} -> {sectors_per_warp(u_bdl)} sectors per warp load")
print(f"(b, l, d) memory: strides {u_bld.strides} -> {sectors_per_warp(u_bld)} sectors per warp load")
assert (sectors_per_warp(u_bdl), sectors_per_warp(u_bld)) == (32, 4)  # 32 x 32 bytes moved vs 4 x 32

# %% [markdown]
# The same kernel, built the library's way: a factory that fixes `n` and the dtype, a
# zero of the kernel's dtype, and `u`, `delta` and `out` in (b, l, d) memory. The
# library passes (b, d, l) views of such arrays (on a GPU a CuPy view passes as it is;
# the simulator copies its arguments and refuses strided views), so here the kernel
# takes the (b, l, d) arrays themselves and indexes `u[i, t, c]`: the same reads. It
# must give the same numbers as the first version.

# %%
def make_scan_kernel(n, dtype):
    """One kernel per state size n and dtype, as minimamba.kernels.cuda builds them."""
    N = n  # a closure constant: `range(N)` has a compile-time trip count, the loops unroll
    ZERO = np.dtype(dtype).type(0.0)  # a zero of the kernel's dtype: y accumulates in float32

    @cuda.jit
    def scan_kernel_n(u, delta, A, B, C, D, out):
        """u, delta, out (b, l, d); A (d, n); B, C (b, n, l); D (d,)."""
        tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        b, l, d = u.shape
        if tid >= b * d:
            return
        i, c = tid // d, tid % d  # consecutive threads: consecutive channels, coalesced in (b, l, d) memory
        h = cuda.local.array(N, dtype)  # registers: every h[s] has a fixed index after unrolling
        for s in range(N):
            h[s] = ZERO
        for t in range(l):
            dt = delta[i, t, c]  # threads c, c+1, ... read neighbouring floats
            x = u[i, t, c]
            y = ZERO
            for s in range(N):
                h[s] = math.exp(dt * A[c, s]) * h[s] + dt * B[i, s, t] * x
                y += C[i, s, t] * h[s]
            out[i, t, c] = y + D[c] * x

    return scan_kernel_n


u_t, delta_t = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (u, delta))  # (b, l, d) each
out_t = np.zeros((b, l, d), np.float32)  # (b, l, d)
make_scan_kernel(n, np.float32)[blocks, threads](u_t, delta_t, A, B, C, D, out_t)
# On a GPU section 1's y sums in float64 and this one in float32: a few eps32 apart. The simulator runs the
# kernels as Python on NumPy scalars, where 0.0 + float32 stays float32 (NumPy's NEP 50), so here both sum
# in float32 and agree exactly: one more thing the simulator does not show.
check("factory kernel, (b, l, d) memory vs section 1", out_t.transpose(0, 2, 1), out, rtol=20 * EPS32)

# %% [markdown]
# ## 3. The library's kernel, checked the same way
#
# `minimamba.kernels.cuda.selective_scan_fn` takes the arguments of
# `minimamba.ops.selective_scan_fn` (mamba_ssm's names and layouts) and fuses more:
# softplus of `delta + delta_bias`, the `silu(z)` gate and the final state for the cache.
# Its output is a (b, d, l) view of (b, l, d) memory, as above. Under the simulator it
# accepts NumPy arrays; on a GPU it takes CuPy arrays zero-copy.

# %%
z = rng.standard_normal((b, d, l)).astype(np.float32)  # (b, d, l)
delta_bias = rng.standard_normal(d).astype(np.float32)  # (d,)
raw_delta = rng.standard_normal((b, d, l)).astype(np.float32)  # (b, d, l) before softplus
kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=True)
y_gpu, h_gpu = mm_cuda.selective_scan_fn(u, raw_delta, A, B, C, **kwargs)  # (b, d, l), (b, d, n)
kwargs64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
y_ref, h_ref = selective_scan_ref(*to64(u, raw_delta, A, B, C), **kwargs64)
print("library output strides (bytes):", y_gpu.strides, "-> channels contiguous")
check("minimamba.kernels.cuda scan: output", y_gpu, y_ref, rtol=200 * EPS32)
check("minimamba.kernels.cuda scan: final state", h_gpu, h_ref, rtol=200 * EPS32)

# %% [markdown]
# ## 4. Checking your own kernel against minimamba, layer by layer, in float64
#
# A kernel can be right on random inputs and still drift inside a model. The recipe:
# run minimamba in **float64** as ground truth, run the model with your kernel in
# float32, and compare every layer's output (`output_hidden_states=True`).
#
# Three "kernels" stand in for yours, each a function with the signature of
# `minimamba.ops.selective_scan_fn`, placed in every layer's mixer (`mixer.kernels` is
# the set of functions a layer calls):
#
# * the readable NumPy scan in float32: a correct kernel;
# * the paper's Eq. (4) in full, ZOH for `B` too: $\bar B = (e^{\Delta A} - 1) A^{-1} B$
#   instead of the reference's Euler $\Delta B$ (tutorial 1). Defensible on paper, but a
#   *different model* than the one the weights were trained with: a discretisation bug;
# * Euler for `A` too, $1 + \Delta A$ instead of $e^{\Delta A}$: the same kind of bug
#   (and where $\Delta |A| > 2$, $|1 + \Delta A| > 1$: the state grows instead of decaying).

# %%
def make_scan(discretise):
    """A selective_scan_fn (ops' signature) with its own discretisation: (delta A, A) -> (dA, the factor of B u)."""
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
             initial_state=None):
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]  # (b, e, l)
        if delta_softplus:
            delta = softplus(delta)  # (b, e, l)
        h = np.zeros(u.shape[:2] + A.shape[1:], u.dtype) if initial_state is None else initial_state.copy()
        y = np.empty_like(u)  # (b, e, l)
        for t in range(u.shape[2]):
            dA, dB = discretise(delta[:, :, t, None], A)  # (b, e, n) each
            h = dA * h + dB * B[:, None, :, t] * u[:, :, t, None]  # (b, e, n)
            y[:, :, t] = np.einsum("ben,bn->be", h, C[:, :, t])  # (b, e)
        if D is not None:
            y = y + D[:, None] * u
        if z is not None:
            y = y * silu(z)
        return (y, h) if return_last_state else y
    return scan


kernels = {
    "correct (ZOH A, Euler B)": make_scan(lambda dt, A: (np.exp(dt * A), dt)),
    "bug: ZOH for B too": make_scan(lambda dt, A: (np.exp(dt * A), (np.exp(dt * A) - 1) / A)),
    "bug: Euler for A": make_scan(lambda dt, A: (1 + dt * A, dt)),
}
config = MambaConfig(vocab_size=97, hidden_size=32, state_size=N_MAX, num_hidden_layers=6, conv_kernel=4)
truth = MambaForCausalLM(config, dtype="float64", impl="reference", seed=0)
ids = rng.integers(0, config.vocab_size, (2, 24))  # (b, l)
hs64 = truth(ids, output_hidden_states=True).hidden_states  # 6 layers + norm_f, each (b, l, d)

# the correct stand-in must be the library's scan: check it first, in float64 against ops
args64 = [rng.standard_normal(shape) for shape in ((2, 8, 11), (2, 8, 11))] + [
    -np.exp(rng.standard_normal((8, 4))), rng.standard_normal((2, 4, 11)), rng.standard_normal((2, 4, 11))]
check("stand-in 'correct' scan vs ops.selective_scan_fn", kernels["correct (ZOH A, Euler B)"](
    *args64, delta_softplus=True), selective_scan_fn(*args64, delta_softplus=True), rtol=100 * 2.2e-16)

rel = {}
for label, scan in kernels.items():
    mine = MambaForCausalLM(config, dtype="float32", impl="numpy", seed=0)  # the same weights, rounded
    for layer in mine.backbone.layers:
        layer.mixer.kernels.selective_scan_fn = scan  # what every layer calls for its scan
    hs32 = mine(ids, output_hidden_states=True).hidden_states
    rel[label] = [float(np.abs(a - b_).max() / np.abs(b_).max()) for a, b_ in zip(hs32, hs64)]
    print(f"{label:<26} max rel error per layer: " + " ".join(f"{r:.1e}" for r in rel[label]))
correct, zoh_b, euler_a = rel.values()
# a correct float32 model: a few eps32 per op, ~100s of ops in a chain over 6 layers
assert max(correct) < 1000 * EPS32, "a float32 model should stay within ~1000 eps32 of float64 over 6 layers"
# the bugs stand out from layer 0 by orders of magnitude: at least 100x the correct kernel's error everywhere
assert min(np.array(zoh_b) / np.array(correct)) > 100 and min(np.array(euler_a) / np.array(correct)) > 100

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for (label, r), marker in zip(rel.items(), "osD"):
    ax.semilogy(range(len(r)), r, marker + "-", label=label)
ax.axhline(EPS32, color="gray", ls=":", label="eps32")
ax.set_xticks(range(len(correct)), [str(i) for i in range(len(correct) - 1)] + ["norm_f"])
ax.set_xlabel("layer output")
ax.set_ylabel("max relative error vs float64")
ax.set_title("per-layer error of a float32 model against minimamba float64", fontsize=10)
ax.legend(fontsize=8, loc="center right")
save(fig, "06_error_per_layer.png")

# %% [markdown]
# ![per-layer error of a correct and two buggy float32 scans](figures/06_error_per_layer.png)
#
# A correct float32 kernel sits near eps32 (the float64 truth rounded to float32 could
# not do better) and grows slowly with depth. A discretisation bug is visible at the
# first layer, orders of magnitude above, and stays there: every layer runs the wrong
# model. (A bug that shows in one layer
# only — an indexing error that needs a large `d` or `l` to bite — shows up as a jump at
# that layer, which points straight at where to look.)
#
# On a GPU, the same check runs with `MambaForCausalLM(..., backend="cupy", impl="cuda")`
# against the float64 CPU model; `python -m minimamba.kernels.gpu_check` does exactly that
# on a 130m-shape model.
