"""Finding, reading and checking checkpoint files.

A checkpoint folder holds `config.json` and either `model.safetensors` or the
shards listed in `model.safetensors.index.json`. Tensors may be float32,
float16 or bfloat16; bfloat16 becomes float32 exactly (its 16 bits are the top
half of a float32). Files are only ever read.

The safetensors format: 8 bytes (little-endian u64) giving the header's size N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the
raw little-endian data. We read it ourselves so that bfloat16 loads without
torch and a truncated or corrupt file gets an error that says so.

The folder may come from a stranger. Every header is validated in full before
any tensor is made (`read_safetensors_header`), shard names in an index must be
plain file names inside the folder (symlinks, as in the Hub cache, still load),
each tensor is read into its own array (memory follows the declared tensors,
not the file), and messages never echo a file's bytes. Files are written
atomically (`write_safetensors`: temp file, fsync, rename).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write
from .config import MambaConfig
from .errors import CheckpointError, open_regular_file, parse_json, read_json_file, shown

__all__ = ["CheckpointError", "read_safetensors", "read_checkpoint", "write_safetensors", "load_state_dict",
           "save_pretrained", "resolve_model_dir"]

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# ---------------------------------------------------------------- finding the folder


def resolve_model_dir(path_or_repo_id, revision=None, cache_dir=None) -> str:
    """A local folder as it is; otherwise a Hub repo id, from the HF cache or downloaded into it.

    "builtin" names the model shipped with minimamba. Otherwise tries, in order: the local
    path; the huggingface_hub cache (no network); the Hub (unless HF_HUB_OFFLINE=1). The
    error says what each step found.
    """
    if path_or_repo_id == "builtin":
        from .pipeline import builtin_model_dir

        return builtin_model_dir()
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

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
MAX_INDEX_BYTES = 100_000_000  # a shard index lists names only; the largest real ones are a few MB


class TensorEntry(NamedTuple):
    """One tensor as a safetensors header declares it, already checked."""
    name: str
    dtype: str  # the safetensors code, "F32", "BF16", ...
    shape: tuple
    begin: int  # byte range within the data section
    end: int


def _open_for_reading(path, what):
    """`open(path, "rb")` of a regular file; a missing one, a folder, a pipe or a device is a CheckpointError."""
    try:
        return open_regular_file(path, what)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: cannot open the {what} (No such file or directory)") from None


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path, f=None) -> tuple[list[TensorEntry], int]:
    """Validate a safetensors file's header completely; return its tensors (in file order) and the data start.

    Checked before any tensor is made: the header length fits the file and a
    bound; the header is a JSON object without repeated keys; each entry has a
    known dtype, a shape of non-negative ints and two ordered offsets whose span
    is exactly shape x itemsize; the tensors tile the data section with no
    overlap, no gap and nothing after the last one.
    """
    own = f is None
    f = _open_for_reading(path, "safetensors file") if own else f
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header claims more bytes than the file has (or over the "
                                  f"{MAX_HEADER_BYTES:,}-byte limit); truncated or not safetensors")
        header = parse_json(f.read(n), path, "safetensors header")
    finally:
        if own:
            f.close()
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    entries = [_header_entry(path, name, info) for name, info in header.items()]
    data_size = size - 8 - n
    entries.sort(key=lambda e: (e.begin, e.end))
    position, previous = 0, None
    for e in entries:
        if e.begin != position:
            what = "overlaps" if e.begin < position else "leaves a gap after"
            after = f"tensor {shown(previous)}" if previous is not None else "the start of the data"
            raise CheckpointError(f"{path}: tensor {shown(e.name)} (bytes {e.begin}..{e.end}) {what} {after} "
                                  f"(ends at {position}); corrupt safetensors file")
        position, previous = e.end, e.name
    if position != data_size:
        if position > data_size:
            raise CheckpointError(f"{path}: the tensors need {position} bytes of data but the file has "
                                  f"{data_size}; the file is truncated or corrupt")
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor; the safetensors "
                              "format allows none (a corrupt or tampered file)")
    return entries, 8 + n


def _header_entry(path, name, info) -> TensorEntry:
    where = f"{path}: corrupt header entry for {shown(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: needs exactly the fields dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: dtype is not one of {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_non_negative_int(s) for s in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_non_negative_int(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end] with begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {shown(name)} {tuple(shape)} {dtype} needs {nbytes} bytes but its "
                              f"data_offsets span {end - begin}; the file is truncated or corrupt")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def read_safetensors(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file as writable NumPy arrays (bf16 as float32).

    The header is validated in full first; then each tensor is read into its own
    array, so memory follows the tensors the header declares (and `names`
    selects), never the size of the file.
    """
    with _open_for_reading(path, "safetensors file") as f:
        entries, start = read_safetensors_header(path, f)
        return _read_entries(path, f, start, entries if names is None else [e for e in entries if e.name in names])


