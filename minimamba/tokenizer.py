"""Tokenizer: a thin wrapper over the `tokenizers` library's `tokenizer.json`.

The state-spaces checkpoints use the GPT-NeoX tokenizer (byte-level BPE,
`<|endoftext|>` is id 0, `<|padding|>` id 1). Byte-level means one character
can span several tokens ("é" is two bytes, an emoji four), so a token on its own
may decode to a broken character; `StreamDecoder` prints only text that is whole.
"""

from __future__ import annotations

import os

import numpy as np

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class Tokenizer:
    """Encode text to token ids and back.

        tok = Tokenizer.from_pretrained("state-spaces/mamba-130m-hf")
        ids = tok.encode("Hello")      # [12092]
        tok.decode(ids)                # 'Hello'
    """

    def __init__(self, tokenizer, name_or_path=None):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.name_or_path = name_or_path
        self.eos_token_id = tokenizer.token_to_id(EOS_TOKEN)  # None when the vocabulary has no such token
        pad = tokenizer.token_to_id(PAD_TOKEN)
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    @classmethod
    def from_file(cls, path):
        return cls(load_tokenizer_file(path), name_or_path=os.fspath(path))

    @classmethod
    def from_pretrained(cls, path_or_repo_id, revision=None, cache_dir=None):
        """`tokenizer.json` from a model folder, a path to the file itself, or a Hub repo id.

        From the Hub only tokenizer.json is fetched (never the weights), from the
        Hugging Face cache first, then online unless HF_HUB_OFFLINE is set.
        """
        path = os.fspath(path_or_repo_id)
        if path == "builtin":  # the model shipped with minimamba
            from .pipeline import builtin_model_dir

            path = builtin_model_dir()
        if os.path.isfile(path):
            return cls.from_file(path)
        if os.path.isdir(path):
            file = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path} has no tokenizer.json. The state-spaces checkpoints use the GPT-NeoX tokenizer: "
                    "copy tokenizer.json from EleutherAI/gpt-neox-20b (or a state-spaces/mamba-*-hf repo) into "
                    "the folder, or name a tokenizer separately (tokenizer=..., or --tokenizer on the command line)")
        else:
            from .weights import CheckpointError

            try:
                file = hub_file(path, "tokenizer.json", revision=revision, cache_dir=cache_dir)
            except CheckpointError as err:
                raise CheckpointError(f"{err}. (The state-spaces checkpoints use the GPT-NeoX tokenizer, "
                                      "EleutherAI/gpt-neox-20b.)") from None
        tokenizer = cls.from_file(file)
        tokenizer.name_or_path = path
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens=True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return rust_call(lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids,
                         f"{self.name_or_path}: encoding failed")

    def decode(self, ids, skip_special_tokens=True) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return rust_call(lambda: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens),
                         f"{self.name_or_path}: decoding failed")

    def batch_decode(self, rows, skip_special_tokens=True) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def __call__(self, texts, add_special_tokens=True, return_tensors="np"):
        """A str or a list of str -> {"input_ids", "attention_mask"}, (b, p) int64, padded on the left.

        NumPy arrays always (return_tensors "np", as transformers); the dict's `.to(device)`
        is there for code written as `tokenizer(...).to(model.device)`.
        """
        from .generation import left_pad

        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: minimamba works on NumPy arrays; use 'np'")

        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"text {empty[0]} encodes to no tokens; give a non-empty prompt")
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids, attention_mask = left_pad(rows, pad)
        return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)

    def stream(self, prompt_ids=(), skip_special_tokens=True) -> StreamDecoder:
        """A `StreamDecoder` for the text that follows `prompt_ids`."""
        return StreamDecoder(self, prompt_ids, skip_special_tokens)

    def __repr__(self):
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


class BatchEncoding(dict):
    """{"input_ids", "attention_mask"} with transformers' `.to(device)`: the arrays stay NumPy, the model moves them."""

    def to(self, device):
        return self


MAX_TOKENIZER_BYTES = 500_000_000  # the largest tokenizer.json files on the Hub are ~30 MB


def rust_call(call, what):
    """Run a call into the `tokenizers` library; any failure becomes a CheckpointError saying `what`.

    NOTE: a Rust panic inside tokenizers (e.g. from a pathological regex in a
    hostile tokenizer.json) reaches Python as pyo3's PanicException, a
    BaseException, which `except Exception` lets through; catch it here.
    """
    from .errors import CheckpointError, shown

    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as err:  # noqa: BLE001 - see the NOTE
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{what} ({type(err).__name__}: {shown(first, 100)[1:-1]})") from None


def load_tokenizer_file(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json; every fault a CheckpointError naming the file."""
    from tokenizers import Tokenizer as _Tokenizer

    from .errors import CheckpointError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, expected a tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_TOKENIZER_BYTES:,} bytes; not a tokenizer.json")
    tokenizer = rust_call(lambda: _Tokenizer.from_file(path), f"{path}: not a valid tokenizer.json")
    rust_call(lambda: tokenizer.encode("Hello, world! 123 é").ids, f"{path}: the tokenizer fails on a test string")
    return tokenizer


def hub_file(repo_id, filename, revision=None, cache_dir=None) -> str:
    """One file of a Hub repo: from the Hugging Face cache, else downloaded (unless HF_HUB_OFFLINE)."""
    from .weights import CheckpointError

    looked = [f"locally: no file or folder {repo_id!r}"]
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"tokenizer not found. Looked {looked[0]}; it is not a Hub repo id (owner/name) either")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises several kinds
        looked.append(f"in the Hugging Face cache: {type(err).__name__}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        looked.append("online: skipped because HF_HUB_OFFLINE is set")
    else:
        try:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001
            looked.append(f"online: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise CheckpointError(f"{filename} of {repo_id!r} not found. Looked " + "; ".join(looked))


class StreamDecoder:
    """Turn tokens arriving one at a time into text, never printing half a character.

    At each token we decode a short window of the token list twice, without and
    with the tokens not printed yet, and print the difference, unless it ends in
    U+FFFD: then the last character is still incomplete (its remaining bytes are in
    tokens to come) and we wait. The window starts a few tokens back so that
    decoders which treat the first token specially (leading spaces) see context.
    The pieces put() and flush() return add up to the decode of all the tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)  # tokens before this are printed
        self.prefix_offset = max(0, self.read_offset - 5)  # the window's start, for context

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_ids) -> str:
        """Add one token (or several); return the text that became whole."""
        self.ids.extend(int(i) for i in np.asarray(token_ids).reshape(-1))
        printed = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(printed) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(printed):]
        return ""

    def flush(self) -> str:
        """The text held back (at the end of generation), even if it is not whole."""
        printed = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(printed):]
