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
# # 3. Loading a real checkpoint and generating
#
# A Hugging Face Mamba checkpoint (`state-spaces/mamba-130m-hf`, or the small model that
# ships inside minimamba) is a folder of plain files. We open each one by hand: the
# config, the safetensors weights (a length, a JSON header, raw bytes), the names of
# the tensors and the one that is missing (the tied head), and bfloat16, which is just
# the top half of a float32. Then the library loads the same folder, and we check it
# read the same numbers, turn text into token ids, and generate.
#
# Everything here runs on the built-in model, `minimamba.BUILTIN_MODEL_DIR`, so no
# download is needed; point `MODEL_DIR` at any other checkpoint folder and it works
# the same.
#
# Dimension names: `d` hidden_size, `e` intermediate_size, `n` state_size, `k`
# conv_kernel, `r` time_step_rank, `V` vocab_size, `L` num_hidden_layers.

# %%
import json
import struct
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minimamba
from minimamba import MambaConfig, MambaForCausalLM, Tokenizer
from _common import check, save  # tutorials/_common.py: the figure folder, check(), save()

MODEL_DIR = Path(minimamba.BUILTIN_MODEL_DIR)
if not (MODEL_DIR / "model.safetensors").is_file():
    sys.exit(f"this tutorial reads the built-in model, and {MODEL_DIR} has no model.safetensors")


# %% [markdown]
# ## 1. The folder
#
# Three files: `config.json` (the shape of the network), `model.safetensors` (the
# weights) and `tokenizer.json` (text <-> token ids). Big checkpoints split the weights
# into shards listed in `model.safetensors.index.json`; this one is a single file.

# %%
for path in sorted(MODEL_DIR.iterdir()):
    print(f"{path.name:<20} {path.stat().st_size:>12,} bytes")

config_dict = json.loads((MODEL_DIR / "config.json").read_text())
for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand",
            "conv_kernel", "time_step_rank", "intermediate_size", "tie_word_embeddings"):
    print(f"  {key:<22} {config_dict.get(key, '(absent: the default)')}")

# %% [markdown]
# Two sizes are derived when the file leaves them out: `intermediate_size = expand * d`,
# and `time_step_rank = "auto"` means `ceil(d / 16)`. `MambaConfig` applies the same rules.

# %%
config = MambaConfig.from_json(MODEL_DIR / "config.json")
d, e, n, k, r, V, L = (config.hidden_size, config.intermediate_size, config.state_size, config.conv_kernel,
                       config.time_step_rank, config.vocab_size, config.num_hidden_layers)
print(f"d={d} e={e} n={n} k={k} r={r} V={V} L={L}  tied head: {config.tie_word_embeddings}")
assert e == config.expand * d

# %% [markdown]
# ## 2. The safetensors file, byte by byte
#
# The format is deliberately simple:
#
# 1. 8 bytes: a little-endian unsigned 64-bit integer `N`, the size of the header;
# 2. `N` bytes of JSON: for every tensor its `dtype`, `shape` and `data_offsets`
#    `[begin, end)` into the data that follows (plus an optional `__metadata__` entry);
# 3. the raw tensor bytes, little-endian, row-major, one tensor after another.
#
# No code runs when it is read (unlike a pickled `.bin`), and one tensor can be read
# without touching the others.

# %%
raw = (MODEL_DIR / "model.safetensors").read_bytes()
(header_size,) = struct.unpack("<Q", raw[:8])  # '<Q': little-endian u64
header = json.loads(raw[8:8 + header_size])
data = memoryview(raw)[8 + header_size:]  # the tensor bytes; offsets count from here
metadata = header.pop("__metadata__", {})
print(f"file {len(raw):,} bytes = 8 + header {header_size:,} + data {len(data):,};  metadata {metadata}")

for name in list(header)[:4]:
    print(f"  {name:<40} {json.dumps(header[name])}")
print(f"  ... {len(header)} tensors")

# the tensors tile the data region exactly: sorted by offset, each begins where the last ended
spans = sorted(tuple(info["data_offsets"]) for info in header.values())
assert spans[0][0] == 0 and spans[-1][1] == len(data)
assert all(end == begin for (_, end), (begin, _) in zip(spans, spans[1:]))
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
for name, info in header.items():
    begin, end = info["data_offsets"]
    assert end - begin == ITEMSIZE[info["dtype"]] * int(np.prod(info["shape"])), name
