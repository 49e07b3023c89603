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
# # 4. Recurrent vs parallel, and why decode is constant-memory
#
# A Mamba model can read a sequence two ways:
#
# * **in parallel** (training, prompt "prefill"): all `l` tokens in one call; the scan
#   runs over the whole sequence inside each layer;
# * **recurrently** (generation, "decode"): one token per call, carrying a `MambaCache`
#   from call to call: per layer, the last `k` conv inputs and the SSM state `h`.
#
# First we check that both give the same numbers. Then we see what the cache costs:
# its size does not depend on how many tokens came before, where a transformer's
# key/value cache grows with every token. Memory is computed from the shapes; time per
# token is measured, for Mamba and for a small NumPy transformer of the same width.
#
# "Parallel" here means *one call for the whole sequence*, not parallel in time: the
# projections and the conv are array operations over all `l` tokens at once, but the
# scan inside `selective_scan_fn` still loops over time, one vectorised step (over
# batch, channels and states) per token. Parallel-in-time scans exist — a tree
# (tutorial 1's Blelloch scan) or chunks (tutorial 7) — and that is what GPU kernels run.

# %%
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from minimamba import MambaCache, MambaConfig, MambaForCausalLM
from minimamba.ops import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update
from _common import EPS32, EPS64, check, save  # tutorials/_common.py: the figure folder, check(), save()

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. The two state-carrying pieces, one step at a time
#
# Only two parts of a Mamba layer look at other tokens: the causal conv (the last `k`
# inputs) and the scan (the state `h`). Each has a whole-sequence function and a one-step
# function in `minimamba.ops` that reads and updates a state in place. Stepping through
# the sequence with the one-step function must reproduce the whole-sequence one.

# %%
bsz, e, n, k, l = 2, 5, 3, 4, 9
x = rng.normal(size=(bsz, e, l))  # (b, e, l)
w_conv, bias_conv = rng.normal(size=(e, k)), rng.normal(size=e)  # (e, k), (e,)
delta, z = rng.normal(size=(bsz, e, l)), rng.normal(size=(bsz, e, l))  # (b, e, l) each
A = -np.exp(rng.normal(size=(e, n)))  # (e, n)
B, C = rng.normal(size=(bsz, n, l)), rng.normal(size=(bsz, n, l))  # (b, n, l) each
D, dt_bias = rng.normal(size=e), rng.normal(size=e)  # (e,) each

conv_parallel = causal_conv1d_fn(x, w_conv, bias_conv, activation="silu")  # (b, e, l)
scan_parallel = selective_scan_fn(conv_parallel, delta, A, B, C, D=D, z=z, delta_bias=dt_bias,
                                  delta_softplus=True)  # (b, e, l)

conv_state = np.zeros((bsz, e, k))  # (b, e, k): the last k inputs; zeros = the padding of a fresh sequence
ssm_state = np.zeros((bsz, e, n))  # (b, e, n): h
scan_steps = np.zeros((bsz, e, l))  # (b, e, l)
for t in range(l):
    xc = causal_conv1d_update(x[:, :, t], conv_state, w_conv, bias_conv, activation="silu")  # (b, e)
    scan_steps[:, :, t] = selective_state_update(ssm_state, xc, delta[:, :, t], A, B[:, :, t], C[:, :, t], D=D,
                                                 z=z[:, :, t], dt_bias=dt_bias, dt_softplus=True)  # (b, e)
# float64, identical arithmetic per step: agreement to a few roundings
check("conv + scan step by step vs whole sequence", scan_steps, scan_parallel, rtol=100 * EPS64)
assert np.array_equal(conv_state[:, :, -1], x[:, :, -1])  # the conv state ends with the newest input

# %% [markdown]
# **Why not a convolution, as in S4?** A time-invariant SSM (S4: `dt`, `B`, `C` fixed)
# has a third mode: unrolled, $y_t = \sum_{s \le t} K_{t-s}\, x_s$ with one kernel
# $K_j = C\, e^{j \Delta A}\, \Delta B$, so the whole layer is a causal convolution that
# an FFT computes in $O(l \log l)$, fully parallel. Mamba has no such mode: its `dt`,
# `B` and `C` depend on the token, so the weight of token $s$ in output $t$,
# $M_{ts} = C_t\, e^{A (S_t - S_s)}\, \Delta_s B_s$ (with $S_t = \sum_{j \le t} \Delta_j$),
# depends on $t$ and $s$ themselves, not only on their distance $t - s$. A convolution
# matrix is constant along each diagonal (Toeplitz); below, the LTI matrix is, Mamba's
# is not. (This is why the selective scan needed its own hardware-aware algorithm,
# Section 3.3 of the paper.)

