"""The persona spec (YAML) and the one way its phrases are matched in text.

A persona spec holds name, description, markers (phrases and names that signal the voice) and
out_of_character (phrases that show it broke). `data stats`, the compare scorecard and the report's
highlighting all match phrases with phrase_pattern, so they count the same replies the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import DataError
from .text import fold_apostrophes


@dataclass
class Persona:
    name: str
    description: str
    markers: list[str]
    out_of_character: list[str]


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def persona_beside(data) -> Path | None:
    """The persona.yaml that goes with a dataset: beside it, or beside the dataset a split was made from.

    A run's split data (outputs/runs/NAME/data, written by `data split`) holds only the JSONL files;
    its manifest.json records the source directory, whose persona.yaml is the persona's.
    """
    base = Path(data)
    folder = base if base.is_dir() else base.parent
    candidates = [folder / "persona.yaml"]
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    source = manifest.get("source") if isinstance(manifest, dict) and manifest.get("stage") == "split" else None
    if isinstance(source, str):
        source = Path(source)
        candidates.append((source if source.is_dir() else source.parent) / "persona.yaml")
    return next((c for c in candidates if c.is_file()), None)


def load_persona(path) -> Persona:
    """A persona spec (YAML: name, description, markers, out_of_character); DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Persona file {path} does not exist. Give a YAML file with name, description and markers.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: the file is not UTF-8 text (byte 0x{error.object[error.start]:02x}). "
                        "Save it as UTF-8 and try again.") from None
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


def phrase_pattern(phrases: list[str]) -> re.Pattern | None:
    """One regex for whole words or phrases in any case, to match against fold_apostrophes(text).

    "Mum" matches "mum," but not "mummy" or "minimum"; "I'm" matches "I’m". The longest phrase wins
    where two overlap. None when there are no phrases.
    """
    cleaned = sorted({fold_apostrophes(p.strip()) for p in phrases if p.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    return re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in cleaned), re.IGNORECASE)


def find_phrases(text: str, phrases) -> list[str]:
    """The phrases (markers or out-of-character phrases) that occur in text, in the given order."""
    folded = fold_apostrophes(text)
    return [p for p in phrases if p.strip() and phrase_pattern([p]).search(folded)]


def count_markers(text: str, markers: list[str]) -> dict[str, int]:
    """How often each marker occurs in text (matched as find_phrases matches it)."""
    folded = fold_apostrophes(text)
    return {marker: len(phrase_pattern([marker]).findall(folded)) if marker.strip() else 0 for marker in markers}
