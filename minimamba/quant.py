"""Weight-only int8 and int4 quantization: llama.cpp's Q8_0 and Q4_0 block formats.

Decode at batch 1 reads every weight once per token, so on a CPU its speed is set
by memory bandwidth; fewer bytes per weight is the only way further. Here the
large matrices (in_proj, x_proj, dt_proj, out_proj, the embeddings and an untied
head) are stored as small integers with one float16 scale per block of
`block_size` weights along the input dimension; everything else (A_log, D, the
conv, norms and biases) stays in float.

    model = MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf")
    q = quantize(model, "int8")                     # a new model; `model` is untouched
    q.save_pretrained("mamba-130m-int8")            # packed weights + quantization_config
    MambaForCausalLM.from_pretrained("mamba-130m-int8")         # loads quantized
    MambaForCausalLM.from_pretrained("state-spaces/mamba-130m-hf", quantization="int4")

The formats (block_size B = 32 is exactly llama.cpp's, so GGUF files convert
without touching a value; B = 128 is torchao's default group size):

    int8 (Q8_0)  per block: d = max|w| / 127 (stored float16), q = round(w / d) in int8.
                 weight = q * d.                       B + 2 bytes per B weights (1.0625 B/w at 32)
    int4 (Q4_0)  per block: m = the w of largest |w| (sign kept), d = m / -8 (float16),
                 q = min(15, trunc(w / d + 8.5)) in 0..15, two per byte:
                 byte j of a block holds weight j in its low 4 bits and weight j + B/2
                 in its high 4 bits. weight = (q - 8) * d.   B/2 + 2 bytes per B weights

Quantized checkpoints are safetensors files in which a quantized matrix `NAME`
(e.g. backbone.layers.0.mixer.in_proj.weight) is stored as the packed integers
under `NAME` (I8 (N, K) for int8, U8 (N, K/2) for int4) and its scales under
`NAME_scale` (F16 (N, K/B)); config.json carries

    "quantization_config": {"quant_method": "minimamba", "scheme": "int8" | "int4",
                            "block_size": 32, "modules": [the quantized tensor names]}

The arithmetic lives in `QuantizedWeight`: `.linear(x)` multiplies (the NumPy path
dequantizes the one matrix it needs, the Numba kernels in minimamba.kernels.quant
multiply from the packed bytes), `[ids]` gives embedding rows, `.dequantize()`
the float matrix.
"""

from __future__ import annotations

import math
import os

import numpy as np

SCHEMES = ("int8", "int4")
BLOCK_SIZES = (32, 64, 128, 256)
# The matrices quantize() considers, by the last part of their name before ".weight".
MODULES = ("in_proj", "x_proj", "dt_proj", "out_proj", "embeddings", "lm_head")
SCALE_SUFFIX = "_scale"


class QuantizationError(ValueError):
    """A quantization request or a quantized file that cannot be used as it is."""


def check_scheme(scheme, block_size):
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(f"block_size {block_size!r} is not supported; choose one of "
                                f"{', '.join(map(str, BLOCK_SIZES))} (32 is llama.cpp's Q8_0 / Q4_0)")


