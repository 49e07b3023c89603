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
# # 1. The selective scan, from the recurrence
#
# At the centre of Mamba (Gu & Dao 2023, https://arxiv.org/abs/2312.00752) is one
# linear recurrence per channel and per state:
#
# $$h_t = \bar A_t\, h_{t-1} + \bar B_t\, x_t, \qquad y_t = C_t\, h_t .$$
#
# This tutorial builds it four times, each checked against the one before:
#
# 1. a plain loop over time for one channel and one state;
# 2. the same loop, vectorised over batch, channels and states (Mamba's shapes);
# 3. a parallel scan (Blelloch's up-sweep / down-sweep), built on the associative operator;
# 4. the library: `minimamba.ops.selective_scan_ref` and `selective_scan_fn`.
#
# On the way: what discretisation is and what the step size `dt` does, and the
# numerical traps (exp underflow, the unstable "closed form", float32 error growth).
#
# Every check prints the largest error and asserts a tolerance; a comment says why
# that tolerance. `check` and `save` (write a figure) are the few lines of
# `tutorials/_common.py`, shared by all the tutorials.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimamba.ops import selective_scan_fn, selective_scan_ref, silu, softplus
from _common import EPS32, EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. One channel, one state: the loop
#
# The continuous-time system is $h'(\tau) = a\,h(\tau) + b\,x(\tau)$, $y = c\,h$,
# with $a < 0$ so the state decays. To run it on tokens we *discretise* with a step
# size $\Delta$ (`dt`), holding $x$ constant over the step:
#
# * **zero-order hold (ZOH)**, exact for constant $x$: $\bar a = e^{\Delta a}$,
#   $\bar b = \frac{e^{\Delta a} - 1}{a}\, b$;
# * **Euler** for $b$: $\bar b \approx \Delta\, b$.
#
# The paper's Eq. (4) writes ZOH for both; the official kernel (and transformers, and
# minimamba) use ZOH for $a$ and the simpler Euler step for $b$, so we do too.
#
# In Mamba `dt`, `b` and `c` change at every token: they are computed from the input,
# which is what makes the scan *selective*. So the loop takes them as sequences.

# %%
def scan_1d(x, dt, a, b, c):
    """h_t = exp(dt_t a) h_{t-1} + dt_t b_t x_t;  y_t = c_t h_t.  x, dt, b, c: (l,); a: scalar < 0."""
    h = 0.0
    y = np.zeros(len(x))
    for t in range(len(x)):
        h = np.exp(dt[t] * a) * h + dt[t] * b[t] * x[t]  # ZOH for a, Euler for b
        y[t] = c[t] * h
    return y


# %% [markdown]
# **Check 1.** With constant `dt`, `b`, `c` and a unit impulse $x = (1, 0, 0, \dots)$
# the state is $\Delta b$ at $t = 0$ and then decays by $e^{\Delta a}$ per step, so
# $y_t = c\,\Delta b\,(e^{\Delta a})^t$.

# %%
L, a, dt0 = 50, -1.0, 0.1
ones = np.ones(L)
impulse = np.zeros(L)
impulse[0] = 1.0
y_loop = scan_1d(impulse, dt0 * ones, a, 2.0 * ones, 3.0 * ones)
y_exact = 3.0 * dt0 * 2.0 * np.exp(dt0 * a) ** np.arange(L)
# float64: one rounding per multiply, ~L of them in a row -> L * eps64 ~ 1e-14
check("loop vs impulse response", y_loop, y_exact, rtol=10 * L * EPS64)

# %% [markdown]
# **Check 2.** Euler and ZOH agree to first order in $u = \Delta |a|$: the ratio
# $\Delta b / \bar b_{\mathrm{ZOH}} = u / (1 - e^{-u}) = 1 + u/2 + u^2/12 + \dots$,
# so for small steps the simpler Euler form costs a relative error of about $u/2$.

