"""Text in, token batches out: the tokenizer, the train/validation split and the batches.

    tokenizer = train_tokenizer(train_text, vocab_size=2048)
    split = split_text(text, val_fraction=0.05)
    batches = BatchSampler(train_ids, batch_size=8, seq_len=256, seed=0)
"""

from __future__ import annotations

import os

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def read_text(path) -> str:
    """The file as UTF-8 text, with a clear error when it is missing, empty or not text."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training text not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def split_text(text: str, val_fraction=0.05, pieces=100):
    """(train_text, val_text): cut into `pieces` equal slices, every (1/val_fraction)-th one held out.

    Spreading the held-out 5% over the whole file (rather than taking its end)
    makes the validation text a fair sample of every play, not only the last.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    every = round(1 / val_fraction)
    size = len(text) // pieces
    if size == 0:
        raise ValueError(f"the text has {len(text)} characters; too short to split into {pieces} pieces")
    train, val = [], []
    for i in range(pieces):
        piece = text[i * size:(i + 1) * size if i < pieces - 1 else len(text)]
        (val if i % every == every - 1 else train).append(piece)
    return "".join(train), "".join(val)


def train_tokenizer(text: str, vocab_size=2048):
    """A byte-level BPE (GPT-2's scheme) trained on `text` with the `tokenizers` library.

    Byte level means every string can be encoded (no unknown token); the one
    special token is <|endoftext|>, id 0.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + <|endoftext|> + a merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def load_tokenizer(path):
    """A tokenizers.Tokenizer from tokenizer.json (or a folder holding one), checked as minimamba.Tokenizer checks it."""
    from ..tokenizer import load_tokenizer_file

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return load_tokenizer_file(path)  # FileNotFoundError("tokenizer not found: ...") when it is not there


def save_tokenizer(tokenizer, folder):
    """tokenizer.json, plus the tokenizer_config.json that lets transformers' AutoTokenizer load it; each atomically."""
    from ..atomic import write_json, write_text

    write_text(os.path.join(folder, "tokenizer.json"), tokenizer.to_str(pretty=True))
    eos = EOS_TOKEN if tokenizer.token_to_id(EOS_TOKEN) is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "unk_token": None, "pad_token": eos, "model_max_length": 1000000000000000019884624838656,
              "clean_up_tokenization_spaces": False}
    write_json(os.path.join(folder, "tokenizer_config.json"), config, indent=2)


def encode(tokenizer, text: str) -> np.ndarray:
    """All of `text` as one stream of ids (uint16 when the vocabulary fits, to halve the memory)."""
    ids = tokenizer.encode(text).ids
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    return np.asarray(ids, dtype=dtype)


class BatchSampler:
    """Random windows of seq_len tokens from one long stream, reproducible from `seed`.

    The state (the NumPy generator's) is saved in checkpoints, so a resumed run
    draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed=0):
        if len(ids) < seq_len + 1:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "use a shorter --seq-len or more text")
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        starts = self.rng.integers(0, len(self.ids) - self.seq_len + 1, self.batch_size)
        return np.stack([self.ids[s:s + self.seq_len] for s in starts]).astype(np.int64)  # (b, l)


def validation_batches(ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Consecutive non-overlapping windows from the start of the held-out stream: the same every time."""
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(f"the validation text has {len(ids)} tokens, fewer than seq_len = {seq_len}")
    windows = ids[:n_windows * seq_len].reshape(n_windows, seq_len).astype(np.int64)
    for i in range(0, min(n_windows, batch_size * max_batches), batch_size):
        yield windows[i:i + batch_size]
