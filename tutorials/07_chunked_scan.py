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
# # 7. The chunked scan: from Blelloch to the GPU kernel
#
# Tutorial 1 turned the recurrence $h_t = \bar A_t h_{t-1} + \bar B_t x_t$ into an
# associative operator and scanned it with a tree. Tutorial 6 wrote the simplest GPU
# kernel, one thread per (batch, channel) walking all `l` steps. Neither is what runs
# on a GPU for a long prompt: a tree does twice the work and needs all `l` states in
# memory at once, and one thread per channel gives a 1536-channel model 1536 threads
# per sequence, where an H200 keeps over 100,000 busy. The library's CUDA scan cuts
# the sequence into **chunks** and runs three passes:
#
# 1. `chunk_state`: every chunk, in parallel, scans its own steps from a zero state;
# 2. `chunk_carry`: one short sequential walk over the chunks carries the true state
#    from each chunk into the next;
# 3. `chunk_output`: every chunk, in parallel again, reruns its steps from the state
#    entering it and writes the outputs.
#
# Here we draw the tree once more (Blelloch's, as in mamba.py's `pscan` notes), write the
# three passes in NumPy, check them against `minimamba.ops.selective_scan_ref`, time them
# against the step-by-step loop, run the library's kernels in Numba's CUDA simulator on
# the same inputs, and map the NumPy lines onto `kernels/cuda.py`.
#
# Shapes as in `minimamba.ops` (the kernels' layout): `u`, `delta` (b, d, l), `A` (d, n),
# `B`, `C` (b, n, l); `T` is the chunk length and `nc = l / T` the number of chunks.

# %%
import os
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba is imported: section 5 runs the CUDA kernels

import matplotlib.pyplot as plt
import numpy as np

import minimamba.kernels.cuda as mm_cuda
from minimamba.ops import selective_scan_fn, selective_scan_ref, softplus
from _common import EPS32, EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. The operator, once more
#
# One step is the affine map $h \mapsto \alpha_t h + \beta_t$ with
# $\alpha_t = e^{\Delta_t A}$ and $\beta_t = \Delta_t B_t x_t$. Two steps in a row are
# again one affine map, and the composition is associative, with identity $(1, 0)$:
#
# $$(\alpha_1, \beta_1) \bullet (\alpha_2, \beta_2) = (\alpha_1 \alpha_2,\ \alpha_2 \beta_1 + \beta_2).$$
#
# So a whole chunk of steps is *one* pair: $\alpha$ is the product of its decays, which
# for Mamba is $e^{A \sum_t \Delta_t}$ (one exp of the summed step sizes), and $\beta$
# is the state the chunk ends in when it starts from zero. That is all pass 2 needs.

# %%
def combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): the composition of h -> a1 h + b1 and h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


l_demo = 12
dt_demo = softplus(rng.normal(-1.0, 1.0, l_demo))  # (l,)
beta_demo = dt_demo * rng.normal(size=l_demo)  # (l,): dt B x with B = 1
a_demo = -0.7
alpha_demo = np.exp(dt_demo * a_demo)  # (l,)
h, states = 0.0, []
for t in range(l_demo):  # the recurrence, step by step
    h = alpha_demo[t] * h + beta_demo[t]
    states.append(h)
chunk = (1.0, 0.0)  # the identity
for t in range(4, 8):  # steps 4..7 folded into one pair
    chunk = combine(*chunk, alpha_demo[t], beta_demo[t])
# the chunk's alpha is one exp of its summed dt; float64, 4 products vs 1 exp: a few eps64
check("chunk alpha = exp(a * sum dt)", chunk[0], np.exp(a_demo * dt_demo[4:8].sum()), rtol=10 * EPS64)
# entering with h_3 and applying the chunk's pair lands on h_7
check("h_7 = alpha_chunk * h_3 + beta_chunk", chunk[0] * states[3] + chunk[1], states[7], rtol=10 * EPS64)

