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
# # 2. One Mamba block, line by line
#
# Tutorial 1 built the selective scan. Here it goes inside a Mamba block (Figure 3 of
# the paper, right): projections compute the scan's `delta`, `B` and `C` from the input,
# a short causal convolution mixes neighbouring tokens, and a gate multiplies the
# result. We take a small model with random weights, read layer 0's weights by name
# from `model.state_dict()`, and redo the block in plain NumPy, with the shape at the
# end of every line, checking each piece against minimamba and the whole block against
# `model.backbone.layers[0]`.
#
# Dimension names (as in `minimamba/model.py`): `b` batch, `l` length, `d` hidden_size
# (the residual width), `e` intermediate_size = expand * d, `n` state_size, `k`
# conv_kernel, `r` time_step_rank, `V` vocab_size.

# %%
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from minimamba import MambaConfig, MambaForCausalLM
from minimamba.ops import causal_conv1d_fn, rms_norm, selective_scan_fn
from _common import EPS32, EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)


def silu(v):
    return v / (1 + np.exp(-v))


def softplus(v):
    return np.logaddexp(0.0, v)  # log(1 + e^v), without overflow


# %% [markdown]
# ## The model and layer 0's weights
#
# Odd sizes in every dimension, so a swapped axis cannot hide. float64, so that our
# NumPy and minimamba can be compared to rounding error.

# %%
config = MambaConfig(vocab_size=97, hidden_size=24, state_size=6, num_hidden_layers=2,
                     conv_kernel=4, expand=2)  # time_step_rank "auto" = ceil(24 / 16) = 2
model = MambaForCausalLM(config, dtype="float64", seed=0, impl="numpy")  # minimamba.ops, the readable path
d, e, n, k, r = (config.hidden_size, config.intermediate_size, config.state_size,
                 config.conv_kernel, config.time_step_rank)
print(f"d={d} e={e} n={n} k={k} r={r}")

prefix = "backbone.layers.0."
W = {name[len(prefix):]: w for name, w in model.state_dict().items() if name.startswith(prefix)}
for name, w in W.items():
    print(f"  {prefix}{name:<22} {str(w.shape):>12}")

# %% [markdown]
# ## The block, one line at a time
#
# The input is the residual stream entering layer 0, (b, l, d). The block is pre-norm
# and residual: `hidden + mixer(rms_norm(hidden))`.

# %%
b, l = 2, 13
hidden = rng.normal(size=(b, l, d))  # (b, l, d)

# 0. RMSNorm: divide by the root-mean-square over d, scale per feature (eps from the config)
normed = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + config.layer_norm_epsilon)  # (b, l, d)
normed = normed * W["norm.weight"]  # (b, l, d)
check("rms norm vs ops.rms_norm", normed, rms_norm(hidden, W["norm.weight"], config.layer_norm_epsilon),
      rtol=10 * EPS64)  # the same formula: a few roundings

# 1. in_proj: one matmul makes both branches; x comes first, the gate z second
xz = normed @ W["mixer.in_proj.weight"].T  # (b, l, 2e)   in_proj.weight: (2e, d)
x, z = xz[..., :e], xz[..., e:]  # (b, l, e), (b, l, e)

# %% [markdown]
# **The causal convolution.** Each channel of `x` gets its own `k`-tap filter
# (depthwise) over the last `k` tokens (causal). `conv1d.weight` has torch's shape
# (e, 1, k) and tap `k-1` multiplies the *current* token. First as a loop over time
# and taps, then vectorised over time (a sum of `k` shifted copies), then the library.

# %%
w_conv = W["mixer.conv1d.weight"][:, 0, :]  # (e, k)
bias_conv = W["mixer.conv1d.bias"]  # (e,)

x_conv_loop = np.zeros((b, l, e))  # (b, l, e)
for t in range(l):
    for j in range(k):
        s = t - (k - 1) + j  # the token tap j looks at; before the start it sees zero padding
        if s >= 0:
            x_conv_loop[:, t] += w_conv[:, j] * x[:, s]  # (b, e)
x_conv_loop += bias_conv

