"""One table of settings for an experiment, loaded from YAML with errors that name file:line.

Precedence: command-line options > YAML file > the defaults below. Every field's comment is the
documentation (README's config reference repeats them). Stage modules import their section from
here; this module imports no stage.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

# The dataset, persona, prompt sets and experiment files that ship with the project (the defaults
# below point here). They are package data (gemma_mlx/shipped/), so an installed wheel has them; in a
# checkout that folder is a link to the repository's data/, which stays where the README says.
SHIPPED_DATA = (Path(__file__).resolve().parent / "shipped").resolve()


DEFAULT_NUM_LAYERS = 16


@dataclass
class LoraSettings:
    fine_tune_type: str = "lora"  # lora | dora | full (full trains every weight: slow, large)
    rank: int = 8  # LoRA rank r
    # mlx-lm's raw multiplier on the low-rank update (y = Wx + scale * B(A(x))). It is NOT PEFT's
    # alpha: PEFT's alpha / rank equals this scale, so alpha = scale * rank (20 * 8 = 160).
    scale: float = 20.0
    dropout: float = 0.0  # dropout on the LoRA input
    num_layers: int = DEFAULT_NUM_LAYERS  # adapt the last N transformer layers (-1: all; the default 16 means all of a smaller model)
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
    # which validation keeps the "best" adapters: score = clean endings x length fidelity x on topic
    # (selection.checkpoint_score); stops = most clean endings (later wins a tie); loss = lowest validation loss
    best_by: str = "score"  # score | stops | loss
    # after training, shift the kept adapters' reply-end logit (folded into the turn-end row) so that greedy
    # replies to the validation prompts are as long as the training replies (training/calibration.py)
    calibrate_length: bool = True


@dataclass
class GenerationSettings:
    max_tokens: int = 256  # a reply that reaches this is reported as cut ("length")
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens were generated
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens below min_p * p(max) (0: off)
    # > 1 discourages repeats (1.0: off). 1.1 by default: measured on the real 270M base fine-tuned with
    # the defaults, plain greedy looped on 3 of 25 held-out prompts and 1.1 on none (README)
    repetition_penalty: float = 1.1
    no_repeat_ngram: int = 0  # never repeat a token n-gram of the reply this long (0: off)
    samples: int = 1  # replies per prompt
    seed: int = 0  # sampling seed


@dataclass
class PreferenceSettings:
    # preference pairs for a DPO stage after fine-tuning (the arena's export, its votes.jsonl, gemma-mlx
    # prefs' output or any TRL prompt/chosen/rejected JSONL); empty: no preference stage
    data: str = ""
    beta: float = 2.0  # how far DPO may move from the fine-tuned model (higher: stays closer); per-token scale
    learning_rate: float = 1.0e-5  # peak learning rate of the preference stage
    epochs: int = 1  # passes over the pairs
    # weight of the chosen replies' own per-token loss added to DPO's (0: plain DPO); keeps them likely. On the real
    # 270M plain DPO lost clean endings (100% -> 88%) and overshot the length (1.66x) (README)
    chosen_weight: float = 2.0
    # DPO's reward per reply: the mean log-ratio per token (true) or the sum (false, the original DPO). A summed
    # reward grows with length; on pairs whose chosen reply is the longer one it ranks new pairs by length.
    # Measured on the real 270M (README): held-out reward accuracy 0.56 -> 0.75, 24/25 -> 25/25 clean endings
    per_token_reward: bool = True
    # dpo, or orpo: no reference model; the chosen replies' loss plus beta x an odds-ratio term (beta is ORPO's
    # lambda there; chosen_weight and per_token_reward do not apply)
    objective: str = "dpo"


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
    # export each fused model at the end: "gguf" (llama.cpp, Ollama, LM Studio) and/or "web" (a browser page)
    export: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    preferences: PreferenceSettings = field(default_factory=PreferenceSettings)
    # where each setting that is not a default came from ("exp.yaml:12", "command line"); not a setting
    locations: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


NOT_SETTINGS = ("locations",)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPES = ("float32", "bfloat16", "float16")

# Every rule a setting must follow, in one table: dotted key -> (test, what the value must be).
# Checked when a config is built (load_config, apply_overrides) and when a stage gets settings
# objects from Python, so `run` finds a bad value before convert starts.
RULES: dict[str, tuple[typing.Callable, str]] = {
    "name": (lambda v: bool(NAME.match(v)) and v not in (".", ".."),
             "a plain directory name (letters, digits, '.', '_', '-'), not a path"),
    "checkpoints": (lambda v: len(v) > 0, "a list of at least one checkpoint"),
    "dtype": (lambda v: v in ("", *DTYPES), f"empty or one of {', '.join(DTYPES)}"),
    "quantize_bits": (lambda v: v in (0, 4, 8), "0 (off), 4 or 8"),
    "prompts": (lambda v: len(v) > 0, "a list of at least one prompt file"),
    "export": (lambda v: all(x in ("gguf", "web") for x in v) and len(set(v)) == len(v),
               "a list of gguf and/or web (each once)"),
    "lora.fine_tune_type": (lambda v: v in ("lora", "dora", "full"), "lora, dora or full"),
    "lora.rank": (lambda v: v >= 1, "at least 1"),
    "lora.scale": (lambda v: v > 0, "above 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.num_layers": (lambda v: v == -1 or v >= 1, "-1 (all layers) or at least 1"),
    "lora.train_turn_tokens": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
    "lora.turn_token_init": (lambda v: v in ("eos", "keep"), "eos or keep"),
    "train.epochs": (lambda v: v >= 1, "at least 1"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.learning_rate": (lambda v: v > 0, "above 0"),
    "train.lr_schedule": (lambda v: v in ("constant", "cosine", "linear"), "constant, cosine or linear"),
    "train.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "train.optimizer": (lambda v: v in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.max_seq_length": (lambda v: v >= 8, "at least 8 (tokens)"),
    "train.val_every_steps": (lambda v: v >= 0, "0 (once per epoch) or more"),
    "train.early_stopping_patience": (lambda v: v >= 0, "0 (off) or more"),
    "train.seed": (lambda v: v >= 0, "0 or more"),
    "train.turn_token_lr_scale": (lambda v: v > 0, "above 0"),
    "train.end_of_turn_weight": (lambda v: v > 0, "above 0"),
    "train.val_generation_tokens": (lambda v: v >= 0, "0 (off) or more"),
    "train.best_by": (lambda v: v in ("stops", "score", "loss"), "stops, score or loss"),
    "train.calibrate_length": (lambda v: isinstance(v, bool), "true or false"),
    "preferences.beta": (lambda v: v > 0, "above 0"),
    "preferences.learning_rate": (lambda v: v > 0, "above 0"),
    "preferences.epochs": (lambda v: v >= 1, "at least 1"),
    "preferences.chosen_weight": (lambda v: v >= 0, "0 or more"),
    "preferences.objective": (lambda v: v in ("dpo", "orpo"), "dpo or orpo"),
    "generation.max_tokens": (lambda v: v >= 1, "at least 1"),
    "generation.min_new_tokens": (lambda v: v >= 0, "0 or more"),
    "generation.temperature": (lambda v: v >= 0, "0 (greedy) or more"),
    "generation.top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1.0 turns it off)"),
    "generation.top_k": (lambda v: v >= 0, "0 (off) or more"),
    "generation.min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 turns it off)"),
    "generation.repetition_penalty": (lambda v: v > 0, "above 0 (1.0 turns it off)"),
    "generation.no_repeat_ngram": (lambda v: v == 0 or v >= 2, "0 (off) or at least 2"),
    "generation.samples": (lambda v: v >= 1, "at least 1"),
    "generation.seed": (lambda v: v >= 0, "0 or more"),
}
SECTIONS = {LoraSettings: "lora", TrainSettings: "train", GenerationSettings: "generation",
            PreferenceSettings: "preferences"}


LARGEST_INT = 2**31 - 1  # seeds, counts and token limits; larger values only crash later, deep in MLX


def _out_of_range(value) -> str | None:
    """What is wrong with a number no setting can use: an infinity, a NaN, or an integer past 2**31 - 1."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INT:
        return f"at most {LARGEST_INT:,}"
    return None


