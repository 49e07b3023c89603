"""A tiny text model for the generation tests: a byte-level BPE tokenizer trained here on
`tests/data/shakespeare_tiny.txt` and a random-weight checkpoint whose vocab_size matches it.

Import the fixtures into a test module: `from text_fixtures import text_tokenizer, text_checkpoint`.
"""

import os

import numpy as np
import pytest

from minimamba import MambaConfig, MambaForCausalLM

DATA = os.path.join(os.path.dirname(__file__), "data", "shakespeare_tiny.txt")
VOCAB_SIZE = 384  # 256 bytes + 2 special tokens + 126 merges


def train_tokenizer(vocab_size=VOCAB_SIZE):
    """Byte-level BPE like GPT-NeoX's: <|endoftext|> is id 0, <|padding|> id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([DATA], trainer)
    return tokenizer


def text_config(vocab_size):
    return MambaConfig(vocab_size=vocab_size, hidden_size=24, state_size=3, num_hidden_layers=2, conv_kernel=3,
                       time_step_rank=5, expand=2, tie_word_embeddings=False)


def text_model_weights(config, seed):
    """transformers' initialisation plus noise on every tensor. With the initialisation alone a tiny
    tied model mostly repeats its last token (logits ~ embedding self-similarity), which would make
    greedy tests trivial; an untied head and noisy weights give varied continuations."""
    rng = np.random.default_rng(seed + 1)
    model = MambaForCausalLM(config, seed=seed)
    state = {}
    for name, value in model.state_dict().items():
        value = np.asarray(value, dtype=np.float64)
        if name.endswith("A_log"):
            value = value + 0.3 * rng.standard_normal(value.shape)
        elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
            value = 1.0 + 0.3 * rng.standard_normal(value.shape)
        else:
            value = value + 0.3 * rng.standard_normal(value.shape)
        state[name] = value.astype(np.float32)
    return model.load_state_dict(state)


def make_text_checkpoint(folder, seed=0):
    """A folder with config.json, model.safetensors and tokenizer.json (vocab sizes equal)."""
    tokenizer = train_tokenizer()
    model = text_model_weights(text_config(tokenizer.get_vocab_size()), seed)
    model.save_pretrained(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    return str(make_text_checkpoint(tmp_path_factory.mktemp("text") / "tiny-text"))


@pytest.fixture(scope="session")
def text_tokenizer(text_checkpoint):
    from minimamba import Tokenizer

    return Tokenizer.from_pretrained(text_checkpoint)


@pytest.fixture(scope="session")
def text_model(text_checkpoint):
    return MambaForCausalLM.from_pretrained(text_checkpoint)