# %%
for dt in (0.001, 0.01, 0.1):
    u = dt * abs(a)
    b_zoh = (np.exp(dt * a) - 1) / a
    b_euler = dt
    rel = b_euler / b_zoh - 1
    print(f"dt={dt:<6} Euler/ZOH - 1 = {rel:.3e}   u/2 = {u / 2:.3e}")
    assert abs(rel - u / 2) <= u**2 / 10  # the next term of the series is u^2/12

# %% [markdown]
# ## 2. What `dt` does
#
# `dt` appears twice: in the decay $e^{\Delta a}$ and in the input weight $\Delta b$.
#
# * **small `dt`**: $e^{\Delta a} \approx 1$ and $\Delta b \approx 0$ — the token is
#   nearly ignored and the state (the past) is kept;
# * **large `dt`**: $e^{\Delta a} \approx 0$ — the state is reset and replaced by this
#   token: the past is forgotten, the present focused on.
#
# Because Mamba computes `dt` per token from the input, it can *choose*: a large `dt`
# on a token it wants to store, a small `dt` on tokens it wants to skip. The bottom
# panel does this by hand: `dt` is large on the non-zero inputs and tiny elsewhere, so
# the state latches each new value and holds it across the gap.

# %%
x = np.zeros(80)
x[5] = 1.0
x[20:30] = 0.5
x[50] = -1.0
dts = (0.03, 0.3, 3.0)
responses = {dt: scan_1d(x, dt * np.ones(len(x)), a, np.ones(len(x)), np.ones(len(x))) for dt in dts}
dt_selective = np.where(x != 0, 3.0, 0.003)
y_selective = scan_1d(x, dt_selective, a, np.ones(len(x)), np.ones(len(x)))

fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
axes[0].step(np.arange(len(x)), x, where="mid", color="k")
axes[0].set_ylabel("input x")
axes[0].set_title("the same input under small and large dt  (a = -1, b = c = 1)")
for dt in dts:
    y = responses[dt]
    axes[1].plot(y / np.abs(y).max(), label=f"dt = {dt}: decay per step {np.exp(dt * a):.2f}")
axes[1].set_ylabel("y / max|y|")
axes[1].legend(fontsize=8, loc="lower left")
axes[2].plot(y_selective, color="C3", label="dt = 3 on non-zero tokens, 0.003 elsewhere")
axes[2].set_ylabel("y (selective dt)")
axes[2].set_xlabel("time step t")
axes[2].legend(fontsize=8, loc="lower left")
save(fig, "01_dt_small_vs_large.png")

# %% [markdown]
# ![The same input under small and large dt](figures/01_dt_small_vs_large.png)
#
# **Check 3.** Unrolling the recurrence gives a sum over past tokens,
# $h_t = \sum_{s \le t} e^{a (S_t - S_s)}\, \Delta_s b_s x_s$ with $S_t = \sum_{j \le t} \Delta_j$:
# token $s$ is weighted by how much `dt` has passed since. Written as an $l \times l$
# lower-triangular matrix this is the whole scan as one matrix product (the view Mamba-2
# builds on). It must agree with the loop, here with the input-dependent `dt`.
#
# **Mask before the exp.** Above the diagonal ($s > t$) the exponent $a (S_t - S_s)$ is
# *positive* and grows with the distance, so `exp` of the full matrix overflows on long
# inputs even though `tril` throws those entries away afterwards. Mask first: put
# $-\infty$ above the diagonal, where $e^{-\infty} = 0$ is exactly the zero we want
# (mamba_ssm's `ssd_minimal.segsum` does the same with `masked_fill(~mask, -inf)`).

# %%
def decay_matrix(dt, a):
    """(l, l): entry [t, s] = exp(a (S_t - S_s)) for s <= t, 0 above the diagonal; masked before the exp."""
    S = np.cumsum(dt)  # (l,)
    causal = np.tril(np.ones((len(dt), len(dt)), dtype=bool))  # (l, l)
    return np.exp(np.where(causal, a * (S[:, None] - S[None, :]), -np.inf))  # (l, l)


