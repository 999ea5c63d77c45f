"""`gemma-mlx train`: LoRA fine-tuning in epochs, with best/last adapters, resume and a manifest.

The run works in `<out>.partial/` and is renamed to `<out>/` only when it finished, so a later
stage never finds half a run, and a finished run is only replaced with force. Ctrl-C saves the
current adapters and a resume state there; `resume=True` continues with the same data order
(epoch orders depend on (seed, epoch) only) and reaches the same final loss.
The loop itself lives in training/loop.py (one way: it never imports this module); this module
plans a run, decides refuse / resume / start over, and writes its outputs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import ADAPTERS_FILE, damaged_safetensors, remove_unfinished_saves
from .models import ADAPTER_SEPARATOR, resolve_model_dir
from .model_ref import fingerprint
from .config import NAME, LoraSettings, PreferenceSettings, TrainSettings, check_settings, to_dict
from .errors import CheckpointError, ConfigError, DamagedFileError, OutputExistsError, TrainingError
from .training.setup import OPTIMIZER_FILE, RESUME_FILE, RunSetup, read_metrics
from .state import ResumeState, as_dict, load_state_file

if TYPE_CHECKING:  # the loop imports mlx; load it only when a run starts
    from .training.loop import TrainingCallback
from .manifest import (
    Progress,
    StageOutput,
    check_output,
    check_writable,
    finish_output,
    finished_output,
    lock_output,
    now_iso,
    outputs_root,
    quiet,
    read_manifest,
    release_output,
    replace_dir,
    versions,
    write_error,
    write_json,
)

@dataclass
class TrainResult:
    out_dir: Path
    summary: dict
    status: str  # "trained" | "up-to-date" | "interrupted"


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
    return setting == "on" or (setting == "auto" and flavour == "pt")


def _base_id(model_dir: Path, manifest: dict | None) -> str:
    """What identifies the base model: the one model fingerprint compare's inputs record too (model_ref)."""
    return fingerprint(model_dir, manifest)


def plan_run(model, data, out, lora, train, run_name) -> RunSetup:
    from .examples import data_hash

    check_settings(lora)
    check_settings(train)
    model_dir = resolve_model_dir(model).resolve()  # recorded absolute: fuse finds it from any directory
    manifest = read_manifest(model_dir)
    flavour = model_flavour(model_dir, manifest)
    turn = want_turn_tokens(lora.train_turn_tokens, flavour)
    if not out and (not NAME.match(str(run_name)) or run_name in (".", "..")):
        raise ConfigError(f"The run name {run_name!r} is not a plain directory name (letters, digits, '.', '_', "
                          "'-'); outputs go to outputs/runs/<run-name>/, so it cannot be a path. Choose another, "
                          "or give --out.")
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


