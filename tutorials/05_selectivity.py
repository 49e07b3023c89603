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
# # 5. Selectivity in action
#
# What makes Mamba *selective* is that the step size `dt` and the matrices `B` and `C`
# are computed from each token (tutorial 2). `dt` decides, per token and per channel,
# how much of the state to forget (`exp(dt * A)`, close to 0 for a large step) and how
# much of the new input to write (`dt * B * x`); `B` says into which of the `n` state
# slots, `C` which slots to read out.
#
# Here we look at those numbers on real text: the built-in model (trained on
# Shakespeare's plays) reads a short passage with speaker names and line breaks. We
# recompute one layer from its weights and its input, so that `dt`, `B` and `C` are in
# our hands, check the recomputation against the model's own hidden state, then draw
# them and measure whether they behave differently at newlines and speaker names.
#
# Dimension names: `l` tokens, `d` hidden_size, `e` intermediate_size (channels), `n`
# state_size, `k` conv_kernel, `r` time_step_rank.

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minimamba
from minimamba import MambaForCausalLM, Tokenizer
from _common import EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

MODEL_DIR = Path(minimamba.BUILTIN_MODEL_DIR)
if not (MODEL_DIR / "model.safetensors").is_file():
    sys.exit(f"this tutorial reads the built-in model, and {MODEL_DIR} has no model.safetensors")


def silu(v):
    return v / (1 + np.exp(-v))


def softplus(v):
    return np.logaddexp(0.0, v)  # log(1 + e^v), without overflow


# %% [markdown]
# ## The text and the model
#
# The opening exchange of *Romeo and Juliet* in the layout of the training text: a
# speaker's name on its own line ending in a full stop, then the speech. The model is
# loaded in float64 so that our recomputation can be compared to rounding error.

# %%
PASSAGE = """Sampson.
Gregory, o' my word, we'll not carry coals.

Gregory.
No, for then we should be colliers.

Sampson.
I mean, an we be in choler we'll draw.

Gregory.
Ay, while you live, draw your neck out o' the collar.
"""
model = MambaForCausalLM.from_pretrained(MODEL_DIR, dtype="float64")
config = model.config
tokenizer = Tokenizer.from_pretrained(MODEL_DIR)
ids = np.array([tokenizer.encode(PASSAGE)])  # (1, l)
tokens = [tokenizer.decode([i]) for i in ids[0]]
l = ids.shape[1]
print(f"{l} tokens:", tokens)

# %% [markdown]
# Each token gets a role, from the text alone: the newline characters, the speaker
# names (the tokens of a line that is a single capitalised word and a full stop),
# punctuation, and the rest (words inside a speech).

# %%
roles = []
line_is_name = []
for line in PASSAGE.split("\n"):
    line_is_name.append(line.endswith(".") and line[:-1].isalpha() and line[0].isupper())
line_no = 0
for tok in tokens:
    if "\n" in tok:
        roles.append("newline")
    elif line_is_name[line_no]:
        roles.append("speaker name")
    elif tok.strip() and all(not ch.isalnum() for ch in tok.strip()):
        roles.append("punctuation")
    else:
        roles.append("word")
    line_no += tok.count("\n")
roles = np.array(roles)  # (l,)
ROLES = ["newline", "speaker name", "punctuation", "word"]
assert "".join(tokens) == PASSAGE and line_no == PASSAGE.count("\n")
print({role: int((roles == role).sum()) for role in ROLES})

# %% [markdown]
# ## Recomputing one layer, with dt, B and C in hand
#
# `output_hidden_states=True` returns every layer's output, then the output of the final
# norm (L + 1 arrays of (1, l, d)); the input of layer `i` is the output of layer `i - 1`
# (the embeddings for layer 0). From that input and the layer's weights we redo the
# block of tutorial 2, keeping its intermediates, for every layer.

