"""`gemma-mlx train`: LoRA fine-tuning in epochs, with best/last adapters, resume and a manifest.

The run works in `<out>.partial/` and is renamed to `<out>/` only when it finished, so a later
stage never finds half a run, and a finished run is only replaced with force. Ctrl-C saves the
current adapters and a resume state there; `resume=True` continues with the same data order
(epoch orders depend on (seed, epoch) only) and reaches the same final loss.
The loop itself lives in train_loop.py; this module sets a run up and writes its outputs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters import ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE, adapter_config, save_adapters
from .checkpoints import resolve_model_dir
from .config import LoraSettings, TrainSettings, to_dict
from .errors import OutputExistsError, TrainingError
from .manifest import (
    Progress,
    check_writable,
    now_iso,
    replace_dir,
    outputs_root,
    quiet,
    read_manifest,
    sha256_json,
    versions,
    write_json,
    write_manifest,
)

RESUME_FILE = "resume_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class TrainResult:
    out_dir: Path
    summary: dict
    status: str  # "trained" | "up-to-date" | "interrupted"


@dataclass
class RunSetup:
    """Everything a run needs that is decided before the first step."""

    model_dir: Path
    base_manifest: dict | None
    flavour: str
    turn_tokens: bool
    data: Path
    data_sha256: str
    lora: LoraSettings
    train: TrainSettings
    out: Path
    identity: dict  # what must match for a re-run to be a no-op or a resume to continue

    @property
    def work(self) -> Path:
        """Where the run lives until it finished (`<out>.partial`)."""
        return self.out.with_name(self.out.name + ".partial")


def model_flavour(model_dir: Path, manifest: dict | None) -> str:
    """"pt" or "it": the model's manifest says; otherwise read it from the weights (flavour.py)."""
    import json

    from .flavour import detect_flavour, eos_ids_of

    if manifest and manifest.get("flavour") in ("pt", "it"):
        return manifest["flavour"]
    generation = model_dir / "generation_config.json"
    eos = eos_ids_of(json.loads(generation.read_text())) if generation.is_file() else []
    return detect_flavour(model_dir, model_dir.name, eos).flavour


def want_turn_tokens(setting: str, flavour: str) -> bool:
    if setting not in ("auto", "on", "off"):
        raise TrainingError(f"lora.train_turn_tokens is '{setting}'; use auto, on or off.")
    return setting == "on" or (setting == "auto" and flavour == "pt")


def check_settings(lora: LoraSettings, train: TrainSettings) -> None:
    """Reject settings that cannot work before loading anything."""
    problems = []
    if train.epochs < 1:
        problems.append(f"train.epochs is {train.epochs}; it must be at least 1")
    if train.batch_size < 1:
        problems.append(f"train.batch_size is {train.batch_size}; it must be at least 1")
    if not train.learning_rate > 0:
        problems.append(f"train.learning_rate is {train.learning_rate}; it must be above 0")
    if train.lr_schedule not in SCHEDULES:
        problems.append(f"train.lr_schedule is '{train.lr_schedule}'; use one of {', '.join(SCHEDULES)}")
    if train.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer is '{train.optimizer}'; use one of {', '.join(OPTIMIZERS)}")
    if train.max_seq_length < 8:
        problems.append(f"train.max_seq_length is {train.max_seq_length}; it must be at least 8")
    if train.best_by not in ("stops", "loss"):
        problems.append(f"train.best_by is '{train.best_by}'; use stops or loss")
    if not train.turn_token_lr_scale > 0:
        problems.append(f"train.turn_token_lr_scale is {train.turn_token_lr_scale}; it must be above 0")
    if not train.end_of_turn_weight > 0:
        problems.append(f"train.end_of_turn_weight is {train.end_of_turn_weight}; it must be above 0")
    if lora.turn_token_init not in ("eos", "keep"):
        problems.append(f"lora.turn_token_init is '{lora.turn_token_init}'; use eos or keep")
    for key in ("warmup_steps", "val_every_steps", "early_stopping_patience", "weight_decay", "val_generation_tokens"):
        if getattr(train, key) < 0:
            problems.append(f"train.{key} is {getattr(train, key)}; it must be 0 or more")
    if lora.rank < 1 and lora.fine_tune_type != "full":
        problems.append(f"lora.rank is {lora.rank}; it must be at least 1")
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout is {lora.dropout}; it must be in [0, 1)")
    if problems:
        raise TrainingError("Cannot train with these settings: " + "; ".join(problems) + ". Fix them in the config or options.")


def _base_id(model_dir: Path, manifest: dict | None) -> str:
    """What identifies the base model: its manifest, or its files' names, sizes and times."""
    if manifest:
        return sha256_json(manifest)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime] for p in sorted(model_dir.iterdir()) if p.is_file()}
    return sha256_json(files)