# %%
def token_mixing_matrix(dt, A_c, B_c, C_c):
    """(l, l): M[t, s] = sum_n C_c[n, t] exp(A_c[n] (S_t - S_s)) dt[s] B_c[n, s] for s <= t, else 0."""
    S = np.cumsum(dt)  # (l,)
    causal = np.tril(np.ones((len(dt), len(dt)), dtype=bool))  # (l, l)
    gap = np.where(causal, S[:, None] - S[None, :], np.inf)  # (l, l): inf above the diagonal -> exp(-inf) = 0
    decay = np.exp(A_c[:, None, None] * gap)  # (n, l, l), A_c < 0: masked before the exp (tutorial 1)
    return np.einsum("nt,nts,s,ns->ts", C_c, decay, dt, B_c)  # (l, l)


def toeplitz_spread(M):
    """Largest spread (max - min) along any diagonal below the main one, relative to max |M|."""
    return max(np.ptp(np.diagonal(M, -j)) for j in range(M.shape[0])) / np.abs(M).max()


ch = 0  # batch row 0, channel 0
dt_sel = np.logaddexp(0.0, delta[0, ch] + dt_bias[ch])  # (l,) softplus, as the scan does
M_sel = token_mixing_matrix(dt_sel, A[ch], B[0], C[0])  # (l, l)
y_direct = selective_scan_fn(conv_parallel[:1, ch:ch + 1], delta[:1, ch:ch + 1], A[ch:ch + 1], B[:1], C[:1],
                             delta_bias=dt_bias[ch:ch + 1], delta_softplus=True)[0, 0]  # (l,)
# float64: the same sums in another grouping
check("selective: M @ x vs selective_scan_fn", M_sel @ conv_parallel[0, ch], y_direct, rtol=100 * EPS64)
lti_dt = np.full(l, dt_sel.mean())  # (l,) one step size for every token
M_lti = token_mixing_matrix(lti_dt, A[ch], B[0][:, :1].repeat(l, 1), C[0][:, :1].repeat(l, 1))  # (l, l)
K_lti = M_lti[:, 0]  # (l,): the LTI kernel K_j, read off the first column
# the LTI layer is a convolution with K (float64, the same products summed in another order)
check("LTI: M @ x vs np.convolve(K, x)", M_lti @ conv_parallel[0, ch], np.convolve(K_lti, conv_parallel[0, ch])[:l],
      rtol=100 * EPS64)
spread_lti, spread_sel = toeplitz_spread(M_lti), toeplitz_spread(M_sel)
print(f"spread along the diagonals: LTI {spread_lti:.1e}, selective {spread_sel:.2f} (relative to max |M|)")
# LTI: exp(A (S_t - S_s)) with S a float64 cumsum: the diagonals agree to rounding of the exponent
assert spread_lti < 1e-12
# selective: random dt, B, C per token make entries of one diagonal differ by O(max |M|); 0.1 is a loose floor
assert spread_sel > 0.1

# %% [markdown]
# ## 2. Prefill and step-by-step give the same numbers
#
# The same in the whole model. A small random-weight model in float64. `model(ids)` is the parallel pass.
# For the recurrent pass we make a `MambaCache` and feed one token per call with
# `cache_params=cache`: each layer then runs one step of the conv
# (`causal_conv1d_update`) and one step of the scan (`selective_state_update`).

# %%
config = MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4)
model = MambaForCausalLM(config, dtype="float64", seed=0, impl="numpy")
b, l = 2, 20
ids = rng.integers(0, config.vocab_size, size=(b, l))  # (b, l)

logits_parallel = model(ids).logits  # (b, l, V)

cache = MambaCache(config, max_batch_size=b, dtype="float64")
logits_recurrent = np.zeros_like(logits_parallel)  # (b, l, V)
for t in range(l):
    out = model(ids[:, t:t + 1], cache_params=cache, use_cache=True)  # one token per row
    logits_recurrent[:, t] = out.logits[:, 0]  # (b, V)
print(cache)
print("conv state per layer", cache.conv_states[0].shape, "  ssm state per layer", cache.ssm_states[0].shape)

# float64; the two paths do the same arithmetic, grouped differently (the conv sums over
# the state buffer instead of a padded sequence): a few roundings per layer
check("step-by-step vs parallel logits (float64)", logits_recurrent, logits_parallel, rtol=1e3 * EPS64)

