"""Hypothesis fuzzing of every file minimamba reads from a stranger: safetensors headers and bodies,
config.json, shard indexes, tokenizer.json and PEFT adapter configs.

The contract, checked on every case: the input loads, or minimamba raises its own
CheckpointError (a ValueError) naming the file; never a raw built-in exception, a
hang (each case runs under a 20 s alarm), or memory beyond the tensors the header
declares (tracemalloc). Derandomized, so CI sees the same cases every run;
`FUZZ_SCALE=10` multiplies the case counts for a longer local run.
"""

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimamba import MambaConfig, MambaForCausalLM, Tokenizer
from minimamba.errors import CheckpointError
from minimamba.training import lora
from minimamba.weights import read_safetensors, write_safetensors

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
CASES = {}  # class of input -> [cases tried, cases that loaded], printed at the end


def fuzz_settings(n):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def alarm(seconds=20):
    """A hang becomes a failure: SIGALRM after `seconds` (where there is no SIGALRM, no guard)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"a case ran longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def loads_or_refuses(kind, load, path_in_message=None):
    """Run `load`; a CheckpointError naming the file is fine; anything else fails the test."""
    counts = CASES.setdefault(kind, [0, 0])
    counts[0] += 1
    try:
        with alarm():
            got = load()
        counts[1] += 1
        return got
    except CheckpointError as err:
        if path_in_message is not None:
            assert str(path_in_message) in str(err), f"the error does not name the file: {err}"
        return None


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nfuzz cases tried (loaded): " + ", ".join(f"{k} {n} ({ok})" for k, (n, ok) in CASES.items())
          + f"; {sum(n for n, _ in CASES.values())} in all")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
small_ints = st.integers(-3, 2**64 + 3) | st.sampled_from([0, 1, 2, 3, 4, 7, 8, 2**31, 2**63, -1])


# ---------------------------------------------------------------- safetensors headers and bodies

WORK = tempfile.mkdtemp(prefix="minimamba-fuzz-")
BASE_TENSORS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.arange(4, dtype=np.float16),
                "i": np.arange(5, dtype=np.int8), "b": np.array([True, False]), "z": np.zeros((0, 3), np.float64)}


def base_header():
    path = os.path.join(WORK, "base.safetensors")
    write_safetensors(path, BASE_TENSORS)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def read_checked(path):
    """read_safetensors under tracemalloc: the arrays made may not exceed the file's data (x2 for bf16 -> f32)."""
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        tensors = read_safetensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * size + 200_000, f"peak {peak} bytes for a {size}-byte file"
    assert sum(t.nbytes for t in tensors.values()) <= 2 * size
    return tensors


@st.composite
def mutated_headers(draw):
    header, data = base_header()
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["field", "offset", "shape", "dtype", "drop", "add", "metadata", "rename"]))
        name = draw(st.sampled_from(names))
        if name not in header:
            continue
        info = header[name]
        if op == "field":
            info[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_values)
        elif op == "offset" and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2:
            info["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        elif op == "shape" and isinstance(info.get("shape"), list):
            info["shape"] = draw(st.lists(small_ints, max_size=4))
        elif op == "dtype":
            info["dtype"] = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8",
                                                  "BOOL", "F8_E4M3", "f32", "", "U64"]))
        elif op == "drop":
            del header[name]
        elif op == "add":
            header[draw(st.text(max_size=6))] = draw(json_values)
        elif op == "metadata":
            header["__metadata__"] = draw(json_values)
        elif op == "rename":
            header[draw(st.sampled_from(names))] = header.pop(name)
    blob = json.dumps(header).encode()
    length = draw(st.sampled_from([len(blob)] * 6 + [len(blob) + 1, len(blob) - 1, 0, 2**64 - 1, 2**40]))
    tail = draw(st.sampled_from([data] * 6 + [data[:-1], data + b"\0", b""]))
    return struct.pack("<Q", length) + blob + tail


