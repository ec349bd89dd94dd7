"""One run, one directory: an exclusive lock on ``<run>/run.lock`` for the whole life of the process that trains it.

A second `python -m finetune` on the same directory (a scheduler's requeue while the first job still runs, the same
command pasted twice) would rename the first one's checkpoints aside and race it for ``adapter/``. The lock is
``fcntl.lockf`` on a file that names its holder (``host pid``): the kernel drops it when the process dies, however it
dies, so a file left by a dead process is simply taken over (with a warning when it names a pid of this host that is
gone). A holder that ends normally empties the file; it is never deleted while held (a deleted lock file would let a
third process lock a new file beside the first's). Several processes of one launch: rank 0 alone takes it.

fcntl locks belong to a process and a file: closing any descriptor of ``run.lock`` in the holding process drops its
lock, so nothing but this module opens that file (``held_by_other`` does not look at a lock this process holds).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import socket
import sys

from finetune.errors import UserError

NAME = "run.lock"
_held: dict[str, int] = {}  # run directory -> open descriptor: the lock lives as long as the descriptor


def _path(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), NAME)


def _holder(fd: int) -> tuple[str, int] | None:
    """(host, pid) written in the lock file, or None when it is empty or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").split()
    if len(text) == 2 and text[1].isdigit():
        return text[0], int(text[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def _try_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _described(holder) -> str:
    return f"pid {holder[1]} on {holder[0]}" if holder else "another process"


def held_by_other(run_dir: str) -> tuple[str, int] | str | None:
    """Who holds the lock of ``run_dir`` now (a live process other than this one): (host, pid), "" when the file does
    not say, or None when nobody does. Creates nothing: a missing lock file is nobody's."""
    path = _path(run_dir)
    if os.path.abspath(run_dir) in _held or not os.path.isfile(path):
        return None  # ours (testing it would release it: fcntl locks are the process's, per file)
    try:
        fd = os.open(path, os.O_RDONLY)  # a shared lock to test with: a reader needs no write permission
    except OSError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            return None  # closing the descriptor below releases it at once
        return _holder(fd) or ""
    finally:
        os.close(fd)


def refuse_if_held(run_dir: str) -> None:
    """A UserError naming the holder when another live process trains in ``run_dir``."""
    holder = held_by_other(run_dir)
    if holder is not None:
        raise UserError(f"{os.path.abspath(run_dir)} is in use by another run ({_described(holder)}): one run per "
                        "directory; wait for it to finish or stop it, or choose another output_dir")


def refuse_if_training(path: str, what: str) -> None:
    """For readers of a run (evaluation, export): refuse ``path`` (a run directory, or an adapter inside one) while
    the run that writes it is still training."""
    path = os.path.abspath(path)
    # the run itself, its adapter/ (<run>/adapter), or one of its checkpoints (<run>/checkpoints/checkpoint-N)
    for run_dir in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        holder = held_by_other(run_dir)
        if holder is not None:
            raise UserError(f"{what} {path}: {run_dir} is still training ({_described(holder)}); wait for it to "
                            "finish or stop it")


def acquire(run_dir: str, warn=None) -> None:
    """Take the lock of ``run_dir`` for this process (creating the directory and the file); a UserError naming the
    holder when another process has it. Taking a lock this process holds already does nothing."""
    run_dir = os.path.abspath(run_dir)
    if run_dir in _held:
        return
    path = _path(run_dir)
    if not os.path.isfile(path):
        os.makedirs(run_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: the file names the holder until we hold it
    if not _try_lock(fd):
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another run ({_described(holder)}): one run per directory; wait for "
                        "it to finish or stop it, or choose another output_dir")
    previous = _holder(fd)
    host = socket.gethostname()
    if previous and previous[0] == host and previous[1] != os.getpid() and not _alive(previous[1]):
        (warn or _warn)(f"warning: {path}: took over the stale lock of pid {previous[1]} on {host} (that process is "
                        "gone)")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{host} {os.getpid()}\n".encode())
    _held[run_dir] = fd


def release(run_dir: str) -> None:
    """Empty the file (a clean end, not a stale lock) and drop the lock; nothing when this process does not hold it."""
    fd = _held.pop(os.path.abspath(run_dir), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # the directory may be gone already (a run that failed before writing anything)
    os.close(fd)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)
