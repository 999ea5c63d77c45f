"""One writer per output (rule 6 of the stage-output protocol in manifest.py): an exclusive OS lock.

From check_output until its output is in place, a stage holds `flock` on `.NAME.lock` next to the
output. A second writer is refused with the holder's pid; the OS drops the lock when its process
dies, however it dies, so a kill never leaves an output locked.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import threading
from pathlib import Path

from .errors import OutputLockedError

_held_locks: dict[Path, int] = {}  # lock file -> open descriptor, for the outputs this process is writing
_held_guard = threading.Lock()


def lock_path(final: Path) -> Path:
    """`.NAME.lock` next to the output: outside it, so it is never part of what the output records."""
    final = Path(final).expanduser()
    return final.parent.resolve() / f".{final.name}.lock"  # one lock, however the output is spelled


def lock_output(final: Path, stage: str = "gemma-mlx") -> None:
    """Take the exclusive OS lock on `final` for this process, or refuse with the holder's pid.

    flock, not a pid file: the OS drops the lock when its process dies, however it dies, so a kill
    never leaves an output locked. Taking it again in the process that holds it is a no-op. Where
    the lock file cannot be made (a missing or read-only parent) nothing can be written there
    either, and the stage's own write reports that.
    """
    path = lock_path(final)
    with _held_guard:
        if path in _held_locks:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = _lock_file(path)
        except OSError:
            return
        if descriptor is None:
            raise OutputLockedError(
                f"{final} is being written by another gemma-mlx process (pid {_holder(path)}), so this {stage} "
                "would mix its files with that one's. Wait until that process has finished (or stop it), then run "
                "the command again; it will find that output, or carry on from where it is."
            )
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        _held_locks[path] = descriptor


def _lock_file(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock, or None when another process has it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except OSError:
            os.close(descriptor)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one


def _holder(path: Path) -> str:
    """The pid the lock's holder wrote into the lock file ("unknown" if it has not written it yet)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _release_all() -> None:
    """At exit, the lock files this process still holds go too (a command that failed after taking a lock
    leaves no `.NAME.lock` beside its output; the OS lock itself would go with the process anyway)."""
    with _held_guard:
        held = list(_held_locks.items())
        _held_locks.clear()
    for path, descriptor in held:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            os.close(descriptor)


atexit.register(_release_all)


def release_output(final: Path) -> None:
    """Give up this process's lock on `final` (nothing if it holds none) and remove the lock file.

    The file goes before the lock, so a process that opened it meanwhile sees that it was removed
    (lock_output compares inodes) and locks a fresh one.
    """
    path = lock_path(final)
    with _held_guard:
        descriptor = _held_locks.pop(path, None)
        if descriptor is None:
            return
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(descriptor)
