"""A checkpoint folder from a stranger: every header checked before a tensor is made, no path out of the
folder, memory that follows the declared tensors, errors that name the file and never echo its bytes."""

import json
import os
import shutil
import struct
import tracemalloc

import numpy as np
import pytest

from minimamba import MambaForCausalLM
from minimamba.errors import CheckpointError
from minimamba.weights import SAFETENSORS_DTYPES, read_checkpoint, read_safetensors, write_safetensors

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def copy_fixture(case, tmp_path):
    dst = tmp_path / case
    shutil.copytree(os.path.join(FIXTURES, case), dst)
    return dst


def raw_file(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ---------------------------------------------------------------- the format's rules


@pytest.mark.parametrize("header, data, words", [
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12), "overlaps tensor 'a'"),
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, bytes(8), "overlaps tensor 'a'"),  # aliased
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, bytes(20), "leaves a gap after tensor 'a'"),
    ({"a": entry("F32", [2], 4, 12)}, bytes(12), "leaves a gap after the start of the data"),
    ({"a": entry("F32", [2], 0, 8)}, bytes(9), "1 bytes after the last tensor"),
    ({"a": entry("F32", [2], 0, 8)}, bytes(7), "truncated or corrupt"),
    ({"a": entry("F32", [3], 0, 8)}, bytes(8), "needs 12 bytes but its data_offsets span 8"),
    ({"a": entry("Q4", [2], 0, 8)}, bytes(8), "dtype is not one of"),
    ({"a": entry("F32", [-2], 0, 8)}, bytes(8), "shape must be a list of non-negative integers"),
    ({"a": entry("F32", [True], 0, 4)}, bytes(4), "shape must be a list of non-negative integers"),
    ({"a": entry("F32", [2], 8, 0)}, bytes(8), "begin <= end"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "needs exactly the fields"),
    ({"a": [1, 2]}, bytes(8), "needs exactly the fields"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
    ({"a": entry("F32", [2**40, 2**40], 0, 8)}, bytes(8), "needs 4835703278458516698824704 bytes"),  # no overflow
])
def test_format_violations_are_refused_before_any_tensor(tmp_path, header, data, words):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_file(header, data))
    with pytest.raises(CheckpointError) as err:
        read_safetensors(path)
    print(err.value)
    assert str(path) in str(err.value) and words in str(err.value)


def test_repeated_header_key_and_oversized_header(tmp_path):
    path = tmp_path / "x.safetensors"
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    with pytest.raises(CheckpointError, match="key 'a' appears twice"):
        read_safetensors(path)
    with open(path, "wb") as f:  # a 200 MB header length in a sparse 200 MB file: refused without reading it
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(200_000_100)
    with pytest.raises(CheckpointError, match="100,000,000-byte limit"):
        read_safetensors(path)


def test_a_text_file_as_weights_echoes_nothing(tmp_path):
    """The old reader printed the first 8 bytes of /etc/passwd as a 'header length'."""
    secret = b"root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n" * 3
    folder = copy_fixture("odd", tmp_path)
    (folder / "model.safetensors").write_bytes(secret)
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(folder)
    message = str(err.value)
    print(message)
    (n,) = struct.unpack("<Q", secret[:8])
    assert "SECRET" not in message and "root:x" not in message and str(n) not in message and f"{n:,}" not in message


# ---------------------------------------------------------------- shard indexes


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors", "sub/model.safetensors", "", "config.json",
                                   ".hidden.safetensors", 7, None])
