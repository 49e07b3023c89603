"""The built-in model shipped in minimamba/builtin/: present, small, loadable, and trained.

It was trained once by `minimamba train` (the command is in its README.md model
card) and committed; these tests check the files, not the training.
"""

import json
import os

import numpy as np
import pytest

import minimamba
from minimamba import MambaForCausalLM

BUILTIN = os.path.join(os.path.dirname(minimamba.__file__), "builtin")
TEXT = os.path.join(os.path.dirname(__file__), "data", "shakespeare_tiny.txt")


def test_builtin_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert os.path.isfile(os.path.join(BUILTIN, name)), name
    total = sum(os.path.getsize(os.path.join(BUILTIN, f)) for f in os.listdir(BUILTIN))
    print(f"builtin model folder: {total / 1e6:.2f} MB")
    assert total < 15e6


def test_builtin_model_has_learned_shakespeare():
    """Next-token loss on 12 KB of Romeo and Juliet far below the uniform guess ln(V)."""
    from minimamba.training.data import load_tokenizer

    model = MambaForCausalLM.from_pretrained(BUILTIN)
    tokenizer = load_tokenizer(BUILTIN)
    with open(TEXT, encoding="utf-8") as f:
        ids = np.array(tokenizer.encode(f.read()).ids[:1024])[None]
    loss = float(model(ids, labels=ids).loss)
    uniform = np.log(model.config.vocab_size)
    print(f"loss {loss:.3f} nats/token (perplexity {np.exp(loss):.1f}); uniform guess {uniform:.3f}")
    assert loss < 0.6 * uniform


def test_builtin_card_states_the_numbers():
    card = open(os.path.join(BUILTIN, "README.md"), encoding="utf-8").read()
    for needle in ("minimamba train", "validation loss", "perplexity", "tokens/s", "shakespeare"):
        assert needle in card.lower() or needle in card, needle
    config = json.load(open(os.path.join(BUILTIN, "config.json")))
    assert config["model_type"] == "mamba"


@pytest.mark.crosscheck
def test_builtin_greedy_output_is_the_same_in_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from minimamba.training.sample import sample_ids

    tok = transformers.AutoTokenizer.from_pretrained(BUILTIN)
    hf = transformers.MambaForCausalLM.from_pretrained(BUILTIN).eval()
    for prompt in ("ROMEO.\n", "KING HENRY.\nNow", "To be, or not to be"):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1]:].tolist()
        ours = sample_ids(MambaForCausalLM.from_pretrained(BUILTIN), ids[0].tolist(), 60, temperature=0)
        print(repr(tok.decode(ours)))
        assert ours == ref, f"greedy continuations differ for {prompt!r}:\n{tok.decode(ours)!r}\n{tok.decode(ref)!r}"