y_matrix = decay_matrix(dt_selective, a) @ (dt_selective * x)  # (l,)
# S_t - S_s subtracts two sums of <= 80 terms of size <= 3: abs error ~ 80 * 3 * eps64, tiny.
check("loop vs matrix form (selective dt)", y_selective, y_matrix, rtol=1e3 * EPS64)

# %% [markdown]
# The trap, in float32 on 400 tokens of `dt = 0.3` (a = -1): $S_{399} = 120$, and
# $e^{120}$ is far beyond float32's largest number ($3.4 \times 10^{38} \approx e^{88.7}$).
# Exp-then-mask meets `inf` above the diagonal; `np.tril` happens to replace them with
# zeros, but the equally natural `causal * exp(...)` makes $0 \cdot \infty$ = NaN, and so
# would the gradient of either form in an autodiff framework. Mask-then-exp never
# creates an `inf`.

# %%
l_long = 400
dt_long = np.full(l_long, 0.3, dtype=np.float32)  # (l,)
x_long = rng.normal(size=l_long).astype(np.float32)  # (l,)
S_long = np.cumsum(dt_long)  # (l,) float32
causal_long = np.tril(np.ones((l_long, l_long), dtype=bool))  # (l, l)
with np.errstate(over="ignore", invalid="ignore"):
    exp_first = np.exp(np.float32(a) * (S_long[:, None] - S_long[None, :]))  # (l, l): inf above the diagonal
    y_exp_then_mask = (causal_long * exp_first) @ (dt_long * x_long)  # (l,)
y_mask_then_exp = decay_matrix(dt_long, np.float32(a)) @ (dt_long * x_long)  # (l,) float32
print(f"exp before the mask: {np.isinf(exp_first).sum()} inf entries, "
      f"{np.isnan(y_exp_then_mask).sum()} of {l_long} outputs NaN")
assert np.isinf(exp_first).any() and np.isnan(y_exp_then_mask).any()
y_long64 = scan_1d(x_long.astype(np.float64), dt_long.astype(np.float64), a, np.ones(l_long), np.ones(l_long))
# float32 with memory ~1/0.3 steps: a few eps32 per step over ~3 steps of memory, plus the float32
# differences S_t - S_s of sums up to 120 (abs error ~ 120 * eps32 in the exponent): ~1e-5 allowed
check("mask then exp, float32, 400 tokens vs float64 loop", y_mask_then_exp, y_long64, rtol=1e-4)

# %% [markdown]
# ## 3. Vectorised over channels and states
#
# A Mamba layer runs this recurrence for every batch row, every channel `d` and every
# state `n`, in the layout of `minimamba.ops` (the layout of the CUDA kernel in
# mamba_ssm):
#
# | array | shape | meaning |
# | --- | --- | --- |
# | `u` | (b, d, l) | input $x$, one sequence per channel |
# | `delta` | (b, d, l) | step size $\Delta$ per channel and token |
# | `A` | (d, n) | diagonal state matrix, negative (not input-dependent) |
# | `B`, `C` | (b, n, l) | input and output maps per token, shared by all channels |
# | `D` | (d,) | skip connection $y \mathrel{+}= D\,u$ |
#
# The state is $h$ of shape (b, d, n): `n` numbers per channel. First, literally, the
# 1-channel loop for each (row, channel, state), summed over states:

# %%
def scan_loops(u, delta, A, B, C):
    """Four nested loops around scan_1d. Returns y (b, d, l)."""
    bsz, d, l = u.shape
    y = np.zeros((bsz, d, l))
    for i in range(bsz):
        for ch in range(d):
            for s in range(A.shape[1]):  # y = C . h sums the n independent states
                y[i, ch] += scan_1d(u[i, ch], delta[i, ch], A[ch, s], B[i, s], C[i, s])
    return y


# %% [markdown]
# Then the loop over time only, with everything else broadcast. This is the shape of
# `selective_scan_ref` in minimamba and mamba_ssm.