print("dtypes in the file:", sorted({info["dtype"] for info in header.values()}))

# %% [markdown]
# ## 3. The key names, and the tensor that is not there
#
# The names are the PyTorch module paths of transformers' `MambaForCausalLM`:
# `backbone.embeddings.weight`, then for each layer `backbone.layers.{i}.` plus the
# block's norm and the mixer's weights (tutorial 2 uses each one), then
# `backbone.norm_f.weight`. Layer 0's, with their shapes:

# %%
for name, info in header.items():
    if name.startswith("backbone.layers.0."):
        print(f"  {name:<40} {info['dtype']:>4} {str(info['shape']):>12}")
per_layer = sum(name.startswith("backbone.layers.0.") for name in header)
assert len(header) == 1 + per_layer * L + 1 + (0 if config.tie_word_embeddings else 1)

# %% [markdown]
# There is no `lm_head.weight`: with `tie_word_embeddings` the language-model head *is*
# the embedding matrix (V, d), used once to look up token vectors and once, transposed,
# to turn the last hidden state into logits. Saving it twice would double the biggest
# tensor. (Some checkpoints do store it, tied or not; a loader then ignores the copy.)

# %%
print("lm_head.weight in the file:", "lm_head.weight" in header)
assert config.tie_word_embeddings == ("lm_head.weight" not in header)

# %% [markdown]
# ## 4. Reading one tensor by hand
#
# Slice the bytes at its offsets, view them as the dtype, reshape. We pick layer 0's
# `A_log`, the (e, n) log-decay rates of tutorial 1 (`A = -exp(A_log)`).

# %%
NUMPY_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def bf16_bits_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32: they are the high 16 bits of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_tensor(name):
    info = header[name]
    begin, end = info["data_offsets"]
    array = np.frombuffer(data[begin:end], dtype=NUMPY_DTYPE[info["dtype"]]).reshape(info["shape"])
    return bf16_bits_to_f32(array) if info["dtype"] == "BF16" else array


A_log = read_tensor("backbone.layers.0.mixer.A_log")  # (e, n)
print("A_log", A_log.shape, A_log.dtype, " A = -exp(A_log) in", (-np.exp(A_log)).min(), "..", (-np.exp(A_log)).max())

# %% [markdown]
# The library reads the same folder. Its `state_dict()` gives the weights back under
# the same names; the file is float32 (or bfloat16, which converts exactly), so the
# arrays must be *identical*, bit for bit, not just close.

# %%
model = MambaForCausalLM.from_pretrained(MODEL_DIR)  # float32, the NumPy backend
weights = model.state_dict()
assert np.array_equal(weights["backbone.layers.0.mixer.A_log"], A_log)
for name in header:
    assert np.array_equal(weights[name], read_tensor(name)), name
print(f"all {len(header)} tensors read by hand equal from_pretrained's, bit for bit")
# the tied head: minimamba's logits use the embedding matrix itself
if config.tie_word_embeddings:
    assert model.head_weight is weights["backbone.embeddings.weight"]

# %% [markdown]
# ## 5. bfloat16 is the top half of a float32
#
# The state-spaces checkpoints and many others store weights as bfloat16: the sign and
# the 8 exponent bits of a float32, but only 7 of its 23 mantissa bits. The same range
# as float32, about 3 significant digits, half the bytes. Converting to float32 is a
# 16-bit shift; converting *to* bfloat16 drops the low 16 bits, rounding to nearest even.
#
# We round a weight matrix to bfloat16 by hand, then check the shift against an
# independent decoding of the bits by the formula `(-1)^s * (1 + m / 2^7) * 2^(x - 127)`.

# %%
W = weights["backbone.layers.0.mixer.in_proj.weight"]  # (2e, d) float32
bits32 = W.view(np.uint32)  # (2e, d) the float32 bit patterns
# round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits
bits16 = ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(np.uint16)  # (2e, d)
W_bf16 = bf16_bits_to_f32(bits16)  # (2e, d) float32 holding bfloat16 values