# %%
out = model(ids, output_hidden_states=True)
weights = model.state_dict()
L = config.num_hidden_layers
assert len(out.hidden_states) == L + 1
layer_inputs = [weights["backbone.embeddings.weight"][ids]] + list(out.hidden_states[:L - 1])  # L of (1, l, d)


def block_with_intermediates(hidden, i):
    """Layer i on hidden (1, l, d): its output (1, l, d) and {x, dt, B, C, A} for one sequence."""
    p = f"backbone.layers.{i}."
    W = {name[len(p):]: w for name, w in weights.items() if name.startswith(p)}
    e, n, k, r = config.intermediate_size, config.state_size, config.conv_kernel, config.time_step_rank
    normed = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + config.layer_norm_epsilon)  # (1, l, d)
    normed = normed * W["norm.weight"]  # (1, l, d)
    xz = normed @ W["mixer.in_proj.weight"].T + W.get("mixer.in_proj.bias", 0)  # (1, l, 2e)
    x, z = xz[..., :e], xz[..., e:]  # (1, l, e) each
    x_pad = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # (1, k-1+l, e)
    w_conv = W["mixer.conv1d.weight"][:, 0, :]  # (e, k)
    x = silu(sum(w_conv[:, j] * x_pad[:, j:j + l] for j in range(k)) + W.get("mixer.conv1d.bias", 0))  # (1, l, e)
    x_dbl = x @ W["mixer.x_proj.weight"].T  # (1, l, r + 2n)
    dt_low, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]  # (1, l, r), (1, l, n), (1, l, n)
    dt = softplus(dt_low @ W["mixer.dt_proj.weight"].T + W["mixer.dt_proj.bias"])  # (1, l, e)
    A = -np.exp(W["mixer.A_log"])  # (e, n)
    h = np.zeros((e, n))  # (e, n)
    y = np.zeros((l, e))  # (l, e)
    for t in range(l):
        h = np.exp(dt[0, t, :, None] * A) * h + dt[0, t, :, None] * B[0, t, None, :] * x[0, t, :, None]  # (e, n)
        y[t] = h @ C[0, t]  # (e,)
    y = (y[None] + W["mixer.D"] * x) * silu(z)  # (1, l, e)
    output = hidden + y @ W["mixer.out_proj.weight"].T + W.get("mixer.out_proj.bias", 0)  # (1, l, d)
    return output, dict(x=x[0], dt=dt[0], B=B[0], C=C[0], A=A)


layers = []
for i, hidden in enumerate(layer_inputs):
    output, inner = block_with_intermediates(hidden, i)
    # float64 on both sides, the same operations in a different order: a few hundred roundings at most
    check(f"layer {i}: our recomputation vs hidden_states[{i}]", output, out.hidden_states[i], rtol=1e3 * EPS64)
    layers.append(inner)

# %% [markdown]
# ## Which layer selects the most?
#
# For each layer: how much does `dt` change from token to token, compared with how
# much it differs between channels? We measure the spread of `log dt` over tokens
# (per channel, then averaged) and over channels (per token, then averaged). A layer
# whose `dt` were a fixed per-channel constant (an LTI model like S4) would have zero
# spread over tokens.

# %%
spread_tokens = [float(np.log(inner["dt"]).std(axis=0).mean()) for inner in layers]
spread_channels = [float(np.log(inner["dt"]).std(axis=1).mean()) for inner in layers]
for i, (s_t, s_c) in enumerate(zip(spread_tokens, spread_channels)):
    dt = layers[i]["dt"]
    print(f"layer {i}: dt median {np.median(dt):.3f} (range {dt.min():.1e} .. {dt.max():.1e});  "
          f"std of log dt over tokens {s_t:.2f}, over channels {s_c:.2f}")
LAYER = int(np.argmax(spread_tokens))
print(f"the most token-dependent layer: {LAYER}")
dt, B, C, A = (layers[LAYER][key] for key in ("dt", "B", "C", "A"))  # (l, e), (l, n), (l, n), (e, n)