def _problems(settings, prefix: str, locations: dict[str, str]) -> list[str]:
    found = []
    for f in dataclasses.fields(settings):
        if f.name in NOT_SETTINGS:
            continue
        value, key = getattr(settings, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            found += _problems(value, f"{key}.", locations)
        elif (problem := _out_of_range(value)) or (key in RULES and not RULES[key][0](value)):
            where = f"{locations[key]}: " if key in locations else ""
            found.append(f"{where}{key} is {value!r}; it must be {problem or RULES[key][1]}")
    min_new = getattr(settings, "min_new_tokens", None)
    if min_new is not None and min_new > settings.max_tokens:
        found.append(f"{prefix}min_new_tokens ({min_new}) cannot exceed {prefix}max_tokens ({settings.max_tokens})")
    return found


def check_settings(settings, locations: dict[str, str] | None = None) -> None:
    """Raise one ConfigError listing every setting that breaks RULES (each with its file:line when known).

    `settings` is an ExperimentConfig or one of its sections (LoraSettings, TrainSettings, GenerationSettings).
    """
    if isinstance(settings, ExperimentConfig):
        prefix, locations = "", settings.locations if locations is None else locations
    else:
        prefix = SECTIONS[type(settings)] + "."
    problems = _problems(settings, prefix, locations or {})
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]}. Fix it in the config file or the options.")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"{len(problems)} settings cannot work; fix them in the config file or the options:\n{listed}")


