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
# # 8. The backward pass by hand
#
# minimamba trains without an autodiff framework: every op has a forward and a
# backward written out by hand (`minimamba/training/backward.py`), as llm.c does for
# GPT-2. Here we derive three of them — RMSNorm, the causal convolution and the
# selective scan — write each in a few lines of NumPy, and check each against
# **central finite differences**, the one check that needs no trust in the derivation.
# The scan's gradient turns out to be a recurrence of the same form as the forward,
# running *backwards in time*. Its memory is the interesting part: the backward needs
# every state $h_t$, and storing them costs (b, l, e, n) numbers per layer. The last
# sections do what `kernels/cpu_backward.py` does instead — keep only the state at
# the start of each chunk and recompute the rest — and measure the memory of both.
#
# Layout, as in `minimamba.training.backward`: time before channels, `x`, `u`, `delta`
# (b, l, e), `B`, `C` (b, l, n), `A` (e, n). Everything in float64, so that finite
# differences are accurate to ~1e-9.

# %%
import time
import tracemalloc
from importlib.util import find_spec
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minimamba.ops import rms_norm, selective_scan_ref
from minimamba.training.backward import (causal_conv_backward, causal_conv_forward, rms_norm_backward,
                                         rms_norm_forward, selective_scan_backward, selective_scan_forward)
from _common import EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. Checking a gradient: central differences
#
# For a function `f` and any upstream gradient `w` (what the rest of the network sends
# back), the backward must return the gradient of the scalar $L = \sum w \odot f(x)$.
# Central differences estimate it one input element at a time:
#
# $$\frac{\partial L}{\partial x_i} \approx \frac{L(x + \epsilon e_i) - L(x - \epsilon e_i)}{2 \epsilon},$$
#
# with an error of about $\epsilon^2 |L'''| / 6$ (the Taylor remainder) plus
# $\mathrm{eps64}\, |L| / \epsilon$ (rounding in the subtraction). With $\epsilon = 10^{-5}$
# and values of order 1 both are below $10^{-10}$: a correct backward agrees to ~1e-9
# relative, a wrong one (a missing term, a transposed axis) by order 1. We allow 1e-7.

# %%
FD_EPS = 1e-5
FD_RTOL = 1e-7  # both error terms above are ~1e-10 relative; 1000x margin, far below any real mistake


def numerical_grad(loss, x):
    """Central differences of the scalar loss() with respect to every element of x (perturbed in place)."""
    grad = np.zeros_like(x)
    flat, grad_flat = x.reshape(-1), grad.reshape(-1)  # views: writing flat[i] changes x
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + FD_EPS
        up = loss()
        flat[i] = old - FD_EPS
        down = loss()
        flat[i] = old
        grad_flat[i] = (up - down) / (2 * FD_EPS)
    return grad


# %% [markdown]
# ## 2. RMSNorm
#
# $y_i = w_i\, x_i\, r$ with $r = (\tfrac1d \sum_j x_j^2 + \varepsilon)^{-1/2}$, over the
# last axis. $r$ depends on every $x_j$: $\partial r / \partial x_j = -r^3 x_j / d$. With
# $g = \bar y \odot w$ (the upstream gradient times the weight) and $\hat x = x r$:
#
# $$\bar x_j = g_j r + \sum_i g_i x_i \Big(-\frac{r^3 x_j}{d}\Big)
#            = r \big(g_j - \hat x_j \cdot \mathrm{mean}_i(g_i \hat x_i)\big),
#   \qquad \bar w = \sum_{\text{positions}} \bar y \odot \hat x .$$
#
# The second term removes from $g$ its component along $\hat x$: scaling $x$ does not
# change $y$ (for $\varepsilon \to 0$), so the gradient has no component in that direction.