# %% [markdown]
# ## 2. Blelloch's tree
#
# Associativity lets us bracket the product of all `l` pairs any way we like. Blelloch's
# scan (1990) brackets it as a balanced tree, in two sweeps:
#
# * **up-sweep** (a reduction): at stride 1, 2, 4, ... each right child becomes
#   left • right; after $\log_2 l$ steps the last element holds the product of all;
# * **down-sweep**: the root is set to the identity; going down, each left child takes
#   its parent's value and each right child becomes parent • (old left child). After
#   $\log_2 l$ more steps element $t$ holds the product of everything *before* $t$.
#
# Instead of numbers, we run it on *ranges of steps*: an element holds the range
# $i{:}j$ of steps it has combined, and `combine` checks that the two ranges meet (left
# ends where right begins), which is exactly what associativity without commutativity
# demands. The drawing is the record of that run.

# %%
def combine_ranges(left, right):
    """The steps covered by left then right; None is the identity. Fails unless they are adjacent, in order."""
    if left is None or right is None:
        return right if left is None else left
    assert left[1] + 1 == right[0], f"{left} and {right} do not meet: the order of the steps would be wrong"
    return (left[0], right[1])


def blelloch_ranges(l):
    """Run Blelloch's scan on ranges. Returns the rows of values (one per step) and the edges drawn between them."""
    values = [(t, t) for t in range(l)]  # step t alone
    rows, edges = [list(values)], []  # edges: (row, from position, to position, kind)
    stride = 1
    while stride < l:  # up-sweep
        for right in range(2 * stride - 1, l, 2 * stride):
            values[right] = combine_ranges(values[right - stride], values[right])
            edges += [(len(rows), right - stride, right, "combine"), (len(rows), right, right, "combine")]
        rows.append(list(values))
        stride *= 2
    values[-1] = None  # the root's prefix: nothing comes before
    rows.append(list(values))
    stride = l // 2
    while stride >= 1:  # down-sweep
        for right in range(2 * stride - 1, l, 2 * stride):
            left = right - stride
            values[left], values[right] = values[right], combine_ranges(values[right], values[left])
            edges += [(len(rows), right, left, "copy"), (len(rows), right, right, "combine"),
                      (len(rows), left, right, "combine")]
        rows.append(list(values))
        stride //= 2
    return rows, edges


l_tree = 8
rows, edges = blelloch_ranges(l_tree)
exclusive = rows[-1]
assert exclusive == [None] + [(0, t - 1) for t in range(1, l_tree)]  # element t: steps 0..t-1
n_combines = sum(kind == "combine" for *_, kind in edges) // 2
print(f"l = {l_tree}: {len(rows) - 2} parallel steps, {n_combines} combines "
      f"(the loop: {l_tree} steps, {l_tree - 1} combines)")
assert len(rows) - 2 == 2 * int(np.log2(l_tree)) and n_combines == 2 * (l_tree - 1)

# %%
fig, ax = plt.subplots(figsize=(9, 6))
n_up = int(np.log2(l_tree))
for r, row in enumerate(rows):
    for t, value in enumerate(row):
        label = "id" if value is None else (f"{value[0]}" if value[0] == value[1] else f"{value[0]}:{value[1]}")
        changed = r == 0 or row[t] != rows[r - 1][t]
        ax.text(t, -r, label, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="tab:orange" if r > n_up and changed else
                          ("tab:blue" if changed else "white"), alpha=0.35 if changed else 1.0, ec="gray"))
for r, src, dst, kind in edges:
    ax.annotate("", xy=(dst, -r + 0.25), xytext=(src, -(r - 1) - 0.25),
                arrowprops=dict(arrowstyle="->", color="tab:red" if kind == "copy" else "k", lw=0.8))