def plan_preference_run(model, pairs, out, lora, train, preferences, run_name) -> RunSetup:
    """A DPO or ORPO run (training/dpo.py): from a fine-tuned persona, an adapter dir or a fused model, on pairs."""
    import dataclasses

    from .errors import DataError
    from .models import recorded_base
    from .training.pairs import pairs_hash

    for settings in (lora, train, preferences):
        check_settings(settings)
    base_spec, separator, adapter_spec = str(model).partition(ADAPTER_SEPARATOR)
    start = Path(adapter_spec if separator else model).expanduser()
    adapters = start.resolve() if (start / ADAPTERS_FILE).is_file() else None
    if separator and adapters is None:
        raise CheckpointError(f"{start} holds no LoRA adapters ({ADAPTERS_FILE}); after {ADAPTER_SEPARATOR} give "
                              "train's output directory (or its last/).")
    if separator:  # BASE_DIR::ADAPTER_DIR: the base as given
        model_dir = resolve_model_dir(base_spec).resolve()
    elif adapters is not None:  # train's output (or its last/): its base is recorded
        model_dir = resolve_model_dir(recorded_base(adapters)).resolve()
    else:
        model_dir = resolve_model_dir(model).resolve()
    pairs = Path(pairs).expanduser()
    if not pairs.exists():
        raise DataError(f"The preference pairs {pairs} do not exist. Export them from the arena (gemma-mlx arena ... "
                        "--export-preferences FILE) or make them with gemma-mlx prefs.")
    manifest = read_manifest(model_dir)
    train = dataclasses.replace(train, learning_rate=preferences.learning_rate, epochs=preferences.epochs)
    if not out and (not NAME.match(str(run_name)) or run_name in (".", "..")):
        raise ConfigError(f"The run name {run_name!r} is not a plain directory name; choose another, or give --out.")
    suffix = f"-{preferences.objective}"  # -dpo or -orpo
    default = adapters.with_name(adapters.name + suffix) if adapters else outputs_root() / "runs" / run_name / (model_dir.name + suffix)
    out = Path(out).expanduser() if out else default
    sha = pairs_hash(pairs)
    identity = {"base_model": str(model_dir), "base_id": _base_id(model_dir, manifest), "data_sha256": sha,
                "start_adapters": str(adapters) if adapters else None,
                "start_sha256": sha256_file(adapters / ADAPTERS_FILE) if adapters else None,
                "lora": to_dict(lora), "train": to_dict(train), "preferences": to_dict(preferences), "turn_tokens": False}
    return RunSetup(model_dir, manifest, model_flavour(model_dir, manifest), False, pairs, sha, lora, train, out,
                    identity, preferences=preferences, start_adapters=adapters)


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stage_output(setup: RunSetup) -> StageOutput:
    """The run's output under the stage-output protocol: its identity is the key."""
    inputs = {"the model it trains": setup.model_dir}
    if setup.data.exists():  # not a hub dataset id
        inputs["the training data"] = setup.data
    if setup.start_adapters is not None:
        inputs["the adapters it starts from"] = setup.start_adapters
    return StageOutput("train", setup.out, key=setup.identity, inputs=inputs)


def _identity_diff(old: dict, new: dict) -> list[str]:
    keys = []
    for key in new:
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            keys += [f"{key}.{k}" for k in new[key] if old[key].get(k) != new[key][k]]
        elif old.get(key) != new[key]:
            keys.append(key)
    return keys


def read_resume_state(setup: RunSetup) -> dict | None:
    """The saved state of an unfinished run (None when there is none); a damaged one is an error."""
    path = setup.work / RESUME_FILE
    if not path.is_file():
        return None
    fix = (f"The unfinished run in {setup.work} cannot be resumed from it: start over with --force (it discards "
           "that run), or move the directory away to keep its adapters.")
    return as_dict(load_state_file(path, ResumeState, fix))


def _saved_adapters(work: Path) -> list[Path]:
    return sorted(work.rglob(ADAPTERS_FILE)) if work.is_dir() else []


def prepare_work_dir(setup: RunSetup, resume: bool, force: bool, progress) -> dict | None:
    """Decide between refuse / resume / fresh start; return the resume state if resuming.

    An unfinished run's saved adapters are only ever discarded with force.
    """
    check_output(stage_output(setup), force, progress)  # inputs, files in the way, a different finished run
    if setup.work.exists() and not setup.work.is_dir():
        raise OutputExistsError(f"{setup.work} is a file, and a training run would replace it. Choose another --out or --run-name.")
    check_writable(setup.out.parent)
    state = read_resume_state(setup) if setup.work.exists() else None
    if state is not None:
        changed = _identity_diff(state["identity"], setup.identity)
        if resume and not changed:
            remove_unfinished_saves(setup.work)
            refuse_damaged_weights(setup.work, "the unfinished run there cannot be resumed from it. Start over with "
                                   "--force (it discards that run), or move the directory away to keep what is whole.")
            return state
        if changed and not force:
            raise TrainingError(
                f"The unfinished run in {setup.work} was started with a different {', '.join(changed)}, so it cannot "
                "be continued with these settings. Continue it with the settings it had (--resume), or start over "
                "with --force (it discards that run and its saved adapters)."
            )
        if not changed and not force:
            raise OutputExistsError(
                f"An unfinished run is waiting in {setup.work} (its adapters are saved). Add --resume to continue it, "
                "or --force to discard it and start over."
            )
    elif _saved_adapters(setup.work) and not force:
        raise OutputExistsError(
            f"{setup.work} holds adapters of an unfinished run but no resume state. They are kept: move them away, "
            "or start over with --force (it discards them)."
        )
    if setup.work.exists():
        progress(f"discarding the unfinished run in {setup.work} (--force)" if force else
                 f"starting over in {setup.work} (nothing was saved there)")
        shutil.rmtree(setup.work)
    try:
        setup.work.mkdir(parents=True)
    except OSError as error:
        raise write_error(setup.work, error) from None
    return None


