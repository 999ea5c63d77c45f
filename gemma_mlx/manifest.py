"""Shared output helpers: where outputs go, stage manifests, hashes, and all-or-nothing writes.

Every stage writes into its own directory with a `manifest.json` saying what it did. A later stage
reads that instead of guessing, and a re-run compares its would-be inputs with the recorded ones.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from .errors import GemmaMlxError, OutputExistsError

MANIFEST_NAME = "manifest.json"

# Library functions report progress through a callable (the CLI prints to stderr); by default, nothing.
Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """The default progress sink: a library call prints nothing unless given a callable."""
OUTPUTS_ENV = "GEMMA_MLX_OUTPUTS"


def outputs_root() -> Path:
    """`$GEMMA_MLX_OUTPUTS`, else `./outputs` (tests point the env var at a tmp dir)."""
    return Path(os.environ.get(OUTPUTS_ENV, "outputs"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes our outputs."""
    found = {}
    for name in ("gemma-mlx", "mlx", "mlx-lm", "transformers", "tokenizers", "huggingface_hub"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path, pattern: str = "*") -> str:
    """One hash over the relative names and contents of the files under root (manifest excluded)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob(pattern) if p.is_file() and p.name != MANIFEST_NAME):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, value) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(directory: Path, manifest: dict) -> None:
    write_json(Path(directory) / MANIFEST_NAME, manifest)


def check_writable(directory: Path, need_bytes: int = 0) -> None:
    """Fail early, before long work, if we cannot write `directory` or it lacks space."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise GemmaMlxError(
            f"Cannot write to {directory}: {probe} is a file, not a directory. "
            "Choose another output with --out, or move that file away."
        )
    if not os.access(probe, os.W_OK):
        raise GemmaMlxError(
            f"Cannot write to {probe} (permission denied), so nothing can be saved under {directory}. "
            "Choose another output with --out, or fix the directory's permissions."
        )
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise GemmaMlxError(
            f"Not enough disk space under {probe}: about {need_bytes / 1e9:.2f} GB is needed and "
            f"{free / 1e9:.2f} GB is free. Free some space or choose another output with --out."
        )


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it replaces `final` in one rename.

    On any failure or Ctrl-C the temp dir is removed and `final` (if it existed) is untouched,
    so a half-written model is never left where a later stage would find it.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise OutputExistsError(
            f"{final} is a file, and an output directory would replace it. Choose another output directory."
        )
    if final.exists() and not force:
        raise OutputExistsError(
            f"{final} already exists and holds something different. "
            "Re-run with --force to replace it, or choose another output directory."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(finished: Path, final: Path) -> None:
    """Move a finished directory to `final`, replacing what was there with as short a gap as renames allow."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(finished, final)
    shutil.rmtree(old, ignore_errors=True)