sign = (bits16 >> 15).astype(np.float64)  # (2e, d)
exponent = ((bits16 >> 7) & 0xFF).astype(np.int64)  # (2e, d)
mantissa = (bits16 & 0x7F).astype(np.float64)  # (2e, d)
assert exponent.min() > 0 and exponent.max() < 255  # normal numbers only (no zeros, subnormals, inf, nan)
by_formula = (-1.0) ** sign * (1 + mantissa / 2**7) * np.ldexp(1.0, exponent - 127)  # (2e, d) float64
assert np.array_equal(W_bf16.astype(np.float64), by_formula)
print("16-bit shift == sign/exponent/mantissa formula for all", W.size, "values")

# rounding to 8 significant bits: relative error at most 2^-8 (half a unit in the last place)
rel = np.abs(W_bf16 - W) / np.abs(W)
print(f"bfloat16 rounding: max relative error {rel.max():.2e} (bound 2^-8 = {2.0**-8:.2e}), mean {rel.mean():.1e}")
assert rel.max() <= 2.0**-8

# %% [markdown]
# A whole bfloat16 checkpoint, written by hand in the format of section 2 (every float
# rounded as above), loads with `from_pretrained` into the same float32 model but half
# the file size. Its logits are not those of the float32 weights: each weight moved by
# up to 2^-8 of itself.

# %%
ids_check = np.arange(1, 33)[None] % V  # (1, 32) any tokens will do
tmp = Path(tempfile.mkdtemp())
(tmp / "config.json").write_bytes((MODEL_DIR / "config.json").read_bytes())
new_header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
for name in header:
    w32 = np.ascontiguousarray(weights[name], dtype=np.float32).view(np.uint32)
    b16 = ((w32 + 0x7FFF + ((w32 >> 16) & 1)) >> 16).astype("<u2")
    new_header[name] = {"dtype": "BF16", "shape": list(w32.shape), "data_offsets": [offset, offset + b16.nbytes]}
    chunks.append(b16.tobytes())
    offset += b16.nbytes