# %%
def rms_norm_grad(dy, x, w, eps):
    """dx (..., d) and dw (d,) of y = x * r * w."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # (..., 1)
    x_hat = x * r  # (..., d)
    g = dy * w  # (..., d)
    dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdims=True))  # (..., d)
    dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(0)  # (d,)
    return dx, dw


b, l, d, eps = 2, 5, 8, 1e-5
x = rng.normal(size=(b, l, d))  # (b, l, d)
w_norm = rng.normal(size=d)  # (d,)
dy = rng.normal(size=(b, l, d))  # (b, l, d): the upstream gradient
loss = lambda: float((dy * rms_norm(x, w_norm, eps)).sum())  # noqa: E731
dx, dw = rms_norm_grad(dy, x, w_norm, eps)
check("RMSNorm dx vs central differences", dx, numerical_grad(loss, x), rtol=FD_RTOL)
check("RMSNorm dw vs central differences", dw, numerical_grad(loss, w_norm), rtol=FD_RTOL)
lib_dx, lib_dw = rms_norm_backward(dy, rms_norm_forward(x, w_norm, eps)[1])
# the same formula in float64: a few roundings
check("RMSNorm dx vs training.backward.rms_norm_backward", dx, lib_dx, rtol=100 * EPS64)
check("RMSNorm dw vs training.backward.rms_norm_backward", dw, lib_dw, rtol=100 * EPS64)
print(f"component of dx along x: {abs((dx * x).sum(-1)).max():.1e} (x {abs(dx).max():.1e} for dx itself)")
assert abs((dx * x).sum(-1)).max() < 1e-3 * abs(dx).max()  # zero but for eps = 1e-5 in the norm

# %% [markdown]
# ## 3. The causal convolution
#
# Each channel has `k` taps; tap `j` multiplies the input `k-1-j` steps back:
# $\mathrm{out}_t = \sum_j w_j\, x_{t-(k-1)+j} + \mathrm{bias}$ (zero before $t = 0$).
# Input $x_s$ reaches the outputs $t = s + (k-1) - j$, so
#
# $$\bar x_s = \sum_j w_j\, \overline{\mathrm{out}}_{s + (k-1) - j}, \qquad
#   \bar w_j = \sum_{b, t} \overline{\mathrm{out}}_t\, x_{t-(k-1)+j}, \qquad
#   \overline{\mathrm{bias}} = \sum_{b, t} \overline{\mathrm{out}}_t .$$
#
# The gradient of a causal filter is the same filter run *anti-causally*: $\bar x_s$ reads
# the output gradients of $s$ and the `k-1` steps after it (past the end: zero).

# %%
def conv(x, w, bias):
    """x (b, l, e), w (e, k), bias (e,) -> (b, l, e): the depthwise causal conv (tutorial 2)."""
    k, l = w.shape[1], x.shape[1]
    x_pad = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # (b, k-1+l, e)
    return sum(w[:, j] * x_pad[:, j:j + l] for j in range(k)) + bias  # (b, l, e)


def conv_grad(dout, x, w):
    """dx (b, l, e), dw (e, k), dbias (e,) of conv."""
    k, l = w.shape[1], x.shape[1]
    dout_pad = np.pad(dout, ((0, 0), (0, k - 1), (0, 0)))  # (b, l+k-1, e): zeros past the end
    dx = sum(w[:, j] * dout_pad[:, k - 1 - j:k - 1 - j + l] for j in range(k))  # (b, l, e): anti-causal
    x_pad = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # (b, k-1+l, e)
    dw = np.stack([(dout * x_pad[:, j:j + l]).sum((0, 1)) for j in range(k)], axis=1)  # (e, k)
    return dx, dw, dout.sum((0, 1))


e, k = 3, 4
x = rng.normal(size=(b, l, e))  # (b, l, e)
w_conv, bias_conv = rng.normal(size=(e, k)), rng.normal(size=e)  # (e, k), (e,)
dout = rng.normal(size=(b, l, e))  # (b, l, e)
loss = lambda: float((dout * conv(x, w_conv, bias_conv)).sum())  # noqa: E731
dx, dw, dbias = conv_grad(dout, x, w_conv)
check("conv dx vs central differences", dx, numerical_grad(loss, x), rtol=FD_RTOL)
check("conv dw vs central differences", dw, numerical_grad(loss, w_conv), rtol=FD_RTOL)
check("conv dbias vs central differences", dbias, numerical_grad(loss, bias_conv), rtol=FD_RTOL)
lib = causal_conv_backward(dout, causal_conv_forward(x, w_conv, bias_conv)[1])
for name, ours, theirs in zip(("dx", "dw", "dbias"), (dx, dw, dbias), lib):
    check(f"conv {name} vs training.backward.causal_conv_backward", ours, theirs, rtol=100 * EPS64)

# %% [markdown]
# ## 4. The selective scan
#
# Forward, per batch row, channel and state (tutorial 1), with $a_t = e^{\Delta_t A}$:
#
# $$h_t = a_t h_{t-1} + \Delta_t B_t u_t, \qquad y_t = C_t \cdot h_t + D u_t .$$
#
# Let $\bar y_t$ be the upstream gradient. $h_t$ influences $y_t$ directly and every
# later output through $h_{t+1}$, so the **total** gradient reaching it is
#
# $$\bar h_t = \bar y_t C_t + a_{t+1} \bar h_{t+1}, \qquad \bar h_{l} = 0 .$$
#
# That is the forward recurrence again — an elementwise decay times the previous value
# plus an input — run from the last step to the first. The same associative operator
# applies, so the backward can be chunked or tree-scanned exactly like the forward
# (mamba_ssm's backward kernel is a reverse scan). With $\bar h_t$ in hand, every
# input's gradient is local to step $t$:
#
# | input | gradient | from |
# | --- | --- | --- |
# | $C_t$ | $\sum_e \bar y_t h_t$ | $y_t = C_t \cdot h_t$ |
# | $u_t$ | $\Delta_t \sum_n \bar h_t B_t + D \bar y_t$ | the input term and the skip |
# | $B_t$ | $\sum_e \bar h_t \Delta_t u_t$ | the input term |
# | $\Delta_t$ | $\sum_n \big(\bar h_t h_{t-1} a_t A + \bar h_t B_t u_t\big)$ | the decay and the input term |
# | $A$ | $\sum_{b, t} \bar h_t h_{t-1} a_t \Delta_t$ | the decay, every step |
# | $D$ | $\sum_{b, t} \bar y_t u_t$ | the skip |
#
# The decay's rows need $h_{t-1}$ — every state of the forward. We write one function
# for the recurrence and use it both ways. Each piece takes a starting state `h0` and
# the gradient `dh_in` arriving at its last state from later steps (zero for a whole
# sequence), and returns the gradient leaving through `h0`; section 5 needs them.

# %%
def linear_recurrence(alpha, beta, h0):
    """h_t = alpha_t * h_{t-1} + beta_t along axis 1 (time), from h_{-1} = h0. alpha, beta (b, l, e, n)."""
    h, out = h0, np.empty_like(beta)  # (b, e, n), (b, l, e, n)
    for t in range(beta.shape[1]):
        h = alpha[:, t] * h + beta[:, t]  # (b, e, n)
        out[:, t] = h
    return out


def scan_forward(u, delta, A, B, C, D, h0):
    """y (b, l, e) and every state (b, l, e, n), starting from h0 (b, e, n)."""
    decay = np.exp(delta[..., None] * A)  # (b, l, e, n)
    states = linear_recurrence(decay, (delta * u)[..., None] * B[:, :, None, :], h0)  # (b, l, e, n)
    return np.einsum("blen,bln->ble", states, C) + D * u, states  # (b, l, e), (b, l, e, n)


def scan_backward(dy, u, delta, A, B, C, D, states, h0, dh_in):
    """Gradients of u, delta, A, B, C, D, and of h0; states from scan_forward, dh_in = dL/dh_last from later."""
    decay = np.exp(delta[..., None] * A)  # (b, l, e, n): a_t
    decay_next = np.concatenate([decay[:, 1:], np.ones_like(decay[:, :1])], axis=1)  # (b, l, e, n): a_{t+1}
    dy_C = dy[..., None] * C[:, :, None, :]  # (b, l, e, n): y_t's direct pull on h_t
    dh = linear_recurrence(decay_next[:, ::-1], dy_C[:, ::-1], dh_in)[:, ::-1]  # (b, l, e, n): reverse time
    h_prev = np.concatenate([h0[:, None], states[:, :-1]], axis=1)  # (b, l, e, n): h_{t-1}
    d_decay = dh * h_prev * decay  # (b, l, e, n): dL/d(delta A) through exp
    du = (dh * B[:, :, None, :]).sum(-1) * delta + D * dy  # (b, l, e)
    ddelta = (d_decay * A + dh * B[:, :, None, :] * u[..., None]).sum(-1)  # (b, l, e)
    dA = (d_decay * delta[..., None]).sum((0, 1))  # (e, n)
    dB = np.einsum("blen,ble->bln", dh, delta * u)  # (b, l, n)
    dC = np.einsum("ble,blen->bln", dy, states)  # (b, l, n)
    dD = (dy * u).sum((0, 1))  # (e,)
    dh0 = decay[:, 0] * dh[:, 0]  # (b, e, n): what flows back into the state before this piece
    return du, ddelta, dA, dB, dC, dD, dh0


b, l, e, n = 2, 7, 3, 4
u = rng.normal(size=(b, l, e))  # (b, l, e)
delta = np.logaddexp(0.0, rng.normal(-1.0, 1.0, size=(b, l, e)))  # (b, l, e), softplus: positive
A = -np.exp(rng.normal(size=(e, n)))  # (e, n)
B, C = rng.normal(size=(b, l, n)), rng.normal(size=(b, l, n))  # (b, l, n) each
D = rng.normal(size=e)  # (e,)
dy = rng.normal(size=(b, l, e))  # (b, l, e)
zero_state = np.zeros((b, e, n))  # (b, e, n)

y, states = scan_forward(u, delta, A, B, C, D, zero_state)
y_ref = selective_scan_ref(*(a.transpose(0, 2, 1) for a in (u, delta)), A, *(a.transpose(0, 2, 1) for a in (B, C)),
                           D=D).transpose(0, 2, 1)  # (b, l, e): ops works in the kernels' (b, e, l)
check("scan forward vs ops.selective_scan_ref", y, y_ref, rtol=100 * EPS64)  # float64, same steps

grads = scan_backward(dy, u, delta, A, B, C, D, states, zero_state, zero_state)[:6]
inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D)
loss = lambda: float((dy * scan_forward(u, delta, A, B, C, D, zero_state)[0]).sum())  # noqa: E731
for (name, array), grad in zip(inputs.items(), grads):
    check(f"scan d{name} vs central differences", grad, numerical_grad(loss, array), rtol=FD_RTOL)
lib = selective_scan_backward(dy, u, delta, A, B, C, D, selective_scan_forward(u, delta, A, B, C, D)[1])
for name, ours, theirs in zip(inputs, grads, lib):
    check(f"scan d{name} vs training.backward.selective_scan_backward", ours, theirs, rtol=100 * EPS64)

# %% [markdown]
# ## 5. Memory: store every state, or recompute them by chunks
#
# The backward above keeps `states`, (b, l, e, n) numbers per layer. For a 130m-shape
# layer (e = 1536, n = 16) in float32 that is 98 kB per token, 200 MB per layer for one
# 2048-token sequence, 4.8 GB for the 24 layers. The states are cheap to recompute, and
# the chunk plumbing of section 4 lets us do it one chunk at a time:
#
# * **forward**: run the chunks in order, keep only the state *entering* each chunk,
#   (b, nc, e, n) for `nc = l / T` chunks, and drop the chunk's states;
# * **backward**: walk the chunks in reverse; for each, recompute its `T` states from
#   its entering state, run the backward on the chunk with the gradient `dh_in`
#   arriving from the chunk after it, and pass `dh0` on to the chunk before.
#
# The states now held are (b, nc, e, n) + (b, T, e, n), smallest for $T \approx \sqrt{l}$.
# The price is one more forward recurrence per backward. This is the plan of
# `kernels/cpu_backward.py` (with `DEFAULT_CHUNK = 64`) and of the paper's kernel, which
# recomputes the states in SRAM (Section 3.3.2).

# %%
def chunked_forward(u, delta, A, B, C, D, T):
    """y (b, l, e) and the state entering each chunk (b, nc, e, n); the chunks' states are dropped."""
    b, l, e = u.shape
    h = np.zeros((b, e, A.shape[1]), dtype=u.dtype)  # (b, e, n)
    y, h_start = np.empty_like(u), []
    for t0 in range(0, l, T):
        c = slice(t0, t0 + T)
        h_start.append(h)
        y[:, c], chunk_states = scan_forward(u[:, c], delta[:, c], A, B[:, c], C[:, c], D, h)
        h = chunk_states[:, -1].copy()  # (b, e, n); a copy, since a view would keep all T states alive
    return y, np.stack(h_start, axis=1)  # (b, l, e), (b, nc, e, n)


