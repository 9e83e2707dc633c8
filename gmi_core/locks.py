"""A lock per spec file, shared by every process that builds (CLI, ComfyUI, A1111, two of either).

The lock is an OS file lock (fcntl on POSIX, msvcrt on Windows) on ``<spec>.lock``: the kernel drops it
when its holder exits, even by kill -9, so a stale lock cannot outlive a crashed build. The file holds
the holder's pid for messages only. Lock files stay in place (deleting them would race with waiters).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import Busy

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def holder(lock_path: Path) -> str:
    try:
        pid = Path(lock_path).read_text(encoding="ascii").split()[0]
        return f"pid {int(pid)}"
    except (OSError, ValueError, IndexError):
        return "another process"


@contextmanager
def spec_lock(spec_path: Path, wait: float = 0.0, poll: float = 0.2):
    """Hold the build lock of one spec; Busy when another build holds it for longer than ``wait`` seconds."""
    lock_path = Path(spec_path).with_name(Path(spec_path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise Busy(f"being built by {holder(lock_path)}")
            time.sleep(poll)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is for messages only
        try:
            yield lock_path
        finally:
            _unlock(fd)
    finally:
        os.close(fd)
