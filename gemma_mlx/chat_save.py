"""chat's /save: a conversation written as one line of persona-data JSONL, never over a file by accident.

A shared helper of `chat` (imports no stage module).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import GemmaMlxError


def save_conversation(path: Path, messages: list[dict], force: bool = False) -> Path:
    """Write one JSONL line {"messages": [...]}, the shape of the persona data (`gemma-mlx data check` reads it).

    An existing file is kept unless `force`; the file appears whole or not at all (temp file, rename).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise GemmaMlxError(f"{path} is a folder. Give a file name, e.g. /save {path / 'chat.jsonl'}")
    if path.exists() and not force:
        raise GemmaMlxError(f"{path} already exists and was left as it is. /save --force {path} replaces it.")
    if not path.parent.is_dir():
        raise GemmaMlxError(f"The folder {path.parent} does not exist. Create it or save somewhere else.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise GemmaMlxError(f"Could not write {path}: {error.strerror or error}. Nothing was saved.") from None
    return path


def save_command(conversation, rest: str) -> str:
    """What /save REST says after saving `conversation` (a chat.Conversation): where it went, or why not."""
    words = rest.split()
    force = "--force" in words[:1] + words[-1:]
    target = " ".join(w for i, w in enumerate(words) if not (w == "--force" and i in (0, len(words) - 1)))
    if not target:
        return "Give a file name: /save chat.jsonl"
    if not conversation.turns:
        return "Nothing to save yet: no exchange has been kept."
    try:
        path = save_conversation(Path(target), conversation.messages(), force)
    except GemmaMlxError as error:
        return str(error)
    count = len(conversation.turns) // 2
    return f"(saved {count} exchange{'' if count == 1 else 's'} to {path})"
