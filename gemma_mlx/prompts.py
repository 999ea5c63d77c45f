"""Prompt sets and persona specs: the evaluation side of a persona, kept apart from its training data.

A prompt file holds one prompt per line (blank lines and `#` comments skipped), or JSONL records
with "prompt" or "messages". A persona spec is YAML: name, description, markers (phrases and names
that signal the voice) and out_of_character (phrases that show it broke). Errors name file:line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import DataError


@dataclass
class Persona:
    name: str
    description: str
    markers: list[str]
    out_of_character: list[str]


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompt_from_record(record) -> str | None:
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str):
            return record["prompt"]
        messages = record.get("messages")
        if isinstance(messages, list):
            users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[-1], str):
                return users[-1]
    return None


def read_prompt_lines(path) -> list[tuple[str, str]]:
    """(prompt, "file:line") pairs of a prompt file; see read_prompts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prompt file {path} does not exist. Give a .txt file (one prompt per line) or a .jsonl file.")
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


def _line_of(node, key: str) -> int:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return k.start_mark.line + 1
    return 1


def _string_list(value, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{where}: '{key}' must be a list of non-empty strings, not {_short(value)}.")
    return value


def load_persona(path) -> Persona:
    """A persona spec (YAML: name, description, markers, out_of_character); DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Persona file {path} does not exist. Give a YAML file with name, description and markers.")
    text = path.read_text(encoding="utf-8")
    try:
        node, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise DataError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML ({getattr(error, 'problem', error)}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}:1: a persona must be a mapping with name, description, markers, out_of_character.")
    known = ("name", "description", "markers", "out_of_character")
    for key in data:
        if key not in known:
            raise DataError(f"{path}:{_line_of(node, key)}: unknown key '{key}'. Known keys: {', '.join(known)}.")
    for key in ("name", "markers"):
        if key not in data:
            raise DataError(f"{path}:1: the persona has no '{key}'; add it.")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise DataError(f"{path}:{_line_of(node, key)}: '{key}' must be a string, not {_short(data[key])}.")
    return Persona(
        name=data["name"],
        description=data.get("description") or "",
        markers=_string_list(data["markers"], f"{path}:{_line_of(node, 'markers')}", "markers"),
        out_of_character=_string_list(data.get("out_of_character") or [], f"{path}:{_line_of(node, 'out_of_character')}",
                                      "out_of_character"),
    )


def marker_pattern(marker: str) -> re.Pattern:
    """A marker as a whole word or phrase, any case ("Mum" matches "mum," but not "mummy")."""
    return re.compile(r"(?<!\w)" + re.escape(marker) + r"(?!\w)", re.IGNORECASE)


def count_markers(text: str, markers: list[str]) -> dict[str, int]:
    """How often each marker occurs in text."""
    return {marker: len(marker_pattern(marker).findall(text)) for marker in markers}