# %% [markdown]
# Generation does both: a parallel prefill of the prompt that *returns* the cache
# (`use_cache=True`), then one token at a time. The cache can also take several tokens
# at once (a second chunk of a long prompt). Any mix gives the same numbers and leaves
# the same state behind.

# %%
cache2 = MambaCache(config, max_batch_size=b, dtype="float64")
mixed = [model(ids[:, :12], cache_params=cache2, use_cache=True).logits]  # prefill 12 tokens
mixed.append(model(ids[:, 12:17], cache_params=cache2, use_cache=True).logits)  # a chunk of 5
for t in range(17, l):  # then one at a time
    mixed.append(model(ids[:, t:t + 1], cache_params=cache2, use_cache=True).logits)
check("prefill + chunk + steps vs parallel logits", np.concatenate(mixed, axis=1), logits_parallel,
      rtol=1e3 * EPS64)
for i in range(config.num_hidden_layers):
    check(f"layer {i} ssm state: mixed vs step-by-step", cache2.ssm_states[i], cache.ssm_states[i], rtol=1e3 * EPS64)
    check(f"layer {i} conv state: mixed vs step-by-step", cache2.conv_states[i], cache.conv_states[i],
          rtol=1e3 * EPS64)

model32 = MambaForCausalLM(config, dtype="float32", seed=0, impl="numpy")  # same weights, rounded
cache32 = MambaCache(config, max_batch_size=b, dtype="float32")
steps32 = np.concatenate([model32(ids[:, t:t + 1], cache_params=cache32, use_cache=True).logits
                          for t in range(l)], axis=1)  # (b, l, V)
# float32 weights and arithmetic vs float64: ~10 eps32 expected (tutorial 2), 100 eps32 allowed
check("step-by-step float32 vs parallel float64", steps32, logits_parallel, rtol=100 * EPS32)

# %% [markdown]
# ## 3. Memory: a fixed-size state vs a growing KV cache
#
# The cache holds, per layer, `conv_states` (b, e, k) and `ssm_states` (b, e, n), and
# nothing else: the whole past is summarised in `e * (k + n)` numbers per layer. A
# transformer must keep every past token's key and value, `2 * d` numbers per layer per
# token, to attend to them. Below, the shapes of `state-spaces/mamba-130m` (d = 768,
# 24 layers, e = 1536, n = 16, k = 4) beside a transformer of the same width and depth,
# both caches in float32, for one sequence. (Matching parameters instead, GPT-2 small's
# 12 layers of d = 768, halves the KV cache: the two cross at twice the length.)

# %%
config_130m = MambaConfig(hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2)
L_, e_, n_, k_, d_ = (config_130m.num_hidden_layers, config_130m.intermediate_size, config_130m.state_size,
                      config_130m.conv_kernel, config_130m.hidden_size)
mamba_bytes = L_ * e_ * (k_ + n_) * 4  # per sequence, whatever the context length
assert MambaCache(config_130m, max_batch_size=1).nbytes() == mamba_bytes  # the real object agrees
kv_bytes_per_token = 2 * L_ * d_ * 4  # K and V, every layer, float32

contexts_mem = np.logspace(0, 6, 61)  # 1 .. 1M tokens
kv_bytes = kv_bytes_per_token * contexts_mem
crossover = mamba_bytes / kv_bytes_per_token
print(f"Mamba-130m cache: {mamba_bytes / 1e6:.2f} MB at any length; "
      f"KV cache: {kv_bytes_per_token / 1e3:.0f} kB per token "
      f"-> {kv_bytes_per_token * 2048 / 1e6:.0f} MB at 2048 tokens, {kv_bytes_per_token * 1e6 / 1e9:.0f} GB at 1M")
print(f"the KV cache is larger beyond {crossover:.0f} tokens")

# %% [markdown]
# ## 4. Time per token
#
# Memory also sets the time: a decode step reads the whole cache. Mamba's step does the
# same work at any context length; an attention step compares the new query with every
# cached key. We measure both on small models of the same width (d = 64, 2 layers, float32,
# minimamba's NumPy path `impl="numpy"`): the median time of 25 decode steps after a context
# of length L.
#
# The attention baseline is a minimal pre-norm transformer (4 heads, a 4d MLP) with a
# preallocated KV cache, written here in NumPy; first we check its cached decode equals
# full causal attention over the sequence.

