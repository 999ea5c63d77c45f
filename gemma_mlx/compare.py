"""`gemma-mlx compare`: the same prompts, settings and seed through several models, side by side.

Each model is loaded once, answers every prompt (x samples) in one batch, and is freed before the
next loads, so peak memory is one model's. Replies are then scored (scoring/scorecard.py) and written as
four views of one results dict (report.py). With a judge model, that model is loaded last and
grades every reply 1-5 against a fixed rubric.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .scoring import best_of as best_of_n, ontopic, scorecard
from .scoring.inputs import (
    check_model_specs,
    collect_prompts,
    find_run_dir,
    manifest_summary,
    read_loss_curve,
    read_persona,
    read_training_data,
)
from .config import GenerationSettings, check_settings, to_dict
from .errors import ConfigError
from .text import plural
from .generate import generate_replies
from .scoring.judge import JUDGE_RUBRIC, JUDGE_SETTINGS, JUDGE_TEMPLATE, judge_replies
from .model_ref import ModelRef, resolve
from .manifest import (
    MANIFEST_NAME,
    Progress,
    StageOutput,
    atomic_output_dir,
    check_output,
    check_writable,
    finish_output,
    now_iso,
    outputs_root,
    quiet,
    sha256_json,
    versions,
)
from .scoring.report import FORMAT, REPORT_FILES, write_reports

MINING_NOTE = (
    "Mined markers are phrases of 2-3 words (not starting or ending with a common word) and names "
    "(capitalised words inside a sentence) found in at least 2% of the training replies (and 3 of them) "
    "but in at most 2% of the base model's replies; the base model is a compared model that was "
    "converted, not fine-tuned. Without training data, or a base model whose replies hold at least 50 "
    "words in all, nothing is mined."
)


@dataclass
class CompareResult:
    out_dir: Path
    results: dict
    status: str = "compared"  # or "up-to-date" (same inputs as the report already there)


@dataclass
class ModelRun:
    """One compared model: how it was loaded and ran, then its scored replies (one record per reply).

    Built by run_model, named by unique_names, scored by score_model, graded by the judge; as_json()
    is its entry in comparison.json.
    """

    loaded_name: str  # the model's own short name
    spec: str
    path: str
    adapter_path: str | None
    stage: str | None  # convert | fuse | base+adapters | None (no manifest)
    manifest: dict | None  # the parts of the model's manifest a reader needs
    load_seconds: float
    generate_seconds: float
    tokens: int
    tokens_per_second: float
    peak_memory_gb: float
    loss_curve: dict | None
    raw_replies: list = field(default_factory=list, repr=False)  # generate.Reply objects, until scored
    name: str = ""  # the display name, unique among the compared models
    replies: list[dict] = field(default_factory=list)
    scorecard: dict = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        """A converted, un-tuned model: the reference for mined markers."""
        return self.stage == "convert"

    @classmethod
    def from_json(cls, entry: dict) -> "ModelRun":
        """A model's entry of a comparison.json, read back (its replies already scored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"raw_replies", "loaded_name"}
        return cls(loaded_name=entry["name"], **{k: v for k, v in entry.items() if k in names})

    def as_json(self) -> dict:
        keys = ("name", "spec", "path", "adapter_path", "stage", "manifest", "load_seconds", "generate_seconds",
                "tokens", "tokens_per_second", "peak_memory_gb", "loss_curve", "scorecard", "replies")
        return {**{k: getattr(self, k) for k in keys}, "is_base": self.is_base}


# ---------------------------------------------------------------------------- generation