def chunked_backward(dy, u, delta, A, B, C, D, h_start, T):
    """The gradients of scan_backward, recomputing each chunk's states from h_start (b, nc, e, n)."""
    du, ddelta, dB, dC = np.empty_like(u), np.empty_like(u), np.empty_like(B), np.empty_like(C)
    dA, dD = np.zeros_like(A), np.zeros_like(D)
    dh_in = np.zeros_like(h_start[:, 0])  # (b, e, n): nothing arrives after the last step
    for j in reversed(range(h_start.shape[1])):
        c = slice(j * T, (j + 1) * T)
        _, chunk_states = scan_forward(u[:, c], delta[:, c], A, B[:, c], C[:, c], D, h_start[:, j])  # recompute
        du[:, c], ddelta[:, c], dA_c, dB[:, c], dC[:, c], dD_c, dh_in = scan_backward(
            dy[:, c], u[:, c], delta[:, c], A, B[:, c], C[:, c], D, chunk_states, h_start[:, j], dh_in)
        dA += dA_c
        dD += dD_c
    return du, ddelta, dA, dB, dC, dD


for T in (1, 3, 7, 64):  # T = 3: a short last chunk; 64 > l: one chunk
    y_chunked, h_start = chunked_forward(u, delta, A, B, C, D, T)
    check(f"chunked forward (T = {T}) vs whole", y_chunked, y, rtol=100 * EPS64)
    grads_chunked = chunked_backward(dy, u, delta, A, B, C, D, h_start, T)
    worst = max(np.abs(g1 - g2).max() / np.abs(g2).max() for g1, g2 in zip(grads_chunked, grads))
    print(f"chunked backward (T = {T}): worst relative difference over the six gradients {worst:.1e}")
    assert worst < 100 * EPS64  # float64, the same steps grouped by chunk