x_pad = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # (b, k-1+l, e): k-1 zeros on the left
x_conv = sum(w_conv[:, j] * x_pad[:, j:j + l] for j in range(k)) + bias_conv  # (b, l, e)
# the same k products summed in the same order: exact agreement expected, allow a few eps
check("conv: shifted sum vs loop", x_conv, x_conv_loop, rtol=10 * EPS64)
x_conv_lib = causal_conv1d_fn(x.transpose(0, 2, 1), w_conv, bias_conv).transpose(0, 2, 1)  # (b, l, e)
check("conv: vs ops.causal_conv1d_fn", x_conv, x_conv_lib, rtol=10 * EPS64)

# 2. SiLU after the conv (z never goes through the conv)
x = silu(x_conv)  # (b, l, e)

# %% [markdown]
# **Selection.** `x_proj` computes, per token, a low-rank `delta` (r numbers) and the
# scan's `B` and `C` (n numbers each, shared by all e channels). `dt_proj` lifts `delta`
# to one step size per channel; its bias sits inside the softplus, which keeps the step
# positive. `A` is not input-dependent: it is stored as `A_log` so that `-exp(A_log)`
# is always negative and every state decays.

# %%
x_dbl = x @ W["mixer.x_proj.weight"].T  # (b, l, r + 2n)   x_proj.weight: (r + 2n, e), no bias
dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]  # (b, l, r), (b, l, n), (b, l, n)
dt = softplus(dt_low @ W["mixer.dt_proj.weight"].T + W["mixer.dt_proj.bias"])  # (b, l, e)
A = -np.exp(W["mixer.A_log"])  # (e, n)
assert dt.min() > 0 and A.max() < 0

# %% [markdown]
# **The scan** (tutorial 1) in the block's layout, time before channels: `x` and `dt` are
# (b, l, e) and `B`, `C` (b, l, n), where the kernel's layout is (b, e, l) and (b, n, l).
# The state `h` is (b, e, n); only the current step's is kept. Then the skip
# connection `D * x`.

# %%
h = np.zeros((b, e, n))  # (b, e, n): the state, n numbers per channel
y = np.zeros((b, l, e))  # (b, l, e)
for t in range(l):
    dA = np.exp(dt[:, t, :, None] * A)  # (b, e, n)   zero-order hold
    dBx = dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]  # (b, e, n)   Euler
    h = dA * h + dBx  # (b, e, n)
    y[:, t] = (h * C[:, t, None, :]).sum(-1)  # (b, e)   y_t = C_t . h_t
y = y + W["mixer.D"] * x  # (b, l, e)   skip connection

# the library takes the kernel layout (b, e, l) and (b, n, l), and the pre-softplus delta
y_lib = selective_scan_fn(x.transpose(0, 2, 1), (dt_low @ W["mixer.dt_proj.weight"].T).transpose(0, 2, 1), A,
                          B.transpose(0, 2, 1), C.transpose(0, 2, 1), D=W["mixer.D"],
                          delta_bias=W["mixer.dt_proj.bias"], delta_softplus=True).transpose(0, 2, 1)
# float64 both sides; only the softplus formula differs (logaddexp vs log1p(exp)): a few eps x l
check("scan vs ops.selective_scan_fn", y, y_lib, rtol=100 * EPS64)

# %%
# 3. the gate: the other branch, through SiLU, multiplies the scan's output
y_gated = y * silu(z)  # (b, l, e)

# 4. out_proj back to the residual width, then the residual connection
mixer_out = y_gated @ W["mixer.out_proj.weight"].T  # (b, l, d)   out_proj.weight: (d, e)
block_out = hidden + mixer_out  # (b, l, d)

layer0 = model.backbone.layers[0]
check("mixer vs layers[0].mixer(normed)", mixer_out, layer0.mixer(normed), rtol=100 * EPS64)
check("block vs model.backbone.layers[0]", block_out, layer0(hidden), rtol=100 * EPS64)

# %% [markdown]
# ## What flows through the block
#
# One sequence, every intermediate as a (token x feature) picture. With random weights
# the values mean nothing yet — tutorial 5 looks at a trained model — but the shapes and
# roles are visible: `dt` is positive, one value per token *and* channel (at
# initialisation it is set mostly by the per-channel `dt_proj.bias`, hence the stripes;
# training makes it depend on the token), while `B` and `C` are one vector per token,
# shared by all channels.

# %%
panels = [("input hidden (l, d)", hidden[0]), ("x after conv + SiLU (l, e)", x[0]),
          ("dt = softplus(...) (l, e)", dt[0]), ("B (l, n)", B[0]), ("C (l, n)", C[0]),
          ("gate silu(z) (l, e)", silu(z[0])), ("y * silu(z) (l, e)", y_gated[0]),
          ("block output (l, d)", block_out[0])]
