"""The ten-second start: text in, text out.

    import minimamba
    print(minimamba.generate_text("ROMEO:", max_new_tokens=40))                  # the built-in model
    print(minimamba.generate_text("The capital of France is", model="state-spaces/mamba-130m-hf"))

Models and tokenizers are loaded once and kept, so repeated calls are fast.
"""

from __future__ import annotations

import functools
import os

import numpy as np


def builtin_model_dir() -> str:
    """The folder of the model shipped with minimamba; a clear error while it is missing."""
    from . import BUILTIN_MODEL_DIR

    if not os.path.isfile(os.path.join(BUILTIN_MODEL_DIR, "config.json")):
        raise FileNotFoundError(f"the built-in model is not installed ({BUILTIN_MODEL_DIR} has no config.json); "
                                "name a checkpoint folder or Hub repo instead, e.g. model='state-spaces/mamba-130m-hf'")
    return BUILTIN_MODEL_DIR


def _key(path):
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path


@functools.lru_cache(maxsize=16)
def _resolve(path):
    """The local folder of a checkpoint folder or Hub repo (the cache, else a download)."""
    from .weights import resolve_model_dir

    return resolve_model_dir(path)


@functools.lru_cache(maxsize=4)
def _load_model(path, dtype, backend, impl, adapter=None, merge_adapter=False):
    from .model import MambaForCausalLM

    model = MambaForCausalLM.from_pretrained(path, dtype=dtype, backend=backend, impl=impl)
    return model if adapter is None else model.load_adapter(adapter, merge=merge_adapter)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path):
    from .tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def check_model_folder(folder):
    """A clear error for a folder that holds no model at all (before a missing tokenizer is blamed)."""
    from .adapters import ADAPTER_CONFIG

    names = set(os.listdir(folder))
    if not names & {"config.json", ADAPTER_CONFIG, "model.safetensors", "model.safetensors.index.json"}:
        raise FileNotFoundError(f"no model here: {folder} has no config.json, weights or {ADAPTER_CONFIG}. "
                                "Name a checkpoint folder, a Hub repo id, or 'builtin'")


def load(model=None, tokenizer=None, dtype="float32", backend="numpy", impl=None, adapter=None,
         merge_adapter=False):
    """(MambaForCausalLM, Tokenizer) for a folder or Hub repo id (None or "builtin": the built-in model), cached.

    `model` may also be a loaded MambaForCausalLM (its tokenizer then comes from the
    folder it was loaded from) and `tokenizer` a Tokenizer or a folder / repo / file.
    `adapter` is a PEFT LoRA folder applied on top (unmerged unless `merge_adapter`);
    given alone, its base_model_name_or_path is the model. An adapter folder passed
    as `model` works too (as PEFT's AutoPeftModel).
    """
    from .adapters import base_model_of, is_adapter_folder
    from .model import MambaForCausalLM
    from .tokenizer import Tokenizer

    if not isinstance(model, MambaForCausalLM) and str(model).endswith(".gguf"):  # llama.cpp's file
        from .gguf import gguf_tokenizer
        tokenizer = gguf_tokenizer(model) if tokenizer is None else tokenizer
        model = MambaForCausalLM.from_pretrained(model, dtype=dtype, backend=backend, impl=impl)
    if not isinstance(model, MambaForCausalLM):
        if model is None and adapter is not None:
            model = adapter
        folder = _key(builtin_model_dir() if model in (None, "builtin") else _resolve(_key(model)))
        check_model_folder(folder)
        if is_adapter_folder(folder):  # the adapter names its base model
            adapter = folder if adapter is None else adapter
            folder = _key(_resolve(_key(base_model_of(folder))))
        adapter = None if adapter is None else _key(_resolve(_key(adapter)))
        if tokenizer is None:
            tokenizer = _load_tokenizer(folder)  # first: a missing tokenizer fails before the weights load
        model = _load_model(folder, dtype, backend, impl, adapter, merge_adapter)
    elif adapter is not None:
        raise ValueError("adapter= goes with a model name or folder; for a loaded model call model.load_adapter()")
    if tokenizer is None:
        if getattr(model, "folder", None) is None:
            raise ValueError("this model was not loaded from a folder; pass tokenizer= as well")
        tokenizer = model.folder
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = _load_tokenizer(_key(tokenizer))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings; they do not belong together")
    return model, tokenizer


def generate_text(prompt, model=None, max_new_tokens=50, tokenizer=None, return_full_text=True,
                  dtype="float32", backend="numpy", impl=None, **sampling):
    """Continue `prompt` (a str, or a list of str batched with left padding) and return the text.

    `sampling` takes `generate`'s options (do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, eos_token_id, seed, ...). Generation stops at the tokenizer's
    `<|endoftext|>` unless eos_token_id says otherwise. With `return_full_text` (the default,
    as transformers' pipeline) the prompt comes first.
    """
    from .generation import generate

    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a str or a non-empty list of str")
    model, tokenizer = load(model, tokenizer, dtype=dtype, backend=backend, impl=impl)
    if "eos_token_id" not in sampling and tokenizer.eos_token_id is not None:
        sampling["eos_token_id"] = tokenizer.eos_token_id
    sampling.setdefault("pad_token_id", tokenizer.pad_token_id)
    batch = tokenizer(prompts)
    tokens = generate(model, batch["input_ids"], max_new_tokens=max_new_tokens,
                      attention_mask=batch["attention_mask"], **sampling)  # (b, p + t)
    p = batch["input_ids"].shape[1]
    eos = sampling.get("eos_token_id")
    eos = [] if eos is None else list(np.atleast_1d(eos))
    texts = []
    for row, (prompt_text, mask) in enumerate(zip(prompts, batch["attention_mask"])):
        new = tokens[row, p:].tolist()
        stops = [i for i, t in enumerate(new) if t in eos]
        new = new[:stops[0]] if stops else new  # the row ends at its first eos
        prompt_ids = batch["input_ids"][row, mask.astype(bool)].tolist()
        before = tokenizer.decode(prompt_ids)
        new_text = tokenizer.decode(prompt_ids + new)[len(before):]  # decoded with its context
        texts.append(prompt_text + new_text if return_full_text else new_text)
    return texts[0] if single else texts