# %% [markdown]
# Now the memory, measured. `tracemalloc` sees NumPy's allocations; we record the peak
# during forward + backward for both versions, float32, one sequence, e = 32, n = 16,
# T = 64, at growing `l`. Next to it, the states each plan keeps, computed from the
# shapes for a 130m-shape layer.

# %%
def peak_bytes(func):
    tracemalloc.start()
    tracemalloc.reset_peak()
    func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def whole(u, delta, A, B, C, D, dy):
    zero = np.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype)
    _, states = scan_forward(u, delta, A, B, C, D, zero)
    return scan_backward(dy, u, delta, A, B, C, D, states, zero, zero)


def chunked(u, delta, A, B, C, D, dy, T=64):
    _, h_start = chunked_forward(u, delta, A, B, C, D, T)
    return chunked_backward(dy, u, delta, A, B, C, D, h_start, T)


e_m, n_m, T_m = 32, 16, 64
lengths = [256, 512, 1024, 2048, 4096]
peaks, seconds = {"whole": [], "chunked": []}, {"whole": [], "chunked": []}
for l_m in lengths:
    args = [rng.normal(size=(1, l_m, e_m)), np.full((1, l_m, e_m), 0.05), -np.exp(rng.normal(size=(e_m, n_m))),
            rng.normal(size=(1, l_m, n_m)), rng.normal(size=(1, l_m, n_m)), np.ones(e_m),
            rng.normal(size=(1, l_m, e_m))]
    args = [a.astype(np.float32) for a in args]  # u, delta, A, B, C, D, dy
    for name, func in (("whole", whole), ("chunked", chunked)):
        start = time.perf_counter()
        peaks[name].append(peak_bytes(lambda: func(*args)))
        seconds[name].append(time.perf_counter() - start)
    states_mb = l_m * e_m * n_m * 4 / 1e6
    print(f"l = {l_m:>5}: peak whole {peaks['whole'][-1] / 1e6:6.1f} MB, chunked {peaks['chunked'][-1] / 1e6:5.2f} MB "
          f"(all states: {states_mb:5.1f} MB); time whole {seconds['whole'][-1]:.2f} s, "
          f"chunked {seconds['chunked'][-1]:.2f} s")