def _read_entries(path, f, start, entries) -> dict[str, np.ndarray]:
    tensors = {}
    for e in entries:
        array = np.empty(e.shape, dtype=np.dtype(SAFETENSORS_DTYPES[e.dtype]).newbyteorder("<"))
        f.seek(start + e.begin)
        if f.readinto(array.reshape(-1).view(np.uint8)) != e.end - e.begin:
            raise CheckpointError(f"{path}: tensor {shown(e.name)} ends past the end of the file (did it change "
                                  "while being read?)")
        if e.dtype == "BF16":
            array = bf16_to_f32(array)
        elif e.dtype == "BOOL" and (array.view(np.uint8) > 1).any():
            raise CheckpointError(f"{path}: tensor {shown(e.name)} is BOOL but holds bytes other than 0 and 1")
        tensors[e.name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return tensors


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32, exactly: shift into the high half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_shard_name(shard, index) -> str:
    """A shard named by an index must be a .safetensors file directly inside the model folder."""
    if not isinstance(shard, str):
        raise CheckpointError(f"{index}: weight_map values must be shard file names (strings)")
    if (not shard.endswith(".safetensors") or shard in (".safetensors",) or "/" in shard or "\\" in shard
            or "\0" in shard or shard.startswith(".") or os.path.isabs(shard) or os.path.splitdrive(shard)[0]):
        raise CheckpointError(f"{index}: shard {shown(shard)} is not a .safetensors file name inside the model "
                              "folder (no folders, '..' or absolute paths); refusing to read outside the folder")
    return shard


def read_index(index) -> dict[str, str]:
    """The weight_map {tensor name: shard file name} of a model.safetensors.index.json, checked."""
    data = read_json_file(index, "shard index", limit=MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: needs a non-empty \"weight_map\" object {{tensor name: shard file}}")
    for shard in weight_map.values():
        check_shard_name(shard, index)
    return weight_map


def checkpoint_headers(folder) -> list[tuple[str, list[TensorEntry], int]]:
    """[(file, its validated tensor entries, data start)] for every weights file of a folder.

    Sharded folders: each shard must hold exactly the tensors the index maps to
    it, and no tensor may appear twice.
    """
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [(single, *read_safetensors_header(single))]
    if os.path.isfile(index):
        weight_map = read_index(index)
        files, seen = [], {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index} lists shard {shard} but {shard_path} does not exist")
            entries, start = read_safetensors_header(shard_path)
            for e in entries:
                if e.name in seen:
                    raise CheckpointError(f"{folder}: tensor {shown(e.name)} is in both {seen[e.name]} and {shard}")
                seen[e.name] = shard
                if weight_map.get(e.name) != shard:
                    raise CheckpointError(f"{shard_path}: holds tensor {shown(e.name)}, which {index} "
                                          + ("does not list" if e.name not in weight_map
                                             else f"maps to {weight_map[e.name]}"))
            files.append((shard_path, entries, start))
        missing = sorted(set(weight_map) - set(seen))
        if missing:
            raise CheckpointError(f"{index} maps {shown(missing[0])} to a shard that does not contain it")
        return files
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(folder)):
        raise CheckpointError(
            f"{folder} has only PyTorch pickle weights (pytorch_model.bin); minimamba never unpickles. "
            "Convert them once with transformers: MambaForCausalLM.from_pretrained(folder)"
            ".save_pretrained(out_folder, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def read_checkpoint(folder) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, single-file or sharded; all headers are checked before any read."""
    tensors = {}
    for path, entries, start in checkpoint_headers(folder):
        with _open_for_reading(path, "safetensors file") as f:
            tensors.update(_read_entries(path, f, start, entries))
    return tensors


def check_finite(tensors: dict[str, np.ndarray], source) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that has them and how many."""
    for name, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            first = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
            raise CheckpointError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf), the first "
                                  f"at index {first}; the checkpoint is broken (pass allow_non_finite=True to load "
                                  "it anyway, e.g. to study it)")


# ---------------------------------------------------------------- writing tensors


def write_safetensors(path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """A .safetensors file written atomically (temp file, fsync, rename), one tensor at a time.

    Readable by the safetensors library and transformers; never holds a second
    copy of the whole model in memory.
    """
    codes = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
    header, offset, parts = {}, 0, []
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, value in arrays.items():
        value = np.asarray(value)
        code = codes.get(value.dtype.newbyteorder("="))
        if code is None:
            raise ValueError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store")
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
        parts.append(value)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in parts:
            f.write(value.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


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
        if name in out:
            raise CheckpointError(f"the checkpoint holds {name!r} twice, under two spellings of its name")
        out[name] = value
    return out


def validate(tensors: dict[str, np.ndarray], config: MambaConfig, source="checkpoint",
             skip=()) -> dict[str, np.ndarray]:
    """Check every tensor's presence and shape against the config; return the ones the model uses.

    A tied `lm_head.weight` that equals the embedding is dropped; one that
    differs while the config says tied is an error (the config contradicts the file).
    `skip`: names the caller has taken out and checked itself (a quantized file's packed matrices).
    """
    shapes = {name: shape for name, shape in expected_shapes(config).items() if name not in skip}
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
        raise CheckpointError(f"{source}: unexpected tensor {shown(extra[0])} {tuple(tensors[extra[0]].shape)} "
                              f"({len(extra)} in all) that the config does not account for "
                              "(check num_hidden_layers, use_bias, use_conv_bias)")
    return {name: tensors[name] for name in shapes}


def load_state_dict(folder, config: MambaConfig, allow_non_finite=False) -> dict[str, np.ndarray]:
    """Read, rename and validate a checkpoint folder's tensors; nothing is computed yet.

    NaN or infinite weights are refused (naming the tensor) unless `allow_non_finite`.
    """
    state = validate(normalize_keys(read_checkpoint(folder)), config, source=str(folder))
    if not allow_non_finite:
        check_finite(state, source=str(folder))
    return state


def save_pretrained(folder, config: MambaConfig, state_dict: dict[str, np.ndarray]) -> None:
    """Write config.json and model.safetensors in the layout transformers loads, each file atomically."""
    os.makedirs(folder, exist_ok=True)
    config.to_json(os.path.join(folder, "config.json"))
    arrays = {name: np.asarray(value) for name, value in state_dict.items()
              if name != "lm_head.weight" or not config.tie_word_embeddings}
    write_safetensors(os.path.join(folder, "model.safetensors"), arrays, metadata={"format": "pt"})
