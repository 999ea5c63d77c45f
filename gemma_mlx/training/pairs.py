"""Preference pairs: a prompt, the reply people preferred and the one they did not.

Three shapes are read, line by line, so a bad pair is named by file:line:
- the arena's export and TRL's preference JSONL: `{"prompt", "chosen", "rejected"}`, where the
  prompt is a string or a list of messages and each reply is a string or a list of messages whose
  last one is the assistant's (TRL's conversational form);
- the arena's votes.jsonl itself: `{"prompt", "reply_a", "reply_b", "choice"}`; ties are left out.
A directory holds `train.jsonl` and `valid.jsonl` (used as they are); a single file is split into
training and held-out pairs by prompt, so the same prompt is never on both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ROLES = ("system", "user", "assistant")
VALID_SHARE = 0.1  # held-out pairs from a single file (by prompt), at least one when there are 10 or more


@dataclass
class Pair:
    messages: list[dict]  # the conversation up to the reply (ends with the user's turn)
    chosen: str
    rejected: str
    source: str  # "file:line"

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def _prompt_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: the prompt is empty. Give the user's message, or remove the line.")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"prompt\" must be a string or a list of messages, not {json.dumps(value)[:40]}.")
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}: a prompt message must be {{\"role\": user|assistant|system, \"content\": "
                            f"text}}, not {json.dumps(message)[:60]}. Fix or remove the line.")
    if value[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt's last message is the {value[-1]['role']}'s; it must be the user's, "
                        "whose message the two replies answer.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply_text(value, key: str, where: str) -> str:
    if isinstance(value, dict) and "text" in value:  # a votes.jsonl reply
        value = value["text"]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")  # TRL's conversational form
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be the reply's text (or a list of messages ending with the "
                        f"assistant's), not {json.dumps(value)[:40]}. Fix or remove the line.")
    return value  # may be empty: a model that said nothing can be the one people did not want


def parse_pair(record, where: str) -> Pair | None:
    """One pair from a JSON record; None for a vote that is a tie. Raises DataError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a preference pair is a JSON object, not {type(record).__name__}.")
    if "choice" in record and "reply_a" in record:  # a line of the arena's votes.jsonl
        if record["choice"] in ("tie", "bad"):
            return None  # no side preferred
        if record["choice"] not in ("A", "B"):
            raise DataError(f"{where}: a vote's \"choice\" is {json.dumps(record['choice'])[:20]}; the arena writes "
                            "\"A\", \"B\", \"tie\" or \"bad\". Fix or remove the line.")
        win, lose = ("reply_a", "reply_b") if record["choice"] == "A" else ("reply_b", "reply_a")
        record = {"prompt": record.get("prompt"), "chosen": record.get(win), "rejected": record.get(lose)}
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"{where}: a preference pair needs \"prompt\", \"chosen\" and \"rejected\"; "
                        f"{', '.join(repr(k) for k in missing)} missing. (The arena's export, its votes.jsonl and "
                        "TRL's preference JSONL have this shape.)")
    return Pair(_prompt_messages(record["prompt"], where), _reply_text(record["chosen"], "chosen", where),
                _reply_text(record["rejected"], "rejected", where), where)


def read_pairs(path: Path, same: list[str] | None = None) -> list[Pair]:
    """Every pair of one JSONL file, in order. Ties of a votes file are left out, and so are pairs whose
    two replies are the same text (nothing to prefer; two models can give the same reply): their
    file:line go to `same`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text. Save it as UTF-8 JSONL.") from None
    except OSError as error:
        raise DataError(f"Cannot read the preference pairs {path} ({error.strerror or error}). Check the path.") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}). Each line must be one JSON object.") from None
        pair = parse_pair(record, where)
        if pair is not None and pair.chosen.strip() == pair.rejected.strip():
            if same is not None:
                same.append(where)
        elif pair is not None:
            pairs.append(pair)
    return pairs


def _held_out(prompt: str, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{prompt.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < VALID_SHARE


def load_pair_splits(path, seed: int = 0, same: list[str] | None = None) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of a file or a directory with train.jsonl / valid.jsonl."""
    path = Path(path)
    if path.is_dir():
        train, valid = path / "train.jsonl", path / "valid.jsonl"
        if not train.is_file():
            raise DataError(f"{path} is a directory without train.jsonl. Give a JSONL file of pairs, or put the "
                            "training pairs in train.jsonl (and held-out ones in valid.jsonl).")
        return read_pairs(train, same), read_pairs(valid, same) if valid.is_file() else []
    if not path.is_file():
        raise DataError(f"The preference pairs {path} do not exist. Export them from the arena "
                        "(gemma-mlx arena ... --export-preferences FILE) or make them with gemma-mlx prefs.")
    pairs = read_pairs(path, same)
    if len(pairs) < 10:
        return pairs, []
    valid = [p for p in pairs if _held_out(p.prompt, seed)]
    if not valid:  # a small file can miss the 10%: hold out the last prompt's pairs
        last = pairs[-1].prompt
        valid = [p for p in pairs if p.prompt == last]
    held = {id(p) for p in valid}
    train = [p for p in pairs if id(p) not in held]
    if not train:  # every pair shares the held-out prompt (e.g. multi-turn pairs that all end "more"): train on them
        return valid, []
    return train, valid


def pairs_hash(path) -> str:
    """What identifies the pairs for re-runs: the bytes of the file (or of train/valid.jsonl)."""
    path = Path(path)
    files = [path / "train.jsonl", path / "valid.jsonl"] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
