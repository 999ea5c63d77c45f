"""What a comparison is about: its prompts, model specs, persona, training data, and training runs.

Everything here is read and checked before any model loads, so a typo in the last argument fails
in a second instead of after the first model has generated.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, DataError
from ..model_ref import ModelRef, resolve
from ..text import length_stats, word_count


def collect_prompts(prompts: list[str | Path]) -> list[tuple[str, str]]:
    """(text, source) pairs from prompt files (Path) and inline prompts (str), first copy kept.

    An empty or unreadable file is an error rather than a silent zero-prompt comparison.
    """
    from ..prompts import read_prompt_lines

    found: list[tuple[str, str]] = []
    for item in prompts:
        if isinstance(item, Path):
            if item.is_dir():
                raise DataError(f"{item} is a directory. --prompts takes a text file with one prompt per line (or JSONL).")
            try:
                found += read_prompt_lines(item)  # DataError (with file:line) for missing, empty or invalid files
            except OSError as error:
                raise DataError(
                    f"Cannot read prompt file {item} ({error.strerror or error}). Check its permissions, "
                    "or copy the prompts to a readable UTF-8 text file."
                ) from None
        else:
            if not str(item).strip():
                raise DataError("An inline prompt is empty. Give some text, or leave the option out.")
            found.append((str(item), "argument"))
    unique, seen = [], set()
    for text, source in found:
        if text not in seen:
            seen.add(text)
            unique.append((text, source))
    if not unique:
        raise DataError("No prompts to compare. Pass --prompts FILE (one prompt per line) or --prompt TEXT.")
    return unique


def check_model_specs(models: list[str]) -> list[ModelRef]:
    """Every model spec resolved once (model_ref.resolve), before any model loads: a model or adapter
    directory that is missing or incomplete, or a model named twice, fails here."""
    if not models:
        raise CheckpointError("No models to compare. Give one or more model directories (or BASE::ADAPTERS).")
    refs = [resolve(spec) for spec in models]
    seen = set()
    for ref in refs:
        if ref.same_as in seen:
            raise CheckpointError(f"Model {ref.spec} is given twice. Each model is compared once; remove the repeat.")
        seen.add(ref.same_as)
    return refs


def read_training_data(training_data: Path | None) -> tuple[dict | None, list[str], list[tuple[str, str]]]:
    """(summary, training replies, (training prompt, source) pairs) of a persona dataset."""
    if training_data is None:
        return None, [], []
    from ..examples import data_hash, load_examples, load_splits, split_dir_files

    path = Path(training_data)
    # a split folder (a run's data/) gives its train split: the valid and test replies were never trained on
    examples = [e for e in (load_splits(path).train if split_dir_files(path) else load_examples(path)) if e.messages]
    replies = [e.reply for e in examples if e.reply]
    prompts = [(e.prompt, e.source) for e in examples if e.prompt]
    summary = {
        "path": str(training_data),
        "sha256": data_hash(Path(training_data)),
        "examples": len(examples),
        "reply_words": length_stats([word_count(r) for r in replies]),
        # compare sends each prompt alone: a persona trained behind a system message is not asked that way
        "with_system": sum(1 for e in examples if e.messages[0]["role"] == "system"),
    }
    return summary, replies, prompts


def read_persona(persona: Path | None) -> dict:
    if persona is None:
        return {"path": None, "name": None, "description": None, "markers": [], "out_of_character": []}
    from ..persona import load_persona

    spec = load_persona(Path(persona))
    return {"path": str(persona), "name": spec.name, "description": spec.description,
            "markers": list(spec.markers), "out_of_character": list(spec.out_of_character)}


# ---------------------------------------------------------------------------- training runs

def read_loss_curve(metrics_file: Path, kept: bool = True) -> dict | None:
    """Train/valid (epoch, loss) points from a training run's metrics.jsonl (bad lines are skipped),
    the clean greedy endings at each validation (the count that picks the kept adapters), and, when
    `kept` (the model is the run's kept adapters, not its last/), the kept epoch from summary.json;
    also summary.json's per-validation table (`validations`, shown by the report) when the run wrote one."""
    curve = {"source": str(metrics_file), "train": [], "valid": [], "clean": [], "clean_of": None, "kept_epoch": None,
             "validations": []}
    for line in metrics_file.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            split, epoch, loss = record["split"], float(record["epoch"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if split in ("train", "valid"):
            curve[split].append([epoch, loss])
        if split == "valid" and isinstance(record.get("gen_clean"), int):
            curve["clean"].append([epoch, record["gen_clean"]])
            curve["clean_of"] = max(curve["clean_of"] or 0, int(record.get("gen_replies") or 0)) or None
    try:
        summary = json.loads((metrics_file.parent / "summary.json").read_text())
        curve["kept_epoch"] = float(summary["best_epoch"]) if kept and summary.get("best_epoch") is not None else None
        table = summary.get("validations")
        curve["validations"] = [row for row in table if isinstance(row, dict)] if isinstance(table, list) else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return curve if curve["train"] or curve["valid"] else None


def find_run_dir(manifest: dict | None, adapter_path: Path | None) -> Path | None:
    """The training run a model came from: its adapters dir, or the one a fused model's manifest records."""
    candidates = []
    if adapter_path:
        candidates.append(Path(adapter_path))
    if manifest and manifest.get("adapters"):
        candidates.append(Path(manifest["adapters"]))
    for directory in candidates:
        for run_dir in (directory, directory.parent):  # adapters may be the run's last/ checkpoint
            if (run_dir / "metrics.jsonl").is_file():
                return run_dir
    return None


def manifest_summary(manifest: dict | None) -> dict | None:
    """The parts of a model's manifest a reader of the comparison needs (not the whole train log)."""
    if not manifest:
        return None
    keep = ("stage", "name", "flavour", "model_type", "settings", "base_model", "adapters", "created", "source")
    summary = {k: manifest[k] for k in keep if k in manifest}
    train = manifest.get("train_manifest")
    if isinstance(train, dict):
        summary["train"] = {k: train[k] for k in ("settings", "summary", "data_sha256", "created") if k in train}
    return summary
