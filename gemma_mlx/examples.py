"""Persona datasets: read mlx-lm's JSONL formats (and Hugging Face datasets), load and split them.

Accepted record shapes are mlx-lm's: chat `{"messages": [...]}`, `{"prompt": ..., "completion": ...}`
and `{"text": ...}`. Reading collects every problem with its `file:line`, so `gemma-mlx data check`
can list them all; `load_examples` raises them as one DataError. Checks that judge a *valid*
dataset (duplicates, lengths, overlap) live in data.py, the `data` command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .manifest import sha256_file, sha256_tree

DATA_SUFFIXES = (".jsonl", ".jsonl.txt")
SPLIT_NAMES = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
NEAR_DUPLICATE_JACCARD = 0.8
UTF8_BOM = b"\xef\xbb\xbf"
SHAPE_HELP = 'one of {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'


@dataclass
class Example:
    messages: list[dict] | None
    text: str | None
    source: str  # "file:line"

    @property
    def prompt(self) -> str:
        """The first user turn (or the text of a text record): what duplicates are judged on."""
        if self.messages is None:
            return self.text or ""
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")

    @property
    def reply(self) -> str | None:
        """The last assistant turn; None for a text record."""
        if self.messages is None:
            return None
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), None)


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]


@dataclass
class Problem:
    where: str  # "file:line", or the path for whole-dataset findings
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Parsed:
    """Everything read from a dataset: valid examples and the problems met on the way."""

    examples: list[Example] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)  # "chat" | "completion" | "text" -> count


# ---------------------------------------------------------------- records


def _check_messages(messages) -> list[str]:
    """What is wrong with a chat record's messages (empty list: nothing)."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list of {\"role\", \"content\"} objects"]
    problems, roles = [], []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            problems.append(f"message {number} is {type(message).__name__}, not an object with role and content")
            roles.append(None)
            continue
        role = message.get("role")
        roles.append(role)
        label = f"message {number} ({role})" if isinstance(role, str) else f"message {number}"
        if role not in ROLES:
            problems.append(f"{label}: role must be one of {', '.join(ROLES)}, not {role!r}")
        content = message.get("content")
        if content is None:
            problems.append(f"{label} has no content")
        elif not isinstance(content, str):
            problems.append(f"{label}: content must be a string, not {type(content).__name__} ({_short(content)})")
        elif not content.strip():
            problems.append(f"{label} has empty content")
        elif token := _control_token_in(content):
            problems.append(_control_token_problem(label, token))
    if all(role in ROLES for role in roles):
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
        if body != expected:
            problems.append(
                f"roles out of order ({', '.join(roles)}): after an optional leading system message, "
                "turns must alternate user, assistant, user, ..."
            )
        elif roles[-1] != "assistant":
            problems.append(
                f"the last message is from the {roles[-1]}, not the assistant: there is no reply to learn from"
            )
    return problems


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_record(record, where: str) -> tuple[Example | None, str | None, list[str]]:
    """(example, shape, problems) for one decoded record; example is None when it is invalid."""
    if not isinstance(record, dict):
        kind = {type(None): "null", bool: "true/false", int: "number", float: "number", str: "string", list: "array"}
        return None, None, [f"unknown record shape: a JSON {kind.get(type(record), type(record).__name__)}, "
                            f"expected an object, {SHAPE_HELP}"]
    keys = {k for k, v in record.items() if v is not None}  # HF datasets fill absent columns with None
    if "messages" in keys:
        problems = _check_messages(record["messages"])
        if problems:
            return None, "chat", problems
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        return Example(messages=messages, text=None, source=where), "chat", []
    if "prompt" in keys or "completion" in keys:
        if not {"prompt", "completion"} <= keys:
            missing = "completion" if "prompt" in keys else "prompt"
            return None, "completion", [f"a prompt/completion record has no '{missing}'"]
        problems = [_field_problem(record, key) for key in ("prompt", "completion")]
        problems = [p for p in problems if p]
        if problems:
            return None, "completion", problems
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        return Example(messages=messages, text=None, source=where), "completion", []
    if "text" in keys:
        problem = _field_problem(record, "text")
        if problem:
            return None, "text", [problem]
        return Example(messages=None, text=record["text"], source=where), "text", []
    found = ", ".join(sorted(record)) or "none"
    return None, None, [f"unknown record shape (keys: {found}); each line must be {SHAPE_HELP}{_shape_hint(record)}"]