growth_whole = peaks["whole"][-1] / peaks["whole"][0]
growth_chunked = peaks["chunked"][-1] / peaks["chunked"][0]
print(f"l x{lengths[-1] // lengths[0]}: peak whole x{growth_whole:.1f}, chunked x{growth_chunked:.1f}")
# whole holds several (l, e, n) arrays: it grows in proportion to l (x16 here, minus fixed costs);
# chunked holds (l / T) boundary states plus one chunk's arrays: it grows far more slowly
assert growth_whole > 12 and growth_chunked < 0.5 * growth_whole
assert peaks["whole"][-1] > 5 * peaks["chunked"][-1]

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
ax.loglog(lengths, np.array(peaks["whole"]) / 1e6, "o-", label="store every state (sections 2-4)")
ax.loglog(lengths, np.array(peaks["chunked"]) / 1e6, "s-", label=f"chunk boundaries + recompute, T = {T_m}")
ax.loglog(lengths, np.array(lengths) * e_m * n_m * 4 / 1e6, ":", color="gray", label="the states alone, l x e x n")
ax.set_xticks(lengths, [str(l_m) for l_m in lengths])
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.set_xlabel("sequence length l")
ax.set_ylabel("peak memory of forward + backward (MB)")
ax.set_title(f"measured (tracemalloc): one scan, e = {e_m}, n = {n_m}, float32", fontsize=9)
ax.legend(fontsize=8)
ax = axes[1]
long = np.logspace(2, 5, 31)  # l = 100 .. 100k
e_130m, n_130m, layers_130m = 1536, 16, 24
per_state = e_130m * n_130m * 4 * layers_130m / 1e9  # GB per stored state, all 24 layers
ax.loglog(long, long * per_state, label="every state: l x e x n")
ax.loglog(long, (np.ceil(long / 64) + 64) * per_state, label="boundaries + one chunk, T = 64 (cpu_backward)")
ax.loglog(long, 2 * np.ceil(np.sqrt(long)) * per_state, "--", label="boundaries + one chunk, T = sqrt(l)")
for l_mark in (2048, 100_000):
    print(f"mamba-130m, l = {l_mark}: every state {l_mark * per_state:.1f} GB, "
          f"boundaries + one chunk of 64 {(np.ceil(l_mark / 64) + 64) * per_state:.2f} GB")