ax.axhline(-n_up - 0.5, color="gray", lw=0.5, ls=":")
ax.axhline(-n_up - 1.5, color="gray", lw=0.5, ls=":")
ax.set_yticks(-np.arange(len(rows)),
              ["input"] + [f"up {s}" for s in range(1, n_up + 1)] + ["root := id"]
              + [f"down {s}" for s in range(1, n_up + 1)])
ax.set_xticks([])
ax.set_xlim(-0.6, l_tree - 0.4)
ax.set_ylim(-len(rows) + 0.5, 0.6)
ax.set_title("Blelloch scan on 8 steps: each box holds the range of steps it has combined\n"
             "(blue: combined in the up-sweep, orange: in the down-sweep; red arrows copy)", fontsize=9)
for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
save(fig, "07_blelloch_tree.png")

# %% [markdown]
# ![Blelloch's up-sweep and down-sweep on 8 steps, with the range each element holds](figures/07_blelloch_tree.png)
#
# The last row holds the *exclusive* prefix of every position (`0:t-1`); one more
# combine with step `t` itself gives the inclusive one, the state $h_t$. The tree takes
# $2 \log_2 l$ parallel steps but $2(l - 1)$ combines, twice the loop's work, and each
# level touches all `l` elements: fine inside a block of threads that share fast memory
# (mamba_ssm scans each 2048-step chunk with a block-wide parallel scan over this
# operator), costly across the whole sequence in global memory.
#
# ## 3. The chunked scan in NumPy: three passes
#
# The other way to use associativity: few levels, wide leaves. Cut `l` into `nc`
# chunks of `T` steps; scan each chunk on its own (all chunks at once), combine the
# chunks' pairs in order (a short loop over `nc`), then redo each chunk from its true
# starting state. If `l` is not a multiple of `T` we pad with `delta = 0`, `u = 0`:
# the step $(e^{0}, 0) = (1, 0)$ is the identity, so padding changes nothing.

