"""MambaConfig: transformers' fields and defaults, JSON round trip, the state-spaces layout, auto rank."""

import json
import math
import os

import pytest

from minimamba import MambaConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# transformers 5.24 MambaConfig defaults, written out by hand from its configuration_mamba.py
TRANSFORMERS_DEFAULTS = dict(
    vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
    pad_token_id=0, bos_token_id=0, eos_token_id=0, expand=2, conv_kernel=4, use_bias=False,
    use_conv_bias=True, hidden_act="silu", initializer_range=0.1, residual_in_fp32=True,
    time_step_scale=1.0, time_step_min=0.001, time_step_max=0.1, time_step_init_scheme="random",
    time_step_floor=1e-4, rescale_prenorm_residual=False, use_cache=True, use_mambapy=False,
)


def test_defaults_are_transformers_defaults():
    config = MambaConfig()
    for name, value in TRANSFORMERS_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.time_step_rank == 48 and config.intermediate_size == 1536


@pytest.mark.parametrize("hidden, rank", [(768, 48), (24, 2), (16, 1), (17, 2), (2560, 160)])
def test_auto_rank_is_ceil_of_d_over_16(hidden, rank):
    assert MambaConfig(hidden_size=hidden).time_step_rank == rank == math.ceil(hidden / 16)
    assert MambaConfig(hidden_size=hidden, time_step_rank=7).time_step_rank == 7


def test_json_round_trip(tmp_path):
    config = MambaConfig(vocab_size=61, hidden_size=24, state_size=3, num_hidden_layers=3, conv_kernel=2,
                         time_step_rank=5, use_bias=True, use_conv_bias=False, tie_word_embeddings=False,
                         extra={"transformers_version": "5.24.0", "dtype": "bfloat16"})
    path = tmp_path / "config.json"
    config.to_json(path)
    again = MambaConfig.from_json(path)
    # every field survives; unknown keys are kept, and model_type / architectures are added for transformers
    assert again.to_dict() == config.to_dict()
    assert again.extra == {"transformers_version": "5.24.0", "dtype": "bfloat16", "model_type": "mamba",
                           "architectures": ["MambaForCausalLM"]}
    with open(path) as f:
        raw = json.load(f)
    assert raw["intermediate_size"] == 48 and raw["model_type"] == "mamba"
    again.to_json(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()  # a fixed point after one trip


def test_reads_transformers_config_json():
    """The fixture configs were written by transformers' save_pretrained."""
    with open(os.path.join(FIXTURES, "odd", "config.json")) as f:
        raw = json.load(f)
    config = MambaConfig.from_pretrained(os.path.join(FIXTURES, "odd"))
    for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "conv_kernel",
                 "time_step_rank", "use_bias", "use_conv_bias", "layer_norm_epsilon", "expand"):
        assert getattr(config, name) == raw[name], name
    assert config.intermediate_size == raw["intermediate_size"]


def test_state_spaces_config():
    raw = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    config = MambaConfig.from_dict(raw)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 24, 50280)
    assert (config.state_size, config.conv_kernel, config.expand, config.time_step_rank) == (16, 4, 2, 48)
    assert config.tie_word_embeddings and config.use_conv_bias and not config.use_bias
    custom = MambaConfig.from_dict({"d_model": 24, "n_layer": 2, "vocab_size": 61,
                                    "ssm_cfg": {"d_state": 3, "d_conv": 2, "expand": 3, "dt_rank": 5,
                                                "bias": True, "conv_bias": False}})
    assert (custom.state_size, custom.conv_kernel, custom.expand, custom.time_step_rank) == (3, 2, 3, 5)
    assert custom.use_bias and not custom.use_conv_bias and custom.vocab_size == 61
    with pytest.raises(ValueError, match="only Mamba1 checkpoints"):
        MambaConfig.from_dict({"d_model": 24, "ssm_cfg": {"layer": "Mamba2"}})


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("state_size", -1), ("num_hidden_layers", 2.5),
                                          ("conv_kernel", True), ("vocab_size", "many"), ("time_step_rank", 0)])
def test_bad_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"MambaConfig.{field} must be a positive integer"):
        MambaConfig(**{field: value})


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        MambaConfig.from_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MambaConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        MambaConfig.from_json(tmp_path / "list.json")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        MambaConfig(hidden_act="gelu")