header_bytes = json.dumps(new_header).encode()
header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces so the data starts 8-byte aligned
(tmp / "model.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks))
print(f"bfloat16 file {(tmp / 'model.safetensors').stat().st_size:,} bytes vs float32 {len(raw):,}")

model_bf16 = MambaForCausalLM.from_pretrained(tmp)
W_loaded = model_bf16.state_dict()["backbone.layers.0.mixer.in_proj.weight"]
assert np.array_equal(W_loaded, W_bf16)  # the library's bf16 reader = our shift
logits32 = model(ids_check).logits  # (1, 32, V)
logits16 = model_bf16(ids_check).logits  # (1, 32, V)
# each weight is off by <= 2^-8 relative; L layers of a few matmuls each add up such errors, partly cancelling:
# a few times 2^-8 of the logits' scale is expected, 2^-4 would mean a wrong conversion
check("logits, bfloat16 weights vs float32 weights", logits16, logits32, rtol=2.0**-4)
agree = float(np.mean(logits16.argmax(-1) == logits32.argmax(-1)))
print(f"most likely next token agrees at {100 * agree:.0f}% of the {ids_check.shape[1]} positions")

# %% [markdown]
# ## 6. Where the bytes are
#
# Grouping the tensors by kind shows where a Mamba model keeps its parameters: the
# three projections (in_proj, x_proj + dt_proj, out_proj) and the embedding. The scan's
# own parameters, `A_log` and `D`, and the conv are small: (e, n), (e,) and (e, k) per layer.

# %%
def kind(name):
    return name.replace("backbone.", "").split(".")[-2] if ".layers." in name else name.split(".")[1]


bytes_by_kind = {}
for name, info in header.items():
    begin, end = info["data_offsets"]
    label = kind(name) if not name.endswith(("A_log", "mixer.D")) else "A_log, D"
    label = {"embeddings": "embeddings (= head)", "layers": "norm"}.get(label, label)
    bytes_by_kind[label] = bytes_by_kind.get(label, 0) + end - begin
for label, nbytes in sorted(bytes_by_kind.items(), key=lambda item: -item[1]):
    print(f"  {label:<22} {nbytes:>10,} bytes  {100 * nbytes / len(data):5.1f}%")
assert sum(bytes_by_kind.values()) == len(data)
n_params = sum(int(np.prod(info["shape"])) for info in header.values())
print(f"{n_params:,} parameters")

# %% [markdown]
# ## 7. Text in, text out
#
# The tokenizer maps text to ids. The built-in model's is a byte-level BPE (as GPT-2's
# and GPT-NeoX's): common words are one token, rare ones a few pieces, and any byte
# sequence can be encoded. The prompt follows the layout of the training text, a
# speaker's name on its own line, then the speech.

# %%
tokenizer = Tokenizer.from_pretrained(MODEL_DIR)
prompt = "Romeo.\nBut soft! what light"
prompt_ids = tokenizer.encode(prompt)
print(tokenizer, f"\n{len(prompt)} characters -> {len(prompt_ids)} tokens:", prompt_ids)
print([tokenizer.decode([i]) for i in prompt_ids])
assert tokenizer.decode(prompt_ids) == prompt and max(prompt_ids) < V

# %% [markdown]
# One forward pass gives logits for every position; the last row is the model's guess
# for the token after the prompt.

# %%
input_ids = np.array([prompt_ids])  # (1, p)
logits = model(input_ids).logits  # (1, p, V)
z = logits[0, -1].astype(np.float64)  # (V,)
probs = np.exp(z - z.max())
probs /= probs.sum()  # (V,) softmax
top = np.argsort(probs)[::-1][:12]
for i in top[:5]:
    print(f"  {tokenizer.decode([i])!r:<14} p = {probs[i]:.3f}")

# %% [markdown]
# `model.generate` does the loop: one parallel pass over the prompt that leaves a
# `MambaCache` behind, then one token per step through the cache (tutorial 4). Greedy
# decoding picks the most likely token every time; we check it against the slow way,
# re-running the whole sequence for every new token without any cache.

# %%
greedy = model.generate(input_ids, max_new_tokens=24)  # (1, p + 24)
print(repr(tokenizer.decode(greedy[0])))
assert greedy[0, len(prompt_ids)] == z.argmax()  # the first new token is the argmax above

slow = input_ids
for _ in range(24):
    next_id = model(slow).logits[:, -1].argmax(-1)  # (1,) no cache: the whole sequence every time
    slow = np.concatenate([slow, next_id[:, None]], axis=1)  # (1, p + i + 1)
assert np.array_equal(slow, greedy), "cached generation should pick the same tokens as recomputing everything"
print("generate (cache, one token per step) == recomputing the whole sequence each step: all 24 tokens")

# %% [markdown]
# Sampling draws from the softmax instead, here sharpened by `temperature=0.8` and cut to
# the smallest set of tokens holding 95% of the probability (`top_p`). The same seed
# gives the same text; `minimamba.generate_text` wraps tokenizer, model and decoding
# in one call.

# %%
sampled = model.generate(input_ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
print(tokenizer.decode(sampled[0]))
again = model.generate(input_ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
assert np.array_equal(sampled, again)
text = minimamba.generate_text(prompt, max_new_tokens=24)  # greedy, the built-in model
assert text == tokenizer.decode(greedy[0]), (text, tokenizer.decode(greedy[0]))

# %% [markdown]
# ## The figure: bytes per kind of tensor, and the next-token distribution

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
labels, sizes = zip(*sorted(bytes_by_kind.items(), key=lambda item: -item[1]))
ax1.barh(labels[::-1], np.array(sizes[::-1]) / 2**20, color="tab:blue")
ax1.set_xlabel("MiB in model.safetensors")
ax1.set_title(f"{n_params / 1e6:.2f}M parameters, {len(data) / 2**20:.1f} MiB, by tensor kind ({L} layers summed)",
              fontsize=9)
ax2.bar(range(len(top)), probs[top], color="tab:orange")
ax2.set_xticks(range(len(top)))
ax2.set_xticklabels([repr(tokenizer.decode([i]))[1:-1] or "(empty)" for i in top], rotation=60, fontsize=8)
ax2.set_ylabel("probability")
ax2.set_title(f"next token after {prompt!r}", fontsize=9)
fig.tight_layout()
save(fig, "03_bytes_and_next_token.png")

# %% [markdown]
# ![Parameter bytes per tensor kind, and the next-token distribution](figures/03_bytes_and_next_token.png)
#
# The same steps load `state-spaces/mamba-130m-hf` (`MambaForCausalLM.from_pretrained`
# with the repo id downloads it once into the Hugging Face cache): its file is bfloat16,
# it has 24 layers of d = 768, and its tokenizer is GPT-NeoX's. Tutorial 4 looks at what
# the cache carries from one generated token to the next.