# %%
def chunked_scan(u, delta, A, B, C, D, T):
    """The selective scan in three passes over chunks of T steps. delta already softplus'ed.

    u, delta (b, d, l); A (d, n); B, C (b, n, l); D (d,). Returns y (b, d, l) and the last state (b, d, n).
    """
    b, d, l = u.shape
    n = A.shape[1]
    nc = -(-l // T)  # chunks, the last one padded
    pad = [(0, 0), (0, 0), (0, nc * T - l)]
    u_c = np.pad(u, pad).reshape(b, d, nc, T)  # (b, d, nc, T)
    dt_c = np.pad(delta, pad).reshape(b, d, nc, T)  # (b, d, nc, T): padded steps have dt = 0, the identity
    B_c = np.pad(B, pad).reshape(b, n, nc, T)  # (b, n, nc, T)
    C_c = np.pad(C, pad).reshape(b, n, nc, T)  # (b, n, nc, T)

    def step(h, t):
        """Step t of every chunk at once: h (b, nc, d, n) -> the state after it."""
        dA = np.exp(dt_c[:, :, :, t].transpose(0, 2, 1)[..., None] * A)  # (b, nc, d, n)
        dBu = (dt_c[:, :, :, t] * u_c[:, :, :, t]).transpose(0, 2, 1)[..., None] * B_c[:, None, :, :, t].transpose(
            0, 3, 1, 2)  # (b, nc, d, n)
        return dA * h + dBu  # (b, nc, d, n)

    # pass 1 (chunk_state): each chunk from zero; its end state, and its summed dt
    h = np.zeros((b, nc, d, n), dtype=u.dtype)  # (b, nc, d, n)
    for t in range(T):
        h = step(h, t)
    chunk_end = h  # (b, nc, d, n): beta of each chunk's pair
    chunk_dt = dt_c.sum(axis=3).transpose(0, 2, 1)  # (b, nc, d): alpha of each chunk is exp(A * chunk_dt)

    # pass 2 (chunk_carry): walk the chunks in order, carrying the true state
    h_in = np.empty_like(chunk_end)  # (b, nc, d, n): the state entering each chunk
    carry = np.zeros((b, d, n), dtype=u.dtype)  # (b, d, n)
    for j in range(nc):
        h_in[:, j] = carry
        carry = np.exp(chunk_dt[:, j, :, None] * A) * carry + chunk_end[:, j]  # (alpha, beta) of chunk j

    # pass 3 (chunk_output): each chunk again, from its true entering state, writing y
    y_c = np.empty((b, nc, d, T), dtype=u.dtype)  # (b, nc, d, T)
    h = h_in  # (b, nc, d, n)
    for t in range(T):
        h = step(h, t)
        y_c[..., t] = np.einsum("bjdn,bnj->bjd", h, C_c[..., t])  # (b, nc, d)
    y = y_c.transpose(0, 2, 1, 3).reshape(b, d, nc * T)[:, :, :l] + D[:, None] * u  # (b, d, l)
    return y, carry


bsz, d, n, l = 2, 6, 4, 50
u = rng.normal(size=(bsz, d, l))  # (b, d, l)
delta = softplus(rng.normal(-1.0, 1.0, size=(bsz, d, l)))  # (b, d, l), positive
A = -np.exp(rng.normal(0.0, 1.0, size=(d, n)))  # (d, n), negative
B = rng.normal(size=(bsz, n, l))  # (b, n, l)
C = rng.normal(size=(bsz, n, l))  # (b, n, l)
D = rng.normal(size=d)  # (d,)

y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, D=D, return_last_state=True)  # (b, d, l), (b, d, n)
for T in (1, 7, 16, 50, 64):  # T = 1: every step its own chunk; 7: a padded last chunk; 64 > l: one chunk
    y_chunked, h_chunked = chunked_scan(u, delta, A, B, C, D, T)
    # float64: the same products, grouped per chunk (one exp of a sum instead of a product of exps):
    # a few eps64 per step over a memory of at most l = 50 steps
    check(f"chunked (T = {T:>2}) vs selective_scan_ref: y", y_chunked, y_ref, rtol=100 * EPS64)
    check(f"chunked (T = {T:>2}) vs selective_scan_ref: last state", h_chunked, h_ref, rtol=100 * EPS64)

# %% [markdown]
# ## 4. Timing against the step-by-step loop
#
# Both are NumPy, so both pay Python's overhead once per loop iteration: the
# sequential loop (`selective_scan_ref`) makes `l` iterations of work (b, d, n); the
# chunked scan makes `T + nc + T` iterations of work (b, nc, d, n) or (b, d, n). With
# `nc = l / T` that is smallest near $T = \sqrt{l/2}$. On a GPU the same count is what
# the three passes cost in *time*, with all chunks running at once: `nc`-fold more
# threads in passes 1 and 3, for a second pass of exps over the data.
#
# Timings below are measurements of the machine that ran this (median of a few runs,
# one thread); they are printed and drawn, never asserted.

# %%
b_t, d_t, n_t, l_t = 1, 16, 16, 4096
u_t = rng.normal(size=(b_t, d_t, l_t)).astype(np.float32)  # (b, d, l)
delta_t = softplus(rng.normal(-2.0, 1.0, size=(b_t, d_t, l_t))).astype(np.float32)  # (b, d, l)
A_t = -np.exp(rng.normal(0.0, 1.0, size=(d_t, n_t))).astype(np.float32)  # (d, n)
B_t, C_t = (rng.normal(size=(b_t, n_t, l_t)).astype(np.float32) for _ in range(2))  # (b, n, l) each
D_t = np.ones(d_t, np.float32)  # (d,)