def _free_memory() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def run_model(ref: ModelRef, prompts: list[str], settings: GenerationSettings, position: str, progress: Progress,
              best_of: int = 1) -> ModelRun:
    """Load one model, answer every prompt in one batch, free it; timings and peak memory included.

    With best_of > 1 every prompt gets that many candidate rows in the same batch (scoring/best_of.py);
    raw_replies then holds them all, and compare keeps one per prompt after on-topic scoring.
    """
    import mlx.core as mx

    _free_memory()
    mx.reset_peak_memory()
    progress(f"{position} loading {ref.spec}")
    started = time.perf_counter()
    loaded = ref.load()
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rows, row_settings = best_of_n.candidate_rows(prompts, settings, best_of) if best_of > 1 else (prompts, settings)
    replies = generate_replies(loaded, rows, row_settings, progress=lambda m: progress(f"{position} {m}"))
    generate_seconds = time.perf_counter() - started
    peak_gb = mx.get_peak_memory() / 1e9
    tokens = sum(r.tokens for r in replies)
    manifest, adapter_path = ref.manifest, ref.adapters
    run_dir = find_run_dir(manifest, adapter_path)
    entry = ModelRun(
        loaded_name=ref.label,
        spec=ref.spec,
        path=str(ref.dir),
        adapter_path=str(adapter_path) if adapter_path else None,
        stage=ref.stage,
        manifest=manifest_summary(manifest),
        load_seconds=round(load_seconds, 3),
        generate_seconds=round(generate_seconds, 3),
        tokens=tokens,
        tokens_per_second=tokens / generate_seconds if generate_seconds > 0 else 0.0,
        peak_memory_gb=round(peak_gb, 4),
        # the run's kept epoch is marked only when this model is its kept adapters (not its last/)
        loss_curve=read_loss_curve(run_dir / "metrics.jsonl",
                                   kept=Path(adapter_path or (manifest or {}).get("adapters") or ".").name != "last")
        if run_dir else None,
        raw_replies=replies,
    )
    progress(f"{position} {ref.label}: {plural(len(replies), 'reply', 'replies')}, {plural(tokens, 'token')} in {generate_seconds:.1f}s "
             f"({entry.tokens_per_second:.1f} tokens/s, peak {peak_gb:.2f} GB)")
    del loaded
    _free_memory()
    return entry


def unique_names(entries: list[ModelRun]) -> list[str]:
    """Display names: the model's own name, or enough trailing path parts to tell twins apart."""
    names = [e.loaded_name for e in entries]
    if len(set(names)) == len(names):
        return names
    paths = [Path(e.adapter_path or e.path).resolve() for e in entries]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{n} #{i + 1}" for i, n in enumerate(names)]


# ---------------------------------------------------------------------------- scoring

def score_model(entry: ModelRun, prompts: list[str], markers: list[str], out_of_character: list[str],
                training_words: dict | None, topic_scores: list | None = None) -> None:
    """Per-reply flags, then the model's scorecard and one per prompt (over that prompt's samples)."""
    records = []
    for i, r in enumerate(entry.raw_replies):
        flags = scorecard.reply_flags(r.text, r.finish_reason, markers, out_of_character)
        score = topic_scores[i] if topic_scores else None
        flags.update(on_topic_score=score,
                     on_topic=ontopic.is_on_topic(score, r.prompt, r.text) if topic_scores else None)
        records.append({"prompt_index": r.prompt_index, "sample_index": r.sample_index, "text": r.text,
                        "tokens": int(r.tokens), "finish_reason": r.finish_reason, "stop_token": r.stop_token,
                        "seconds": float(r.seconds), "tokens_per_second": float(r.tokens_per_second),
                        **flags, "judge_score": None, "judge_raw": None})
    entry.raw_replies = []
    entry.replies = records
    entry.scorecard = _scorecard(records, prompts, bool(markers), training_words, entry)


def _scorecard(records: list[dict], prompts: list[str], has_markers: bool, training_words, entry: ModelRun) -> dict:
    card = scorecard.summarise([r["text"] for r in records], records, has_markers, training_words)
    scores = [r["judge_score"] for r in records if r["judge_score"] is not None]
    card.update(tokens_per_second=entry.tokens_per_second, peak_memory_gb=entry.peak_memory_gb,
                judge_mean=sum(scores) / len(scores) if scores else None)
    card["per_prompt"] = []
    for index in range(len(prompts)):
        mine = [r for r in records if r["prompt_index"] == index]
        card["per_prompt"].append({"prompt_index": index,
                                   **scorecard.summarise([r["text"] for r in mine], mine, has_markers, training_words)})
    return card


def _warnings(overlaps: list[dict], models: list[dict], settings: GenerationSettings, training: dict | None = None,
              judge: str | None = None) -> list[str]:
    warnings = []
    if judge and models and all(m["scorecard"].get("judge_mean") is None for m in models):
        warnings.append(f"The judge ({judge}) gave no usable score: none of its answers held a rating from 1 to 5 "
                        "(replies.jsonl keeps what it said). The verdict uses the on-topic rate instead; a larger "
                        "instruction-tuned judge rates more reliably.")
    if training and training.get("with_system"):
        warnings.append(
            f"{training['with_system']} of {training['examples']} training examples begin with a system message, and "
            "compare sends each prompt alone, so the models are not asked the way they were trained. Read the replies "
            "with that in mind, or try the persona with its system message in `gemma-mlx chat --system`."
        )
    if overlaps:
        listed = "; ".join(f"prompt {o['prompt_index'] + 1} \"{o['prompt']}\" ~ {o['training_source']}" for o in overlaps[:5])
        warnings.append(
            f"{len(overlaps)} compare prompt(s) appear (nearly) verbatim in the training data, so their replies "
            f"are not held-out evidence: {listed}. Use prompts the model was not trained on."
        )
    for model in models:
        loops = [r for r in model["replies"] if r["loop"]]
        if loops:
            warnings.append(
                f"{model['name']}: {len(loops)} of {len(model['replies'])} replies are loops (word 4-grams repeated 3+ "
                "times cover half the reply), e.g. prompt " f"{loops[0]['prompt_index'] + 1}. Greedy decoding of a small "
                "model does this; a higher --repetition-penalty, --no-repeat-ngram 4 or another checkpoint helps."
            )
        if model["scorecard"]["cut_rate"] and model["scorecard"]["cut_rate"] >= 0.5:
            warnings.append(
                f"{model['name']}: {model['scorecard']['cut_rate']:.0%} of replies hit the {settings.max_tokens}-token "
                "limit; their length and endings say more about the limit than the model (raise --max-tokens)."
            )
    return warnings