# %%
def scan_vectorised(u, delta, A, B, C, return_last_state=False):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t.  Keeps u's dtype."""
    bsz, d, l = u.shape
    h = np.zeros((bsz, d, A.shape[1]), dtype=u.dtype)  # (b, d, n)
    y = np.zeros((bsz, d, l), dtype=u.dtype)  # (b, d, l)
    for t in range(l):
        dA = np.exp(delta[:, :, t, None] * A)  # (b, d, n)   ZOH
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]  # (b, d, n)   Euler
        h = dA * h + dBu  # (b, d, n)
        y[:, :, t] = np.einsum("bdn,bn->bd", h, C[:, :, t])  # (b, d)
    return (y, h) if return_last_state else y


bsz, d, n, l = 2, 3, 4, 25
u = rng.normal(size=(bsz, d, l))  # (b, d, l)
delta = softplus(rng.normal(-1.0, 1.0, size=(bsz, d, l)))  # (b, d, l), positive as in the model
A = -np.exp(rng.normal(0.0, 1.0, size=(d, n)))  # (d, n), negative
B = rng.normal(size=(bsz, n, l))  # (b, n, l)
C = rng.normal(size=(bsz, n, l))  # (b, n, l)

y_loops = scan_loops(u, delta, A, B, C)
y_vec = scan_vectorised(u, delta, A, B, C)
# same operations, only the order of the n-sum differs: a few eps64 of the largest term
check("vectorised vs nested loops", y_vec, y_loops, rtol=100 * EPS64)

# %% [markdown]
# ## 4. The associative operator and a parallel scan
#
# The loop is sequential: step $t$ needs $h_{t-1}$. But each step is an *affine map*
# $h \mapsto \alpha_t h + \beta_t$ with $\alpha_t = e^{\Delta_t A}$ and
# $\beta_t = \Delta_t B_t x_t$, and affine maps compose into affine maps. Doing
# $(\alpha_1, \beta_1)$ first and then $(\alpha_2, \beta_2)$:
#
# $$h \mapsto \alpha_2(\alpha_1 h + \beta_1) + \beta_2, \qquad
#   (\alpha_1, \beta_1) \bullet (\alpha_2, \beta_2) = (\alpha_1 \alpha_2,\; \alpha_2 \beta_1 + \beta_2).$$
#
# The operator $\bullet$ is **associative** (not commutative: order in time matters),
# with identity $(1, 0)$. The states are its inclusive prefix "sums":
# $h_t = \big((\alpha_0, \beta_0) \bullet \dots \bullet (\alpha_t, \beta_t)\big)_\beta$
# (starting from $h_{-1} = 0$). Associativity lets us bracket the product as a tree,
# which takes $O(\log l)$ parallel steps instead of $l$.

# %%
def combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): the composition of h -> a1 h + b1 and h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


p, q, r = [(rng.uniform(0, 1, 5), rng.normal(size=5)) for _ in range(3)]
left = combine(*combine(*p, *q), *r)
right = combine(*p, *combine(*q, *r))
check("associativity: (p.q).r vs p.(q.r)", np.stack(left), np.stack(right), rtol=10 * EPS64)

# %% [markdown]
# **Blelloch's scan** (1990) in two sweeps over a binary tree on $l$ (padded to a power
# of two with the identity):
#
# * **up-sweep**: at stride 1, 2, 4, ... each right child becomes
#   left $\bullet$ right, so the last element ends up holding the whole product;
# * **down-sweep**: set the root to the identity; going back down, each left child takes
#   its parent's prefix, and each right child becomes parent-prefix $\bullet$ left-subtree.
#   Afterwards element $t$ holds the product of everything *before* $t$ (an exclusive
#   scan); one more $\bullet$ with element $t$ itself makes it inclusive.
#
# Each `while` iteration below is one parallel step: all its pairs are independent
# (here, one vectorised NumPy call; on a GPU, one step of all threads).