# %% [markdown]
# ## Forgetting and writing, per token
#
# Per token we measure, in that layer:
#
# * **relative dt**: how much larger this token's step is than usual for each channel,
#   `exp(mean over channels of (log dt[t] - mean over tokens of log dt))`. Above 1 the
#   token forgets more of the state and writes more of itself than the channel usually does;
# * **dt swing**: the root-mean-square over channels of that same token part of `log dt`.
#   A token can speed some channels up and slow others down, which the mean above
#   cancels; the swing measures how strongly the token moves `dt` at all;
# * **kept**: the mean of `exp(dt * A)` over channels and state slots, the fraction of
#   the state that survives this token (1: nothing forgotten, 0: the state is wiped);
# * **|B|**, the norm of the write vector (with `dt` it scales what this token writes),
#   and **|C|**, the norm of the read vector.
#
# And we compare them across the roles of the tokens: a ratio above 1 means that role
# gets a larger value than words inside a speech.

# %%
log_dt = np.log(dt)  # (l, e)
log_dt_token_part = log_dt - log_dt.mean(axis=0)  # (l, e): what the token adds to each channel's usual log dt
relative_dt = np.exp(log_dt_token_part.mean(axis=1))  # (l,)
swing = np.sqrt((log_dt_token_part**2).mean(axis=1))  # (l,)
kept = np.exp(dt[:, :, None] * A).mean(axis=(1, 2))  # (l,)
B_norm, C_norm = np.linalg.norm(B, axis=1), np.linalg.norm(C, axis=1)  # (l,), (l,)
measures = {"relative dt": relative_dt, "dt swing": swing, "kept = exp(dt A)": kept, "|B|": B_norm, "|C|": C_norm}
word = roles == "word"
ratio = {label: {role: values[roles == role].mean() / values[word].mean() for role in ROLES}
         for label, values in measures.items()}
print(f"{'layer ' + str(LAYER) + ', mean':<18}" + "".join(f"{role:>15}" for role in ROLES))
for label, values in measures.items():
    print(f"{label:<18}" + "".join(f"{values[roles == role].mean():>15.3f}" for role in ROLES))
for label in measures:
    print(f"{label:<18} vs words: " + ", ".join(f"{role} x{ratio[label][role]:.2f}" for role in ROLES[:3]))

# %% [markdown]
# Which tokens move `dt` the most, and which the least?

# %%
order = np.argsort(-swing)
print("largest dt swing: " + ", ".join(f"{tokens[t]!r} ({roles[t]}, {swing[t]:.2f})" for t in order[:6]))
print("smallest dt swing: " + ", ".join(f"{tokens[t]!r} ({roles[t]}, {swing[t]:.2f})" for t in order[::-1][:6]))

# %% [markdown]
# ## The figure
#
# Left, the heatmap: `dt` for every token (rows, labelled; a space is drawn as `·`,
# newlines in blue, speaker names in red) and channel (columns: every 4th channel,
# sorted by its mean `dt` over the passage), on a log colour scale. Middle, the same
# with each channel's mean `log dt` removed: the part that depends on the token. Right,
# per token, the dt swing, the relative `dt` and the norms of `B` and `C` (the legend
# sits below the panel, off the lines).

