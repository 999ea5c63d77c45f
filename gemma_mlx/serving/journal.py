"""Append-only JSONL files that only ever grow by whole lines: the votes and the saved conversations.

A line is written under a lock (threads) and flock (another arena on the same file), then fsync'd,
so an acknowledged record survives a crash; a write that fails part way (a full disk) is cut back
off, because a half line left there would glue onto the next record and break the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path

_WRITE_LOCK = threading.Lock()


def append_record(path: Path, record: dict) -> None:
    """Add `record` as one JSON line at the end of `path`, durably; raises OSError with the file unchanged."""
    path = Path(path)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with _WRITE_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # another arena on the same file appends after us, not into us
            _append_whole(descriptor, line)
        finally:
            os.close(descriptor)


def _append_whole(descriptor: int, data: bytes) -> None:
    """Write all of `data` at the end of the file; on any failure cut the file back to its old size."""
    size = os.fstat(descriptor).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(descriptor, data[written:])
        os.fsync(descriptor)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, size)
        raise