@fuzz_settings(600)
@given(raw=mutated_headers())
def test_fuzz_safetensors_headers(raw):
    path = os.path.join(WORK, "header.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    loads_or_refuses("safetensors header", lambda: read_checked(path), path)


@fuzz_settings(500)
@given(data=st.data())
def test_fuzz_safetensors_bytes(data):
    """Byte flips, insertions and cuts anywhere in a real model file, then the whole from_pretrained."""
    folder = os.path.join(WORK, "bytes-model")
    if not os.path.isdir(folder):
        shutil.copytree(os.path.join(FIXTURES, "odd"), folder)
    with open(os.path.join(FIXTURES, "odd", "model.safetensors"), "rb") as f:
        raw = bytearray(f.read())
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip-header", "flip", "cut", "insert"]))
        hi = 8 + n if op == "flip-header" else len(raw)
        at = data.draw(st.integers(0, max(0, min(hi, len(raw)) - 1)))
        if op in ("flip", "flip-header") and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(bytes(raw))
    loads_or_refuses("safetensors body", lambda: MambaForCausalLM.from_pretrained(folder), folder)


# ---------------------------------------------------------------- config.json

with open(os.path.join(FIXTURES, "odd", "config.json")) as _f:
    BASE_CONFIG = json.load(_f)
STATE_SPACES_CONFIG = {"d_model": 24, "n_layer": 2, "vocab_size": 61, "pad_vocab_size_multiple": 8,
                       "ssm_cfg": {"d_state": 3, "d_conv": 4, "expand": 2}}
numbers = st.integers(-5, 2**64) | st.floats() | st.sampled_from([0, 1, -1, 2**31, 10**9, 1e-30, 0.5, True, False])


@fuzz_settings(700)
@given(base=st.sampled_from([BASE_CONFIG, STATE_SPACES_CONFIG]), data=st.data())
def test_fuzz_config(base, data):
    config = json.loads(json.dumps(base))
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(sorted(config) + ["ssm_cfg", "d_model", "time_step_rank", "extra"]))
        value = data.draw(numbers | json_values | st.sampled_from(["auto", "silu", "gelu", "Mamba2", None]))
        if data.draw(st.booleans()) and isinstance(config.get("ssm_cfg"), dict):
            config["ssm_cfg"][data.draw(st.sampled_from(["d_state", "d_conv", "expand", "dt_rank", "layer"]))] = value
        elif data.draw(st.integers(0, 5)) == 0:
            config.pop(key, None)
        else:
            config[key] = value
    path = os.path.join(WORK, "config.json")
    text = json.dumps(config, allow_nan=True)
    if data.draw(st.integers(0, 9)) == 0:  # sometimes not even JSON
        text = text[:data.draw(st.integers(0, len(text)))]
    with open(path, "w") as f:
        f.write(text)
    got = loads_or_refuses("config.json", lambda: MambaConfig.from_json(path), path)
    if got is not None:
        assert got.num_parameters() <= 10**12 and got.intermediate_size >= 1


# ---------------------------------------------------------------- shard indexes

TRICKY_SHARDS = ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "../model.safetensors",
                 "/etc/passwd", "..", ".", "", "a/b.safetensors", "C:\\x.safetensors", "x\0.safetensors",
                 "missing.safetensors", "config.json", "model.safetensors.index.json"]


@fuzz_settings(400)
@given(data=st.data())
def test_fuzz_shard_index(data):
    folder = os.path.join(WORK, "sharded")
    if not os.path.isdir(folder):
        shutil.copytree(os.path.join(FIXTURES, "sharded"), folder)
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            test_fuzz_shard_index.original = json.load(f)
    index = json.loads(json.dumps(test_fuzz_shard_index.original))
    weight_map = index["weight_map"]
    names = sorted(weight_map)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["shard", "drop", "add", "value", "whole"]))
        name = data.draw(st.sampled_from(names))
        if op == "shard":
            weight_map[name] = data.draw(st.sampled_from(TRICKY_SHARDS) | st.text(max_size=20))
        elif op == "drop":
            weight_map.pop(name, None)
        elif op == "add":
            weight_map[data.draw(st.text(max_size=10))] = data.draw(st.sampled_from(TRICKY_SHARDS))
        elif op == "value":
            weight_map[name] = data.draw(json_values)
        else:
            index = data.draw(json_values | st.just({"weight_map": data.draw(json_values)}))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    loads_or_refuses("shard index", lambda: MambaForCausalLM.from_pretrained(folder), folder)