def check_against_models(config: ExperimentConfig, model_configs: dict[str, dict]) -> None:
    """The settings that depend on a model's shape, checked against each checkpoint's config.json.

    Run before convert, so `lora.num_layers: 99` fails in a second, not after a download.
    """
    problems = []
    where = lambda key: f"{config.locations[key]}: " if key in config.locations else ""  # noqa: E731
    for name, model in model_configs.items():
        layers = model.get("num_hidden_layers")
        n = config.lora.num_layers
        if layers and n > layers and n != DEFAULT_NUM_LAYERS:  # 16, the default, takes all of a smaller model
            problems.append(f"{where('lora.num_layers')}lora.num_layers is {n}, but {name} has {layers} layers; "
                            f"use 1 to {layers}, or -1 for all")
        positions = model.get("max_position_embeddings")
        for key, value in (("generation.max_tokens", config.generation.max_tokens),
                           ("train.max_seq_length", config.train.max_seq_length)):
            if positions and value > positions:
                problems.append(f"{where(key)}{key} is {value}, but {name} reads at most {positions} tokens")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"Settings that do not fit the model(s):\n{listed}")


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.2 habits: `1e-4` is a float (YAML 1.1 reads a string)
    and a key given twice in one mapping is an error (not "the last one wins")."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]*(?:[eE][-+]?[0-9]+)$|^[-+]?[0-9][0-9_]*\.[0-9_]*$"
               r"|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _build(cls, node: yaml.MappingNode, data: dict, source: str, prefix: str = "", locations: dict | None = None):
    """Make a dataclass from a YAML mapping, naming the file:line of any unknown or mistyped key.

    `locations` collects "file:line" for every key that was set.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_SETTINGS}
    key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    value_nodes = {k.value: v for k, v in node.value} if node is not None else {}
    values = {}
    for key, value in (data or {}).items():
        where = f"{source}:{key_lines.get(key, '?')}"
        if locations is not None:
            locations[f"{prefix}{key}"] = where
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'. Known keys here: {known}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}' must be a mapping of settings, not {value!r}.")
            values[key] = _build(tp, value_nodes.get(key), value, source, f"{prefix}{key}.", locations)
        else:
            values[key] = _coerce(value, tp, where, f"{prefix}{key}")
    return cls(**values)


def load_config(path: Path | None = None, overrides: dict | None = None) -> ExperimentConfig:
    """The experiment config from a YAML file (None: all defaults), with command-line `overrides`
    (dotted keys) on top, checked as a whole: every bad value is named with its file:line."""
    if path is None:
        return apply_overrides(ExperimentConfig(), overrides or {})
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give the experiment's YAML file inside it (`gemma-mlx init {path}` "
                              "writes one, experiment.yaml, with every key documented).")
        raise ConfigError(f"Config file {path} does not exist. Check the path, or leave it out to use the defaults.")
    if path.name.endswith((".jsonl", ".jsonl.txt", ".json")):
        raise ConfigError(f"{path} looks like a dataset, not an experiment config (YAML). Name it in a config's `data:` "
                          f"key (`gemma-mlx init DIR` writes one), or train on it directly: gemma-mlx train --data {path} ...")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the config file {path} ({error}). Save it as UTF-8 text and check its permissions.") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(error, 'problem', error)}).") from None
    if data is None:
        return apply_overrides(ExperimentConfig(), overrides or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys to values, not {type(data).__name__}.")
    locations: dict[str, str] = {}
    config = _build(ExperimentConfig, node, data, str(path), locations=locations)
    config.locations = locations
    return apply_overrides(config, overrides or {})


def apply_overrides(config, overrides: dict, where: str | None = "command line"):
    """Return a checked copy with dotted-key overrides applied (`{"train.epochs": 3}`); None values are skipped.

    `config` is an ExperimentConfig or one section (e.g. GenerationSettings with `{"temperature": 0.7}`).
    `where` says where the values came from, for error messages and an ExperimentConfig's
    `locations`; None keeps the recorded locations (for values derived from the file, like resolved paths).
    """
    config = dataclasses.replace(config)
    locations = dict(config.locations) if isinstance(config, ExperimentConfig) else {}
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
        setattr(target, leaf, _coerce(value, hint, where or "command line", dotted))
        if where is not None:
            key = dotted if isinstance(config, ExperimentConfig) else f"{SECTIONS.get(type(config), '')}.{dotted}"
            locations[key] = where
    if isinstance(config, ExperimentConfig):
        config.locations = locations
    check_settings(config, locations)
    return config


def apply_text_overrides(settings, texts: dict[str, str], where: str):
    """Overrides typed as text (chat's /settings, the arena's form) read as YAML scalars (0.7, 64,
    true), then checked like any other: a value that reads as nothing is an error, not skipped."""
    import yaml

    overrides = {}
    for key, text in texts.items():
        try:
            value = yaml.safe_load(str(text))
        except yaml.YAMLError:
            value = None
        if value is None:  # apply_overrides would skip it silently
            raise ConfigError(f"'{text}' is not a valid value for {key}.")
        overrides[key] = value
    return apply_overrides(settings, overrides, where=where)


def to_dict(settings) -> dict:
    """The settings as a plain dict (for manifests and hashes): where they came from is left out."""
    values = dataclasses.asdict(settings)
    for key in NOT_SETTINGS:
        values.pop(key, None)
    return values
