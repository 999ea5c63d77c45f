"""One table of settings for an experiment, loaded from YAML with errors that name file:line.

Precedence: command-line options > YAML file > the defaults below. Every field's comment is the
documentation (README's config reference repeats them). Stage modules import their section from
here; this module imports no stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

# The dataset, persona and prompt sets that ship with the project (the defaults below point here).
SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass
class LoraSettings:
    fine_tune_type: str = "lora"  # lora | dora | full (full trains every weight: slow, large)
    rank: int = 8  # LoRA rank r
    # mlx-lm's raw multiplier on the low-rank update (y = Wx + scale * B(A(x))). It is NOT PEFT's
    # alpha: PEFT's alpha / rank equals this scale, so alpha = scale * rank (20 * 8 = 160).
    scale: float = 20.0
    dropout: float = 0.0  # dropout on the LoRA input
    num_layers: int = 16  # adapt the last N transformer layers (-1: all)
    # projections to adapt, as paths inside a layer; empty means mlx-lm's default
    # (all attention and MLP projections of the layer)
    keys: list[str] = field(default_factory=list)
    # train the <start_of_turn>/<end_of_turn> embedding rows: auto = on for base (-pt) models only
    train_turn_tokens: str = "auto"  # auto | on | off
    # where a base model's <end_of_turn> row starts: "eos" copies <eos>'s row (the base model already
    # reads it as "the text ends here"); "keep" leaves the never-trained row
    turn_token_init: str = "keep"  # eos | keep


@dataclass
class TrainSettings:
    epochs: int = 5  # passes over the training set; every example is used every epoch
    batch_size: int = 4  # examples per step
    learning_rate: float = 1e-4  # peak learning rate
    lr_schedule: str = "cosine"  # constant | cosine | linear (decay after warmup)
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    optimizer: str = "adamw"  # adam | adamw | sgd
    weight_decay: float = 0.0  # AdamW weight decay
    max_seq_length: int = 512  # examples longer than this (in tokens) are truncated, with a warning
    response_only: bool = True  # loss on the reply tokens only (prompt and turn header masked)
    val_every_steps: int = 0  # extra validation every N steps (0: once per epoch only)
    early_stopping_patience: int = 0  # stop after N validations without improvement (0: off)
    grad_checkpoint: bool = False  # trade compute for memory on long sequences
    seed: int = 0  # data order, LoRA init and dropout
    # the turn-token rows learn at learning_rate times this (they start far from where they must go)
    turn_token_lr_scale: float = 1.0
    # loss weight of the <end_of_turn> prediction at each reply end (1: like every other token)
    end_of_turn_weight: float = 5.0
    # at each validation, answer up to 16 validation prompts greedily with at most this many tokens
    # and count clean endings (stopped by itself, no loop); 0: off
    val_generation_tokens: int = 160
    # which validation keeps the "best" adapters: stops = most clean endings (later wins a tie);
    # loss = lowest validation loss
    best_by: str = "stops"  # stops | loss


@dataclass
class GenerationSettings:
    max_tokens: int = 256  # a reply that reaches this is reported as cut ("length")
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens were generated
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens below min_p * p(max) (0: off)
    repetition_penalty: float = 1.0  # > 1 discourages repeats (1.0: off)
    no_repeat_ngram: int = 0  # never repeat a token n-gram of the reply this long (0: off)
    samples: int = 1  # replies per prompt
    seed: int = 0  # sampling seed


@dataclass
class ExperimentConfig:
    name: str = "bluey"  # outputs go to outputs/runs/<name>/
    # checkpoints to fine-tune with identical data and settings: short names, hub ids or local dirs
    checkpoints: list[str] = field(default_factory=lambda: ["gemma-3-1b-pt", "gemma-3-1b-it"])
    dtype: str = ""  # float32 | bfloat16 | float16; empty: float32 on a Linux CPU, bfloat16 with Metal
    quantize_bits: int = 0  # 0 (off), 4 or 8
    # persona dataset: a JSONL file, or a directory of JSONL files (or with train/valid/test files)
    data: str = str(SHIPPED_DATA / "bluey")
    persona: str = str(SHIPPED_DATA / "bluey" / "persona.yaml")  # persona spec for the compare scorecard
    # prompt files for the comparison (one prompt per line, or JSONL with "prompt")
    prompts: list[str] = field(
        default_factory=lambda: [str(SHIPPED_DATA / "prompts" / f"{name}.txt") for name in ("comparison", "personality", "everyday")]
    )
    compare_bases: bool = True  # also compare the un-tuned base models
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str, key: str):
    """Check a YAML value against a field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list of {_type_name(item_type)}, not {value!r}.")
        return [_coerce(item, item_type, where, key) for item in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, not {value!r}.")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a number, not {value!r}.")
    if tp is str and value is None:
        return ""
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, not {type(value).__name__} ({value!r}).")
    return value


def _build(cls, node: yaml.MappingNode, data: dict, source: str, prefix: str = ""):
    """Make a dataclass from a YAML mapping, naming the file:line of any unknown or mistyped key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    value_nodes = {k.value: v for k, v in node.value} if node is not None else {}
    values = {}
    for key, value in (data or {}).items():
        where = f"{source}:{key_lines.get(key, '?')}"
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'. Known keys here: {known}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}' must be a mapping of settings, not {value!r}.")
            values[key] = _build(tp, value_nodes.get(key), value, source, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, tp, where, f"{prefix}{key}")
    return cls(**values)


def load_config(path: Path | None = None) -> ExperimentConfig:
    """The experiment config from a YAML file (None: all defaults)."""
    if path is None:
        return ExperimentConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Check the path, or leave it out to use the defaults.")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(error, 'problem', error)}).") from None
    if data is None:
        return ExperimentConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys to values, not {type(data).__name__}.")
    return _build(ExperimentConfig, node, data, str(path))


def apply_overrides(config: ExperimentConfig, overrides: dict) -> ExperimentConfig:
    """Return a copy with dotted-key overrides applied (`{"train.epochs": 3}`); None values are skipped."""
    config = dataclasses.replace(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = config
        for part in parents:
            child = dataclasses.replace(getattr(target, part))
            setattr(target, part, child)
            target = child
        if not any(f.name == leaf for f in dataclasses.fields(target)):
            raise ConfigError(f"Unknown setting '{dotted}'.")
        hint = typing.get_type_hints(type(target))[leaf]
        setattr(target, leaf, _coerce(value, hint, "command line", dotted))
    return config


def to_dict(settings) -> dict:
    return dataclasses.asdict(settings)
