"""Loading checkpoints: layouts, dtypes, names, the Hub cache, and errors that name the problem."""

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM, MambaModel
from minimamba.weights import CheckpointError, expected_shapes, load_state_dict, read_safetensors

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(case):
    return os.path.join(FIXTURES, case)


def copy_fixture(case, tmp_path):
    dst = tmp_path / case
    shutil.copytree(fixture(case), dst)
    return dst


def folder_hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[path] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def raw_tensor_bytes(path, name):
    """dtype string and raw bytes of one tensor, parsed here with struct/json (not via minimamba)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        begin, end = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        return header[name]["dtype"], header[name]["shape"], f.read(end - begin)


# ---------------------------------------------------------------- layouts and dtypes


def test_sharded_equals_the_same_weights_in_one_file(tmp_path):
    folder = fixture("sharded")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) >= 2
    model = MambaForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "single")
    again = MambaForCausalLM.from_pretrained(tmp_path / "single")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value)
    # and every tensor came from the shard the index names
    for name, shard in weight_map.items():
        dtype, shape, raw = raw_tensor_bytes(os.path.join(folder, shard), name)
        assert dtype == "F32"
        np.testing.assert_array_equal(model.state_dict()[name], np.frombuffer(raw, "<f4").reshape(shape))


def test_missing_shard_is_named(tmp_path):
    folder = copy_fixture("sharded", tmp_path)
    os.remove(folder / "model-00002-of-00004.safetensors")
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00004.safetensors but .* does not exist"):
        MambaForCausalLM.from_pretrained(folder)


def test_bf16_loads_exactly():
    """Each bfloat16 value becomes the float32 with the same top 16 bits, checked one value at a time with struct."""
    path = os.path.join(fixture("bf16"), "model.safetensors")
    model = MambaForCausalLM.from_pretrained(fixture("bf16"))
    name = "backbone.layers.1.mixer.in_proj.weight"
    dtype, shape, raw = raw_tensor_bytes(path, name)
    assert dtype == "BF16"
    bits = struct.unpack(f"<{len(raw) // 2}H", raw)
    want = [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in bits]
    got = model.state_dict()[name]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(-1), np.asarray(want, dtype=np.float32))
    f64 = MambaForCausalLM.from_pretrained(fixture("bf16"), dtype="float64").state_dict()[name]
    np.testing.assert_array_equal(f64.reshape(-1), np.asarray(want, dtype=np.float64))  # exact in float64 too


def test_float16_and_float64_files_load(tmp_path):
    model = MambaForCausalLM.from_pretrained(fixture("odd"))
    from safetensors.numpy import save_file

    for dtype in (np.float16, np.float64):
        folder = tmp_path / np.dtype(dtype).name
        os.makedirs(folder)
        shutil.copy(os.path.join(fixture("odd"), "config.json"), folder)
        save_file({k: v.astype(dtype) for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        loaded = MambaForCausalLM.from_pretrained(folder, dtype="float64")
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(loaded.state_dict()[name], value.astype(dtype).astype(np.float64))


def test_state_spaces_layout():
    """Original mamba_ssm names (backbone.embedding.weight) and config (d_model, n_layer, ssm_cfg, padding)."""
    folder = fixture("state_spaces")
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    assert "d_model" in raw and raw["vocab_size"] == 61 and raw["pad_vocab_size_multiple"] == 8
    config = MambaConfig.from_pretrained(folder)
    assert (config.hidden_size, config.num_hidden_layers, config.state_size) == (24, 2, 3)
    assert config.vocab_size == 64  # 61 padded to a multiple of 8, as mamba_ssm pads it
    assert (config.conv_kernel, config.expand, config.time_step_rank) == (4, 2, 2)  # mamba_ssm defaults, rank ceil(24/16)
    assert config.use_conv_bias and not config.use_bias
    _, _, raw_emb = raw_tensor_bytes(os.path.join(folder, "model.safetensors"), "backbone.embedding.weight")
    model = MambaForCausalLM.from_pretrained(folder)
    np.testing.assert_array_equal(model.backbone.embeddings_weight.reshape(-1), np.frombuffer(raw_emb, "<f4"))
    assert model.head_weight is model.backbone.embeddings_weight


def test_tied_and_untied_heads():
    tied = MambaForCausalLM.from_pretrained(fixture("odd"))
    assert tied.config.tie_word_embeddings and tied.lm_head_weight is None
    assert "lm_head.weight" not in tied.state_dict()
    untied = MambaForCausalLM.from_pretrained(fixture("untied"))
    _, shape, raw = raw_tensor_bytes(os.path.join(fixture("untied"), "model.safetensors"), "lm_head.weight")
    np.testing.assert_array_equal(untied.head_weight, np.frombuffer(raw, "<f4").reshape(shape))
    assert not np.array_equal(untied.head_weight, untied.backbone.embeddings_weight)


def test_backbone_alone_loads_from_a_causal_lm_checkpoint():
    lm = MambaForCausalLM.from_pretrained(fixture("odd"))
    backbone = MambaModel.from_pretrained(fixture("odd"))
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(backbone(ids).last_hidden_state, lm.backbone(ids).last_hidden_state)


# ---------------------------------------------------------------- errors that name the problem


def edit_tensors(folder, edit):
    """Rewrite model.safetensors of a copied fixture through a function of the tensor dict."""
    from safetensors.numpy import save_file

    path = str(folder / "model.safetensors")
    tensors = dict(read_safetensors(path))
    save_file(edit(tensors), path)


def test_missing_tensor_names_key_and_shape(tmp_path):
    folder = copy_fixture("odd", tmp_path)
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != "backbone.layers.1.mixer.A_log"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.1.mixer.A_log' with shape \(48, 3\)"):
        MambaForCausalLM.from_pretrained(folder)


def test_misshapen_tensor_names_both_shapes(tmp_path):
    folder = copy_fixture("odd", tmp_path)
    edit_tensors(folder, lambda t: {**t, "backbone.layers.0.mixer.x_proj.weight": np.zeros((12, 48), np.float32)})
    with pytest.raises(CheckpointError, match=r"'backbone.layers.0.mixer.x_proj.weight' has shape \(12, 48\) "
                                              r"but the config implies \(11, 48\)"):
        MambaForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 2}, "unexpected tensor 'backbone.layers.2."),
    ({"num_hidden_layers": 4}, "missing tensor 'backbone.layers.3."),
    ({"hidden_size": 32}, "has shape (61, 24) but the config implies (61, 32)"),
    ({"use_conv_bias": True}, "check use_bias / use_conv_bias"),
    ({"use_bias": False}, "unexpected tensor"),
    ({"state_size": 4}, "but the config implies"),
    ({"tie_word_embeddings": False}, "missing tensor 'lm_head.weight'"),
])
def test_config_contradicting_weights(tmp_path, change, words):
    folder = copy_fixture("odd", tmp_path)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config.update(change)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(folder)
    print(err.value)
    assert words in str(err.value)


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    folder = copy_fixture("untied", tmp_path)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but lm_head.weight differs"):
        MambaForCausalLM.from_pretrained(folder)


def test_truncated_file(tmp_path):
    folder = copy_fixture("odd", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MambaForCausalLM.from_pretrained(folder)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        MambaForCausalLM.from_pretrained(folder)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(CheckpointError, match="header claims .* truncated or not safetensors"):
        MambaForCausalLM.from_pretrained(folder)


def test_corrupt_header(tmp_path):
    folder = copy_fixture("odd", tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        MambaForCausalLM.from_pretrained(folder)
    # a header that parses but describes nonsense
    header = json.dumps({"backbone.norm_f.weight": {"dtype": "F32", "shape": [24]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 96)
    with pytest.raises(CheckpointError, match="corrupt header entry for 'backbone.norm_f.weight'"):
        MambaForCausalLM.from_pretrained(folder)
    path.write_bytes(struct.pack("<Q", 1000))  # the length itself is not echoed: it may be any file's first bytes
    with pytest.raises(CheckpointError, match="header claims more bytes than the file has"):
        MambaForCausalLM.from_pretrained(folder)


def test_pytorch_bin_only_says_how_to_convert(tmp_path):
    folder = tmp_path / "pt"
    os.makedirs(folder)
    shutil.copy(os.path.join(fixture("odd"), "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(folder)
    print(err.value)
    assert "never unpickles" in str(err.value)
    assert "save_pretrained(out_folder, safe_serialization=True)" in str(err.value)


def test_no_weights_at_all(tmp_path):
    folder = tmp_path / "empty"
    os.makedirs(folder)
    shutil.copy(os.path.join(fixture("odd"), "config.json"), folder)
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        MambaForCausalLM.from_pretrained(folder)


def test_missing_config(tmp_path):
    folder = tmp_path / "noconfig"
    shutil.copytree(fixture("odd"), folder)
    os.remove(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        MambaForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("path, words", [
    ("/no/such/folder", "model not found"),
    ("./relative/missing", "model not found"),
    ("owner/never-downloaded", "not found. Looked locally"),
])
def test_nonexistent_path(tmp_path, path, words):
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained(path, cache_dir=tmp_path / "empty-cache")
    print(err.value)
    assert words in str(err.value)


def test_a_file_instead_of_a_folder():
    with pytest.raises(CheckpointError, match="is a file; pass the folder"):
        MambaForCausalLM.from_pretrained(os.path.join(fixture("odd"), "model.safetensors"))


def test_loading_never_modifies_files():
    before = {case: folder_hashes(fixture(case)) for case in ("odd", "bf16", "sharded", "state_spaces", "untied")}
    for case in before:
        for dtype in ("float32", "float64"):
            model = MambaForCausalLM.from_pretrained(fixture(case), dtype=dtype)
            model(np.array([[1, 2, 3]]))
            state = model.state_dict()
            next(iter(state.values()))[...] = 0  # writing into the model's arrays must not reach the file
    after = {case: folder_hashes(fixture(case)) for case in before}
    assert after == before


def test_loaded_arrays_are_writable_copies():
    """np.frombuffer views are read-only; the model must own writable arrays (fine-tuning writes them)."""
    model = MambaForCausalLM.from_pretrained(fixture("odd"))
    for name, value in model.state_dict().items():
        assert value.flags.writeable, name


# ---------------------------------------------------------------- the Hub, offline from a prepared cache


def make_hub_cache(tmp_path, repo_id, case, commit="0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(fixture(case), snapshot)
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(commit)
    return cache, snapshot


def test_from_pretrained_hub_id_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, snapshot = make_hub_cache(tmp_path, "owner/tiny-mamba", "odd")
    model = MambaForCausalLM.from_pretrained("owner/tiny-mamba", cache_dir=cache)
    assert os.path.samefile(model.folder, snapshot)
    local = MambaForCausalLM.from_pretrained(fixture("odd"))
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(model(ids).logits, local(ids).logits)
    config = MambaConfig.from_pretrained("owner/tiny-mamba", cache_dir=cache)
    assert config.hidden_size == 24
    by_commit = MambaForCausalLM.from_pretrained("owner/tiny-mamba", cache_dir=cache,
                                                 revision="0123456789abcdef0123456789abcdef01234567")
    assert os.path.samefile(by_commit.folder, snapshot)


def test_hub_revision_not_in_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, _ = make_hub_cache(tmp_path, "owner/tiny-mamba", "odd")
    with pytest.raises(CheckpointError) as err:
        MambaForCausalLM.from_pretrained("owner/tiny-mamba", cache_dir=cache, revision="v9")
    print(err.value)
    assert "'owner/tiny-mamba' not found" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_expected_shapes_cover_every_file_tensor():
    """The file's names (lm_head dropped when tied) are exactly what expected_shapes lists."""
    config = MambaConfig.from_pretrained(fixture("odd"))
    names = set(read_safetensors(os.path.join(fixture("odd"), "model.safetensors"))) - {"lm_head.weight"}
    assert names == set(expected_shapes(config))
    assert set(load_state_dict(fixture("odd"), config)) == names