# %%
def blelloch_scan(alpha, beta):
    """Inclusive scan of (alpha_t, beta_t) under `combine`, along the last axis. Returns (prod alpha, h)."""
    l = alpha.shape[-1]
    size = 1 << (l - 1).bit_length()  # next power of two
    pad = [(0, 0)] * (alpha.ndim - 1) + [(0, size - l)]
    al = np.pad(alpha, pad, constant_values=1.0)  # (..., size), padded with the identity (1, 0)
    be = np.pad(beta, pad, constant_values=0.0)
    al0, be0 = al.copy(), be.copy()
    steps = 0
    stride = 1
    while stride < size:  # up-sweep
        right = np.arange(2 * stride - 1, size, 2 * stride)
        lft = right - stride
        al[..., right], be[..., right] = combine(al[..., lft], be[..., lft], al[..., right], be[..., right])
        stride *= 2
        steps += 1
    al[..., -1], be[..., -1] = 1.0, 0.0  # the root's prefix: nothing comes before
    stride = size // 2
    while stride >= 1:  # down-sweep
        right = np.arange(2 * stride - 1, size, 2 * stride)
        lft = right - stride
        left_a, left_b = al[..., lft], be[..., lft]  # fancy indexing copies
        al[..., lft], be[..., lft] = al[..., right], be[..., right]  # left child: the parent's prefix
        al[..., right], be[..., right] = combine(al[..., right], be[..., right], left_a, left_b)
        stride //= 2
        steps += 1
    al, be = combine(al, be, al0, be0)  # exclusive -> inclusive
    print(f"  blelloch: l = {l}, {steps} parallel steps (the loop takes {l})")
    return al[..., :l], be[..., :l]


alpha = np.exp(delta[:, :, None, :] * A[None, :, :, None])  # (b, d, n, l)
beta = delta[:, :, None, :] * B[:, None, :, :] * u[:, :, None, :]  # (b, d, n, l)
_, h_all = blelloch_scan(alpha, beta)  # (b, d, n, l): every state at once
y_blelloch = np.einsum("bdnl,bnl->bdl", h_all, C)  # (b, d, l)
# the tree multiplies the same factors in another order: ~log2(l) extra roundings per entry
check("Blelloch scan vs loop", y_blelloch, y_vec, rtol=100 * EPS64)

# %% [markdown]
# A GPU kernel does not build one tree over the whole sequence: it cuts the sequence
# into **chunks**, scans inside each chunk in parallel, and carries the last state of a
# chunk into the next (mamba_ssm's kernel does this with 2048-token chunks, and
# `minimamba.ops.selective_scan_fn` works chunk by chunk too, to bound memory).
# The associative operator is what makes any of these orderings correct; tutorial 7
# builds the chunked form and maps it onto the library's CUDA kernels.
#
# ## 5. Numerical caveats
#
# **exp underflow.** $e^{\Delta A}$ is a decay factor; when $\Delta A$ is very negative it
# underflows. In float32 anything below about $-87$ becomes subnormal and below about
# $-104$ exactly 0 (float64: $-745$). In the recurrence that is harmless — the state is
# reset, which is what a true value of $10^{-46}$ would do anyway:

# %%
for x_ in (-80.0, -90.0, -110.0):
    print(f"exp({x_}) in float32 = {np.exp(np.float32(x_)):.3e}   in float64 = {np.exp(x_):.3e}")
assert np.exp(np.float32(-110.0)) == 0.0

