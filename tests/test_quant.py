"""Weight-only int8 / int4 quantization (minimamba.quant) and its Numba kernels (minimamba.kernels.quant)."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba import MambaConfig, MambaForCausalLM
from minimamba.quant import (QuantizationError, QuantizedWeight, dequantize_blocks, quantize, quantize_array,
                             weight_bytes)

F16_EPS = 2.0 ** -11  # relative rounding of a float16 scale ...
F16_SUB = 2.0 ** -25  # ... and absolute below 2**-14, where float16 is subnormal (spacing 2**-24)
# Every matrix a whole number of 32- and 64-blocks, except dt_proj (rows of time_step_rank = 5 weights).
QCONFIG = dict(vocab_size=67, hidden_size=64, state_size=3, num_hidden_layers=2, conv_kernel=3,
               time_step_rank=5, expand=2)


@pytest.fixture
def qmodel_float():
    return MambaForCausalLM(MambaConfig(**QCONFIG), seed=3)


# ---------------------------------------------------------------- formats


@settings(max_examples=40, deadline=None)
@given(scheme=st.sampled_from(["int8", "int4"]), block_size=st.sampled_from([32, 128]),
       rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2 ** 31),
       log_scale=st.floats(-6, 4))
def test_round_trip_error_is_bounded_per_block(scheme, block_size, rows, blocks, seed, log_scale):
    w = (np.random.default_rng(seed).standard_normal((rows, blocks * block_size)) * 10.0 ** log_scale
         ).astype(np.float32)
    q = quantize_array(w, scheme, block_size)
    err = np.abs(q.dequantize() - w).reshape(rows, blocks, block_size).max(axis=-1)  # (rows, blocks)
    amax = np.abs(w).reshape(rows, blocks, block_size).max(axis=-1)
    d = np.abs(q.scales.astype(np.float32))
    if scheme == "int8":
        # |w - q d| <= d/2 with the float32 d = amax/127, plus 127 |d - d16| from storing d in float16
        bound = amax / 127 / 2 + 127 * np.maximum(amax / 127 * F16_EPS, F16_SUB)
    else:
        # steps of |d| = amax/8: at most one step off (the clipped top of the opposite sign), plus 8 |d - d16|
        bound = amax / 8 + 8 * np.maximum(amax / 8 * F16_EPS, F16_SUB)
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), f"max error / bound {np.max(err / bound):.4f}"
    assert q.scales.shape == (rows, blocks) and np.all(d <= amax * (1 + F16_EPS) + F16_SUB)


def test_layouts_are_llama_cpp_q8_0_and_q4_0_byte_for_byte(rng):
    quants = pytest.importorskip("gguf.quants")
    w = rng.standard_normal((7, 96)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    for scheme, reference in (("int8", quants.Q8_0), ("int4", quants.Q4_0)):
        q = quantize_array(w, scheme, 32)
        ours = np.concatenate([q.scales.view(np.uint8).reshape(7, 3, 2), q.qs.view(np.uint8).reshape(7, 3, -1)], -1)
        theirs = reference.quantize(w).reshape(7, 3, -1)
        assert np.array_equal(ours, theirs), f"{scheme}: {np.sum(ours != theirs)} bytes differ from gguf's"
        deq = reference.dequantize(reference.quantize(w))
        assert np.array_equal(q.dequantize(), deq), f"{scheme}: dequantized values differ from gguf's"


def test_int4_nibble_order_low_half_then_high_half():
    w = np.arange(1, 33, dtype=np.float32)[None] * np.where(np.arange(32) % 2, 1, -1)[None]  # (1, 32)
    q = quantize_array(w, "int4", 32)
    nibbles = np.concatenate([q.qs[0] & 15, q.qs[0] >> 4])  # bytes 0..15: low = weights 0..15, high = 16..31
    expected = np.clip(np.trunc(w[0] / q.scales[0, 0].astype(np.float32) + 8.5), 0, 15)
    assert q.qs.shape == (1, 16)
    assert np.array_equal(nibbles, expected.astype(np.uint8)), (nibbles, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="int3", block_size=32), "unknown quantization scheme 'int3'"),
    (dict(scheme="int8", block_size=48), "block_size 48 is not supported"),
    (dict(scheme="int4", block_size=64, shape=(3, 96)), "96 weights is not a whole number of blocks of 64"),
    (dict(scheme="int8", block_size=32, shape=(96,)), "only matrices"),
])
def test_bad_requests_name_the_problem(kwargs, message):
    w = np.ones(kwargs.pop("shape", (3, 64)), dtype=np.float32)
    with pytest.raises(QuantizationError, match=message):
        quantize_array(w, **kwargs)


def test_quantized_weight_refuses_inconsistent_parts():
    with pytest.raises(QuantizationError, match="scales must be float16 of shape"):
        QuantizedWeight("int8", np.zeros((2, 64), np.int8), np.zeros((2, 3), np.float16), 32)
    with pytest.raises(QuantizationError, match="int4 weights must be a 2-D uint8"):
        QuantizedWeight("int4", np.zeros((2, 32), np.int8), np.zeros((2, 2), np.float16), 32)


# ---------------------------------------------------------------- kernels against the NumPy twin


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("n, k, block_size", [(37, 96, 32), (5, 128, 128), (131, 256, 64), (1, 32, 32)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 41])  # matvec up to MATVEC_MAX_ROWS = 8, tiled matmul above
def test_numba_kernels_match_dequantize_then_matmul(scheme, n, k, block_size, m, rng):
    kq = pytest.importorskip("minimamba.kernels.quant")
    q = quantize_array(rng.standard_normal((n, k)).astype(np.float32), scheme, block_size)
    x = rng.standard_normal((m, k)).astype(np.float32)[:, None, :]  # (m, 1, K): leading dims kept
    w = q.dequantize()
    reference = x.astype(np.float64) @ w.T.astype(np.float64)  # exact products of the dequantized weights
    got = kq.linear(q, x)
    assert got.shape == (m, 1, n) and got.dtype == np.float32
    # float32 summation of k products: |error| <= k eps sum |x w| (Higham's gamma_k), with the bound's slack kept 2x
    bound = 2 * k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w).T)
    err = np.abs(got - reference)
    assert (err <= bound + 1e-30).all(), f"max error {err.max():.2e}, worst error/bound {np.max(err / bound):.2f}"
    q.impl = "numpy"
    assert np.abs(q.linear(x) - reference).max() <= bound.max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tiled_matmul_over_several_tiles(scheme, rng, monkeypatch):
    kq = pytest.importorskip("minimamba.kernels.quant")
    n, k = 70, 64
    monkeypatch.setattr(kq, "TILE_BYTES", 16 * 4 * k)  # 16 rows per tile: 4 full tiles and a partial one
    q = quantize_array(rng.standard_normal((n, k)).astype(np.float32), scheme, 32)
    x = rng.standard_normal((20, k)).astype(np.float32)
    w = q.dequantize()
    bound = 2 * k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w).T)
    err = np.abs(kq.linear(q, x) - x.astype(np.float64) @ w.T.astype(np.float64))
    assert (err <= bound).all(), f"worst error/bound {np.max(err / bound):.2f}"


def test_linear_and_embedding_rows_of_the_numpy_path(rng):
    q = quantize_array(rng.standard_normal((11, 64)).astype(np.float32), "int4", 32)
    q.impl = "numpy"
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    assert np.array_equal(q.linear(x), x @ q.dequantize().T)
    ids = np.array([[3, 0], [10, 3]])
    assert np.array_equal(q[ids], q.dequantize()[ids])
    with pytest.raises(ValueError, match="last dimension must be 64"):
        q.linear(x[..., :63])


# ---------------------------------------------------------------- models


def test_quantized_model_is_the_float_model_with_dequantized_weights(qmodel_float):
    ids = np.array([[5, 9, 60, 1, 0, 33]])
    for scheme in ("int8", "int4"):
        q = quantize(MambaForCausalLM(qmodel_float.config, seed=3, impl="numpy"), scheme, 32)
        assert sorted({name.split(".")[-2] for name in q.quantization_config["modules"]}) == [
            "embeddings", "in_proj", "out_proj", "x_proj"]
        assert len(q.quantization_config["kept_float"]) == 2  # dt_proj: rows of 5 weights
        twin = MambaForCausalLM(qmodel_float.config, impl="numpy", init=False)
        twin.load_state_dict({n: v.dequantize() if isinstance(v, QuantizedWeight) else v
                              for n, v in q.state_dict().items()})
        assert np.array_equal(q(ids).logits, twin(ids).logits), scheme
        assert qmodel_float.state_dict()["backbone.embeddings.weight"].dtype == np.float32  # the source untouched


def test_numba_model_matches_numpy_model_and_decode_matches_prefill(qmodel_float):
    pytest.importorskip("numba")
    ids = np.array([[5, 9, 60, 1, 0, 33, 2, 2, 7, 40, 11, 12]])  # 12 tokens: the tiled matmul path
    for scheme in ("int8", "int4"):
        fast = quantize(MambaForCausalLM(qmodel_float.config, seed=3, impl="numba"), scheme)
        slow = quantize(MambaForCausalLM(qmodel_float.config, seed=3, impl="numpy"), scheme)
        full = fast(ids).logits  # (1, 12, V)
        scale = np.abs(full).max()
        assert np.abs(full - slow(ids).logits).max() <= 1e-5 * scale
        out = fast(ids[:, :4], use_cache=True)  # prefill 4 (matvec: 4 rows), then 8 decode steps
        steps = [out.logits]
        for t in range(4, 12):
            out = fast(ids[:, t:t + 1], cache_params=out.cache_params, use_cache=True)
            steps.append(out.logits)
        assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5 * scale


@pytest.mark.parametrize("impl, kernel_calls", [(None, 7), ("numba", 7), ("numpy", 0), ("reference", 0)])
def test_each_impl_multiplies_where_it_says(qmodel_float, impl, kernel_calls, monkeypatch):
    """impl auto and numba multiply from the packed bytes (the NumPy path dequantizes a whole matrix per
    call: 35x slower on the 130m shape's in_proj); numpy and reference keep the readable path."""
    kq = pytest.importorskip("minimamba.kernels.quant")
    calls = []
    monkeypatch.setattr(kq, "linear", lambda weight, x, real=kq.linear: calls.append(weight.shape) or real(weight, x))
    q = quantize(MambaForCausalLM(qmodel_float.config, seed=3, impl=impl), "int8")
    q(np.array([[5, 9, 60]]))
    assert len(calls) == kernel_calls  # 2 layers x (in_proj, x_proj, out_proj) + the tied head


def test_explicit_module_that_does_not_divide_is_an_error(qmodel_float):
    with pytest.raises(QuantizationError, match="dt_proj.weight: a row of 5 weights"):
        quantize(qmodel_float, "int8", 32, modules=["in_proj", "dt_proj"])
    with pytest.raises(QuantizationError, match="unknown module 'conv1d'"):
        quantize(qmodel_float, "int8", modules=["conv1d"])
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(quantize(qmodel_float, "int8"), "int4")


def test_weight_bytes_count_packed_weights_and_scales(qmodel_float):
    q8, q4 = quantize(qmodel_float, "int8"), quantize(qmodel_float, "int4")
    packed = sum(qmodel_float.state_dict()[n].size for n in q8.quantization_config["modules"])
    floats = weight_bytes(qmodel_float) - 4 * packed
    assert weight_bytes(q8) == floats + packed * (1 + 2 / 32)
    assert weight_bytes(q4) == floats + packed * (0.5 + 2 / 32)


def test_to_and_arrays_refuse_clearly(qmodel_float):
    q = quantize(qmodel_float, "int8")
    with pytest.raises(TypeError, match="not an array: call .dequantize"):
        q.to(dtype="float64")
    with pytest.raises(TypeError, match="not an array"):
        np.asarray(q.backbone.embeddings_weight)


def test_save_and_load_are_bit_exact(qmodel_float, tmp_path):
    ids = np.array([[5, 9, 60, 1]])
    for scheme, block_size in (("int8", 64), ("int4", 32)):
        q = quantize(qmodel_float, scheme, block_size)
        q.save_pretrained(tmp_path / scheme)
        config = json.loads((tmp_path / scheme / "config.json").read_text())
        assert config["quantization_config"]["scheme"] == scheme
        assert config["quantization_config"]["block_size"] == block_size
        back = MambaForCausalLM.from_pretrained(tmp_path / scheme)
        for name, value in q.state_dict().items():
            other = back.state_dict()[name]
            if isinstance(value, QuantizedWeight):
                assert np.array_equal(value.qs, other.qs) and np.array_equal(value.scales, other.scales), name
            else:
                assert np.array_equal(value, other), name
        assert np.array_equal(back(ids).logits, q(ids).logits)


def test_from_pretrained_quantization_keyword(tiny_checkpoint, tmp_path, qmodel_float):
    qmodel_float.save_pretrained(tmp_path / "f")
    loaded = MambaForCausalLM.from_pretrained(tmp_path / "f", quantization="int4")
    direct = quantize(MambaForCausalLM.from_pretrained(tmp_path / "f"), "int4")
    ids = np.array([[1, 2, 3]])
    assert np.array_equal(loaded(ids).logits, direct(ids).logits)
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int2'"):
        MambaForCausalLM.from_pretrained(tmp_path / "f", quantization="int2")


def test_quantized_file_with_a_missing_scale_is_refused(qmodel_float, tmp_path):
    from safetensors.numpy import load_file, save_file

    quantize(qmodel_float, "int8").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["backbone.layers.1.mixer.out_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QuantizationError, match="missing scale tensor 'backbone.layers.1.mixer.out_proj.weight_scale'"):
        MambaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["backbone.layers.1.mixer.out_proj.weight_scale", "backbone.layers.0.mixer.D"])
def test_quantized_file_with_non_finite_values_is_refused(qmodel_float, tmp_path, name):
    """As a float checkpoint: a NaN in a scale or a float tensor is refused, naming it, unless allowed."""
    from safetensors.numpy import load_file, save_file

    quantize(qmodel_float, "int8").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[3] = np.nan
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{re.escape(name)}' has 1 non-finite value"):
        MambaForCausalLM.from_pretrained(tmp_path)
    assert MambaForCausalLM.from_pretrained(tmp_path, allow_non_finite=True).quantization_config


def test_quantized_file_with_a_wrong_scheme_is_refused(qmodel_float, tmp_path):
    quantize(qmodel_float, "int8").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["scheme"] = "int4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"int4 in blocks of 32 of a \(67, 64\) matrix needs \(67, 32\)"):
        MambaForCausalLM.from_pretrained(tmp_path)
    config["quantization_config"]["scheme"] = "nf4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'nf4'"):
        MambaForCausalLM.from_pretrained(tmp_path)


