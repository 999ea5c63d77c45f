"""Shared output helpers: where outputs go, stage manifests, hashes, and all-or-nothing writes.

Every stage writes into its own directory with a `manifest.json` saying what it did. A later stage
reads that instead of guessing, and a re-run compares its would-be inputs with the recorded ones.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from .errors import GemmaMlxError, OutputExistsError
from .locks import lock_output, release_output  # noqa: F401  (rule 6; release_output is part of this API)
from .state import Manifest, as_dict, load_state_file

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
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temp file next to it and a rename: a reader, a kill or a full disk never
    leaves half a file under the real name, and an earlier file stays whole until the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(directory: Path) -> dict | None:
    """A directory's manifest.json checked against state.Manifest, as a dict; None when there is none.

    A damaged one (bad bytes, bad JSON, another shape, a field of the wrong type) is a
    DamagedFileError naming the file and the field: it is never trusted, nor taken for no record.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return as_dict(load_state_file(path, Manifest))


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


# ---------------------------------------------------------------------------- the stage-output protocol
#
# Every stage (convert, split, train, fuse, export-hf, compare, and run through them) writes its
# output directory by these rules, and only here are they written down:
#   1. An output may never be or contain one of its inputs, and inside an input it may only be a
#      directory this stage wrote; --force does not change that.
#   2. A file in the way is never replaced.
#   3. An output of this stage made from the same inputs and settings, with every recorded file still
#      there at its recorded size, is up to date: nothing to do. One whose files are gone or cut short
#      is made again.
#   4. --force replaces an earlier output of this stage made from other inputs; without it, that is
#      refused. A directory that this stage did not write (no manifest of this stage) is never
#      replaced, --force or not: it may hold anything.
#   5. The output is written in a temp dir next to it and renamed into place when complete; a
#      failure or Ctrl-C leaves the old output as it was, and temp dirs left by a killed process are
#      cleaned up by the next run. An old output that a kill left renamed aside (between the two
#      renames of replace_dir) is renamed back when the output itself is missing.
#   6. One writer at a time: from check_output until the output is in place, the stage holds an
#      exclusive OS lock on `.NAME.lock` next to the output. A second writer is refused with the
#      holder's pid; a killed holder's lock is released by the OS at once.


@dataclass
class StageOutput:
    """One stage's output directory, what it is made of, and what it must never replace."""

    stage: str
    path: Path
    key: dict  # everything the output depends on: ids or hashes of the inputs, and the settings
    inputs: dict[str, Path] = field(default_factory=dict)  # "the model it trains" -> path

    @property
    def key_sha256(self) -> str:
        return sha256_json(self.key)


def refuse_to_replace_inputs(output: StageOutput) -> None:
    """Rule 1: the output is not, does not hold, and does not sit inside (unless its own) any input."""
    target = Path(output.path).expanduser().resolve()
    for what, path in output.inputs.items():
        path = Path(path).expanduser().resolve()
        if path == target or target in path.parents:
            where = "is" if path == target else f"holds ({path})"
            raise OutputExistsError(
                f"The output {output.path} {where} {what}; writing there would replace it, so it is refused even "
                "with --force. Choose another output directory."
            )
        if path in target.parents and target.exists() and not _written_by(target, output.stage):
            raise OutputExistsError(
                f"The output {output.path} is inside {what} ({path}) and holds something {output.stage} did not "
                "write; replacing it could delete part of the input. Choose another output directory."
            )


def _written_by(directory: Path, stage: str) -> bool:
    manifest = read_manifest(directory)
    return bool(manifest) and manifest.get("stage") == stage


def recorded_files(directory: Path) -> dict[str, int]:
    """Relative path -> size in bytes of every file under a finished output (the manifest excluded)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def damaged_files(directory: Path, manifest: dict) -> list[str]:
    """Recorded files that are missing or no longer their recorded size (rule 3)."""
    directory = Path(directory)
    damaged = []
    for name, size in (manifest.get("files") or {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            damaged.append(name)
    return damaged


def check_output(output: StageOutput, force: bool = False, progress: Progress = quiet, remake: bool = False) -> dict | None:
    """Apply rules 1-4 before any work: the manifest when the output is up to date, else None.

    `remake` makes an up-to-date output again (`run --redo`); it still needs no force for that.

    Raises OutputExistsError (one paragraph: what is there, what to do) when the output may not be
    written, OutputLockedError when another process is writing it (rule 6). Temp dirs of killed runs
    next to the output are removed here (rule 5). When None is returned the caller holds the output's
    lock until atomic_output_dir finishes (or it calls release_output).
    """
    path = Path(output.path)
    refuse_to_replace_inputs(output)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, and the {output.stage} output directory would replace it. "
                                "Choose another output directory, or move the file away.")
    lock_output(path, output.stage)
    try:
        manifest = _check_locked_output(output, force, progress, remake)
    except BaseException:
        release_output(path)
        raise
    if manifest is not None:  # up to date: nothing will be written
        release_output(path)
    return manifest


def _check_locked_output(output: StageOutput, force: bool, progress: Progress, remake: bool) -> dict | None:
    """Rules 3-5 for check_output, under the output's lock (so a recovery cannot race a writer)."""
    path = Path(output.path)
    clean_stale_temp_dirs(path, progress)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    manifest = read_manifest(path)
    if not manifest or manifest.get("stage") != output.stage:
        raise OutputExistsError(
            f"{path} already exists and holds something that `{output.stage}` did not write (no {output.stage} "
            f"manifest.json), so it is not replaced, even with --force. Choose another output directory, or "
            "move it away yourself."
        )
    if manifest.get("key_sha256") == output.key_sha256:
        if remake:
            progress(f"{path}: up to date, but making it again as asked")
            return None
        damaged = damaged_files(path, manifest)
        if not damaged:
            return manifest
        progress(f"{path}: {len(damaged)} recorded file(s) are missing or cut short ({', '.join(damaged[:3])}); "
                 "making the output again")
        return None
    if not force:
        raise OutputExistsError(
            f"{path} already holds {'an' if output.stage[0] in 'aeiou' else 'a'} {output.stage} output made from other "
            "inputs or settings. Re-run with --force "
            "to replace it, or choose another output directory."
        )
    return None