ax.set_xlabel("sequence length l")
ax.set_ylabel("scan states kept for the backward (GB)")
ax.set_title("computed: mamba-130m (24 layers, e = 1536, n = 16), float32", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "08_backward_memory.png")

# %% [markdown]
# ![Peak memory of the scan's forward + backward against the sequence length](figures/08_backward_memory.png)
#
# Left, measured: storing every state costs memory in proportion to `l` (our NumPy
# backward holds several (b, l, e, n) arrays at its peak, the decays and the state
# gradients too); the chunked version holds the boundary states and one chunk's arrays.
# Right, computed for mamba-130m (printed above): at 2048 tokens every state is 4.8 GB,
# the chunk boundaries plus one chunk 0.23 GB; at 100k tokens 236 GB against 3.8 GB.
# The cost is compute: one more forward recurrence per backward. In this NumPy version
# the printed times barely differ, because the whole version's large arrays cost time
# too; the paper's kernel recomputes in SRAM, which is cheaper than reading stored
# states back from HBM.
#
# ## 6. The same plan in `kernels/cpu_backward.py`
#
# The Numba kernel does per chunk what `chunked_backward` does, with loops instead of
# whole arrays, and carries `dh` already multiplied by the decay (our `dh0`). The lines
# below are quoted from it; the cell checks that each still appears there.
#
# | here | `kernels/cpu_backward.py` |
# | --- | --- |
# | `h_start.append(h)` in `chunked_forward` | `h_start[:, c] = h` in `scan_forward` |
# | recompute: `scan_forward(..., h_start[:, j])` | `hs[bi, 0] = h0[bi]`, then `hs[bi, s + 1, ei, ni] = decay[bi, s, ei, ni] * hs[bi, s, ei, ni] + dtu * B[bi, s, ni]` |
# | $\bar h_t = \bar y_t C_t + a_{t+1} \bar h_{t+1}$ | `dhv = dh[bi, ei, ni] + g * C[bi, s, ni]  # total dL/dh_t` |
# | `d_decay = dh * h_prev * decay` | `da = dhv * hs[bi, s, ei, ni] * a` |
# | `ddelta`, `dA` | `ddt += da * A[ei, ni] + dhv * bt * uu`, `dA_rows[bi, ei, ni] += da * dt` |
# | `dB`, `du` | `dB[bi, s, ni] += dhv * dt * uu`, `du[bi, s, ei] = duu * dt + g * D[ei]` |
# | `dh0 = decay[:, 0] * dh[:, 0]` | `dh[bi, ei, ni] = dhv * a` (after every step) |

