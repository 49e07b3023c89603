"""Reading llama.cpp Mamba GGUF files (minimamba.gguf); the files are written here with gguf's GGUFWriter."""

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM
from minimamba.quant import QuantizedWeight, quantize

gguf = pytest.importorskip("gguf")

from minimamba.gguf import GGUFError, gguf_tokenizer, write_gguf  # noqa: E402

QCONFIG = dict(vocab_size=67, hidden_size=64, state_size=3, num_hidden_layers=2, conv_kernel=3,
               time_step_rank=5, expand=2)
IDS = np.array([[5, 9, 60, 1, 0, 33, 2]])


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def float_model():
    return MambaForCausalLM(MambaConfig(**QCONFIG), seed=7)


def test_f32_file_gives_exactly_the_safetensors_logits(float_model, tmp_path):
    float_model.save_pretrained(tmp_path / "st")
    write_gguf(float_model, tmp_path / "m.gguf")
    from_st = MambaForCausalLM.from_pretrained(tmp_path / "st")
    from_gguf = MambaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    assert from_gguf.config.hidden_size == 64 and from_gguf.config.time_step_rank == 5
    assert from_gguf.config.vocab_size == 67 and from_gguf.config.tie_word_embeddings
    assert np.array_equal(from_gguf(IDS).logits, from_st(IDS).logits)


def test_file_stores_a_as_llama_cpp_does(float_model, tmp_path):
    write_gguf(float_model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    a_log = float_model.backbone.layers[1].mixer.A_log
    assert np.array_equal(tensors["blk.1.ssm_a"], -np.exp(a_log))  # convert_hf_to_gguf: A = -exp(A_log)
    assert tensors["blk.0.ssm_conv1d.weight"].shape == (128, 3)  # squeezed (e, 1, k) -> (e, k)
    assert "output.weight" not in tensors  # tied head omitted
    loaded = MambaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    assert np.array_equal(loaded.backbone.layers[1].mixer.A, -np.exp(a_log))  # the file's A, exactly
    assert np.abs(loaded.backbone.layers[1].mixer.A_log - a_log).max() <= 4 * np.finfo(np.float32).eps * np.abs(a_log).max()


@pytest.mark.parametrize("scheme, kind", [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_quantized_round_trip_is_bit_exact_and_stays_packed(float_model, tmp_path, scheme, kind):
    q = quantize(float_model, scheme, 32)
    write_gguf(q, tmp_path / "q.gguf")
    kinds = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert kinds == {"F32", kind}
    back = MambaForCausalLM.from_pretrained(tmp_path / "q.gguf")
    assert sorted(back.quantization_config["modules"]) == sorted(q.quantization_config["modules"])
    for name, value in q.state_dict().items():
        other = back.state_dict()[name]
        if isinstance(value, QuantizedWeight):
            assert isinstance(other, QuantizedWeight) and other.scheme == scheme
            assert np.array_equal(other.qs, value.qs) and np.array_equal(other.scales, value.scales), name
    assert np.array_equal(back(IDS).logits, q(IDS).logits)
    # ... and within the format's rounding of the float model
    ref = float_model(IDS).logits
    assert np.abs(back(IDS).logits - ref).max() <= (0.05 if scheme == "int8" else 0.5) * np.abs(ref).max()


def test_untied_head_and_biases(tmp_path):
    config = MambaConfig(**QCONFIG, tie_word_embeddings=False, use_bias=True)
    model = MambaForCausalLM(config, seed=2)
    write_gguf(model, tmp_path / "u.gguf")
    back = MambaForCausalLM.from_pretrained(tmp_path / "u.gguf")
    assert not back.config.tie_word_embeddings and back.config.use_bias
    assert np.array_equal(back(IDS).logits, model(IDS).logits)


def test_another_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(writer)
    with pytest.raises(GGUFError, match="architecture 'llama' is not 'mamba'"):
        MambaForCausalLM.from_pretrained(tmp_path / "llama.gguf")


def test_unsupported_tensor_type_and_garbage_are_refused(float_model, tmp_path):
    write_gguf(float_model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    writer = gguf.GGUFWriter(tmp_path / "q41.gguf", "mamba")
    for key, field in reader.fields.items():
        if key.startswith("mamba."):
            value = field.contents()
            kind = field.types[0]
            writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ssm_in.weight":
            data = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(t.name, data)
    _finish(writer)
    with pytest.raises(GGUFError, match="'blk.0.ssm_in.weight' is stored as Q4_1"):
        MambaForCausalLM.from_pretrained(tmp_path / "q41.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        MambaForCausalLM.from_pretrained(tmp_path / "junk.gguf")


def test_tokenizer_from_the_file_matches_the_json(tmp_path):
    from minimamba.pipeline import builtin_model_dir
    from minimamba.tokenizer import Tokenizer

    folder = builtin_model_dir()
    model = MambaForCausalLM.from_pretrained(folder)
    write_gguf(model, tmp_path / "b.gguf", tokenizer_json=f"{folder}/tokenizer.json")
    ours, reference = gguf_tokenizer(tmp_path / "b.gguf"), Tokenizer.from_pretrained(folder)
    text = "ROMEO:\nBut soft! what light through yonder window breaks?<|endoftext|> héllo  ☃"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(reference.encode(text)) == reference.decode(reference.encode(text))
    assert ours.eos_token_id == reference.eos_token_id == 0


def test_cli_info_and_generate_read_gguf(tmp_path, capsys):
    from minimamba.cli import main
    from minimamba.pipeline import builtin_model_dir

    folder = builtin_model_dir()
    q = quantize(MambaForCausalLM.from_pretrained(folder), "int4")
    write_gguf(q, tmp_path / "b.gguf", tokenizer_json=f"{folder}/tokenizer.json")
    assert main(["info", str(tmp_path / "b.gguf")]) == 0
    out = capsys.readouterr().out
    assert "Q4_0 13 tensors" in out and "vocab_size   2048" in out
    assert main(["generate", "ROMEO:", "--model", str(tmp_path / "b.gguf"), "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
