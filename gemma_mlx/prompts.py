"""Prompt files: what a comparison asks, kept apart from the training data.

A prompt file holds one prompt per line (blank lines and `#` comments skipped), or JSONL records
with "prompt" or "messages". Errors name file:line.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompt_from_record(record) -> str | None:
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str):
            return record["prompt"]
        messages = record.get("messages")
        if isinstance(messages, list):
            roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
            if roles not in (["user"], ["user", "assistant"]):
                raise ValueError(f"its \"messages\" are {', '.join(map(str, roles)) or 'empty'}; a comparison prompt is "
                                 "one user message (a reply after it is ignored). Give that message alone: compare "
                                 "would drop a system message or earlier turns")
            if isinstance(messages[0].get("content"), str):
                return messages[0]["content"]
    return None


def read_prompt_lines(path) -> list[tuple[str, str]]:
    """(prompt, "file:line") pairs of a prompt file; see read_prompts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prompt file {path} does not exist. Give a .txt file (one prompt per line) or a .jsonl file.")
    if path.suffix.lower() in (".csv", ".tsv", ".parquet", ".json"):
        raise DataError(f"Prompt file {path} is a {path.suffix.lower()[1:].upper()} file; prompt files are .txt (one prompt "
                        "per line) or .jsonl (a \"prompt\" per line). Save the prompt column as a .txt file.")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {error.start}); save the file as UTF-8.") from None
    found = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not path.name.endswith(".jsonl")):
            continue
        where = f"{path}:{number}"
        if path.name.endswith(".jsonl"):
            try:
                prompt = _prompt_from_record(json.loads(stripped))
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            except ValueError as error:
                raise DataError(f"{where}: {error}.") from None
            if not prompt or not prompt.strip():
                raise DataError(
                    f"{where}: no prompt found; each line needs a non-empty \"prompt\" string or "
                    "\"messages\" with a user message."
                )
            found.append((prompt, where))
        else:
            found.append((stripped, where))
    if not found:
        raise DataError(f"Prompt file {path} holds no prompts (blank lines and # comments are skipped).")
    return found


def read_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per line; blank and # lines skipped) or a .jsonl file ("prompt" or "messages")."""
    return [prompt for prompt, _ in read_prompt_lines(path)]
