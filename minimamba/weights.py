"""Finding, reading and checking checkpoint files.

A checkpoint folder holds `config.json` and either `model.safetensors` or the
shards listed in `model.safetensors.index.json`. Tensors may be float32,
float16 or bfloat16; bfloat16 becomes float32 exactly (its 16 bits are the top
half of a float32). Files are only ever read.

The safetensors format: 8 bytes (little-endian u64) giving the header's size N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the
raw little-endian data. We read it ourselves so that bfloat16 loads without
torch and a truncated or corrupt file gets an error that says so.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from .config import MambaConfig

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is."""


# ---------------------------------------------------------------- finding the folder


def resolve_model_dir(path_or_repo_id, revision=None, cache_dir=None) -> str:
    """A local folder as it is; otherwise a Hub repo id, from the HF cache or downloaded into it.

    Tries, in order: the local path; the huggingface_hub cache (no network);
    the Hub (unless HF_HUB_OFFLINE=1). The error says what each step found.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    looked = [f"locally: no folder {path!r}"]
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise CheckpointError(f"model not found. Looked {looked[0]}; it is not a Hub repo id (owner/name) either")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.md"]
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=patterns, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises several kinds
        looked.append(f"in the Hugging Face cache: {type(err).__name__}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        looked.append("online: skipped because HF_HUB_OFFLINE is set")
    else:
        try:
            return snapshot_download(path, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
        except Exception as err:  # noqa: BLE001
            looked.append(f"online: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise CheckpointError(f"model {path!r} not found. Looked " + "; ".join(looked))


# ---------------------------------------------------------------- reading tensors


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as NumPy arrays (bf16 as float32)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
        data = bytearray(size - 8 - n)  # writable, so the arrays made from it are too (training writes them)
        data = memoryview(data)[:f.readinto(data)]  # a view, not a second copy
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}: {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if end > len(data) or end - begin != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} {shape} {info['dtype']} needs bytes {begin}..{end} "
                                  f"but the data section has {len(data)}; the file is truncated or corrupt")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
        if info["dtype"] == "BF16":
            array = bf16_to_f32(array)
        tensors[name] = array
    return tensors


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32, exactly: shift into the high half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_checkpoint(folder) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, single-file or sharded."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index} lists shard {shard} but {shard_path} does not exist")
            tensors.update(read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index} maps {missing[0]!r} to a shard that does not contain it")
        return tensors
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(folder)):
        raise CheckpointError(
            f"{folder} has only PyTorch pickle weights (pytorch_model.bin); minimamba never unpickles. "
            "Convert them once with transformers: MambaForCausalLM.from_pretrained(folder)"
            ".save_pretrained(out_folder, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------- names and shapes


def expected_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of MambaForCausalLM, by its transformers name, with its shape."""
    d, e, n, k, r = (config.hidden_size, config.intermediate_size, config.state_size,
                     config.conv_kernel, config.time_step_rank)
    shapes = {"backbone.embeddings.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        shapes[p + "mixer.in_proj.weight"] = (2 * e, d)
        if config.use_bias:
            shapes[p + "mixer.in_proj.bias"] = (2 * e,)
        shapes[p + "mixer.conv1d.weight"] = (e, 1, k)
        if config.use_conv_bias:
            shapes[p + "mixer.conv1d.bias"] = (e,)
        shapes[p + "mixer.x_proj.weight"] = (r + 2 * n, e)
        shapes[p + "mixer.dt_proj.weight"] = (e, r)
        shapes[p + "mixer.dt_proj.bias"] = (e,)  # always present, whatever use_bias says
        shapes[p + "mixer.A_log"] = (e, n)
        shapes[p + "mixer.D"] = (e,)
        shapes[p + "mixer.out_proj.weight"] = (d, e)
        if config.use_bias:
            shapes[p + "mixer.out_proj.bias"] = (d,)
    shapes["backbone.norm_f.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def normalize_keys(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the original state-spaces names onto transformers' ones.

    The original checkpoints call the embedding `backbone.embedding.weight`;
    MambaModel (no head) checkpoints drop the `backbone.` prefix.
    """
    out = {}
    for name, value in tensors.items():
        if name == "backbone.embedding.weight":
            name = "backbone.embeddings.weight"
        if name.startswith(("embeddings.", "embedding.", "layers.", "norm_f.")):
            name = "backbone." + name.replace("embedding.", "embeddings.", 1)
        out[name] = value
    return out


def validate(tensors: dict[str, np.ndarray], config: MambaConfig, source="checkpoint") -> dict[str, np.ndarray]:
    """Check every tensor's presence and shape against the config; return the ones the model uses.

    A tied `lm_head.weight` that equals the embedding is dropped; one that
    differs while the config says tied is an error (the config contradicts the file).
    """
    shapes = expected_shapes(config)
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None)
    if head is not None and config.tie_word_embeddings:
        emb = tensors.get("backbone.embeddings.weight")
        if emb is not None and (emb.shape != head.shape or not np.array_equal(emb, head)):
            raise CheckpointError(f"{source}: config says tie_word_embeddings=true but lm_head.weight differs "
                                  "from backbone.embeddings.weight; set tie_word_embeddings to false")
    elif head is not None:
        tensors["lm_head.weight"] = head
    for name, shape in shapes.items():
        if name not in tensors:
            hint = ""
            if name.endswith("bias") and ("in_proj" in name or "out_proj" in name or "conv1d" in name):
                hint = " (the config asks for a bias the file does not have: check use_bias / use_conv_bias)"
            raise CheckpointError(f"{source}: missing tensor {name!r} with shape {shape}{hint}")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got} but the config implies {shape}")
        if not np.issubdtype(tensors[name].dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensors[name].dtype}, expected floating point")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} {tuple(tensors[extra[0]].shape)} "
                              f"({len(extra)} in all) that the config does not account for "
                              "(check num_hidden_layers, use_bias, use_conv_bias)")
    return {name: tensors[name] for name in shapes}


def load_state_dict(folder, config: MambaConfig) -> dict[str, np.ndarray]:
    """Read, rename and validate a checkpoint folder's tensors; nothing is computed yet."""
    return validate(normalize_keys(read_checkpoint(folder)), config, source=str(folder))


def save_pretrained(folder, config: MambaConfig, state_dict: dict[str, np.ndarray]) -> None:
    """Write config.json and model.safetensors in the layout transformers loads."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config.to_json(os.path.join(folder, "config.json"))
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in state_dict.items()
              if name != "lm_head.weight" or not config.tie_word_embeddings}
    save_file(arrays, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