def test_index_names_only_files_inside_the_folder(tmp_path, shard):
    folder = copy_fixture("sharded", tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model-00001-of-00004.safetensors", outside)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(folder)
    print(err.value)
    assert "model.safetensors.index.json" in str(err.value)
    assert "root:" not in str(err.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    folder = copy_fixture("sharded", tmp_path)
    shards = sorted(f for f in os.listdir(folder) if f.startswith("model-"))
    a = read_safetensors(folder / shards[0])
    b = read_safetensors(folder / shards[1])
    name = next(iter(a))
    write_safetensors(folder / shards[1], {**b, name: a[name] + 1})  # the later shard used to win silently
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is in both {shards[0]} and {shards[1]}"):
        MambaForCausalLM.from_pretrained(folder)


def test_a_shard_holding_a_tensor_the_index_does_not_list_is_refused(tmp_path):
    folder = copy_fixture("sharded", tmp_path)
    shard = sorted(f for f in os.listdir(folder) if f.startswith("model-"))[0]
    write_safetensors(folder / shard, {**read_safetensors(folder / shard), "stowaway": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="holds tensor 'stowaway', which .* does not list"):
        MambaForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("text, words", [("[]", "non-empty \"weight_map\""), ('{"weight_map": {}}', "non-empty"),
                                         ("{", "is not valid JSON"), ('{"weight_map": {"a": ["x"]}}', "strings")])
def test_malformed_index(tmp_path, text, words):
    folder = copy_fixture("sharded", tmp_path)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=words):
        MambaForCausalLM.from_pretrained(folder)


def test_hub_cache_symlinks_into_blobs_still_load(tmp_path):
    """huggingface_hub stores snapshots/<commit>/<file> as symlinks to blobs/<hash>; that must keep working."""
    source = os.path.join(FIXTURES, "sharded")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    os.makedirs(blobs)
    os.makedirs(snapshot)
    for i, name in enumerate(sorted(os.listdir(source))):
        shutil.copy(os.path.join(source, name), blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snapshot), snapshot / name)
    got = MambaForCausalLM.from_pretrained(snapshot).state_dict()
    want = MambaForCausalLM.from_pretrained(source).state_dict()
    assert all(np.array_equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- memory and values


def test_memory_follows_the_declared_tensors_not_the_file(tmp_path):
    arrays = {f"t{i}": np.full((1000, 1000), i, dtype=np.float32) for i in range(10)}  # 10 x 4 MB
    path = tmp_path / "big.safetensors"
    write_safetensors(path, arrays)
    tracemalloc.start()
    one = read_safetensors(path, names={"t3"})
    _, peak_one = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    del one
    everything = read_safetensors(path)
    _, peak_all = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak while reading 1 of 10 tensors: {peak_one / 1e6:.2f} MB; all 10: {peak_all / 1e6:.2f} MB "
          f"(file {os.path.getsize(path) / 1e6:.1f} MB)")
    assert peak_one < 4.1e6 + 1e5  # one 4 MB tensor and bookkeeping
    assert peak_all < 40.1e6 + 1e5  # the ten tensors, no second buffer of the file
    assert np.array_equal(everything["t7"], arrays["t7"])

    with open(path, "ab") as f:  # 3 GB of trailing bytes (a sparse file: no disk used)
        f.truncate(os.path.getsize(path) + 3 * 10**9)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="bytes after the last tensor"):
        read_safetensors(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak while refusing a file with 3 GB of trailing bytes: {peak / 1e6:.3f} MB")
    assert peak < 1e6


@pytest.mark.parametrize("dtype", list(SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_reads_and_writes(tmp_path, dtype):
    from safetensors.numpy import load_file, save_file

    if dtype == "BF16":
        want = np.array([1.0, -2.5, 2.0**100], dtype=np.float32)  # exact in bfloat16
        bits = (want.view(np.uint32) >> 16).astype(np.uint16)
        header = {"x": entry("BF16", [3], 0, 6)}
        (tmp_path / "bf.safetensors").write_bytes(raw_file(header, bits.tobytes()))
        assert np.array_equal(read_safetensors(tmp_path / "bf.safetensors")["x"], want)
        return
    want = (np.arange(-3, 9).reshape(3, 4) % 2 == 0) if dtype == "BOOL" else \
        np.arange(-3, 9).reshape(3, 4).astype(SAFETENSORS_DTYPES[dtype])
    save_file({"x": want}, str(tmp_path / "theirs.safetensors"))
    write_safetensors(tmp_path / "ours.safetensors", {"x": want})
    for name in ("theirs", "ours"):
        got = read_safetensors(tmp_path / f"{name}.safetensors")["x"]
        assert got.dtype == want.dtype and np.array_equal(got, want) and got.flags.writeable, name
    assert np.array_equal(load_file(str(tmp_path / "ours.safetensors"))["x"], want)  # the library reads ours


def test_non_finite_weights_are_named_at_load(tmp_path):
    folder = copy_fixture("odd", tmp_path)
    state = read_checkpoint(folder)
    state["backbone.layers.1.mixer.D"][5] = np.nan
    state["backbone.layers.1.mixer.D"][7] = np.inf
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(folder)
    print(err.value)
    assert "'backbone.layers.1.mixer.D' has 2 non-finite value(s)" in str(err.value)
    assert "first at index (5,)" in str(err.value) and "allow_non_finite=True" in str(err.value)
    model = MambaForCausalLM.from_pretrained(folder, allow_non_finite=True)  # for people who study broken ones
    assert np.isnan(model.state_dict()["backbone.layers.1.mixer.D"][5])


def test_unreadable_paths_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, expected a safetensors file"):
        read_safetensors(tmp_path)
    with pytest.raises(CheckpointError, match="cannot open the safetensors file"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_pipes_and_devices_are_refused_not_read(tmp_path):
    """A FIFO would block open() forever; /dev/zero would never end."""
    folder = copy_fixture("odd", tmp_path)
    os.remove(folder / "config.json")
    os.mkfifo(folder / "config.json")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        MambaForCausalLM.from_pretrained(folder)
    os.remove(folder / "config.json")
    os.symlink("/dev/zero", folder / "config.json")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        MambaForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_safetensors("/dev/zero")


def test_bool_tensors_hold_only_0_and_1(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_file({"b": entry("BOOL", [3], 0, 3)}, b"\x00\x01\x02"))
    with pytest.raises(CheckpointError, match="holds bytes other than 0 and 1"):
        read_safetensors(path)
