"""Model directories, as every stage after convert reads them: find one, load one, one kind of error.

A model is named by a path or by a name converted earlier (outputs/models/<name>). Loading goes
through mlx-lm's `load` here and nowhere else, so a truncated or damaged weights file, adapters from
another checkpoint, or a missing tokenizer give the same one-paragraph error in train, fuse,
compare, chat and run, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from dataclasses import dataclass

from .errors import CheckpointError, GemmaMlxError
from .families import FAMILIES
from .manifest import WRITE_ERRNOS, outputs_root, read_manifest
from .state import ModelConfig, as_dict, load_state_file

TEXT_MODEL_TYPES = tuple(f.text_model_type for f in FAMILIES)  # what convert writes, for every family
ADAPTER_SEPARATOR = "::"  # BASE_DIR::ADAPTER_DIR names a base model with LoRA adapters on top


def read_json(path: Path, what: str) -> dict:
    """A JSON file stages wrote (config.json, adapter_config.json), or one paragraph saying it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise GemmaMlxError(f"{path}:{error.lineno}: {what} is not valid JSON ({error.msg}). Fix the file, or re-create it "
                            "with the stage that wrote it (convert, train or fuse).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise GemmaMlxError(f"Cannot read {path} ({error}). Re-create it with the stage that wrote it.") from None


def split_spec(spec: str | Path) -> tuple[str, str | None]:
    """(model part, adapter part or None) of a model spec: `DIR`, `BASE_DIR::ADAPTER_DIR`, or `ADAPTER_DIR`.

    The one place the separator is read; model_ref.resolve turns the parts into checked dirs. A
    train output dir alone (adapters, no config.json) stands for its recorded base with those
    adapters, so every command takes what `train` printed as it takes a fused model.
    """
    model, separator, adapters = str(spec).partition(ADAPTER_SEPARATOR)
    if separator and not (model.strip() and adapters.strip()):
        raise CheckpointError(f"'{spec}' leaves a side of {ADAPTER_SEPARATOR} empty. Write BASE_DIR{ADAPTER_SEPARATOR}"
                              "ADAPTER_DIR: the converted model first, then the adapters trained on it.")
    if separator and (Path(model).expanduser() / "adapters.safetensors").is_file() and \
            (Path(adapters).expanduser() / "config.json").is_file():
        raise CheckpointError(f"'{spec}' has the adapters first: the order is BASE_DIR{ADAPTER_SEPARATOR}ADAPTER_DIR "
                              f"({adapters}{ADAPTER_SEPARATOR}{model}).")
    if not separator:
        base = recorded_base(Path(model).expanduser())
        if base is not None:
            return base, model
    return model, (adapters if separator else None)


def recorded_base(directory: Path) -> str | None:
    """The base model an adapter dir was trained on (its run manifest, else adapter_config's "model"); None
    when `directory` is not an adapter dir (a model dir, or nothing there)."""
    from .adapters import ADAPTERS_FILE, CONFIG_FILE

    if not (directory / ADAPTERS_FILE).is_file() or (directory / "config.json").is_file():
        return None
    base = (train_manifest_of(directory) or {}).get("base_model")
    if base is None and (directory / CONFIG_FILE).is_file():  # checked in full (read_adapter_config) when it loads
        base = read_json(directory / CONFIG_FILE, "the adapter config").get("model")
    if not base:
        raise CheckpointError(
            f"{directory} holds LoRA adapters but records no base model (no run manifest, no \"model\" in "
            "adapter_config.json). Name the base too: BASE_DIR::ADAPTER_DIR."
        )
    return str(base)


def model_dir_path(spec: str | Path) -> Path:
    """The path a model spec names: a path as given, or a bare name converted earlier (outputs/models/<name>).

    Only resolves; resolve_model_dir also checks that a model is there.
    """
    path = Path(spec).expanduser()
    if not path.exists() and len(path.parts) == 1 and (outputs_root() / "models" / path.name).is_dir():
        path = outputs_root() / "models" / path.name
    return path


def resolve_model_dir(spec: str | Path) -> Path:
    """A model dir that mlx-lm can load (config, weights, tokenizer), or a CheckpointError saying what is missing."""
    path = model_dir_path(spec)
    if not path.exists():
        raise CheckpointError(
            f"Model directory {spec} does not exist (nor outputs/models/{Path(spec).name}). Give a converted "
            "model dir (`gemma-mlx convert NAME` writes outputs/models/NAME), a fused model dir, or "
            "BASE_DIR::ADAPTER_DIR for a base model with LoRA adapters."
        )
    if not path.is_dir():
        raise CheckpointError(f"{spec} is a file, not a model directory. Give the directory that holds config.json.")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not list(path.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if missing:
        raise CheckpointError(
            f"{path} is not an MLX model directory: it has no {' and no '.join(missing)}. Point to a dir "
            "written by `gemma-mlx convert` or `gemma-mlx fuse` (a Hugging Face checkpoint must be converted first)."
        )
    load_state_file(path / "config.json", ModelConfig)  # a field of the wrong type: one paragraph, before mlx-lm reads it
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model), so prompts cannot be encoded. "
            "Copy the tokenizer files from the model it was made from, or convert the model again."
        )
    return path



