"""Tokenizer wrapper, streaming decode across multi-byte characters, and generate_text."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from text_fixtures import text_checkpoint, text_model, text_tokenizer  # noqa: F401 - fixtures

import minimamba
from minimamba import Tokenizer, generate, generate_text
from minimamba.pipeline import load

MULTIBYTE = "é—🙂ñ日本"  # 2, 3, 4, 2 and 3-byte characters; none is a single token in the tiny vocab


def test_special_tokens_and_round_trip(text_tokenizer):
    assert text_tokenizer.eos_token_id == 0 and text_tokenizer.pad_token_id == 1  # as GPT-NeoX
    assert text_tokenizer.vocab_size == 384
    text = "ROMEO: Is the day so young? é — 🙂"
    ids = text_tokenizer.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned
    assert text_tokenizer.decode(ids) == text
    assert text_tokenizer.decode(ids + [0]) == text  # <|endoftext|> skipped by default
    assert text_tokenizer.decode(ids + [0], skip_special_tokens=False) == text + "<|endoftext|>"


def test_batch_is_left_padded(text_tokenizer):
    batch = text_tokenizer(["ROMEO:", "Good morrow, cousin."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short = text_tokenizer.encode("ROMEO:")
    assert ids.shape == mask.shape and ids.dtype == np.int64
    assert ids[0, -len(short):].tolist() == short and (ids[0, :-len(short)] == 1).all()
    assert mask[0].tolist() == [0] * (ids.shape[1] - len(short)) + [1] * len(short) and mask[1].all()


def pieces(tokenizer, ids, prompt_ids=()):
    stream = tokenizer.stream(prompt_ids)
    out = [stream.put(i) for i in ids]
    return out + [stream.flush()]


@settings(deadline=None, max_examples=80)
@given(st.text(alphabet=st.sampled_from(list(MULTIBYTE + "ab .\n")), min_size=1, max_size=30),
       st.text(alphabet=st.sampled_from(list(MULTIBYTE + "Rom")), max_size=6))
def test_stream_never_prints_a_broken_character(text_tokenizer, text, prompt):
    ids = text_tokenizer.encode(text)
    got = pieces(text_tokenizer, ids)
    assert all("\ufffd" not in piece for piece in got), got
    assert "".join(got) == text
    # after a prompt: the pieces add up to the text that follows the prompt's own decode
    prompt_ids = text_tokenizer.encode(prompt)
    whole = text_tokenizer.decode(prompt_ids + ids)
    got = pieces(text_tokenizer, ids, prompt_ids)
    assert "".join(got) == whole[len(text_tokenizer.decode(prompt_ids)):]
    assert all("\ufffd" not in piece for piece in got)


def test_stream_holds_back_until_the_character_is_whole(text_tokenizer):
    ids = text_tokenizer.encode("🙂")
    assert len(ids) > 1  # four bytes over several tokens
    got = pieces(text_tokenizer, ids)
    assert got[:-2] == [""] * (len(ids) - 1) and got[-2] == "🙂" and got[-1] == ""


def test_stream_flushes_invalid_bytes(text_tokenizer):
    """A lone UTF-8 lead byte at the end (a model may make one) is printed by flush() as U+FFFD,
    so the pieces still add up to the full decode."""
    lead = text_tokenizer.encode("é")[0]
    ids = text_tokenizer.encode("ab") + [lead]
    got = pieces(text_tokenizer, ids)
    assert "".join(got) == text_tokenizer.decode(ids) == "ab\ufffd" and got[-1] == "\ufffd"


def test_missing_tokenizer(tmp_path, text_checkpoint):
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(open(os.path.join(text_checkpoint, name), "rb").read())
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(folder)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(bad)


# ---------------------------------------------------------------- generate_text


def test_generate_text_equals_generate(text_checkpoint, text_model, text_tokenizer):
    prompt = "ROMEO: Is the day"
    text = generate_text(prompt, model=text_checkpoint, max_new_tokens=12, eos_token_id=[])
    ids = generate(text_model, [text_tokenizer.encode(prompt)], max_new_tokens=12, eos_token_id=[])
    assert text == text_tokenizer.decode(ids[0])
    assert text.startswith(prompt)
    assert generate_text(prompt, model=text_checkpoint, max_new_tokens=12, eos_token_id=[],
                         return_full_text=False) == text[len(prompt):]


def test_generate_text_batch_equals_one_by_one(text_checkpoint):
    prompts = ["ROMEO:", "Good morrow, cousin. é"]
    batch = generate_text(prompts, model=text_checkpoint, max_new_tokens=10)
    assert batch == [generate_text(p, model=text_checkpoint, max_new_tokens=10) for p in prompts]


def test_generate_text_cuts_at_eos(text_checkpoint, text_model, text_tokenizer, monkeypatch):
    """The text is what precedes the row's first eos token; by default eos is <|endoftext|> (id 0)."""
    prompt = "Good morrow"
    prompt_ids = text_tokenizer.encode(prompt)
    free = generate(text_model, [prompt_ids], max_new_tokens=30, do_sample=True, seed=3, eos_token_id=[])
    new = free[0, len(prompt_ids):].tolist()
    eos = new[5]
    cut = new[:new.index(eos)]
    text = generate_text(prompt, model=text_checkpoint, max_new_tokens=30, do_sample=True, seed=3, eos_token_id=eos)
    assert text == prompt + text_tokenizer.decode(prompt_ids + cut)[len(prompt):]

    seen = {}
    real = minimamba.generation.generate

    def spy(model, input_ids, **kw):
        seen.update(kw)
        return real(model, input_ids, **kw)

    monkeypatch.setattr(minimamba.generation, "generate", spy)
    generate_text(prompt, model=text_checkpoint, max_new_tokens=3)
    assert seen["eos_token_id"] == 0 and seen["pad_token_id"] == 1


def test_models_are_loaded_once(text_checkpoint):
    a = load(text_checkpoint)
    b = load(os.path.join(text_checkpoint, "."))
    assert a[0] is b[0] and a[1] is b[1]


def test_builtin_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(minimamba, "BUILTIN_MODEL_DIR", str(tmp_path / "builtin"))
    with pytest.raises(FileNotFoundError, match="built-in model is not installed"):
        generate_text("hello")


def test_generate_text_bad_prompt(text_checkpoint):
    with pytest.raises(ValueError, match="prompt"):
        generate_text(["a", 3], model=text_checkpoint)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_text("", model=text_checkpoint)


def test_tokenizer_from_an_unknown_repo_says_where_it_looked():
    from minimamba.weights import CheckpointError

    with pytest.raises(CheckpointError, match="in the Hugging Face cache.*online: skipped because HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("nobody/no-such-tokenizer")
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        Tokenizer.from_pretrained("./no/such/dir")