def _shape_hint(record: dict) -> str:
    """How to map two common shapes of other tools onto ours ("" for anything else)."""
    if "conversations" in record:  # ShareGPT
        return ('. This looks like ShareGPT: rename "conversations" to "messages", and in each turn "from" to "role" '
                '(human -> user, gpt -> assistant, system stays) and "value" to "content"')
    if "instruction" in record and "output" in record:  # Alpaca
        return ('. This looks like Alpaca: write {"prompt": instruction (and input, if any, after a blank line), '
                '"completion": output}')
    return ""


def _field_problem(record: dict, key: str) -> str | None:
    value = record[key]
    if not isinstance(value, str):
        return f"'{key}' must be a string, not {type(value).__name__} ({_short(value)})"
    if not value.strip():
        return f"'{key}' is empty"
    token = _control_token_in(value) if key != "text" else None  # a text record is the formatted text, tokens and all
    return _control_token_problem(f"'{key}'", token) if token else None


@functools.cache
def _control_tokens() -> frozenset[str]:
    from .families import FAMILIES

    return frozenset(name for f in FAMILIES for name in (f.bos, f.eos, f.pad, f.turn_start, f.turn_end))


def _control_token_in(text: str) -> str | None:
    """The first chat-template control token (<end_of_turn>, <eos>, ... of any family) written in `text`."""
    found = [(text.index(name), name) for name in _control_tokens() if name in text]
    return min(found)[1] if found else None


def _control_token_problem(label: str, token: str) -> str:
    return (f"{label} contains {token}, one of Gemma's chat-template control tokens, as text: the tokenizer "
            "reads it as the real token, so training would learn a turn that ends or starts there. Remove it "
            "(chat logs pasted with their template markers need them taken out), or give the whole formatted "
            'conversation as a {"text": ...} record')


def _add(parsed: Parsed, record, where: str) -> None:
    example, shape, problems = parse_record(record, where)
    parsed.errors.extend(Problem(where, p) for p in problems)
    if shape:
        parsed.shapes[shape] = parsed.shapes.get(shape, 0) + 1
    if example is not None:
        parsed.examples.append(example)


# ---------------------------------------------------------------- files and directories


def _parse_jsonl(path: Path, parsed: Parsed) -> None:
    """Read one JSONL file byte-wise, so bad encodings are reported with their line too."""
    raw = path.read_bytes()
    name = str(path)
    parsed.files.append(name)
    if raw.startswith(UTF8_BOM):
        parsed.errors.append(Problem(f"{name}:1", (
            "the file starts with a UTF-8 byte order mark (BOM), which mlx-lm's loader cannot parse. "
            "Save it as UTF-8 without BOM")))
        raw = raw[len(UTF8_BOM):]
    if not raw.strip():
        parsed.errors.append(Problem(f"{name}:1", "the file is empty: it holds no records"))
        return
    if raw.lstrip().startswith(b"["):  # a JSON array (often pretty-printed): one error, not one per line
        parsed.errors.append(Problem(f"{name}:1", (
            "the file is one JSON array, not JSON Lines (one complete object per line). Convert it with: python -c "
            "\"import json,sys; [print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]\" "
            f"{path.name} > {path.stem}.jsonl")))
        return
    shapes_before = dict(parsed.shapes)
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        where = f"{name}:{number}"
        if not line.strip():
            if number < len(lines):  # the empty piece after a final newline is no line
                parsed.warnings.append(Problem(where, "blank line: gemma-mlx skips it, but mlx-lm's own loader fails on it"))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            parsed.errors.append(Problem(where, (
                f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                "save the file as UTF-8")))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            parsed.errors.append(Problem(where, (
                f"not valid JSON ({error.msg} at column {error.colno}); each line must be one complete JSON object")))
            continue
        _add(parsed, record, where)
    shapes = {k for k in parsed.shapes if parsed.shapes[k] != shapes_before.get(k, 0)}
    if len(shapes) > 1:
        parsed.warnings.append(Problem(name, (
            f"mixes record shapes ({', '.join(sorted(shapes))}); mlx-lm picks one format from the first record, "
            "so use one shape per file")))


def is_hf_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def looks_like_hub_id(spec: str) -> bool:
    parts = str(spec).split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts) and not str(spec).startswith(".")