# %%
def rmsnorm(x, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


class TinyTransformer:
    """Pre-norm decoder: x + attn(norm(x)); x + mlp(norm(x)). Single sequence, KV cache (layers, H, T, hd)."""

    def __init__(self, vocab, d, n_layer, n_head, max_len, dtype, rng):
        self.d, self.H, self.hd = d, n_head, d // n_head
        w = lambda *shape: (rng.normal(0, 1, shape) / np.sqrt(shape[0])).astype(dtype)  # noqa: E731
        self.emb = w(vocab, d)  # (V, d)
        self.layers = [dict(qkv=w(d, 3 * d), o=w(d, d), up=w(d, 4 * d), down=w(4 * d, d)) for _ in range(n_layer)]
        self.K = np.zeros((n_layer, n_head, max_len, self.hd), dtype)  # the KV cache
        self.V = np.zeros((n_layer, n_head, max_len, self.hd), dtype)
        self.length = 0  # tokens cached so far

    def step(self, token):
        """One token in, next-token logits (V,) out; appends this token's keys and values."""
        t, H, hd = self.length, self.H, self.hd
        x = self.emb[token]  # (d,)
        for i, w in enumerate(self.layers):
            q, k, v = np.split(rmsnorm(x) @ w["qkv"], 3)  # (d,) each
            self.K[i, :, t], self.V[i, :, t] = k.reshape(H, hd), v.reshape(H, hd)
            scores = self.K[i, :, :t + 1] @ q.reshape(H, hd, 1) / np.sqrt(hd)  # (H, t+1, 1): every cached key
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)  # softmax over the t+1 positions
            att = (p.transpose(0, 2, 1) @ self.V[i, :, :t + 1]).reshape(self.d)  # (d,)
            x = x + att @ w["o"]  # (d,)
            h = rmsnorm(x) @ w["up"]  # (4d,)
            x = x + (h / (1 + np.exp(-h))) @ w["down"]  # (d,)
        self.length += 1
        return rmsnorm(x) @ self.emb.T  # (V,)

    def forward(self, tokens):
        """All tokens at once with a causal mask (no cache): the parallel reference for `step`."""
        T, H, hd = len(tokens), self.H, self.hd
        x = self.emb[tokens]  # (T, d)
        mask = np.tril(np.ones((T, T), dtype=bool))
        for w in self.layers:
            q, k, v = [a.reshape(T, H, hd).transpose(1, 0, 2) for a in np.split(rmsnorm(x) @ w["qkv"], 3, axis=-1)]
            scores = np.where(mask, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)  # (H, T, T)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + (p @ v).transpose(1, 0, 2).reshape(T, self.d) @ w["o"]  # (T, d)
            h = rmsnorm(x) @ w["up"]
            x = x + (h / (1 + np.exp(-h))) @ w["down"]
        return rmsnorm(x) @ self.emb.T  # (T, V)

    def fill(self, length, rng):
        """Put `length` tokens' worth of keys and values in the cache (of random hidden states: a step's
        cost depends on how many there are, not on their values)."""
        for i, w in enumerate(self.layers):
            kv = rmsnorm(rng.normal(size=(length, self.d)).astype(self.emb.dtype)) @ w["qkv"][:, self.d:]
            k, v = kv[:, :self.d], kv[:, self.d:]  # (length, d) each
            self.K[i, :, :length] = k.reshape(length, self.H, self.hd).transpose(1, 0, 2)
            self.V[i, :, :length] = v.reshape(length, self.H, self.hd).transpose(1, 0, 2)
        self.length = length


d_small, layers_small, vocab_small = 64, 2, 256
tokens = rng.integers(0, vocab_small, size=16)
tf = TinyTransformer(vocab_small, d_small, layers_small, n_head=4, max_len=16, dtype=np.float64, rng=rng)
stepped = np.stack([tf.step(tok) for tok in tokens])  # (16, V)
# float64, the same sums in another grouping: a few eps
check("attention: KV-cache decode vs full causal pass", stepped, tf.forward(tokens), rtol=1e3 * EPS64)
used = tf.K[:, :, :tf.length].nbytes + tf.V[:, :, :tf.length].nbytes
assert used == 2 * layers_small * d_small * 8 * tf.length  # K and V: 2 x layers x d per token (float64 here)

# %% [markdown]
# Now the timing. Mamba's context is a real prefill of L random tokens (linear in L,
# so cheap); the transformer's cache is filled by `fill`. One cache per context length,
# so the measurements can take turns.