fig, axes = plt.subplots(2, 4, figsize=(13, 5.5))
for ax, (title, value) in zip(axes.flat, panels):
    im = ax.imshow(value, aspect="auto", cmap="viridis" if value.min() >= 0 else "RdBu_r",
                   **({} if value.min() >= 0 else dict(vmin=-np.abs(value).max(), vmax=np.abs(value).max())))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("feature")
    ax.set_ylabel("token")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle("one Mamba block on one sequence (random weights, layer 0)")
fig.tight_layout()
save(fig, "02_block_intermediates.png")

# %% [markdown]
# ![Intermediates of one Mamba block](figures/02_block_intermediates.png)
#
# ## The whole model from our block
#
# The same lines as one function, applied to every layer, then the final RMSNorm and
# the language-model head, which is tied to the embedding matrix. The logits must be
# minimamba's, in float64 and (against a float32 model with the same weights) to
# float32 precision.

# %%
def mamba_block(hidden, W, config):
    """hidden (b, l, d) -> (b, l, d): the lines above, without the checks."""
    e, n, k, r = config.intermediate_size, config.state_size, config.conv_kernel, config.time_step_rank
    l = hidden.shape[1]
    normed = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + config.layer_norm_epsilon)  # (b, l, d)
    normed = normed * W["norm.weight"]  # (b, l, d)
    xz = normed @ W["mixer.in_proj.weight"].T  # (b, l, 2e)
    x, z = xz[..., :e], xz[..., e:]  # (b, l, e) each
    x_pad = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # (b, k-1+l, e)
    w_conv = W["mixer.conv1d.weight"][:, 0, :]  # (e, k)
    x = silu(sum(w_conv[:, j] * x_pad[:, j:j + l] for j in range(k)) + W["mixer.conv1d.bias"])  # (b, l, e)
    x_dbl = x @ W["mixer.x_proj.weight"].T  # (b, l, r + 2n)
    dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]  # (b, l, r), (b, l, n), (b, l, n)
    dt = softplus(dt_low @ W["mixer.dt_proj.weight"].T + W["mixer.dt_proj.bias"])  # (b, l, e)
    A = -np.exp(W["mixer.A_log"])  # (e, n)
    h = np.zeros((hidden.shape[0], e, n))  # (b, e, n)
    y = np.zeros(x.shape)  # (b, l, e)
    for t in range(l):
        h = np.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]  # (b, e, n)
        y[:, t] = (h * C[:, t, None, :]).sum(-1)  # (b, e)
    y = (y + W["mixer.D"] * x) * silu(z)  # (b, l, e)
    return hidden + y @ W["mixer.out_proj.weight"].T  # (b, l, d)


weights = model.state_dict()
input_ids = rng.integers(0, config.vocab_size, size=(b, l))  # (b, l)
hs = weights["backbone.embeddings.weight"][input_ids]  # (b, l, d)
for i in range(config.num_hidden_layers):
    p = f"backbone.layers.{i}."
    hs = mamba_block(hs, {name[len(p):]: w for name, w in weights.items() if name.startswith(p)}, config)  # (b, l, d)
hs = hs / np.sqrt((hs**2).mean(-1, keepdims=True) + config.layer_norm_epsilon)  # (b, l, d)   norm_f
hs = hs * weights["backbone.norm_f.weight"]  # (b, l, d)
logits = hs @ weights["backbone.embeddings.weight"].T  # (b, l, V): the head is the embedding matrix

check("logits vs model(input_ids).logits, float64", logits, model(input_ids).logits, rtol=1e3 * EPS64)

model32 = MambaForCausalLM(config, dtype="float32", seed=0, impl="numpy")  # the same seed: the same weights, rounded
logits32 = model32(input_ids).logits
assert logits32.dtype == np.float32
# float32 rounds every weight (eps32 / 2 relative) and every op; a few tens of ops in a chain over
# 2 layers and 13 steps of a decaying scan: ~10 eps32 expected, 100 eps32 allowed
check("logits float32 model vs ours float64", logits32, logits, rtol=100 * EPS32)

# %% [markdown]
# Our thirty lines of NumPy are the Mamba block. Tutorial 4 runs the same model one
# token at a time through its cache and shows why that costs the same for every token.