@contextlib.contextmanager
def loading_errors(path: Path, fix: str = "Convert or fuse it again (the file may be cut short by a full disk or a copy)."):
    """mlx-lm's and MLX's errors for damaged weights or configs, as one paragraph naming the directory."""
    try:
        yield
    except GemmaMlxError:
        raise
    except OSError as error:
        if error.errno in WRITE_ERRNOS:  # a full disk while writing is the writer's error, not a damaged model
            raise
        raise CheckpointError(f"Could not load the model in {path}: {error}. {fix}") from None
    except (RuntimeError, ValueError, KeyError, json.JSONDecodeError) as error:
        message = " ".join(str(error).split()).rstrip(".") or type(error).__name__
        end = "" if message.endswith("?") else "."
        raise CheckpointError(f"Could not load the model in {path}: {message}{end} {fix}") from None


def train_manifest_of(adapter_dir: Path) -> dict | None:
    """The training manifest for an adapter dir; `last/` has none of its own, so look one level up."""
    for directory in (adapter_dir, adapter_dir.parent):
        manifest = read_manifest(directory)
        if manifest and manifest.get("stage") == "train":
            return manifest
    return None


def check_adapters_fit(base: Path, adapter_dir: Path, train_manifest: dict | None = None) -> dict:
    """Catch adapters trained on another model before any weights are loaded; return the base config.

    The one check for fuse, compare and chat: the same shape is not enough, the base must be the
    checkpoint the adapters were trained on (its convert manifest's source).
    """
    train_manifest = train_manifest if train_manifest is not None else train_manifest_of(adapter_dir)
    config = as_dict(load_state_file(base / "config.json", ModelConfig))
    if config.get("model_type") not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{base / 'config.json'}: model_type is {config.get('model_type')!r}, but gemma-mlx works with converted text "
            f"models ({', '.join(repr(t) for t in TEXT_MODEL_TYPES)}). Use the converted model the adapters were trained on."
        )
    trained_on = (train_manifest or {}).get("base_manifest") or {}
    base_manifest = read_manifest(base) or {}
    shape = {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")}
    if trained_on.get("shape") and trained_on["shape"] != shape:
        raise GemmaMlxError(
            f"The adapters in {adapter_dir} were trained on a model of shape {trained_on['shape']}, but the base "
            f"{base} has shape {shape}. Use them with the model they were trained on "
            f"({(train_manifest or {}).get('base_model', 'see the run manifest')})."
        )
    trained_id, base_id = model_identity(trained_on), model_identity(base_manifest)
    if trained_id and base_id and trained_id != base_id:
        if base_id[0] == "fuse" and trained_id[0] == "convert":
            how = ("a fused model (a base with adapters already in it), not the converted model they were trained on; "
                   "on it they would be applied on top of other adapters, or of themselves a second time")
        elif trained_id[0] == "fuse":
            how = "not the fused model they were trained on"
        else:
            how = "converted from a different checkpoint"
        raise GemmaMlxError(
            f"The adapters in {adapter_dir} were trained on {trained_on.get('name', 'another model')} "
            f"({(train_manifest or {}).get('base_model')}), but the base given is {base_manifest.get('name', base)} "
            f"({base}), {how}. Using them there gives a model nobody trained. "
            "Use the base the adapters were trained on (adapter_config.json names it)."
        )
    return config


def model_identity(manifest: dict) -> tuple | None:
    """What makes a model dir the model it is, from its manifest: a converted checkpoint's source, or a
    fused model's base source and adapters; None when the manifest does not say (a model made elsewhere)."""
    if manifest.get("stage") == "convert" and manifest.get("source_id"):
        return ("convert", json.dumps(manifest["source_id"], sort_keys=True))
    inputs = manifest.get("inputs") or {}
    if manifest.get("stage") == "fuse" and inputs.get("base_id") and inputs.get("adapters_sha256"):
        source = (inputs["base_id"] or {}).get("source_id")
        return ("fuse", json.dumps(source, sort_keys=True), json.dumps(inputs["adapters_sha256"], sort_keys=True))
    return None



def load(model_dir: Path, adapter_dir: Path | None = None):
    """(model, tokenizer) of a model dir, with LoRA adapters and their trained turn-token rows applied.

    Adapters are checked against the base before any weights load (check_adapters_fit).
    """
    from mlx_lm import load as mlx_load

    from .adapters import apply_turn_tokens, read_adapter_config

    model_dir = Path(model_dir)
    if adapter_dir is None:
        with loading_errors(model_dir):
            return mlx_load(str(model_dir))
    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)  # the adapter rules shared with fuse, before mlx-lm reads the config
    check_adapters_fit(model_dir, adapter_dir)
    with loading_errors(adapter_dir, "They may be cut short; use the run's other adapters (last/) or train again."):
        try:
            model, tokenizer = mlx_load(str(model_dir), adapter_path=str(adapter_dir))
        except ValueError as error:
            raise CheckpointError(
                f"The adapters in {adapter_dir} do not fit the model {model_dir}: {error} "
                "Load them with the base model they were trained on (adapter_config.json names it)."
            ) from None
        apply_turn_tokens(model, adapter_dir)
    return model, tokenizer


