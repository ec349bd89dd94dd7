"""A full disk at a write: one line naming the path and the space, exit code 1, and nothing half-written left behind.

Every file a run or an export writes goes to a staging place first (a checkpoint's ``.staging``, ``adapter.tmp``,
``<export>.tmp-XXXX``, ``<file>.partial``) and is renamed into place whole. `guard` around such a write turns "no
space left" (ENOSPC, or a quota: EDQUOT) into `DiskFull` and removes the staging it was given, so the last sealed
checkpoint and any earlier export stay as they were, and the next start finds nothing to trip on. torch.save does not
say "no space" (its zip writer reports "unexpected pos" or "file write failed"): an error of that writer on a disk
with almost nothing free is taken for a full disk too.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager

from finetune.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter")  # torch.save's zip writer, whatever it says
NEARLY_FULL = 64 << 20  # free bytes under which a failed torch.save is taken for a full disk


class DiskFull(UserError):
    """A write ran out of disk space; the message names the path, the space needed and free, and what was kept."""

    code = 1  # not bad input (2): the same command succeeds once there is space


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def size(path: str | None) -> int:
    """Bytes of a file, or of every file under a directory; 0 when it does not exist."""
    if not path or not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
               if os.path.isfile(os.path.join(root, name)))


def human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def is_disk_full(error: BaseException, path: str) -> bool:
    """Whether ``error``, raised writing under ``path``, means the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    text = str(error)
    if any(s in text for s in _NO_SPACE_TEXT):
        return True
    if isinstance(error, RuntimeError) and any(s in text for s in _TORCH_WRITER):
        try:
            return free_bytes(path) < NEARLY_FULL
        except OSError:
            return False
    return False


def remove(path: str | None) -> None:
    """Remove a staging file or directory (what a failed write left); nothing when it is gone."""
    if not path:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def guard(path: str, needed_bytes=None, staging: str | list | None = None, kept=None):
    """Around a write to ``path``: a full disk becomes `DiskFull` ("disk full writing PATH: N needed, M free; KEPT"),
    with ``staging`` (a path or several: what the write had written so far) removed first. Any other error passes
    unchanged. ``needed_bytes`` and ``kept`` may be functions, asked only when the disk is full."""
    stagings = [staging] if isinstance(staging, str) else list(staging or [])
    try:
        yield
    except Exception as e:
        # an inner guard's DiskFull (a file of the staging) is said again for this path: the one the user knows
        if not isinstance(e, DiskFull) and not is_disk_full(e, path):
            raise
        written = sum(size(s) for s in stagings)
        for s in stagings:
            remove(s)
        needed_bytes = needed_bytes() if callable(needed_bytes) else needed_bytes
        kept = kept() if callable(kept) else kept
        raise DiskFull(message(path, needed_bytes, written, kept)) from None


def message(path: str, needed_bytes: int | None, written: int = 0, kept: str | None = None) -> str:
    if needed_bytes:
        need = f"{human(needed_bytes)} needed"
    elif written:
        need = f"more than the {human(written)} written before it filled"
    else:
        need = "more space needed"
    try:
        free = f"{human(free_bytes(path))} free"
    except OSError:
        free = "free space unknown"
    return (f"disk full writing {path}: {need}, {free} there; nothing half-written was left; "
            + (f"{kept}; free some space first" if kept else "free some space, then run the same command again"))


def write_whole(path: str, write, kept: str | None = None) -> None:
    """``write(tmp_path)`` to ``<path>.partial``, then rename: ``path`` exists only whole (a full disk leaves the
    earlier version of it, or none, never a truncated one)."""
    partial = path + ".partial"
    with guard(path, staging=partial, kept=kept):
        try:
            write(partial)
            os.replace(partial, path)
        except BaseException:
            remove(partial)
            raise


def write_text(path: str, text: str, kept: str | None = None) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_whole(path, write, kept)


def write_json(path: str, data, kept: str | None = None, **dump) -> None:
    """``data`` as JSON, whole or not at all (``dump``: json.dump's options, e.g. indent=2)."""
    import json

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, **dump)
            if dump.get("indent") is not None:
                f.write("\n")

    write_whole(path, write, kept)