def test_dequantize_blocks_is_the_documented_formula():
    qs = np.array([[0x1F, 0x80] + [0x88] * 14], dtype=np.uint8)  # (1, 16): one int4 block of 32
    scales = np.array([[0.5]], dtype=np.float16)
    w = dequantize_blocks(qs, scales, "int4", 32)[0]
    assert w[0] == (0xF - 8) * 0.5 and w[16] == (0x1 - 8) * 0.5  # byte 0: low nibble -> weight 0, high -> 16
    assert w[1] == (0x0 - 8) * 0.5 and w[17] == (0x8 - 8) * 0.5


# ---------------------------------------------------------------- minimamba dump --quantization


def test_dump_quantization_shows_what_it_does_to_each_activation(qmodel_float, tmp_path, capsys):
    from minimamba.cli import main
    from minimamba.compare import load_record

    folder = tmp_path / "float"
    qmodel_float.save_pretrained(folder)
    ids = [5, 9, 60, 1, 0, 33]
    paths = {q: str(tmp_path / f"{q}.safetensors") for q in ("float64", "int8", "int4")}
    for q, path in paths.items():
        extra = [] if q == "float64" else ["--quantization", q]
        assert main(["dump", "--model", str(folder), "--ids", ",".join(map(str, ids)), "--dtype", "float64",
                     "-o", path] + extra) == 0
    ref = load_record(paths["float64"])[0]
    table = qmodel_float.state_dict()["backbone.embeddings.weight"]
    errors = {}
    for q in ("int8", "int4"):
        record, meta = load_record(paths[q])
        assert meta["model"].endswith(f":{q}-b32") and sorted(record) == sorted(ref)
        # the recorded embeddings are the dequantized rows, exactly: the dump ran the quantized weights
        rows = quantize_array(table, q, 32).dequantize()[ids].astype(np.float64)
        assert np.array_equal(record["backbone.embeddings"][0], rows), q
        errors[q] = np.abs(record["lm_head"] - ref["lm_head"]).max() / np.abs(ref["lm_head"]).max()
        capsys.readouterr()
        assert main(["compare", paths["float64"], paths[q]]) == 1  # beyond float32 rounding, from the start
        assert "first divergence: backbone.embeddings" in capsys.readouterr().out
    # int4 steps are 16x coarser than int8's (d = max|w| / 8 against / 127): the logits say so
    assert 0 < errors["int8"] < errors["int4"] / 4, errors
    assert main(["dump", "--model", str(folder), "--ids", "1,2", "--quantization", "int8", "--engine", "transformers",
                 "-o", paths["int8"]]) == 2
    assert "use it with --engine minimamba" in capsys.readouterr().err