def _hf_splits(spec: str) -> dict:
    """{split name: rows} of a local saved dataset or a hub dataset id; DataError if it cannot be read."""
    import datasets

    try:
        if Path(spec).is_dir():
            loaded = datasets.load_from_disk(str(spec))
        else:
            loaded = datasets.load_dataset(spec)
    except Exception as error:  # datasets raises many types (offline, missing, bad files)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"{spec} is not a file or directory here, and loading it as a Hugging Face dataset failed: {reason}. "
            "Check the path or the dataset id (a hub id needs network access or the local datasets cache)."
            if not Path(spec).exists() else
            f"{spec} looks like a saved Hugging Face dataset but could not be loaded: {reason}."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return {name: loaded[name] for name in loaded}
    return {"train": loaded}


def _parse_hf(spec: str, parsed: Parsed, splits: dict | None = None) -> dict[str, list[Example]]:
    per_split = {}
    for split, rows in (splits or _hf_splits(spec)).items():
        name = f"{spec}[{split}]"
        parsed.files.append(name)
        before = len(parsed.examples)
        for number, record in enumerate(rows, 1):
            _add(parsed, record, f"{name}:{number}")
        per_split[split] = parsed.examples[before:]
    return per_split


def data_files(directory: Path) -> list[Path]:
    """The JSONL files of a dataset directory, by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))


def _split_file(directory: Path, split: str) -> Path | None:
    return next((directory / f"{split}{s}" for s in DATA_SUFFIXES if (directory / f"{split}{s}").is_file()), None)


def parse_dataset(path) -> Parsed:
    """Read a JSONL file, a directory of them, a saved HF dataset or a hub id, collecting every problem.

    Raises DataError only when there is nothing to read at all (missing path, no data files).
    """
    spec = str(path)
    path = Path(path)
    parsed = Parsed()
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        raise DataError(
            f"{path} is a {path.suffix.lower()[1:].upper()} file, which is not supported: gemma-mlx reads JSONL, one "
            'example per line, e.g. {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
            '"content": "..."}]}. Convert it (pandas: df.to_json("data.jsonl", orient="records", lines=True) with '
            "prompt and completion columns), or load it with `datasets` and save_to_disk."
        )
    if path.is_file():
        _parse_jsonl(path, parsed)
    elif path.is_dir() and is_hf_saved_dataset(path):
        _parse_hf(spec, parsed)
    elif path.is_dir():
        files = data_files(path)
        if not files:
            raise DataError(
                f"{path} holds no data files (*.jsonl or *.jsonl.txt). Put the examples in a JSONL file there, "
                "or point to the file itself."
            )
        for file in files:
            _parse_jsonl(file, parsed)
    elif looks_like_hub_id(spec):
        _parse_hf(spec, parsed)
    else:
        raise DataError(f"{path} does not exist. Give a JSONL file, a directory of JSONL files, or a Hugging Face dataset id.")
    return parsed


def raise_errors(parsed: Parsed, path, limit: int = 5) -> None:
    if not parsed.errors:
        return
    shown = "\n".join(f"  {p}" for p in parsed.errors[:limit])
    more = len(parsed.errors) - limit
    tail = f"\n  ... and {more} more." if more > 0 else ""
    raise DataError(
        f"{path} has {len(parsed.errors)} invalid record(s):\n{shown}{tail}\n"
        f"Fix them (run `gemma-mlx data check {path}` for the full list)."
    )


def load_examples(path) -> list[Example]:
    """Every example of a JSONL file, a directory of them, or a Hugging Face dataset; DataError if any is invalid."""
    parsed = parse_dataset(path)
    raise_errors(parsed, path)
    return parsed.examples


# ---------------------------------------------------------------- duplicates and splits


def normalise(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("\u2019", "")
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """1.0 for equal normalised text, else the Jaccard index of the two word sets."""
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return 1.0
    wa, wb = set(na.split()), set(nb.split())
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


def near_duplicate_pairs(texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[tuple[int, int, float]]:
    """(i, j, score) for i < j whose texts are equal after normalising or have word-set Jaccard >= threshold.

    Jaccard >= t needs the smaller set to be at least t times the larger, so after sorting by set
    size each text is only compared with the few of similar size.
    """
    norms = [normalise(t) for t in texts]
    words = [frozenset(n.split()) for n in norms]
    order = sorted(range(len(texts)), key=lambda i: len(words[i]))
    pairs = []
    for pos, i in enumerate(order):
        for j in order[pos + 1:]:
            if len(words[j]) * threshold > len(words[i]):
                break
            if norms[i] == norms[j]:
                score = 1.0
            elif words[i] and words[j]:
                score = len(words[i] & words[j]) / len(words[i] | words[j])
            else:
                continue
            if score >= threshold:
                pairs.append((min(i, j), max(i, j), round(score, 3)))
    return sorted(pairs)


def duplicate_groups(texts: list[str]) -> list[list[int]]:
    """Indices grouped so that near duplicates share a group (union-find over the pairs)."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in near_duplicate_pairs(texts):
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def _target(n: int, fraction: float) -> int:
    """Examples for a held-out split: rounded, but at least one when asked for and affordable."""
    if fraction <= 0:
        return 0
    return max(1, round(n * fraction)) if n >= 3 else 0


