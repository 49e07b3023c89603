"""Reading llama.cpp's Mamba GGUF files (architecture "mamba"), quantized tensors kept quantized.

Needs the `gguf` package of the ggml project: pip install gguf (or pip install -e '.[gguf]' in the repository).

    model = MambaForCausalLM.from_pretrained("mamba-130m-Q8_0.gguf")   # Q8_0 stays int8
    minimamba generate "Hello" --model mamba-130m-Q4_0.gguf
    minimamba info mamba-130m-Q4_0.gguf

What llama.cpp's convert_hf_to_gguf.py does to a Mamba checkpoint, undone here:

    HF name (backbone.layers.i.)       GGUF name (blk.i.)     note
    embeddings.weight                  token_embd.weight
    layers.i.norm.weight               attn_norm.weight
    mixer.in_proj.weight / .bias       ssm_in.weight / .bias
    mixer.conv1d.weight (e, 1, k)      ssm_conv1d.weight      squeezed to (e, k)
    mixer.conv1d.bias                  ssm_conv1d.bias
    mixer.x_proj.weight                ssm_x.weight
    mixer.dt_proj.weight / .bias       ssm_dt.weight / .bias
    mixer.A_log                        ssm_a                  stored as A = -exp(A_log), not A_log
    mixer.D                            ssm_d
    mixer.out_proj.weight / .bias      ssm_out.weight / .bias
    norm_f.weight                      output_norm.weight
    lm_head.weight                     output.weight          absent when tied to the embeddings

NOTE on A: llama.cpp stores A = -exp(A_log), and the model recomputes A from A_log at
every call (so no cached A can go stale). From a GGUF file, A_log is the float32 value
next to log(-A) (within a few ulps) for which -exp(A_log) gives the file's A back bit for
bit; such a value exists for files converted from float32 A_log, so the logits are those
of the file's numbers exactly. Where none exists, the nearest is kept (A within an ulp).

Tensor types read: F32, F16, BF16 (to float exactly), Q8_0 and Q4_0 (kept packed as
minimamba's int8 / int4 with blocks of 32, byte for byte; a quantized tensor that is not
one of the large matrices is dequantized). Any other type is refused by name.
Metadata keys (`mamba.` prefix): embedding_length, block_count, ssm.conv_kernel,
ssm.inner_size, ssm.state_size, ssm.time_step_rank, attention.layer_norm_rms_epsilon.
"""

from __future__ import annotations

import os

import numpy as np

LAYER_NAMES = {  # GGUF tensor name in block i -> transformers' name in layer i
    "attn_norm.weight": "norm.weight",
    "ssm_in.weight": "mixer.in_proj.weight", "ssm_in.bias": "mixer.in_proj.bias",
    "ssm_conv1d.weight": "mixer.conv1d.weight", "ssm_conv1d.bias": "mixer.conv1d.bias",
    "ssm_x.weight": "mixer.x_proj.weight",
    "ssm_dt.weight": "mixer.dt_proj.weight", "ssm_dt.bias": "mixer.dt_proj.bias",
    "ssm_a": "mixer.A_log", "ssm_d": "mixer.D",
    "ssm_out.weight": "mixer.out_proj.weight", "ssm_out.bias": "mixer.out_proj.bias",
}
TOP_NAMES = {"token_embd.weight": "backbone.embeddings.weight", "output_norm.weight": "backbone.norm_f.weight",
             "output.weight": "lm_head.weight"}


class GGUFError(ValueError):
    """A GGUF file minimamba cannot use as it is."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf (or pip install -e '.[gguf]' in the repository)") from None
    return gguf


def open_gguf(path):
    """A gguf.GGUFReader over `path`, or a GGUFError that says what is wrong (never the file's bytes)."""
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - the reader raises ValueError, struct/IndexError on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(err).__name__})") from None