def median_time(func, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


t_loop = median_time(lambda: selective_scan_ref(u_t, delta_t, A_t, B_t, C_t, D=D_t))
chunk_sizes = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
t_chunked = [median_time(lambda: chunked_scan(u_t, delta_t, A_t, B_t, C_t, D_t, T)) for T in chunk_sizes]
y_t64 = selective_scan_ref(*(a.astype(np.float64) for a in (u_t, delta_t, A_t, B_t, C_t)), D=D_t.astype(np.float64))
# float32 against float64 over 2048 steps: eps32 x a few ops per step x the memory (1 / (dt |A|) <~ 100 steps)
check("chunked (T = 32), float32 vs float64 loop", chunked_scan(u_t, delta_t, A_t, B_t, C_t, D_t, 32)[0], y_t64,
      rtol=1e3 * EPS32)
best = int(np.argmin(t_chunked))
print(f"l = {l_t}, b = {b_t}, d = {d_t}, n = {n_t}, float32: loop {1e3 * t_loop:.0f} ms; chunked "
      + ", ".join(f"T={T}: {1e3 * t:.0f} ms" for T, t in zip(chunk_sizes, t_chunked)))
print(f"fastest chunk T = {chunk_sizes[best]}: x{t_loop / t_chunked[best]:.1f} faster than the loop "
      f"(T + nc + T = {2 * chunk_sizes[best] + l_t // chunk_sizes[best]} iterations instead of {l_t})")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.loglog(chunk_sizes, [1e3 * t for t in t_chunked], "o-", label="chunked scan (NumPy, three passes)")
ax.axhline(1e3 * t_loop, color="C1", label="step-by-step loop (selective_scan_ref)")
ax.set_xlabel("chunk length T")
ax.set_ylabel("time (ms, median of 3)")
ax.set_title(f"scan of l = {l_t}, d = {d_t}, n = {n_t}, float32, one CPU thread (measured)", fontsize=9)
ax.legend(fontsize=8)
save(fig, "07_chunked_timing.png")

# %% [markdown]
# ![Time of the chunked scan against the chunk length, and of the loop](figures/07_chunked_timing.png)
#
# Read it as a U: tiny chunks make pass 2 long (`nc` iterations), huge chunks make
# passes 1 and 3 long (`T` iterations each). In between the chunked scan is faster than
# the loop, but by less than the iteration count (`2T + nc` against `l`) suggests: once
# the arrays are wide, NumPy's time is the arithmetic, and the chunked form does each
# step's arithmetic twice (passes 1 and 3). The same holds on a GPU, where the two
# passes are the price of running `nc` times more threads at once.
#
# ## 5. The library's kernels, in the simulator
#
# `minimamba.kernels.cuda.selective_scan_fn(..., version="chunked", chunk_size=T)` runs
# the same three passes as three CUDA launches. Under Numba's simulator (no GPU) it runs
# on NumPy arrays, on a small shape; it must agree with our NumPy version.

# %%
bs, ds, ns, ls, Ts = 1, 3, 4, 21, 8  # tiny: the simulator runs every thread in Python; 21 = 8 + 8 + 5
us, deltas = rng.normal(size=(bs, ds, ls)), softplus(rng.normal(-1.0, 1.0, size=(bs, ds, ls)))  # (b, d, l) each
As = -np.exp(rng.normal(size=(ds, ns)))  # (d, n)
Bs, Cs = rng.normal(size=(bs, ns, ls)), rng.normal(size=(bs, ns, ls))  # (b, n, l) each
Ds = rng.normal(size=ds)  # (d,)
y_kernel, h_kernel = mm_cuda.selective_scan_fn(us, deltas, As, Bs, Cs, D=Ds, return_last_state=True,
                                               version="chunked", chunk_size=Ts)  # float64 kernels
y_ours, h_ours = chunked_scan(us, deltas, As, Bs, Cs, Ds, Ts)
# float64 on both sides, the same passes: the kernel's exp and sums in another order only
check("kernels.cuda chunked vs our chunked: y", y_kernel, y_ours, rtol=100 * EPS64)
check("kernels.cuda chunked vs our chunked: last state", h_kernel, h_ours, rtol=100 * EPS64)
check("our chunked vs ops.selective_scan_fn", y_ours, selective_scan_fn(us, deltas, As, Bs, Cs, D=Ds),
      rtol=100 * EPS64)

# %% [markdown]
# ## 6. Line by line: NumPy here, CUDA in `kernels/cuda.py`
#
# Each CUDA thread does, for one (batch, chunk, channel) or (batch, state, channel),
# what our NumPy does for all of them at once. The kernel lines below are quoted from
# `kernels/cuda.py` (the cell checks that each still appears there, so this table
# cannot drift from the code).
#
# | pass | NumPy here (all chunks at once) | `kernels/cuda.py` (one thread) | threads |
# | --- | --- | --- | --- |
# | 1 `chunk_state` | `h = np.zeros(...)`, then T times `h = dA * h + dBu` | `h[i] = ZERO`, then per step `h[i] = math.exp(dt * a[i]) * h[i] + dtx * B[bi, gb, i, t]` | b x nc x d |
# | | `chunk_end = h`; `chunk_dt = dt_c.sum(axis=3)` | `chunk_h[bi, j, i, c] = h[i]`; `total_dt += dt`, `chunk_dt[bi, j, c] = total_dt` | |
# | 2 `chunk_carry` | `h_in[:, j] = carry` | `chunk_h[bi, j, i, c] = h  # now: the state entering chunk j` (in place) | b x n x d |
# | | `carry = np.exp(chunk_dt[:, j, :, None] * A) * carry + chunk_end[:, j]` | `h = math.exp(a * chunk_dt[bi, j, c]) * h + end` | |
# | 3 `chunk_output` | `h = h_in`, then T times `h = step(h, t)` and `y = C . h` | `h[i] = chunk_h[bi, j, i, c]`, then `run_steps`: `y += h[i] * C[bi, gc, i, t]` | b x nc x d |
# | | `+ D * u`; the last chunk's `carry` is the final state | `y += skip * x`; `if j == nchunks - 1:` store `last_state` | |
#
# Differences that matter on a GPU, not in NumPy: the kernel fuses the softplus of
# `delta + delta_bias` into passes 1 and 3 and the `silu(z)` gate into pass 3 (we passed
# a softplus'ed `delta` and no gate); pass 2 runs one thread per *state*, since the `n` states of a
# channel are independent there (no `C . h` sum); and pass 1 keeps only `chunk_h` and
# `chunk_dt` — (b, nc, n, d) and (b, nc, d) — never the (b, l, d, n) states. Pass 3
# recomputes `exp(dt A)` that pass 1 already computed: the price of filling the GPU,
# since storing them would mean writing (b, l, d, n) numbers to memory.

# %%
kernel_source = Path(mm_cuda.__file__).read_text(encoding="utf-8")
quoted = ["h[i] = math.exp(dt * a[i]) * h[i] + dtx * B[bi, gb, i, t]", "chunk_h[bi, j, i, c] = h[i]",
          "total_dt += dt", "chunk_dt[bi, j, c] = total_dt",
          "chunk_h[bi, j, i, c] = h  # now: the state entering chunk j",
          "h = math.exp(a * chunk_dt[bi, j, c]) * h + end", "h[i] = chunk_h[bi, j, i, c]",
          "y += h[i] * C[bi, gc, i, t]", "y += skip * x", "if j == nchunks - 1:",
          "def chunk_state(", "def chunk_carry(", "def chunk_output("]
missing = [line for line in quoted if line not in kernel_source]
assert not missing, f"kernels/cuda.py no longer has {missing}: update the table above"
print(f"all {len(quoted)} quoted lines found in {Path(mm_cuda.__file__).name}")

# %% [markdown]
# Tutorial 8 goes the other way through the scan: its gradient, a recurrence that runs
# backwards in time, and how the training kernel trades memory for recomputation with
# the same chunks.
