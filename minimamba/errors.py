"""minimamba's own error for files it cannot use: a ValueError that names the file and the field.

Every malformed input (a config, a safetensors file, a shard index, a tokenizer,
an adapter, a training checkpoint) raises CheckpointError or a subclass, never a
raw TypeError, KeyError or a library's panic. Messages name what is wrong, not
the bytes found: a hostile file's contents are never echoed back.
"""

import json
import os
import stat


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is."""


def shown(text, limit=60) -> str:
    """A name read from a file, safe to put in a message: repr'd and cut to `limit` characters."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unique_keys(pairs):
    """json object_pairs_hook: refuse a key given twice (json.loads would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"key {shown(key)} appears twice")
        out[key] = value
    return out


def parse_json(raw: bytes, path, what):
    """JSON from an untrusted file; any fault is a CheckpointError naming `path` and `what`, not the bytes."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: corrupt {what}: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at byte {err.pos}); a corrupt {what}") from None
    except CheckpointError as err:
        raise CheckpointError(f"{path}: corrupt {what}: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt {what}: nested too deeply") from None


def open_regular_file(path, what):
    """`open(path, "rb")` for a regular file (a symlink to one is fine); every fault a CheckpointError naming it.

    A FIFO or a device (a hostile folder's `config.json -> /dev/zero`) would block or
    never end: refused before opening. A missing file stays a FileNotFoundError.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is not a regular file (a pipe or a device?), expected a {what}")
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open the {what} ({err.strerror or type(err).__name__})") from None


def read_json_file(path, what, limit=10_000_000):
    """A small JSON file (config, index, adapter config) read with a size bound; every fault a CheckpointError.

    A missing file stays a FileNotFoundError (callers say what to do about it).
    """
    with open_regular_file(path, what) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise CheckpointError(f"{path}: larger than {limit:,} bytes; not a {what}")
    return parse_json(raw, path, what)