# %%
source = Path(find_spec("minimamba.kernels.cpu_backward").origin).read_text(encoding="utf-8")
quoted = ["h_start[:, c] = h", "hs[bi, 0] = h0[bi]",
          "hs[bi, s + 1, ei, ni] = decay[bi, s, ei, ni] * hs[bi, s, ei, ni] + dtu * B[bi, s, ni]",
          "dhv = dh[bi, ei, ni] + g * C[bi, s, ni]  # total dL/dh_t", "da = dhv * hs[bi, s, ei, ni] * a",
          "ddt += da * A[ei, ni] + dhv * bt * uu", "dA_rows[bi, ei, ni] += da * dt",
          "dB[bi, s, ni] += dhv * dt * uu", "du[bi, s, ei] = duu * dt + g * D[ei]", "dh[bi, ei, ni] = dhv * a",
          "DEFAULT_CHUNK = 64"]
missing = [line for line in quoted if line not in source]
assert not missing, f"kernels/cpu_backward.py no longer has {missing}: update the table above"
print(f"all {len(quoted)} quoted lines found in cpu_backward.py")

# %% [markdown]
# The whole model's backward (`minimamba.training.grad`) chains these pieces with the
# projections', SiLU's, softplus' and the loss's, each checked the same way in
# `tests/test_training_backward.py`.