def refuse_damaged_weights(work: Path, consequence: str) -> None:
    """DamagedFileError naming the first cut-off or garbled safetensors file under `work`, if any.

    A kill or a full disk while saving can leave such a file; resuming from it or publishing it
    would pass the damage on to fuse, compare and chat as if it were a trained result.
    """
    damaged = damaged_safetensors(work)
    if damaged:
        path, problem = damaged[0]
        others = f" ({len(damaged) - 1} more file(s) too)" if len(damaged) > 1 else ""
        raise DamagedFileError(f"{path} is damaged: {problem}{others}. It was probably cut short by a kill or a full "
                               f"disk, so {consequence}")


def validation_table(metrics: list[dict], kept_step: int | None) -> list[dict]:
    """summary.json's per-validation table: what each validation measured and which one was kept.

    One row per validation record of metrics.jsonl: epoch, step, loss, the greedy replies' clean
    endings (count, of, rate), their mean words and that against the validation replies' own, their
    on-topic share (None when not measured), the score (selection.checkpoint_score), and kept: true on
    the validation whose adapters are the best.
    """
    rows = []
    for m in metrics:
        if m["split"] != "valid":
            continue
        rows.append({"epoch": m["epoch"], "step": m["step"], "loss": m.get("loss"),
                     "clean": m.get("gen_clean"), "replies": m.get("gen_replies"),
                     "clean_rate": m.get("gen_clean_rate"), "mean_words": m.get("gen_mean_words"),
                     "words_vs_valid": m.get("gen_words_vs_valid"), "on_topic_rate": m.get("gen_on_topic_rate"),
                     "score": m.get("gen_score"),
                     "kept": m["step"] == kept_step})
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The per-validation table as the end of a run prints it (nothing without greedy validation replies)."""
    if not any(r["clean"] is not None for r in rows):
        return []
    topic = any(r.get("on_topic_rate") is not None for r in rows)
    lines = ["epoch  clean   words  vs valid  " + ("on topic  " if topic else "") + "score  loss"]
    for r in rows:
        ratio = f"{r['words_vs_valid']:.2f}x" if r["words_vs_valid"] is not None else "-"
        score = f"{r['score']:.2f}" if r["score"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        clean = f"{r['clean']}/{r['replies']}" if r["clean"] is not None else "-"
        words = f"{r['mean_words']:.1f}" if r["mean_words"] is not None else "-"
        share = (f"{r['on_topic_rate']:.0%}" if r.get("on_topic_rate") is not None else "-") if topic else None
        lines.append(f"{r['epoch']:<6g} {clean:<7} {words:<6} {ratio:<9} " + (f"{share:<9} " if topic else "")
                     + f"{score:<6} {loss}" + ("  <- kept" if r["kept"] else ""))
    return lines


def finish_run(setup: RunSetup, summary: dict) -> dict:
    """Write summary, loss curve and manifest into the work dir, then move it to the output dir."""
    from .plot import loss_curve_svg

    work = setup.work
    remove_unfinished_saves(work)
    refuse_damaged_weights(work, f"the run is not published as {setup.out}; it stays in {work}. Train again with "
                           "--force to start over.")
    metrics = read_metrics(work)
    summary["validations"] = validation_table(metrics, summary.get("best_step"))
    (work / "loss.svg").write_text(loss_curve_svg(metrics, f"{setup.model_dir.name}: training and validation loss",
                                                  kept_epoch=summary.get("best_epoch")))
    write_json(work / "summary.json", summary)
    for leftover in (RESUME_FILE, OPTIMIZER_FILE):
        (work / leftover).unlink(missing_ok=True)
    manifest = {
        "base_model": str(setup.model_dir),
        "base_manifest": setup.base_manifest,
        "flavour": setup.flavour,
        "data": str(setup.data.resolve()),
        "data_sha256": setup.data_sha256,
        "settings": {"lora": to_dict(setup.lora), "train": to_dict(setup.train), "turn_tokens": setup.turn_tokens},
        "objective": setup.preferences.objective if setup.preferences else "supervised",
        "summary": summary,
        "created": now_iso(),
        "versions": versions(),
    }
    if setup.preferences is not None:
        manifest["settings"]["preferences"] = to_dict(setup.preferences)
        manifest["start_adapters"] = str(setup.start_adapters) if setup.start_adapters else None
    manifest = finish_output(work, stage_output(setup), manifest)
    try:
        replace_dir(work, setup.out)
    except OSError as error:
        raise write_error(setup.out, error) from None
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
    callback: TrainingCallback | None = None,
    resume_hint: str = "continue with the same command plus --resume",
    remake: bool = False,
    memory_check: bool = True,
    preferences: PreferenceSettings | None = None,
    on_topic=None,
) -> TrainResult:
    """Fine-tune `model` (a converted model dir or name) on `data`; see the module docstring.

    `callback` (a training.loop.TrainingCallback) hears every step and validation; raising
    KeyboardInterrupt from it acts like Ctrl-C.
    `lora` and `train` default to the config defaults (LoraSettings(), TrainSettings()).
    With `preferences` (config.PreferenceSettings) the run is DPO: `model` is the fine-tuned persona
    (an adapter dir or a fused model) and `data` the preference pairs (training/dpo.py).
    `memory_check=False` trains even when the memory estimate exceeds the machine (it only warns).
    `on_topic` (training.validation.OnTopic, e.g. scoring.best_of.on_topic_flags): with best_by: score,
    the share of greedy validation replies on topic joins the score (the CLI and `run` pass it).
    """
    from .distributed import world

    say = (progress or quiet) if world().main else quiet  # rank 0 reports for every rank
    if preferences is not None:
        setup = plan_preference_run(model, data, out, lora or LoraSettings(), train or TrainSettings(), preferences,
                                    run_name)
    else:
        setup = plan_run(model, data, out, lora or LoraSettings(), train or TrainSettings(), run_name)
    setup.memory_check = memory_check
    try:
        return _train(setup, resume, force, remake, progress, say, callback, resume_hint, on_topic)
    finally:
        release_output(setup.out)  # taken by check_output (rank 0): held for the whole run, finished or not


def _train(setup: RunSetup, resume: bool, force: bool, remake: bool, progress: Progress | None, say: Progress,
           callback: TrainingCallback | None, resume_hint: str, on_topic=None) -> TrainResult:
    """train_model's work, while rank 0 holds the lock on the output."""
    from .distributed import broadcast_json, world
    from .training.loop import run_training

    here = world()
    decision = None
    if here.main:  # rank 0 decides (up to date, resume, start over) and tells the other ranks
        decision = _decide(setup, resume, force, remake, say)
    decision = broadcast_json(decision)
    if decision["status"] == "up-to-date":
        return TrainResult(setup.out, decision["summary"], "up-to-date")
    started = time.time()
    build = None
    if setup.preferences is not None:
        from .training.dpo import preference_parts as build
    summary, status = run_training(setup, decision["state"], progress if here.main else None, callback, resume_hint,
                                   build=build, on_topic=on_topic)
    if status == "interrupted":
        return TrainResult(setup.work, summary, status)
    if not here.main:
        return TrainResult(setup.out, summary, status)
    calibration = calibrate_length(setup, summary, say)
    if calibration is not None:
        summary["length_calibration"] = calibration
    summary["finished"] = now_iso()
    summary["run_seconds"] = round(time.time() - started, 2)
    summary["ranks"] = here.size
    finish_run(setup, summary)
    if summary.get("best_val_loss") is None:
        say(f"done: no validation examples, so the final adapters are kept; adapters in {setup.out}")
    else:
        why = {"stops": "most clean greedy endings", "loss": "lowest validation loss",
               "score": "highest score: clean endings x length fidelity"
                        + (" x on topic" if summary.get("on_topic_in_score") else "")}.get(summary["best_by"], summary["best_by"])
        if summary["best_by"] != "loss" and not setup.train.val_generation_tokens and setup.preferences is None:
            why = ("no greedy validation replies (val_generation_tokens 0), so the highest share of reply ends "
                   "where <end_of_turn> is the top token")
        for line in table_lines(summary.get("validations") or []):
            say(line)
        say(f"done: kept the adapters of epoch {summary['best_epoch']:g} ({why}; validation loss "
            f"{summary['best_val_loss']:.4f}); adapters in {setup.out}, the final ones in {setup.out / 'last'}")
    return TrainResult(setup.out, summary, status)