def finished_output(output: StageOutput) -> dict | None:
    """The output's manifest when it was made by its stage from these very inputs and is whole, else None.

    Rule 3 without the lock and the refusals of check_output: for a caller that may look without taking
    the output (train, deciding between an unfinished run and a finished one)."""
    path = Path(output.path)
    manifest = read_manifest(path)
    if (manifest and manifest.get("stage") == output.stage and manifest.get("key_sha256") == output.key_sha256
            and not damaged_files(path, manifest)):
        return manifest
    return None


def finish_output(directory: Path, output: StageOutput, manifest: dict) -> dict:
    """Write the manifest of a complete output (in its temp dir): the stage's record plus the protocol's."""
    manifest = {**manifest, "stage": output.stage, "key": output.key, "key_sha256": output.key_sha256,
                "files": recorded_files(directory)}
    write_manifest(directory, manifest)
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_temp_dirs(final: Path, kind: str) -> list[Path]:
    """`.NAME.<kind>-PID` dirs next to `final` whose process is gone, newest first."""
    found = []
    for leftover in final.parent.glob(f".{final.name}.{kind}-*"):
        pid = leftover.name[len(final.name) + len(kind) + 3:]
        if pid.isdigit() and not _pid_alive(int(pid)):
            found.append(leftover)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def clean_stale_temp_dirs(final: Path, progress: Progress = quiet) -> None:
    """Remove `.NAME.partial-PID` dirs next to `final` whose process is gone, and their `.NAME.old-PID` dirs.

    An `.old` dir is the previous output, renamed aside by replace_dir just before the new one was
    renamed in. When `final` is missing, a kill came between the two renames: the old output is the
    only copy, so it is renamed back instead of deleted.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return
    for leftover in _stale_temp_dirs(final, "partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    olds = _stale_temp_dirs(final, "old")
    if olds and not final.exists():
        os.replace(olds.pop(0), final)
        progress(f"{final}: recovered the earlier output that an interrupted run had moved aside")
    for leftover in olds:
        shutil.rmtree(leftover, ignore_errors=True)


WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def write_failure(error: OSError) -> str:
    """Why a write failed, in words ("the disk is full"), for the messages that report it."""
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is used up",
            errno.EISDIR: "it is a directory"}.get(error.errno, error.strerror or str(error))


def write_error(path: Path, error: OSError) -> GemmaMlxError:
    """A full disk or a read-only directory while writing, as one paragraph (nothing half-written was kept)."""
    return GemmaMlxError(
        f"Writing {path} failed: {write_failure(error)}. Nothing half-written was left there and any earlier output is unchanged. "
        "Free some space or fix the permissions (or choose another output directory), then run the command again."
    )


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it replaces `final` in one rename (rule 5).

    On any failure or Ctrl-C the temp dir is removed and `final` (if it existed) is untouched,
    so a half-written model is never left where a later stage would find it. A full disk or a
    read-only directory becomes one clear GemmaMlxError. The output's lock (rule 6) is held
    throughout and released at the end, whatever happened.
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
    lock_output(final)
    try:
        with _temp_dir_replacing(final) as tmp:
            yield tmp
    finally:
        release_output(final)


@contextlib.contextmanager
def _temp_dir_replacing(final: Path) -> Iterator[Path]:
    """atomic_output_dir's work, under the output's lock."""
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_dirs(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as error:
        raise write_error(final, error) from None
    try:
        yield tmp
        replace_dir(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, error) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(finished: Path, final: Path) -> None:
    """Move a finished directory to `final`, replacing what was there with as short a gap as renames allow."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(finished, final)
    shutil.rmtree(old, ignore_errors=True)