def _roundf(x):
    """Round half away from zero, as C's roundf (llama.cpp's reference quantizer uses it)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


# ---------------------------------------------------------------- the formats, in NumPy


def quantize_array(w, scheme, block_size=32):
    """A float matrix (N, K) -> QuantizedWeight, with llama.cpp's rounding (bit-exact Q8_0 / Q4_0 at B = 32)."""
    check_scheme(scheme, block_size)
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"only matrices are quantized; got shape {w.shape}")
    n, k = w.shape
    if k % block_size:
        raise QuantizationError(f"a row of {k} weights is not a whole number of blocks of {block_size}; "
                                f"choose a block_size that divides {k}, or leave this matrix in float")
    blocks = w.astype(np.float32).reshape(n, k // block_size, block_size)  # (N, K/B, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        if scheme == "int8":
            d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # (N, K/B, 1)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            qs = _roundf(blocks * inv).astype(np.int8).reshape(n, k)  # (N, K)
        else:
            biggest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)  # (N, K/B, 1)
            d = biggest / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.clip(np.trunc(blocks * inv + np.float32(8.5)), 0, 15).astype(np.uint8)  # (N, K/B, B)
            half = block_size // 2
            qs = (q[..., :half] | (q[..., half:] << np.uint8(4))).reshape(n, k // 2)  # (N, K/2)
    scales = d[..., 0].astype(np.float16)  # (N, K/B)
    return QuantizedWeight(scheme, qs, scales, block_size, dtype=w.dtype if w.dtype == np.float64 else np.float32)


def dequantize_blocks(qs, scales, scheme, block_size):
    """Packed integers (..., K or K/2) and scales (..., K/B) -> float32 weights (..., K).

    This is the whole format, read back:
        int8: weight = q * d
        int4: byte j of a block -> low nibble is weight j, high nibble weight j + B/2;
              weight = (nibble - 8) * d
    """
    lead = qs.shape[:-1]
    n_blocks = scales.shape[-1]
    d = scales.astype(np.float32)[..., None]  # (..., K/B, 1)
    if scheme == "int8":
        q = qs.reshape(*lead, n_blocks, block_size).astype(np.float32)  # (..., K/B, B)
    else:
        packed = qs.reshape(*lead, n_blocks, block_size // 2)  # (..., K/B, B/2)
        q = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32) - 8  # (..., K/B, B)
    return (q * d).reshape(*lead, n_blocks * block_size)  # (..., K)


class QuantizedWeight:
    """A (N, K) matrix stored as packed integers and float16 block scales.

    It stands where the model keeps a weight array: `ops.linear` calls `.linear(x)`,
    the embedding lookup calls `[ids]`. `impl` picks how `.linear` multiplies:
    "numpy" dequantizes this matrix and uses `x @ W.T` (the readable twin), "numba"
    multiplies from the packed bytes (minimamba.kernels.quant), "auto" takes Numba
    when it is installed and the input is float32.
    """

    def __init__(self, scheme, qs, scales, block_size, dtype=np.float32, impl="auto"):
        check_scheme(scheme, block_size)
        qs, scales = np.ascontiguousarray(qs), np.ascontiguousarray(scales)
        want = np.int8 if scheme == "int8" else np.uint8
        if qs.dtype != want or qs.ndim != 2:
            raise QuantizationError(f"{scheme} weights must be a 2-D {np.dtype(want).name} array, "
                                    f"got {qs.dtype} {qs.shape}")
        k = qs.shape[1] * (1 if scheme == "int8" else 2)
        if scales.dtype != np.float16 or scales.shape != (qs.shape[0], k // block_size) or k % block_size:
            raise QuantizationError(f"scales must be float16 of shape {(qs.shape[0], k // block_size)} for "
                                    f"{scheme} weights {qs.shape} in blocks of {block_size}; got "
                                    f"{scales.dtype} {scales.shape}")
        self.scheme, self.qs, self.scales, self.block_size = scheme, qs, scales, block_size
        self.shape = (qs.shape[0], k)
        self.dtype = np.dtype(dtype)  # what dequantize() and [ids] give: the model's compute dtype
        self.impl = impl

    ndim = 2

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights plus their scales."""
        return self.qs.nbytes + self.scales.nbytes

    def __repr__(self):
        return (f"QuantizedWeight({self.scheme}, shape={self.shape}, block_size={self.block_size}, "
                f"{self.nbytes / 1e6:.2f} MB)")

    def dequantize(self, dtype=None):
        """The float matrix (N, K)."""
        return dequantize_blocks(self.qs, self.scales, self.scheme, self.block_size).astype(dtype or self.dtype)

    def __getitem__(self, ids):
        """Rows of the matrix (the embedding lookup): ids (...) -> (..., K), dequantized."""
        return dequantize_blocks(self.qs[ids], self.scales[ids], self.scheme, self.block_size).astype(self.dtype)

    def linear(self, x):
        """x (..., K) -> x @ W.T (..., N)."""
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"linear: x has shape {tuple(x.shape)} but the quantized weight is {self.shape} "
                             f"(its last dimension must be {self.shape[1]})")
        if self.impl != "numpy":
            kernels = _kernels(self.impl == "numba")
            if kernels is not None and kernels.supports(self, x):
                return kernels.linear(self, x)
        return x @ self.dequantize(x.dtype).T  # (..., N): one matrix dequantized at a time

    def __array__(self, *args, **kwargs):
        raise TypeError("a QuantizedWeight is not an array: call .dequantize() for the float matrix. "
                        "(model.to() and model.state_dict() arrays are not available for quantized models: "
                        "quantize the model after moving it)")


def _kernels(required):
    try:
        from .kernels import quant
    except ImportError:
        if required:
            raise
        return None
    return quant


# ---------------------------------------------------------------- models


def _quantizable(name):
    """'backbone.layers.0.mixer.in_proj.weight' -> 'in_proj'; None for a tensor that stays float."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in MODULES else None


def _empty_like_model(model):
    new = type(model)(model.config, dtype=model.dtype, backend=model.backend.name, impl=model._kernel_slot.impl,
                      init=False)
    new.kernels = model.kernels  # the very set in use (a user's assignment included)
    return new


def _set_weights(model, state, source):
    """Put float arrays and QuantizedWeights into their slots, after checking names and shapes."""
    shapes = model.parameter_shapes()
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise QuantizationError(f"{source}: tensors do not match the config: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != shapes[name]:
            raise QuantizationError(f"{source}: {name} has shape {tuple(value.shape)}, the config implies "
                                    f"{shapes[name]}")
        obj, attr = model._slot(name)
        if isinstance(value, QuantizedWeight):
            value.dtype = np.dtype(model.dtype)
            value.impl = _weight_impl(model.kernels.name)
        else:
            value = model.backend.asarray(value, dtype=model.dtype)
        setattr(obj, attr, value)


def _weight_impl(kernels_name):
    """How a model's QuantizedWeights multiply, from its impl: the readable NumPy path for
    "reference" / "numpy" (and plugged-in kernels based on them), the Numba kernels for "numba",
    and for "auto" the Numba kernels whenever numba is installed (the NumPy path dequantizes
    a whole matrix per call: 35x slower than the kernels for in_proj of the 130m shape)."""
    base = kernels_name.split("+")[0]
    return base if base in ("numpy", "numba") else "numpy" if base == "reference" else "auto"


def quantize(model, scheme, block_size=32, modules=None):
    """A copy of `model` with its large matrices quantized to `scheme` ("int8" or "int4").

    modules: which matrices, by name (default: all of MODULES). A listed matrix whose
    rows are not a whole number of blocks is an error; with the default, such a matrix
    (dt_proj, whose rows have time_step_rank weights, e.g. 48 on the 130m shape) stays
    in float and is named in `quantization_config["kept_float"]`.
    """
    check_scheme(scheme, block_size)
    if model.backend.name != "numpy":
        raise QuantizationError("quantized weights live in host memory: quantize a model on the numpy backend")
    if getattr(model, "quantization_config", None):
        raise QuantizationError("this model is already quantized")
    chosen = MODULES if modules is None else tuple(modules)
    bad = sorted(set(chosen) - set(MODULES))
    if bad:
        raise QuantizationError(f"unknown module {bad[0]!r}; quantizable matrices are {', '.join(MODULES)}")
    state, quantized, kept = {}, [], []
    for name, value in model.state_dict().items():
        value = model.backend.to_numpy(value)
        if _quantizable(name) in chosen:
            if value.shape[1] % block_size and modules is None:
                kept.append(name)
            else:
                try:
                    value = quantize_array(value, scheme, block_size)
                except QuantizationError as err:
                    raise QuantizationError(f"{name}: {err}") from None
                quantized.append(name)
        state[name] = value if isinstance(value, QuantizedWeight) else value.copy()
    new = _empty_like_model(model)
    _set_weights(new, state, "quantize")
    new.quantization_config = {"quant_method": "minimamba", "scheme": scheme, "block_size": block_size,
                               "modules": [model.prefix + n for n in quantized],
                               "kept_float": [model.prefix + n for n in kept]}
    for attr in ("name_or_path", "folder"):
        if hasattr(model, attr):
            setattr(new, attr, getattr(model, attr))
    return new


def dequantized(model):
    """A float model (same class, config and dtype) holding `model`'s weights as the quantized model
    uses them: each QuantizedWeight dequantized. For tools that rebuild a model from its state_dict
    (the float32 error envelope of `minimamba dump`)."""
    state = {n: v.dequantize() if isinstance(v, QuantizedWeight) else model.backend.to_numpy(v)
             for n, v in model.state_dict().items()}
    twin = type(model)(model.config, dtype=model.dtype, impl=model._kernel_slot.impl, init=False)
    twin.kernels = model.kernels
    return twin.load_state_dict(state)


def weight_bytes(model) -> int:
    """Bytes of every parameter as stored in memory: packed weights and scales, float tensors."""
    return sum(v.nbytes for v in model.state_dict().values())


# ---------------------------------------------------------------- files


def save_quantized(model, folder):
    """config.json (with quantization_config) and model.safetensors holding packed weights and scales."""
    from .atomic import write_json
    from .weights import write_safetensors

    qconfig = getattr(model, "quantization_config", None)
    if not qconfig:
        raise QuantizationError("save_quantized needs a quantized model (see quantize)")
    tensors = {}
    for name, value in model.state_dict().items():
        full = model.prefix + name
        if full == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if isinstance(value, QuantizedWeight):
            tensors[full], tensors[full + SCALE_SUFFIX] = value.qs, value.scales
        else:
            tensors[full] = np.ascontiguousarray(model.backend.to_numpy(value))
    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = {k: qconfig.get(k, []) for k in ("quant_method", "scheme", "block_size", "modules",
                                                                     "kept_float")}
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, metadata={"format": "minimamba-quantized"})
    write_json(os.path.join(folder, "config.json"), config, sort_keys=True)


def read_quantization_config(qconfig, source):
    """Check a config.json's quantization_config; returns (scheme, block_size, modules)."""
    if not isinstance(qconfig, dict):
        raise QuantizationError(f"{source}: quantization_config must be a JSON object")
    if qconfig.get("quant_method", "minimamba") != "minimamba":
        raise QuantizationError(f"{source}: quantization_config.quant_method {qconfig.get('quant_method')!r} "
                                "is not minimamba's; this loader reads only its own packed format")
    scheme, block_size, modules = qconfig.get("scheme"), qconfig.get("block_size"), qconfig.get("modules")
    check_scheme("int8" if scheme == "mixed" else scheme, block_size)  # "mixed": each tensor's dtype says
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise QuantizationError(f"{source}: quantization_config.modules must be a list of tensor names")
    return scheme, block_size, modules


def load_quantized_state(tensors, config, qconfig, source, allow_non_finite=False):
    """Raw tensors of a quantized checkpoint -> {name: array or QuantizedWeight}, every name and shape checked.

    The packed matrices are checked here; the float tensors by weights.validate, as in a float
    checkpoint. NaN/inf in a float tensor or a scale is refused unless `allow_non_finite`.
    """
    from .weights import check_finite, expected_shapes, normalize_keys, validate

    scheme, block_size, modules = read_quantization_config(qconfig, source)
    tensors = normalize_keys(tensors)
    shapes = expected_shapes(config)
    state = {}
    for name in modules:
        if name not in shapes or _quantizable(name) is None:
            raise QuantizationError(f"{source}: quantization_config lists {name!r}, which is not a quantizable "
                                    "matrix of this config")
        if name not in tensors:
            raise QuantizationError(f"{source}: missing packed tensor {name!r}")
        if name + SCALE_SUFFIX not in tensors:
            raise QuantizationError(f"{source}: missing scale tensor {name + SCALE_SUFFIX!r} for {name!r}")
        qs, scales = tensors.pop(name), tensors.pop(name + SCALE_SUFFIX)
        kind = scheme if scheme != "mixed" else ("int8" if qs.dtype == np.int8 else "int4")
        n, k = shapes[name]
        packed = (n, k if kind == "int8" else k // 2)
        if tuple(qs.shape) != packed or tuple(scales.shape) != (n, k // block_size):
            raise QuantizationError(f"{source}: {name} is {tuple(qs.shape)} with scales {tuple(scales.shape)}; "
                                    f"{kind} in blocks of {block_size} of a {(n, k)} matrix needs {packed} and "
                                    f"{(n, k // block_size)}")
        try:
            state[name] = QuantizedWeight(kind, qs, scales, block_size)
        except QuantizationError as err:
            raise QuantizationError(f"{source}: {name}: {err}") from None
    floats = validate(tensors, config, source, skip=set(state))
    if not allow_non_finite:
        check_finite(floats, source)
        check_finite({name + SCALE_SUFFIX: w.scales for name, w in state.items()}, source)
    state.update(floats)
    return state, {"quant_method": "minimamba", "scheme": scheme, "block_size": block_size,
                   "modules": list(modules), "kept_float": list(qconfig.get("kept_float", []))}


def build_model(cls, config, state, qconfig, dtype="float32", backend="numpy", impl=None, source="checkpoint"):
    """A model of class `cls` holding `state` (float arrays and QuantizedWeights, full names)."""
    if backend not in (None, "numpy"):
        raise QuantizationError("quantized models run on the numpy backend (packed weights live in host memory)")
    model = cls(config, dtype=dtype, backend="numpy", impl=impl, init=False)
    _set_weights(model, {name[len(cls.prefix):]: v for name, v in state.items() if name.startswith(cls.prefix)},
                 source)
    model.quantization_config = qconfig
    return model


def from_pretrained_quantized(cls, folder, config, dtype="float32", backend="numpy", impl=None, quantization=None,
                              allow_non_finite=False):
    """from_pretrained for a folder saved quantized (its config.json has quantization_config)."""
    from .weights import read_checkpoint

    stored = config.extra.pop("quantization_config")
    if quantization is not None:
        raise QuantizationError(f"{folder} is already quantized ({stored.get('scheme')}); "
                                "load it without quantization=")
    state, qconfig = load_quantized_state(read_checkpoint(folder), config, stored, str(folder), allow_non_finite)
    model = build_model(cls, config, state, qconfig, dtype, backend, impl, str(folder))
    model.name_or_path, model.folder = str(folder), folder
    return model


def quantize_as_asked(model, quantization):
    """from_pretrained's `quantization=`: "int8" / "int4", or a dict with scheme, block_size, modules."""
    spec = quantization if isinstance(quantization, dict) else {"scheme": quantization}
    return quantize(model, spec["scheme"], spec.get("block_size", 32), spec.get("modules"))


# ---------------------------------------------------------------- accuracy


def next_token_stats(reference_logits, logits, ids):
    """(mean cross-entropy of `logits` on ids[1:], mean KL(reference || quantized) per position), in nats."""
    def log_softmax(z):
        z = np.asarray(z, dtype=np.float64)[:, :-1]  # (b, l-1, V): positions that predict a next token
        top = z.max(axis=-1, keepdims=True)
        return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    target = np.asarray(ids)[:, 1:]  # (b, l-1)
    nll = -np.take_along_axis(log_q, target[..., None], axis=-1).mean()
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
    return float(nll), float(kl)


def perplexity_table(model, text, schemes=SCHEMES, block_size=32, max_tokens=4096):
    """Perplexity and KL from float32 of `model` and its quantized copies on `text` (one pass each)."""
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model.folder)
    ids = np.asarray(tokenizer.encode(text)[:max_tokens], dtype=np.int64)[None]  # (1, l)
    reference = model(ids).logits
    rows = [("float32", *next_token_stats(reference, reference, ids), weight_bytes(model))]
    for scheme in schemes:
        q = quantize(model, scheme, block_size)
        rows.append((f"{scheme} b{block_size}", *next_token_stats(reference, q(ids).logits, ids), weight_bytes(q)))
    return ids.shape[1], [(name, math.exp(nll), kl, nbytes) for name, nll, kl, nbytes in rows]