def split_examples(examples: list[Example], seed: int = 0, valid_fraction: float = 0.1,
                   test_fraction: float = 0.0) -> Splits:
    """Seeded split that keeps near-duplicate prompts together, so no held-out prompt was trained on."""
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise DataError(
            f"Split fractions valid={valid_fraction} and test={test_fraction} must each be in [0, 1) and "
            "leave something to train on (their sum below 1)."
        )
    n = len(examples)
    groups = duplicate_groups([e.prompt for e in examples])
    random.Random(seed).shuffle(groups)
    want = {"test": _target(n, test_fraction), "valid": _target(n, valid_fraction)}
    chosen: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for group in groups:
        name = next((s for s in ("test", "valid") if len(chosen[s]) + len(group) <= want[s]), "train")
        chosen[name].extend(group)
    return Splits(**{name: [examples[i] for i in sorted(idx)] for name, idx in chosen.items()})


def split_dir_files(path: Path) -> dict[str, Path] | None:
    """A folder already split (it holds train.jsonl): its split files by name; else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    files = {s: _split_file(path, s) for s in SPLIT_NAMES}
    return {s: f for s, f in files.items() if f} if files["train"] else None


def load_splits(path, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """Train/valid/test: as found (a directory with train.jsonl, a HF dataset with a train split),
    otherwise a deterministic in-memory split of all the examples."""
    path = Path(path)
    if path.is_dir() and not is_hf_saved_dataset(path):
        files = split_dir_files(path)
        if files:
            left_out = [f.name for f in data_files(path) if f not in files.values()]
            if left_out:
                raise DataError(
                    f"{path} holds {files['train'].name}, so it is read as already split into train/valid/test, and "
                    f"{', '.join(left_out)} would be left out of training. Merge {'it' if len(left_out) == 1 else 'them'} "
                    f"into {files['train'].name} (or valid/test), move {'it' if len(left_out) == 1 else 'them'} "
                    "elsewhere, or point to a directory without train.jsonl to have every file split for you."
                )
            found = {s: load_examples(f) for s, f in files.items()}
            return Splits(found["train"], found.get("valid", []), found.get("test", []))
    if (path.is_dir() and is_hf_saved_dataset(path)) or (not path.exists() and looks_like_hub_id(str(path))):
        parsed = Parsed()
        hf = _parse_hf(str(path), parsed)
        raise_errors(parsed, path)
        if "train" in hf and len(hf) > 1:
            valid = hf.get("valid", hf.get("validation", []))
            return Splits(hf["train"], list(valid), list(hf.get("test", [])))
        return split_examples(parsed.examples, seed, valid_fraction, test_fraction)
    return split_examples(load_examples(path), seed, valid_fraction, test_fraction)


# ---------------------------------------------------------------- prompts, persona, hashes


def data_hash(path) -> str:
    """sha256 over the dataset's files (names and bytes), for manifests; a hub id hashes its fingerprints."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir() and is_hf_saved_dataset(path):
        return sha256_tree(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in data_files(path):
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
        return digest.hexdigest()
    splits = _hf_splits(str(path))
    fingerprints = {name: getattr(rows, "_fingerprint", "") for name, rows in splits.items()}
    return hashlib.sha256(json.dumps([str(path), fingerprints], sort_keys=True).encode()).hexdigest()