def plan_run(model, data, out, lora, train, run_name) -> RunSetup:
    from .data import data_hash

    check_settings(lora, train)
    model_dir = resolve_model_dir(model)
    manifest = read_manifest(model_dir)
    flavour = model_flavour(model_dir, manifest)
    turn = want_turn_tokens(lora.train_turn_tokens, flavour)
    out = Path(out).expanduser() if out else outputs_root() / "runs" / run_name / model_dir.name
    data = Path(data)
    data_sha256 = data_hash(data)
    identity = {
        "base_model": str(model_dir),
        "base_id": _base_id(model_dir, manifest),
        "data_sha256": data_sha256,
        "lora": to_dict(lora),
        "train": to_dict(train),
        "turn_tokens": turn,
    }
    return RunSetup(model_dir, manifest, flavour, turn, data, data_sha256, lora, train, out, identity)


def _identity_diff(old: dict, new: dict) -> list[str]:
    keys = []
    for key in new:
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            keys += [f"{key}.{k}" for k in new[key] if old[key].get(k) != new[key][k]]
        elif old.get(key) != new[key]:
            keys.append(key)
    return keys


def read_resume_state(setup: RunSetup, force: bool, progress) -> dict | None:
    """The saved state of an interrupted run; None when there is none (a new run starts)."""
    path = setup.work / RESUME_FILE
    if not path.is_file():
        if setup.work.exists():  # a run that died before its first save: say why it starts over
            progress(f"nothing to resume in {setup.work}; starting a new run")
        return None
    state = json.loads(path.read_text())
    changed = _identity_diff(state["identity"], setup.identity)
    if changed and force:
        progress(f"the interrupted run in {setup.work} used a different {', '.join(changed)}; starting over (--force)")
        return None
    if changed:
        raise TrainingError(
            f"Cannot resume the run in {setup.work}: it was started with a different "
            f"{', '.join(changed)} (base model {state['identity']['base_model']}). Resume with the same "
            "model, data and settings, or start over with --force."
        )
    return state


def refuse_to_replace_inputs(out: Path, inputs: dict[str, Path]) -> None:
    """An output that would replace (or sit above) one of its own inputs is a mistake even with --force.

    `inputs` maps a description ("the model it trains") to a path.
    """
    target = Path(out).expanduser().resolve()
    for what, path in inputs.items():
        path = Path(path).expanduser().resolve()
        if path == target or target in path.parents:
            where = "is" if path == target else f"holds ({path})"
            raise OutputExistsError(
                f"The output {out} {where} {what}; writing there would replace it. Choose another output directory."
            )


def prepare_work_dir(setup: RunSetup, resume: bool, force: bool, progress) -> dict | None:
    """Decide between refuse / resume / fresh start; return the resume state if resuming."""
    inputs = {"the model it trains": setup.model_dir}
    if setup.data.exists():  # not a hub dataset id
        inputs["the training data"] = setup.data
    refuse_to_replace_inputs(setup.out, inputs)
    for path in (setup.out, setup.work):
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path} is a file, and a training run would replace it. Choose another --out or --run-name.")
    check_writable(setup.out.parent)
    if resume:
        state = read_resume_state(setup, force, progress)
        if state is not None:
            return state
    if setup.out.exists() and not force:
        manifest = read_manifest(setup.out)
        what = ("a finished training run with a different model, data or settings"
                if manifest and manifest.get("stage") == "train" else "something that is not this training run")
        raise OutputExistsError(
            f"{setup.out} already holds {what}. "
            "Re-run with --force to replace it, or choose another --out or --run-name."
        )
    if setup.work.exists():
        if (setup.work / RESUME_FILE).is_file() and not force and not resume:
            raise OutputExistsError(
                f"An interrupted run is waiting in {setup.work}. Add --resume to continue it, or --force "
                "to discard it and start over."
            )
        progress(f"discarding the unfinished run in {setup.work}")
        shutil.rmtree(setup.work)
    setup.work.mkdir(parents=True)
    return None


def schedule(train: TrainSettings, total_steps: int):
    """The learning rate per step: optional linear warmup, then constant/cosine/linear decay."""
    import mlx.optimizers as optim

    decay_steps = max(total_steps - train.warmup_steps, 1)
    main = {
        "constant": lambda: optim.exponential_decay(train.learning_rate, 1.0),
        "cosine": lambda: optim.cosine_decay(train.learning_rate, decay_steps),
        "linear": lambda: optim.linear_schedule(train.learning_rate, 0.0, decay_steps),
    }[train.lr_schedule]()
    if not train.warmup_steps:
        return main
    warmup = optim.linear_schedule(0.0, train.learning_rate, train.warmup_steps)
    return optim.join_schedules([warmup, main], [train.warmup_steps])


def _one_optimizer(train: TrainSettings, lr):
    import mlx.optimizers as optim

    if train.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=train.weight_decay)


