"""Writes that lose nothing: a temp file beside the target, fsynced, then renamed over it.

A reader (or a process that restarts after a kill) sees either the old file or
the new one, never half of one. The temp files are named `.<name>.<8 hex>.tmp`,
so `remove_temp_files` can clear what a killed write left behind and loaders
never mistake them for data.

`fault_point` marks every moment where a kill is most harmful. The kill test sets
MINIMAMBA_KILL_AT=N to SIGKILL the process at the Nth one (and MINIMAMBA_KILL_LOG
to a file to list them); with the variables unset it does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal

KILL_AT_ENV = "MINIMAMBA_KILL_AT"
KILL_LOG_ENV = "MINIMAMBA_KILL_LOG"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_fault_points_seen = 0


def fault_point(label: str) -> None:
    """Test hook: SIGKILL this process at the Nth call when MINIMAMBA_KILL_AT=N (1-based)."""
    global _fault_points_seen
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    _fault_points_seen += 1
    log = os.environ.get(KILL_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_fault_points_seen} {label}\n")
    if _fault_points_seen == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def reset_fault_points() -> None:
    global _fault_points_seen
    _fault_points_seen = 0


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Call `write(f)` on a binary temp file beside `path`, fsync it, rename it onto `path`, fsync the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            fault_point(f"write {name}")
            write(f)
            f.flush()
            fault_point(f"fsync {name}")
            os.fsync(f.fileno())
        fault_point(f"rename {name}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent=2, sort_keys=False) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def remove_temp_files(folder) -> list[str]:
    """Delete the temp files a killed `atomic_write` left in `folder`; return their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if _TEMP_NAME.match(name):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