def calibrate_length(setup: RunSetup, summary: dict, say: Progress) -> dict | None:
    """Shift the kept adapters' reply-end logit so that greedy validation replies are as long as the training
    replies (training/calibration.py); what was done, or None where it does not apply (turned off, a preference
    run, no validation replies or no validation generation, the final adapters kept for want of validation)."""
    train = setup.train
    if (not train.calibrate_length or setup.preferences is not None or not train.val_generation_tokens
            or summary.get("best_score") is None or not summary.get("train_reply_words")):
        return None
    from .examples import load_splits
    from .training.calibration import calibrate_adapters
    from .training.sft import VALIDATION_PROMPTS

    splits = load_splits(setup.data, seed=train.seed)
    conversations = [e.messages for e in splits.valid if e.messages][:VALIDATION_PROMPTS]
    # aimed at the persona's length, the training replies' mean words (what compare holds replies against): 16
    # validation replies alone are a noisy target (on Bluey's they averaged 59 words, the 133 training replies 52)
    done = calibrate_adapters(setup.model_dir, setup.work, conversations, summary["train_reply_words"],
                              train.val_generation_tokens, say)
    if done is not None:
        say(f"length calibration: reply-end logit shifted by {done['shift']:+.2f}: greedy validation replies "
            f"{done['words_before']:.1f} -> {done['words_after']:.1f} words (the training replies' "
            f"{done['target_words']:.1f}), clean {done['clean_before']} -> {done['clean_after']} of {done['replies']}")
    return done