def make_optimizer(train: TrainSettings, total_steps: int, turn_rows: bool = False):
    """The optimizer; with turn rows and turn_token_lr_scale != 1, a second one for those rows."""
    import dataclasses

    import mlx.optimizers as optim

    main = _one_optimizer(train, schedule(train, total_steps))
    if not turn_rows or train.turn_token_lr_scale == 1.0:
        return main
    scaled = dataclasses.replace(train, learning_rate=train.learning_rate * train.turn_token_lr_scale)
    rows = _one_optimizer(train, schedule(scaled, total_steps))
    # the first optimizer takes everything but the rows (and reports the learning rate)
    return optim.MultiOptimizer([main, rows], [lambda path, _: not path.startswith("turn_rows")])


def write_adapter_dir(directory: Path, setup: RunSetup, num_layers: int, weights: dict, turn) -> None:
    config = adapter_config(setup.lora, num_layers, setup.model_dir, turn is not None)
    save_adapters(directory, weights, config, turn)


def copy_adapter_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTERS_FILE, CONFIG_FILE, TURN_TOKENS_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def read_metrics(work: Path) -> list[dict]:
    path = work / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finish_run(setup: RunSetup, summary: dict) -> dict:
    """Write summary, loss curve and manifest into the work dir, then move it to the output dir."""
    from .plot import loss_curve_svg

    work = setup.work
    metrics = read_metrics(work)
    (work / "loss.svg").write_text(loss_curve_svg(metrics, f"{setup.model_dir.name}: training and validation loss"))
    write_json(work / "summary.json", summary)
    for leftover in (RESUME_FILE, OPTIMIZER_FILE):
        (work / leftover).unlink(missing_ok=True)
    manifest = {
        "stage": "train",
        "base_model": str(setup.model_dir),
        "base_manifest": setup.base_manifest,
        "flavour": setup.flavour,
        "data": str(setup.data.resolve()),
        "data_sha256": setup.data_sha256,
        "settings": {"lora": to_dict(setup.lora), "train": to_dict(setup.train), "turn_tokens": setup.turn_tokens},
        "identity": sha256_json(setup.identity),
        "summary": summary,
        "created": now_iso(),
        "versions": versions(),
    }
    write_manifest(work, manifest)
    replace_dir(work, setup.out)
    return manifest


def train_model(
    model: str | Path,
    data: str | Path,
    out: Path | None = None,
    lora: LoraSettings | None = None,
    train: TrainSettings | None = None,
    run_name: str = "default",
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune `model` (a converted model dir or name) on `data`; see the module docstring.

    `callback(event)` is called after every step ({"kind": "step", ...}) and validation
    ({"kind": "valid", ...}); raising KeyboardInterrupt from it acts like Ctrl-C.
    `lora` and `train` default to the config defaults (LoraSettings(), TrainSettings()).
    """
    from .train_loop import run_training

    say = progress or quiet
    setup = plan_run(model, data, out, lora or LoraSettings(), train or TrainSettings(), run_name)
    existing = read_manifest(setup.out)
    resumable = resume and (setup.work / RESUME_FILE).is_file()
    if not resumable and existing and existing.get("stage") == "train" and existing.get("identity") == sha256_json(setup.identity):
        say(f"{setup.out}: already trained with the same model, data and settings, nothing to do")
        return TrainResult(setup.out, existing.get("summary", {}), "up-to-date")
    state = prepare_work_dir(setup, resume, force, say)
    started = time.time()
    summary, status = run_training(setup, state, progress, callback)
    if status == "interrupted":
        return TrainResult(setup.work, summary, status)
    summary["finished"] = now_iso()
    summary["run_seconds"] = round(time.time() - started, 2)
    finish_run(setup, summary)
    if summary.get("best_val_loss") is None:
        say(f"done: no validation examples, so the final adapters are kept; adapters in {setup.out}")
    else:
        why = ("most clean greedy endings" if summary["best_by"] == "stops" else "lowest validation loss")
        say(f"done: kept the adapters of epoch {summary['best_epoch']:g} ({why}; validation loss "
            f"{summary['best_val_loss']:.4f}); adapters in {setup.out}, the final ones in {setup.out / 'last'}")
    return TrainResult(setup.out, summary, status)


def train_with_config(
    model: str | Path,
    data: str | Path | None = None,
    config_path: Path | None = None,
    overrides: dict | None = None,
    out: Path | None = None,
    run_name: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """`gemma-mlx train`: settings from an experiment YAML (or defaults), dotted-key overrides on top.

    The data defaults to the config's `data`, the run name to the config's `name`.
    """
    from .config import apply_overrides, load_config

    config = apply_overrides(load_config(config_path), overrides or {})
    return train_model(model, data or config.data, out=out, lora=config.lora, train=config.train,
                       run_name=run_name or config.name, resume=resume, force=force, progress=progress)
