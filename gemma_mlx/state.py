"""The files gemma-mlx writes and reads back, each with a schema, and the one reader for all of them.

A stage reads what an earlier one recorded (manifests, resume state, metrics, votes, adapter and
model configs). Such a file can be cut short by a full disk, garbled by a copy, or edited by hand;
read without a schema it ends in a KeyError or TypeError far from the file. Read through
`load_state_file` (or `load_state_lines` for JSONL), any of those is one paragraph that names the
file (the line, for JSONL) and the field, and says what to do.

The schemas check what the tool reads and the types it relies on; keys they do not name are kept
(`extra="allow"`), so a newer writer or mlx-lm's own adapter_config.json still reads. Strict types:
`"64"` is not an integer, since mlx-lm would read the raw file and fail on it later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import DamagedFileError, GemmaMlxError

Count = Annotated[int, Field(ge=0)]  # a number of steps, tokens, examples or bytes
Positive = Annotated[int, Field(ge=1)]  # a size of a model


class StateFile(BaseModel):
    """A file the tool wrote; `what` says what it should be, `fix` what to do when it is damaged."""

    model_config = ConfigDict(extra="allow", strict=True)
    what: ClassVar[str] = "a file gemma-mlx wrote"
    fix: ClassVar[str] = "Re-create it with the command that wrote it, or restore it from a copy."


# ---------------------------------------------------------------------------- manifests


class StageRecord(BaseModel):
    """One stage of a `gemma-mlx run`, as its manifest lists it."""

    model_config = ConfigDict(extra="allow", strict=True)
    stage: str
    status: str | None = None
    details: dict = {}


class Manifest(StateFile):
    """manifest.json of any stage's output: the protocol's fields plus what later stages read."""

    what: ClassVar[str] = "a stage manifest (a JSON object with the stage, its key and its files)"
    fix: ClassVar[str] = ("Make that output again with the command that wrote it (move the directory away first), "
                          "or restore the file from a copy.")
    stage: str
    key: dict | None = None
    key_sha256: str | None = None
    files: dict[str, Count] | None = None
    name: str | None = None
    flavour: str | None = None
    source_id: dict | str | None = None  # what a model was converted from: compared, never looked into
    source: dict | str | None = None
    settings: dict | None = None
    shape: dict[str, int | None] | None = None
    model_type: str | None = None
    base_model: str | None = None
    adapters: str | None = None
    data: str | None = None
    base_manifest: Manifest | None = None
    train_manifest: Manifest | None = None
    summary: dict | None = None
    stages: list[StageRecord] | None = None
    config: dict | None = None
    generation: dict | None = None
    persona_name: str | None = None
    seconds: float | None = None
    size_bytes: Count | None = None


# ---------------------------------------------------------------------------- training


class SavedPosition(BaseModel):
    """training.loop.Position as resume_state.json holds it (a test keeps the two in step)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # the loop builds Position(**this)
    epoch: Count
    step_in_epoch: Count
    step: Count
    trained_tokens: Count
    examples_seen: Count
    train_seconds: float = Field(ge=0)
    first_loss: float | None = None
    last_loss: float | None = None
    best_val_loss: float | None = None
    best_score: float | None = None
    best_epoch: float | None = None
    best_step: Count | None = None
    last_val_loss: float | None = None
    last_val_end_p: float | None = None
    bad_validations: Count
    stopped_early: bool = False
    validated_step: Count


class ResumeState(StateFile):
    """resume_state.json: what an interrupted run must match to resume, and where it stopped."""

    what: ClassVar[str] = "the state an interrupted training run saves (identity and position)"
    fix: ClassVar[str] = "Start over with --force (it discards that run), or move the directory away to keep its adapters."
    identity: dict
    position: SavedPosition


class MetricsRecord(StateFile):
    """One line of metrics.jsonl: a training report or a validation."""

    what: ClassVar[str] = "a metrics record (a JSON line with epoch, step, split and loss)"
    fix: ClassVar[str] = "Fix or remove that line, or train again."
    epoch: float = Field(ge=0)
    step: Count
    split: Literal["train", "valid"]
    loss: float | None = None


class LoraParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    rank: Positive
    scale: float
    dropout: float = Field(0.0, ge=0, le=1)
    keys: list[str] | None = None


class AdapterConfig(StateFile):
    """adapter_config.json in mlx-lm's schema, plus our base model and turn-token file."""

    what: ClassVar[str] = "an mlx-lm adapter config"
    fix: ClassVar[str] = "Restore it from a copy, or train the adapters again (`gemma-mlx train`)."
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    num_layers: int = Field(ge=-1)
    lora_parameters: LoraParameters | None = None
    model: str | None = None
    turn_tokens_file: str | None = None