# ---------------------------------------------------------------- tokenizer.json


def small_tokenizer_json():
    from minimamba.training.data import train_tokenizer

    with open(os.path.join(os.path.dirname(__file__), "data", "shakespeare_tiny.txt"), encoding="utf-8") as f:
        text = f.read()[:3000]
    return json.loads(train_tokenizer(text, vocab_size=270).to_str())


@st.composite
def mutated_tokenizers(draw, base):
    tok = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        node = tok
        for _ in range(draw(st.integers(1, 3))):  # walk down a random path, then replace what is there
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node)))
            elif isinstance(node, list) and node:
                key = draw(st.integers(0, len(node) - 1))
            else:
                break
            if isinstance(node[key], (dict, list)) and node[key] and draw(st.booleans()):
                node = node[key]
                continue
            node[key] = draw(json_values | st.sampled_from([-1, 2**32, 2**64, "", "<|endoftext|>"]))
            break
    if draw(st.integers(0, 4)) == 0:  # a Split pre-tokenizer with a random (maybe pathological) regex
        tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": draw(
            st.sampled_from(["(", "(?:a+)+b", "a{99999999}", "\\p{Foo}", "(?<=a+)b", "", "[", "\\"])
            | st.text(alphabet="()[]{}*+?|\\^$.ab01,", max_size=12))},
            "behavior": draw(st.sampled_from(["Isolated", "Removed", "Weird"])), "invert": draw(st.booleans())}
    return json.dumps(tok)


TOKENIZER_BASE = None


@fuzz_settings(300)
@given(data=st.data())
def test_fuzz_tokenizer(data):
    global TOKENIZER_BASE
    if TOKENIZER_BASE is None:
        TOKENIZER_BASE = small_tokenizer_json()
    text = data.draw(mutated_tokenizers(TOKENIZER_BASE))
    if data.draw(st.integers(0, 9)) == 0:
        text = text[:data.draw(st.integers(0, len(text)))]
    path = os.path.join(WORK, "tokenizer.json")
    with open(path, "w") as f:
        f.write(text)

    def load_and_use():
        tok = Tokenizer.from_file(path)
        ids = tok.encode("To be, or not to be: é 123")
        tok.decode(ids)
        return tok

    loads_or_refuses("tokenizer.json", load_and_use, path)


def test_a_rust_panic_in_the_tokenizer_becomes_a_checkpoint_error(tmp_path, monkeypatch):
    """pyo3's PanicException is a BaseException: `except Exception` would let it through."""
    import tokenizers

    class PanicException(BaseException):
        pass

    def panic(path):
        raise PanicException("regex error: the pattern panicked")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", staticmethod(panic))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json .PanicException"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------- PEFT adapter configs


def adapter_folder():
    folder = os.path.join(WORK, "adapter")
    if not os.path.isdir(folder):
        config = MambaConfig.from_json(os.path.join(FIXTURES, "odd", "config.json"))
        params = {k: np.asarray(v) for k, v in MambaForCausalLM(config, seed=0).state_dict().items()}
        adapters = lora.add_adapters(config, params, ("x_proj", "embeddings", "in_proj"), r=2, alpha=4, dropout=0.1)
        lora.save_adapter(folder, adapters)
        adapter_folder.base = (config, params)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            adapter_folder.config = json.load(f)
    return folder


@fuzz_settings(500)
@given(data=st.data())
def test_fuzz_adapter_config(data):
    folder = adapter_folder()
    config, params = adapter_folder.base
    peft = json.loads(json.dumps(adapter_folder.config))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type",
                                         "use_dora", "rank_pattern", "fan_in_fan_out", "bias"]))
        peft[key] = data.draw(numbers | json_values | st.sampled_from(
            [2, 1, 0, -1, 2.0, 1.0, 1.5, "LORA", ["x_proj"], ["conv1d"], "in_proj", ["in_proj", 3]]))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(peft, f)
    got = loads_or_refuses("adapter_config.json", lambda: lora.load_adapter(folder, config, params), folder)
    if got is not None:
        for adapter in got.values():
            assert 0 <= adapter.dropout < 1 and adapter.r >= 1 and np.isfinite(adapter.scale)