# %% [markdown]
# **The unstable "closed form".** With $P_t = \prod_{j \le t} \alpha_j$ (a `cumprod`),
# the recurrence unrolls to $h_t = P_t \sum_{s \le t} \beta_s / P_s$: no loop, just
# `cumprod` and `cumsum`. It is exact on paper and broken in floating point: $P_t$ decays
# geometrically, so after a few hundred tokens $1/P_s$ overflows (and $P_t$ underflows):
# $\beta_s / P_s = \pm\infty$, and $\infty - \infty$ or $0 \cdot \infty$ is NaN.
# With a selective `dt` it is worse: one token with $\Delta |A| > 104$ zeroes $P$ in
# float32 at once. (The safe ways are the
# loop, the associative scan, or differences of `cumsum(log alpha)` inside short chunks.)
#
# **float32 error growth.** Rounding errors in the loop are multiplied by the decay at
# each later step, so the error of float32 against float64 grows while the state still
# remembers and stops growing after about $1/(\Delta |a|)$ steps, the memory length.
# A slowly decaying channel (small $\Delta |a|$) accumulates the most.

# %%
def closed_form(alpha, beta):
    P = np.cumprod(alpha, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return P * np.cumsum(beta / P, axis=-1)


lengths = np.array([25, 50, 100, 200, 400, 800, 1600, 3200])
l_max = lengths[-1]
decay_rate = 0.3  # dt*|a| per step: 1/P_t = exp(0.3 t) overflows float32 at t ~ 296 (e^88.7), float64 at ~ 2366
xs = rng.normal(size=l_max)
alpha64, beta64 = np.full(l_max, np.exp(-decay_rate)), decay_rate * xs  # a = -1, b = 1, dt = decay_rate
h_true = scan_1d(xs, np.full(l_max, decay_rate), -1.0, np.ones(l_max), np.ones(l_max))  # the float64 loop
closed_err = {}
for dtype in (np.float32, np.float64):
    h_closed = closed_form(alpha64.astype(dtype), beta64.astype(dtype))
    closed_err[dtype] = [np.max(np.abs(h_closed[:L_] - h_true[:L_])) / np.max(np.abs(h_true[:L_]))
                         for L_ in lengths]  # NaN once anything broke
    first_bad = int(np.argmax(~np.isfinite(h_closed))) if not np.all(np.isfinite(h_closed)) else None
    print(f"closed form {np.dtype(dtype).name}: first non-finite state at t = {first_bad}, "
          f"max rel err by length: {np.array2string(np.array(closed_err[dtype]), precision=1)}")
check("closed form, float64, first 100 steps", closed_form(alpha64, beta64)[:100], h_true[:100],
      rtol=1e3 * EPS64)  # short: P_t >= 1e-13, still fine
assert not np.all(np.isfinite(closed_form(alpha64.astype(np.float32), beta64.astype(np.float32))))

# float32 error of the loop itself, for three memory lengths
f32_err = {}
for rate in (0.3, 0.03, 0.003):
    dt_ = np.full(l_max, rate)
    want = scan_1d(xs, dt_, -1.0, np.ones(l_max), np.ones(l_max))  # float64
    got = scan_vectorised(xs.astype(np.float32)[None, None], dt_.astype(np.float32)[None, None],
                          np.array([[-1.0]], dtype=np.float32), np.ones((1, 1, l_max), np.float32),
                          np.ones((1, 1, l_max), np.float32))[0, 0]
    f32_err[rate] = np.abs(got - want) / np.max(np.abs(want))  # (l,) relative to the signal size
    horizon = min(l_max, 1 / rate)
    print(f"float32 loop, dt|a| = {rate}: max rel err {f32_err[rate].max():.1e}   "
          f"eps32 x memory length = {EPS32 * horizon:.1e}")
    # a few roundings per step (eps32 / 2 each, inputs included), each then decaying like the
    # state: they add up over ~horizon steps to ~2 eps32 x horizon of max|h|; twice that allowed
    assert f32_err[rate].max() <= 4 * EPS32 * horizon

fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
for dtype, marker in ((np.float32, "o"), (np.float64, "s")):
    errs = np.array(closed_err[dtype])
    ok = np.isfinite(errs)
    line, = axes[0].loglog(lengths[ok], np.maximum(errs[ok], 1e-17), marker=marker,
                           label=f"cumprod form, {np.dtype(dtype).name}")
    axes[0].plot(lengths[~ok], np.full((~ok).sum(), 10.0), "x", ms=9, color=line.get_color())
axes[0].text(lengths[0], 10.0, "x = NaN", va="center", fontsize=8)
axes[0].set_ylim(1e-17, 1e3)
axes[0].set_xlabel("sequence length")
axes[0].set_ylabel("max rel error vs the float64 loop")
axes[0].set_title("cumprod 'closed form': exact until 1/P_t overflows, then NaN", fontsize=9)
axes[0].legend(fontsize=8, loc="center right")
for rate, err in f32_err.items():
    axes[1].semilogy(np.arange(1, l_max + 1), np.maximum.accumulate(err),
                     label=f"dt|a| = {rate} (memory ~{min(l_max, round(1 / rate))} steps)")
axes[1].set_xlabel("time step t")
axes[1].set_ylabel("running max |float32 - float64| / max|h|")
axes[1].set_title("float32 loop: error grows with the memory length", fontsize=9)
axes[1].legend(fontsize=8)
fig.tight_layout()
save(fig, "01_numerical_caveats.png")

# %% [markdown]
# ![Closed form vs loop, and float32 error growth](figures/01_numerical_caveats.png)
#
# ## 6. Check against the library
#
# The full selective scan of Mamba adds three things around the recurrence, all in
# `minimamba.ops.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`:
# `delta = softplus(delta + delta_bias)`, the skip term `+ D * u`, and the gate
# `y * silu(z)`. Our scan plus those three lines must give the library's numbers, in
# float64 to rounding and in float32 to float32's precision.

# %%
delta_raw = rng.normal(size=(bsz, d, l))  # (b, d, l) before bias and softplus
delta_bias = rng.normal(size=d)  # (d,)
D = rng.normal(size=d)  # (d,)
z = rng.normal(size=(bsz, d, l))  # (b, d, l)

delta_ours = softplus(delta_raw + delta_bias[:, None])  # (b, d, l)
y_ours, h_last = scan_vectorised(u, delta_ours, A, B, C, return_last_state=True)  # (b, d, l), (b, d, n)
y_ours = (y_ours + D[:, None] * u) * silu(z)  # (b, d, l)

kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=True)
y_ref, h_ref = selective_scan_ref(u, delta_raw, A, B, C, **kwargs)
y_fn, h_fn = selective_scan_fn(u, delta_raw, A, B, C, **kwargs)
# float64 on both sides, the same arithmetic: agreement to a few eps64 x length
check("ours vs selective_scan_ref (float64)", y_ours, y_ref, rtol=100 * EPS64)
check("ours vs selective_scan_fn (float64)", y_ours, y_fn, rtol=100 * EPS64)
check("last state vs selective_scan_fn (float64)", h_last, h_fn, rtol=100 * EPS64)

y_gate_blelloch = (np.einsum("bdnl,bnl->bdl", blelloch_scan(
    np.exp(delta_ours[:, :, None, :] * A[None, :, :, None]),
    delta_ours[:, :, None, :] * B[:, None, :, :] * u[:, :, None, :])[1], C) + D[:, None] * u) * silu(z)
check("Blelloch + D + gate vs selective_scan_fn", y_gate_blelloch, y_fn, rtol=100 * EPS64)

f32 = [v.astype(np.float32) for v in (u, delta_raw, A, B, C)]
y_fn32 = selective_scan_fn(*f32, D=D.astype(np.float32), z=z.astype(np.float32),
                           delta_bias=delta_bias.astype(np.float32), delta_softplus=True)
assert y_fn32.dtype == np.float32
# float32 library vs float64 ours: eps32 x (a few ops per step) x memory length (<= l = 25 steps)
check("selective_scan_fn float32 vs ours float64", y_fn32, y_ours, rtol=10 * EPS32 * l)

# %% [markdown]
# That is the whole selective scan. Next, tutorial 2 puts it inside one Mamba block,
# with the projections and the convolution that compute `delta`, `B`, `C` from the input.