def _field(reader, key, kind, path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    try:
        value = field.contents()
        return kind(value)
    except Exception:  # noqa: BLE001
        raise GGUFError(f"{path}: metadata key {key!r} does not hold a {kind.__name__}") from None


def read_config(reader, path):
    """MambaConfig from the file's metadata (and the embedding's row count for the vocabulary)."""
    from .config import MambaConfig

    arch = _field(reader, "general.architecture", str, path)
    if arch != "mamba":
        raise GGUFError(f"{path}: architecture {arch!r} is not 'mamba' (Mamba-1); minimamba reads only Mamba-1 "
                        "GGUF files")
    if _field(reader, "mamba.ssm.dt_b_c_rms", bool, path, default=False):
        raise GGUFError(f"{path}: ssm.dt_b_c_rms is set (Falcon-Mamba's extra RMS norms), which minimamba "
                        "does not implement")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    d = _field(reader, "mamba.embedding_length", int, path)
    e = _field(reader, "mamba.ssm.inner_size", int, path)
    if d < 1 or e % d:
        raise GGUFError(f"{path}: ssm.inner_size {e} is not a multiple of embedding_length {d}")
    return MambaConfig(
        vocab_size=int(names["token_embd.weight"].shape[-1]), hidden_size=d,
        num_hidden_layers=_field(reader, "mamba.block_count", int, path),
        state_size=_field(reader, "mamba.ssm.state_size", int, path),
        conv_kernel=_field(reader, "mamba.ssm.conv_kernel", int, path), expand=e // d,
        time_step_rank=_field(reader, "mamba.ssm.time_step_rank", int, path),
        layer_norm_epsilon=_field(reader, "mamba.attention.layer_norm_rms_epsilon", float, path, default=1e-5),
        use_bias="blk.0.ssm_in.bias" in names, use_conv_bias="blk.0.ssm_conv1d.bias" in names,
        tie_word_embeddings="output.weight" not in names)


def hf_name(name, path):
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"backbone.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise GGUFError(f"{path}: unexpected tensor {name!r} for a Mamba model")


def read_tensors(reader, path):
    """{transformers name: float array or QuantizedWeight}, with llama.cpp's transforms undone."""
    from .quant import QuantizedWeight, _quantizable, dequantize_blocks
    from .weights import bf16_to_f32

    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    state = {}
    for t in reader.tensors:
        name = hf_name(t.name, path)
        kind = Q(t.tensor_type)
        data = np.asarray(t.data)
        if kind in (Q.Q8_0, Q.Q4_0):
            rows = data.reshape(-1, data.shape[-1])  # (N, blocks * bytes per block)
            per = 34 if kind == Q.Q8_0 else 18
            if rows.shape[-1] % per:
                raise GGUFError(f"{path}: tensor {t.name!r} is not a whole number of {kind.name} blocks")
            blocks = rows.reshape(rows.shape[0], -1, per)  # (N, K/32, 2 + payload)
            scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # (N, K/32)
            payload = np.ascontiguousarray(blocks[..., 2:]).reshape(rows.shape[0], -1)
            scheme = "int8" if kind == Q.Q8_0 else "int4"
            value = QuantizedWeight(scheme, payload.view(np.int8) if scheme == "int8" else payload, scales, 32)
            if _quantizable(name) is None:  # a small tensor llama.cpp quantized anyway: float here
                value = dequantize_blocks(value.qs, value.scales, scheme, 32)
        elif kind in (Q.F32, Q.F16):
            value = data.astype(np.float32)
        elif kind == Q.BF16:
            value = bf16_to_f32(data.view(np.uint16))
        else:
            raise GGUFError(f"{path}: tensor {t.name!r} is stored as {kind.name}; minimamba reads F32, F16, BF16, "
                            "Q8_0 and Q4_0 (requantize with llama-quantize --pure Q8_0 or Q4_0)")
        if name.endswith("conv1d.weight") and getattr(value, "ndim", 0) == 2:
            value = value[:, None, :]  # (e, k) -> (e, 1, k)
        if name.endswith("A_log"):
            value = a_log_of(value)
        state[name] = value
    return state


def a_log_of(A, reach=4):
    """float32 A_log with -exp(A_log) == A exactly where a float32 value within `reach` ulps of log(-A) does."""
    A = np.asarray(A, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest = np.log(-A.astype(np.float64)).astype(np.float32)  # A = -exp(A_log)  =>  A_log = log(-A)
    best, found = nearest.copy(), -np.exp(nearest) == A
    for direction in (np.inf, -np.inf):
        candidate = nearest
        for _ in range(reach):
            candidate = np.nextafter(candidate, np.float32(direction))
            hit = ~found & (-np.exp(candidate) == A)
            best[hit], found = candidate[hit], found | hit
    return best


def from_gguf(cls, path, dtype="float32", backend="numpy", impl=None, quantization=None):
    """A MambaForCausalLM (or MambaModel) from a GGUF file; see the module docstring."""
    from .quant import QuantizedWeight, build_model, quantize_as_asked

    path = os.fspath(path)
    reader = open_gguf(path)
    config = read_config(reader, path)
    state = read_tensors(reader, path)
    packed = {n: v for n, v in state.items() if isinstance(v, QuantizedWeight)}
    schemes = sorted({v.scheme for v in packed.values()})
    qconfig = None
    if packed:
        qconfig = {"quant_method": "minimamba", "scheme": schemes[0] if len(schemes) == 1 else "mixed",
                   "block_size": 32, "modules": sorted(packed), "kept_float": [], "source": "gguf"}
        if quantization is not None:
            raise GGUFError(f"{path} already holds quantized tensors ({', '.join(schemes)}); load it without "
                            "quantization=")
    model = build_model(cls, config, state, qconfig, dtype, backend, impl, path)  # qconfig None: a float model
    if quantization is not None:
        model = quantize_as_asked(model, quantization)
    model.name_or_path, model.folder = path, None
    return model


def gguf_tokenizer(path):
    """The file's GPT-2-style BPE vocabulary (tokenizer.ggml.*) as a minimamba Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from .tokenizer import Tokenizer

    reader = open_gguf(path)
    if "tokenizer.ggml.model" not in reader.fields:
        raise GGUFError(f"{path} holds no tokenizer (no tokenizer.ggml.* keys); name one with --tokenizer "
                        "(or tokenizer=), e.g. the tokenizer.json of the checkpoint it came from")
    kind = _field(reader, "tokenizer.ggml.model", str, path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE, as GPT-NeoX) "
                        "is read. Pass --tokenizer / tokenizer= instead")
    try:
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        merges = reader.fields["tokenizer.ggml.merges"].contents()
    except KeyError as err:
        raise GGUFError(f"{path}: missing tokenizer key {err.args[0]!r}") from None
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = reader.fields.get("tokenizer.ggml.token_type")
    if types is not None:  # 3 = control, 4 = user defined: whole tokens, never split
        from tokenizers import AddedToken

        special = [AddedToken(tokens[i], special=True) for i, t in enumerate(types.contents()) if t in (3, 4)]
        tok.add_special_tokens(special)
    return Tokenizer(tok, name_or_path=os.fspath(path))


def write_gguf(model, path, tokenizer_json=None):
    """Write `model` as a llama.cpp Mamba GGUF file (F32, or Q8_0 / Q4_0 for quantized int8 / int4 at block 32).

    The inverse of from_gguf, used by the tests and for handing a model to llama.cpp.
    """
    gguf = _gguf()
    from .quant import QuantizedWeight

    cfg = model.config
    writer = gguf.GGUFWriter(os.fspath(path), "mamba")
    writer.add_context_length(2 ** 20)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_ssm_conv_kernel(cfg.conv_kernel)
    writer.add_ssm_inner_size(cfg.intermediate_size)
    writer.add_ssm_state_size(cfg.state_size)
    writer.add_ssm_time_step_rank(cfg.time_step_rank)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_ssm_dt_b_c_rms(False)
    if tokenizer_json is not None:
        import json

        with open(tokenizer_json, encoding="utf-8") as f:
            spec = json.load(f)
        vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        special = {a["content"] for a in spec.get("added_tokens", [])}
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([3 if t in special else 1 for t in tokens])
    inverse = {v: k for k, v in LAYER_NAMES.items()}
    top = {v: k for k, v in TOP_NAMES.items()}
    Q = gguf.GGMLQuantizationType
    for name, value in model.state_dict().items():
        full = model.prefix + name
        if full == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if full in top:
            gname = top[full]
        else:
            _, _, i, rest = full.split(".", 3)
            gname = f"blk.{i}.{inverse[rest]}"
        if isinstance(value, QuantizedWeight):
            if value.block_size != 32:
                raise GGUFError(f"{full}: GGUF's Q8_0 / Q4_0 blocks hold 32 weights; this model has {value.block_size}")
            n = value.shape[0]
            blocks = np.concatenate([value.scales.view(np.uint8).reshape(n, -1, 2),
                                     value.qs.view(np.uint8).reshape(n, value.scales.shape[1], -1)], axis=-1)
            writer.add_tensor(gname, blocks.reshape(n, -1), raw_dtype=Q.Q8_0 if value.scheme == "int8" else Q.Q4_0)
            continue
        value = np.asarray(value, dtype=np.float32)
        if full.endswith("A_log"):
            obj, _ = model._slot(name)
            value = np.asarray(obj.A, dtype=np.float32)  # llama.cpp stores A = -exp(A_log)
        if full.endswith("conv1d.weight"):
            value = value[:, 0, :]
        writer.add_tensor(gname, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def print_info(path):
    """`minimamba info FILE.gguf`: the config, and the tensors by type with their bytes."""
    reader = open_gguf(path)
    config = read_config(reader, path)
    by_type = {}
    for t in reader.tensors:
        kind = _gguf().GGMLQuantizationType(t.tensor_type).name
        count, nbytes = by_type.get(kind, (0, 0))
        by_type[kind] = (count + 1, nbytes + int(t.n_bytes))
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    from .cli import print_config

    print(f"model        {path} (GGUF, architecture mamba)")
    print_config(config)
    print(f"parameters   {n_params:,}")
    stored = ", ".join(f"{kind} {count} tensors {nbytes / 1e6:.1f} MB" for kind, (count, nbytes) in sorted(by_type.items()))
    print(f"stored as    {stored}")
    print(f"float32      {n_params * 4 / 1e6:.1f} MB if dequantized")
    return 0