# %%
contexts = [256, 1024, 4096, 16384]
n_steps = 25
config_small = MambaConfig(vocab_size=vocab_small, hidden_size=d_small, state_size=16,
                           num_hidden_layers=layers_small, conv_kernel=4)
mamba_small = MambaForCausalLM(config_small, dtype="float32", seed=0, impl="numpy")

caches, transformers = {}, {}
for context in contexts:
    prompt = rng.integers(0, vocab_small, size=(1, context))
    caches[context] = mamba_small(prompt, use_cache=True, logits_to_keep=1).cache_params  # prefill
    transformers[context] = TinyTransformer(vocab_small, d_small, layers_small, n_head=4,  # same weights each
                                            max_len=context + n_steps, dtype=np.float32,
                                            rng=np.random.default_rng(1))
    transformers[context].fill(context, rng)
mamba_cache_mb = [caches[c].nbytes() / 1e6 for c in contexts]
kv_cache_mb = [(transformers[c].K[:, :, :c].nbytes + transformers[c].V[:, :, :c].nbytes) / 1e6 for c in contexts]


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# Rounds that visit every context in turn, so a burst of load on the machine hits all of them alike.
times = {(kind, c): [] for kind in ("mamba", "attention") for c in contexts}
token = np.array([[7]])
for _ in range(n_steps):
    for c in contexts:
        times["mamba", c].append(timed(lambda: mamba_small(token, cache_params=caches[c], use_cache=True)))
        times["attention", c].append(timed(lambda: transformers[c].step(7)))
mamba_ms = [1e3 * float(np.median(times["mamba", c])) for c in contexts]
attention_ms = [1e3 * float(np.median(times["attention", c])) for c in contexts]
for i, c in enumerate(contexts):
    print(f"context {c:>6}: Mamba {mamba_ms[i]:.3f} ms/token, cache {mamba_cache_mb[i]:.3f} MB   |   "
          f"attention {attention_ms[i]:.3f} ms/token, KV cache {kv_cache_mb[i]:.2f} MB")

assert len(set(mamba_cache_mb)) == 1  # the same bytes after 256 or 16384 tokens (computed, so asserted)
# Times are measurements of a (possibly busy) machine: printed and drawn, never asserted.
print(f"step time at {contexts[-1]} vs {contexts[0]} tokens: Mamba x{mamba_ms[-1] / mamba_ms[0]:.2f}, "
      f"attention x{attention_ms[-1] / attention_ms[0]:.2f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
ax.loglog(contexts_mem, np.full_like(contexts_mem, mamba_bytes / 1e6), label="Mamba cache (conv + SSM state)")
ax.loglog(contexts_mem, kv_bytes / 1e6, label="transformer KV cache, same d and depth")
ax.axvline(crossover, color="gray", lw=0.8, ls=":")
ax.text(crossover * 1.3, 1e4, f"equal at {crossover:.0f} tokens", fontsize=8)
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("cache memory per sequence (MB, float32)")
ax.set_title("memory, computed from the shapes of mamba-130m (d=768, 24 layers)", fontsize=9)
ax.legend(fontsize=8)
ax = axes[1]
ax.loglog(contexts, mamba_ms, "o-", label=f"Mamba decode step (minimamba, {mamba_cache_mb[0]:.2f} MB cache)")
ax.loglog(contexts, attention_ms, "s-",
          label=f"attention decode step (NumPy, KV cache {kv_cache_mb[0]:.2f}..{kv_cache_mb[-1]:.0f} MB)")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("time per token (ms, median of 25)")
threads = os.environ.get("OMP_NUM_THREADS", "default")
ax.set_title(f"time, measured: d={d_small}, {layers_small} layers, float32, OMP_NUM_THREADS={threads}", fontsize=9)
ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
ax.set_yticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
               if min(mamba_ms + attention_ms) / 2 <= t <= 2 * max(mamba_ms + attention_ms)])
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "04_memory_and_time_per_token.png")

# %% [markdown]
# ![Cache memory and time per token vs context length](figures/04_memory_and_time_per_token.png)
#
# Left: Mamba's cache is a few MB at any context length, the KV cache of a transformer of
# the same width passes it after a few dozen tokens and grows without bound. Right: the
# Mamba decode step takes the same time at every context length, while the attention
# step grows with the number of cached keys. At short contexts the fixed cost of the
# projections (and, in NumPy, of launching many small operations) dominates both and
# they are close; the gap opens as the context grows, linearly for attention.
#
# The price of the fixed-size state is that it is a *summary*: a transformer can look up
# any past token exactly, Mamba only what its selective state chose to keep (tutorial 5).