# %%
channel_order = np.argsort(log_dt.mean(axis=0))[::4]  # every 4th channel, in order of mean dt
row_labels = [repr(tok)[1:-1].replace(" ", "\u00b7") for tok in tokens]  # a space drawn as a middle dot
colors = {"newline": "tab:blue", "speaker name": "tab:red", "punctuation": "tab:gray", "word": "black"}
fig, axes = plt.subplots(1, 3, figsize=(15, 0.17 * l + 2.5), gridspec_kw=dict(width_ratios=[3, 3, 2]))
vmax = float(np.abs(log_dt_token_part).max()) / np.log(10)
for ax, values, title, style in (
        (axes[0], log_dt / np.log(10), f"log10 dt, layer {LAYER} of the built-in model", dict(cmap="magma")),
        (axes[1], log_dt_token_part / np.log(10), "log10 dt minus each channel's mean: the token's part",
         dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax))):
    im = ax.imshow(values[:, channel_order], aspect="auto", interpolation="nearest", **style)
    ax.set_yticks(range(l))
    ax.set_yticklabels(row_labels, fontsize=8, family="monospace")
    for tick, role in zip(ax.get_yticklabels(), roles):
        tick.set_color(colors[role])
    ax.set_xlabel(f"channel (every 4th of {dt.shape[1]}, sorted by mean dt)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)

ax = axes[2]
for label, values, style in (("dt swing / max", swing / swing.max(), "-"), ("relative dt", relative_dt, "-."),
                             ("|B| / max |B|", B_norm / B_norm.max(), "--"),
                             ("|C| / max |C|", C_norm / C_norm.max(), ":")):
    ax.plot(values, np.arange(l), style, label=label)
for t, role in enumerate(roles):
    if role in ("newline", "speaker name"):
        ax.axhspan(t - 0.5, t + 0.5, color=colors[role], alpha=0.15, lw=0)
ax.axvline(1.0, color="gray", lw=0.6)
ax.set_ylim(l - 0.5, -0.5)
ax.set_yticks(range(l))
ax.set_yticklabels([])
ax.set_xlabel("value (shaded: blue newline, red speaker name)")
ax.set_title("per token: dt swing, relative dt, write and read norms", fontsize=9)
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=2)  # below the axes, off the lines
fig.tight_layout()
save(fig, "05_dt_heatmap.png", dpi=80)  # a tall figure: 80 dpi keeps the PNG small

# %% [markdown]
# ![dt per token and channel, and per token the dt swing, relative dt, |B| and |C|](figures/05_dt_heatmap.png)
#
# ## What the numbers say
#
# The tables above are measured on this model and this passage; the lines below are
# written from them, so they stay true if the model is retrained.

# %%
def compare(x):
    """A ratio in words: within 5% counts as 'about the same'."""
    return "about the same as" if abs(x - 1) < 0.05 else (f"x{x:.2f}, more than" if x > 1 else f"x{x:.2f}, less than")


token_factor, channel_factor = np.exp(spread_tokens[LAYER]), np.exp(spread_channels[LAYER])
print(f"1. In layer {LAYER}, a channel's dt varies from token to token by a typical factor of {token_factor:.2f} "
      f"(std of log dt over tokens), while channels differ from each other by a factor of {channel_factor:.1f}: "
      + ("dt is set mostly by the channel (its speed), the token adjusts it."
         if channel_factor > token_factor else "the token moves dt more than the channel does."))
for role in ("newline", "speaker name", "punctuation"):
    print(f"2. At {role} tokens the dt swing is {compare(ratio['dt swing'][role])} at words, the relative dt "
          f"{compare(ratio['relative dt'][role])} at words, |B| {compare(ratio['|B|'][role])} at words, "
          f"|C| {compare(ratio['|C|'][role])} at words.")
top_roles = [roles[t] for t in order[:10]]
print(f"3. Of the 10 tokens that move dt the most, {top_roles.count('newline')} are newlines, "
      f"{top_roles.count('speaker name')} speaker-name tokens, {top_roles.count('punctuation')} punctuation "
      f"(the passage has {100 * np.mean(roles == 'newline'):.0f}% newlines, "
      f"{100 * np.mean(roles == 'speaker name'):.0f}% speaker-name tokens).")

# %% [markdown]
# Two cautions in reading this. One passage of under a hundred tokens is an anecdote,
# not a statistic: run it on other text before drawing conclusions. And a mean over
# channels hides what single channels do: in the middle heatmap, look for columns that
# light up on one kind of token only.
