"""The malformed inputs a new user met as raw Python errors, each now a clear minimamba error."""

import json
import os

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM, Tokenizer
from minimamba.config import ConfigError
from minimamba.errors import CheckpointError
from minimamba.training import lora

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": "24"}, "hidden_size must be a positive integer, got '24'"),
    ({"hidden_size": 24.0}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"state_size": -3}, "state_size must be a positive integer"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
    ({"vocab_size": 10**12}, "absurdly large"),
    ({"hidden_size": 2**20, "num_hidden_layers": 4096}, "parameters, over the limit"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a finite number"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be positive"),
    ({"use_bias": "yes"}, "use_bias must be true or false"),
    ({"eos_token_id": [0, "a"]}, "eos_token_id must be a token id"),
    ({"hidden_act": ["silu"]}, "hidden_act=['silu'] is not supported"),
    ({"time_step_rank": "big"}, "time_step_rank must be a positive integer"),
])
def test_config_fields_are_checked(tmp_path, change, words):
    with open(os.path.join(FIXTURES, "odd", "config.json")) as f:
        config = json.load(f)
    config.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        MambaConfig.from_json(path)
    print(err.value)
    assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("config, words", [
    ({"d_model": 24, "pad_vocab_size_multiple": 0}, "pad_vocab_size_multiple must be an integer"),  # was ZeroDivision
    ({"d_model": 24, "ssm_cfg": [1]}, "ssm_cfg must be an object"),
    ({"d_model": "24"}, "hidden_size must be a positive integer"),
    ({"d_model": 24, "ssm_cfg": {"layer": "Mamba2"}}, "only Mamba1"),
])
def test_state_spaces_config_fields_are_checked(config, words):
    with pytest.raises(ConfigError, match=words):
        MambaConfig.from_dict(config)


def test_a_folder_or_a_list_as_config(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, expected a config.json"):
        MambaConfig.from_json(tmp_path / "config.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        MambaConfig.from_json(tmp_path / "list.json")


def test_tokenizer_files_that_are_not_tokenizers(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, expected a tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "t.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    with pytest.raises(CheckpointError, match="t.json: not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "t.json")


@pytest.fixture
def adapter(tmp_path):
    config = MambaConfig.from_json(os.path.join(FIXTURES, "odd", "config.json"))
    params = {k: np.asarray(v) for k, v in MambaForCausalLM(config, seed=0).state_dict().items()}
    lora.save_adapter(tmp_path, lora.add_adapters(config, params, ("x_proj",), r=2, alpha=4, dropout=0.1))
    return tmp_path, config, params


@pytest.mark.parametrize("change, words", [
    ({"lora_dropout": 2.0}, "lora_dropout must lie in \\[0, 1\\), got 2.0"),  # used to zero every LoRA output
    ({"lora_dropout": 1}, "lora_dropout must lie in"),
    ({"lora_dropout": "0.1"}, "lora_dropout must be a finite number"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.0}, "r must be a positive integer"),
    ({"r": "2"}, "r must be a positive integer"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number"),
    ({"lora_alpha": 1e400}, "lora_alpha must be a finite number"),
    ({"target_modules": ["conv1d"]}, "target module 'conv1d' is not supported"),
    ({"target_modules": [3]}, "target_modules must be a list of module names"),
    ({"peft_type": "IA3"}, "only LORA adapters load"),
])
def test_adapter_config_fields_are_checked(adapter, change, words):
    folder, config, params = adapter
    path = folder / "adapter_config.json"
    peft = json.loads(path.read_text())
    peft.update(change)
    path.write_text(json.dumps(peft).replace("Infinity", "1e400"))
    with pytest.raises(CheckpointError) as err:
        lora.load_adapter(folder, config, params)
    print(err.value)
    assert str(path) in str(err.value)
    assert err.match(words)


def test_boolean_ids_and_negative_logits_to_keep(tiny_model):
    with pytest.raises(ValueError, match="input_ids must be integers, got dtype bool"):
        tiny_model(np.array([[True, False, True]]))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="logits_to_keep must be an integer >= 0"):
            tiny_model(np.array([[1, 2, 3]]), logits_to_keep=bad)
    assert tiny_model(np.array([[1, 2, 3]]), logits_to_keep=np.int64(2)).logits.shape[1] == 2