class ModelConfig(StateFile):
    """A model dir's config.json: the fields gemma-mlx and mlx-lm's gemma3_text read before loading."""

    what: ClassVar[str] = "a model config"
    fix: ClassVar[str] = "Restore it from a copy, or make the model again (`gemma-mlx convert` or `gemma-mlx fuse`)."
    model_type: str | None = None
    hidden_size: Positive | None = None
    num_hidden_layers: Positive | None = None
    intermediate_size: Positive | None = None
    vocab_size: Positive | None = None
    num_attention_heads: Positive | None = None
    num_key_value_heads: Positive | None = None
    head_dim: Positive | None = None
    max_position_embeddings: Positive | None = None
    eos_token_id: int | list[int] | None = None
    quantization: dict | None = None


# ---------------------------------------------------------------------------- the arena


class RecordedReply(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class Vote(StateFile):
    """One line of votes.jsonl."""

    what: ClassVar[str] = "a vote (a JSON line with model_a, model_b and choice)"
    fix: ClassVar[str] = "Fix or remove that line."
    model_a: str
    model_b: str
    choice: Literal["A", "B", "tie", "bad"]
    prompt: str | None = None
    reply_a: RecordedReply | None = None
    reply_b: RecordedReply | None = None


# ---------------------------------------------------------------------------- the reader

Kind = TypeVar("Kind", bound=StateFile)


def load_state_file(path: Path, kind: type[Kind], fix: str | None = None) -> Kind:
    """Read a JSON file the tool wrote and check it against `kind`; a damaged one is one paragraph.

    `fix` replaces the kind's own advice (e.g. with the path of the run to start over).
    """
    path = Path(path)
    return _parse(_read_bytes(path, fix), path, None, kind, fix)


def load_state_lines(path: Path, kind: type[Kind], fix: str | None = None, last_may_be_cut: bool = False) -> list[Kind]:
    """Every record of a JSONL file the tool wrote (blank lines skipped); the first bad line is the error.

    `last_may_be_cut`: a last line with no line end that does not parse is left out instead, for a
    reader that knows a kill mid-append may leave one (a resumed run drops what followed its state).
    """
    path = Path(path)
    data = _read_bytes(path, fix)
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_parse(line, path, number, kind, fix))
        except DamagedFileError:
            if not (last_may_be_cut and number == len(lines) and not data.endswith(b"\n")):
                raise
    return records


def as_dict(record: BaseModel) -> dict:
    """A checked record as the plain dict the file held (for readers that take dicts)."""
    return record.model_dump(exclude_unset=True)


def _read_bytes(path: Path, fix: str | None) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise GemmaMlxError(f"Cannot read {path} ({error.strerror or error}). "
                            f"{fix or 'Check that it is a file you may read.'}") from None


def _parse(data: bytes, path: Path, line: int | None, kind: type[Kind], fix: str | None) -> Kind:
    """One JSON document (a whole file, or line `line` of a JSONL file) checked against `kind`."""
    where = f"{path}:{line}" if line else str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        at = line or data[:error.start].count(b"\n") + 1
        _damaged(f"{path}:{at}", kind, f"byte {error.start + 1} of the line is not UTF-8 text" if line else
                 f"byte {error.start + 1} is not UTF-8 text", fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        _damaged(f"{path}:{line or error.lineno}", kind, f"not valid JSON ({error.msg})", fix)
    if not isinstance(value, dict):
        _damaged(where, kind, f"it holds a JSON {_json_type(value)}, not an object", fix)
    try:
        return kind.model_validate(value)
    except ValidationError as error:
        _damaged(where, kind, _field_problem(error), fix)


def _damaged(where: str, kind: type[StateFile], problem: str, fix: str | None):
    raise DamagedFileError(f"{where}: not {kind.what}, so it is damaged: {problem}. {fix or kind.fix}")


def _field_problem(error: ValidationError) -> str:
    """The first problem pydantic found: 'field lora_parameters.rank is "eight" (input should be a valid integer)'."""
    first = error.errors(include_url=False)[0]
    # pydantic names the branch of a union it tried ("eos_token_id.int"); a reader wants the key alone
    parts = [str(part) for part in first["loc"] if str(part) not in _TYPE_NAMES and "[" not in str(part)]
    field = ".".join(parts) or "the top level"
    if first["type"] == "missing":
        return f"field {field} is missing"
    if first["type"] == "extra_forbidden":
        return f"field {field} is not one the tool writes"
    message = first["msg"][0].lower() + first["msg"][1:]
    shown = json.dumps(first["input"], default=str)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"field {field} is {shown} ({message})"


_TYPE_NAMES = {"int", "float", "str", "bool", "dict", "list", "none"}


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