# ---------------------------------------------------------------------------- the comparison

def _default_out() -> Path:
    """outputs/compare/<timestamp>[-N], claimed by making it (empty), so two comparisons started in the same
    second each get their own folder."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = outputs_root() / "compare"
    root.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count(1):
        out = root / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def _inputs_key(refs: list[ModelRef], prompts, settings, persona, training, judge: ModelRef | None) -> dict:
    return {
        "models": [{"spec": ref.spec, "identity": list(ref.identity)} for ref in refs],
        "prompts": [t for t, _ in prompts],
        "settings": to_dict(settings),
        "persona": sha256_json(persona),
        "training_data": training["sha256"] if training else None,
        "judge": {"spec": judge.spec, "identity": list(judge.identity)} if judge else None,
    }


def _input_paths(refs: list[ModelRef], prompts: list, persona, training_data, judge: ModelRef | None) -> dict[str, Path]:
    """Everything a comparison reads, which its report directory must never replace (the protocol's rule 1)."""
    paths = {}
    for ref in [*refs, *([judge] if judge else [])]:
        for path in ref.paths:
            paths[f"the model {path}"] = path
    for item in prompts:
        if isinstance(item, Path):
            paths[f"the prompt file {item}"] = item
    if persona:
        paths["the persona spec"] = Path(persona)
    if training_data:
        paths["the training data"] = Path(training_data)
    return paths


def _existing_results(out: Path) -> dict | None:
    """An up-to-date output's comparison.json; None when it is damaged (bad bytes, bad JSON, another
    shape: report.validate_results), so the comparison is made again instead of trusted."""
    from .scoring.report import validate_results

    try:
        results = json.loads((out / "comparison.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return None
    return results if isinstance(results, dict) and not validate_results(results) else None


def _results(settings, prompt_pairs, persona_info, mined, training, overlaps, judge, entries) -> dict:
    """The results dict every report file is rendered from (shape: report.SCHEMA, README)."""
    overlapping = {o["prompt_index"] for o in overlaps}
    return {
        "format": FORMAT,
        "created": now_iso(),
        "versions": versions(),
        "settings": to_dict(settings),
        "seed": settings.seed,
        "samples": settings.samples,
        "prompts": [{"index": i, "text": t, "source": s, "overlaps_training": i in overlapping}
                    for i, (t, s) in enumerate(prompt_pairs)],
        "persona": {**{k: persona_info[k] for k in ("path", "name", "description", "markers")},
                    "mined_markers": mined, "out_of_character": persona_info["out_of_character"], "mining": MINING_NOTE},
        "training_data": training,
        "overlaps": overlaps,
        "warnings": [],
        "judge": {"model": judge, "rubric": JUDGE_RUBRIC, "template": JUDGE_TEMPLATE,
                  "settings": to_dict(dataclasses.replace(JUDGE_SETTINGS, seed=settings.seed))} if judge else None,
        "models": [e.as_json() for e in entries],
        "seconds": 0.0,
    }


def _write(output: StageOutput, results: dict) -> None:
    """The four report files and the stage manifest, all or nothing."""
    with atomic_output_dir(output.path, force=True) as tmp:
        write_reports(tmp, results)
        finish_output(tmp, output, {
            "inputs": output.key,
            "settings": results["settings"],
            "files": list(REPORT_FILES),
            "versions": results["versions"],
            "seconds": results["seconds"],
            "created": results["created"],
            "metrics": {m["name"]: {k: v for k, v in m["scorecard"].items() if k != "per_prompt"}
                        for m in results["models"]},
        })


def compare_models(
    models: list[str],
    prompts: list[str] | list[Path],
    settings: GenerationSettings = GenerationSettings(),
    persona: Path | None = None,
    training_data: Path | None = None,
    out: Path | None = None,
    judge: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
    remake: bool = False,
    best_of: int = 1,
    on_topic_model: str | None = None,
) -> CompareResult:
    """Run every prompt through every model with identical settings and seed; write the report dir.

    models: converted or fused model dirs, or "BASE_DIR::ADAPTER_DIR". prompts: prompt files (Path)
    and/or prompt texts (str); repeats are dropped, first kept. An existing comparison report at
    `out` made from the same inputs is a no-op (status "up-to-date"); a different report, or any
    other non-empty directory, is refused unless force, and then replaced in one rename.

    on_topic_model: the base model that scores whether replies answer their prompt (scoring/ontopic.py);
    by default a compared un-tuned model or the adapters' base, and none (no on-topic numbers) when
    neither is there. best_of: answer each prompt that many times in the same batch and keep the
    reply scoring/best_of.py picks.
    """
    progress = progress or quiet
    started = time.perf_counter()
    check_settings(settings)  # a bad setting fails now, not after the first model has loaded
    prompt_pairs = collect_prompts(list(prompts))
    refs = check_model_specs([str(m) for m in models])  # each spec resolved here, once; ModelRefs from here on
    judge_ref = resolve(judge) if judge else None
    persona_info = read_persona(persona)
    training, training_replies, training_prompts = read_training_data(training_data)
    inputs = _inputs_key(refs, prompt_pairs, settings, persona_info, training, judge_ref)
    if best_of < 1:
        raise ConfigError(f"--best-of must be 1 or more, not {best_of}.")
    on_topic_model = on_topic_model or ontopic.default_scoring_model(refs)
    on_topic_ref = resolve(on_topic_model) if on_topic_model else None
    if on_topic_ref:
        inputs["on_topic"] = {"model": on_topic_ref.identity[0],
                              "threshold": ontopic.ON_TOPIC_THRESHOLD, "best_of": best_of}
    elif best_of > 1:
        inputs["best_of"] = best_of
    out = Path(out) if out else _default_out()
    output = StageOutput("compare", out, key=inputs,
                         inputs=_input_paths(refs, list(prompts), persona, training_data, judge_ref))
    existing = check_output(output, force, progress, remake) and _existing_results(out)
    if existing:
        progress(f"compare: {out} already holds this comparison (same models, prompts and settings), nothing to do")
        return CompareResult(out, existing, "up-to-date")
    check_writable(out.parent)

    texts = [t for t, _ in prompt_pairs]
    entries = []
    for i, ref in enumerate(refs):
        entries.append(run_model(ref, texts, settings, f"[model {i + 1}/{len(refs)}]", progress, best_of))
    for entry, name in zip(entries, unique_names(entries)):
        entry.name = name
    topic = (ontopic.score_reply_lists(on_topic_ref, [e.raw_replies for e in entries], progress)
             if on_topic_ref else [None] * len(entries))
    if best_of > 1:
        target = training["reply_words"]["mean"] if training else None
        for k, entry in enumerate(entries):
            entry.raw_replies, topic[k], _ = best_of_n.choose(entry.raw_replies, best_of, topic[k], target)

    base_replies = [r.text for e in entries if e.is_base for r in e.raw_replies]
    mined = scorecard.mine_markers(training_replies, base_replies, exclude=persona_info["markers"])
    markers = persona_info["markers"] + mined
    for entry, scores in zip(entries, topic):
        score_model(entry, texts, markers, persona_info["out_of_character"],
                    training["reply_words"] if training else None, scores)
    if judge:
        judge_replies(judge_ref, texts, entries, persona_info, settings.seed, progress)
        _free_memory()
        for entry in entries:
            entry.scorecard = _scorecard(entry.replies, texts, bool(markers),
                                         training["reply_words"] if training else None, entry)

    overlaps = scorecard.find_overlaps(texts, training_prompts)
    results = _results(settings, prompt_pairs, persona_info, mined, training, overlaps, judge, entries)
    results["warnings"] = _warnings(overlaps, results["models"], settings, training, judge_ref.spec if judge else None)
    results["on_topic"] = {"model": on_topic_model, "threshold": ontopic.ON_TOPIC_THRESHOLD} if on_topic_model else None
    results["best_of"] = best_of
    results["seconds"] = round(time.perf_counter() - started, 3)

    _write(output, results)
    progress(f"compare: wrote {out} ({', '.join(REPORT_FILES)}, {MANIFEST_NAME})")
    return CompareResult(out, results)