def _decide(setup: RunSetup, resume: bool, force: bool, remake: bool, say: Progress) -> dict:
    """{"status": "up-to-date", "summary"} or {"status": "run", "state": resume state or None}.

    The output's lock comes first, whatever follows: a resumed run (and `run --redo`) writes the same
    `.partial` as any other, so a second process must be refused, not share it.
    """
    lock_output(setup.out, "train")  # train_model releases it, however the run ends
    resumable = resume and (setup.work / RESUME_FILE).is_file()
    if resumable and not remake:
        finished = finished_output(stage_output(setup))
        if finished is not None:  # the unfinished run was of other settings: the finished one is what was asked
            say(f"{setup.out}: already trained with the same model, data and settings, nothing to do "
                f"(the unfinished run in {setup.work} is of other settings and stays)")
            return {"status": "up-to-date", "summary": finished.get("summary", {})}
    existing = None if resumable else check_output(stage_output(setup), force, say, remake)
    if existing:
        say(f"{setup.out}: already trained with the same model, data and settings, nothing to do")
        return {"status": "up-to-date", "summary": existing.get("summary", {})}
    return {"status": "run", "state": prepare_work_dir(setup, resume, force, say)}


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
    memory_check: bool = True,
    preferences: str | Path | None = None,
    on_topic=None,
) -> TrainResult:
    """`gemma-mlx train`: settings from an experiment YAML (or defaults), dotted-key overrides on top.

    The data defaults to the config's `data`, the run name to the config's `name`. With
    `preferences` (a pairs file or directory) the run is DPO from `model`, a fine-tuned persona,
    with the config's `preferences` settings.
    """
    import dataclasses

    from .config import load_config

    config = load_config(config_path, overrides or {})
    if preferences is not None:
        prefs = dataclasses.replace(config.preferences, data=str(preferences))
        return train_model(model, preferences, out=out, lora=config.lora, train=config.train,
                           run_name=run_name or config.name, resume=resume, force=force, progress=progress,
                           memory_check=memory_check, preferences=prefs, on_topic=on_topic)
    return train_model(model, data or config.data, out=out, lora=config.lora, train=config.train,
                       run_name=run_name or config.name, resume=resume, force=force, progress=progress,
                       memory_check=memory_check, on_topic=on_topic)