@dataclass
class LoadedModel:
    name: str  # the display name (display_name): "gemma-3-1b-pt + LoRA", "gemma-3-1b-pt (base)"
    path: Path  # the model dir (for base+adapters: the base dir)
    model: object
    tokenizer: object
    manifest: dict | None  # the model dir's manifest.json (base's for base+adapters)
    adapter_path: Path | None  # LoRA adapter dir applied on top, if any


def _label(path: Path) -> str:
    """A readable name: the dir name, with its parent's for generic names like fused/ or last/."""
    return f"{path.parent.name}-{path.name}" if path.name in ("fused", "last") else path.name


def display_name(model_dir: Path, adapter_dir: Path | None = None, manifest: dict | None = None) -> str:
    """The one name a person sees for a model in compare's reports, run's summary and the arena:
    the checkpoint's name, then ' + LoRA' when fine-tuned (fused, or base with adapters; ' + LoRA +
    DPO' after preference training; ' (last)' for a run's final rather than kept adapters) or ' (base)'
    for a converted, un-tuned model."""
    model_dir = Path(model_dir)
    if manifest is None:
        manifest = read_manifest(model_dir) or {}
    trained = None
    if adapter_dir is None and manifest.get("stage") == "fuse" and manifest.get("base_model"):
        model_dir, adapter_dir = Path(manifest["base_model"]), Path(manifest.get("adapters") or "adapters")
        trained = manifest.get("train_manifest")
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        trained = trained or train_manifest_of(adapter_dir) or {}
        return (f"{_label(model_dir)} + LoRA" + (" + DPO" if trained.get("objective") == "dpo" else "")
                + (" (last)" if adapter_dir.name == "last" else ""))
    return f"{_label(model_dir)} (base)" if manifest.get("stage") == "convert" else _label(model_dir)


def fast_activation(model) -> int:
    """On the CPU, give the model's MLPs the tanh-GELU without a tanh (fast_gelu.py); how many.

    MLX's CPU tanh is scalar and slow: in a 16-row decode step of the 270M, mlx-lm's GELU took
    16 ms of the transformer's 81-89 ms, the multiply-add form 2 ms. It is the same function to
    float32 rounding (3.5e-7), so a greedy reply can differ only where two tokens tie within
    rounding. Training already uses it. Metal's tanh is native, so there the model stays mlx-lm's;
    GEMMA_MLX_PLAIN_DECODE=1 keeps it mlx-lm's everywhere.
    """
    import mlx.core as mx

    from .decode_step import plain_forced
    from .fast_gelu import use_fast_gelu

    if mx.default_device().type != mx.cpu or plain_forced():
        return 0
    return use_fast_gelu(model)


def fast_projections(model) -> int:
    """On the CPU, let the narrowing projections (o_proj, down_proj) of a batch multiply by a transposed
    copy of their weights (fast_linear.py): the same bits, about twice as fast there; how many layers.
    GEMMA_MLX_PLAIN_DECODE=1 and Metal keep mlx-lm's layers."""
    import mlx.core as mx

    from .decode_step import plain_forced
    from .fast_linear import use_transposed_copies

    if mx.default_device().type != mx.cpu or plain_forced():
        return 0
    return use_transposed_copies(model)


def fast_positions(model) -> int:
    """On the CPU, let Gemma 3's attention layers take a decode step's query/key norms and rotary positions
    from shared tables (fast_rope.py): the same bits, without recomputing every position's cosines in
    every layer; how many layers. GEMMA_MLX_PLAIN_DECODE=1 and Metal keep mlx-lm's layers."""
    import mlx.core as mx

    from .decode_step import plain_forced
    from .fast_rope import use_rotary_tables

    if mx.default_device().type != mx.cpu or plain_forced():
        return 0
    return use_rotary_tables(model)


def load_model(spec: str | Path, adapter_path: str | Path | None = None) -> LoadedModel:
    """Load a converted or fused model dir, or a base model with LoRA adapters (`BASE::ADAPTERS`)."""
    from .adapters import check_adapter_dir

    spec_text, named = split_spec(spec)
    if named is not None:
        if adapter_path is not None:
            raise GemmaMlxError(
                f"{spec} already names adapters after '{ADAPTER_SEPARATOR}'; do not also pass an adapter path."
            )
        adapter_path = named
    model_dir = resolve_model_dir(spec_text)
    adapter_dir = check_adapter_dir(Path(adapter_path).expanduser()) if adapter_path is not None else None
    model, tokenizer = load(model_dir, adapter_dir)  # LoRA + trained turn-token rows
    fast_activation(model)
    fast_projections(model)
    fast_positions(model)
    manifest = read_manifest(model_dir)
    name = display_name(model_dir, adapter_dir, manifest or {})
    return LoadedModel(name, model_dir, model, tokenizer, manifest, adapter_dir)
