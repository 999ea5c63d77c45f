"""The `gemma-mlx data` commands as library functions: check a dataset, summarise it, split it.

examples.py reads records and reports what makes them invalid; the checks here judge a dataset that
reads fine but would train badly: duplicate prompts, examples longer than training keeps, overlap
with the evaluation prompts, and reply lengths so alike that the model learns one length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .chat_format import encode
from .families import family_of_tokenizer
from .models import model_dir_path
from .examples import (
    NEAR_DUPLICATE_JACCARD,
    Example,
    Parsed,
    Problem,
    data_hash,
    load_examples,
    near_duplicate_pairs,
    normalise,
    parse_dataset,
    split_dir_files,
    split_examples,
)
from .errors import DataError
from .persona import count_markers, load_persona
from .prompts import read_prompt_lines
from .text import length_stats, plural, word_count
from .manifest import Progress, StageOutput, atomic_output_dir, check_output, finish_output, now_iso, quiet, versions

LOW_SPREAD_CV = 0.25  # reply words' coefficient of variation below this: "all alike"
MIN_REPLIES_FOR_SPREAD = 5


@dataclass
class CheckReport:
    errors: list[Problem]
    warnings: list[Problem]
    examples: int
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ---------------------------------------------------------------- tokens


def load_tokenizer(model: str | Path):
    """Only the tokenizer of a model dir (or of a model converted under outputs/models/<name>)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    path = model_dir_path(model)
    if not path.is_dir() or not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise DataError(
            f"{model} is not a model directory with a tokenizer, so tokens cannot be counted. Give a converted "
            "model dir (gemma-mlx convert writes outputs/models/<name>) or a Hugging Face checkpoint dir."
        )
    return mlx_load_tokenizer(path)


def token_counts(examples: list[Example], tokenizer) -> list[tuple[int, int | None]]:
    """(tokens of the whole example in the Gemma turn format, tokens of its reply) per example."""
    counts, family = [], family_of_tokenizer(tokenizer)
    for example in examples:
        if example.messages is None:
            counts.append((len(encode(tokenizer, family.bos + example.text)), None))
        else:
            counts.append((len(encode(tokenizer, family.render(example.messages))), len(encode(tokenizer, example.reply))))
    return counts


# ---------------------------------------------------------------- checks


def duplicate_findings(examples: list[Example]) -> list[dict]:
    """Exact and near-duplicate prompt pairs, with where each one is."""
    pairs = near_duplicate_pairs([e.prompt for e in examples])
    return [
        {"where": examples[j].source, "other": examples[i].source, "similarity": score,
         "kind": "exact" if normalise(examples[i].prompt) == normalise(examples[j].prompt) else "near",
         "prompt": examples[j].prompt}
        for i, j, score in pairs
    ]


def overlap_findings(examples: list[Example], prompt_files) -> list[dict]:
    """Training prompts that equal or nearly equal an evaluation prompt."""
    findings = []
    for prompt_file in prompt_files:
        eval_prompts = read_prompt_lines(prompt_file)
        texts = [e.prompt for e in examples] + [p for p, _ in eval_prompts]
        n = len(examples)
        for i, j, score in near_duplicate_pairs(texts):
            if i < n <= j:
                prompt, where = eval_prompts[j - n]
                findings.append({"where": examples[i].source, "eval_prompt": prompt, "eval_where": where,
                                 "similarity": score, "prompt": examples[i].prompt})
    return findings


def _spread_warning(path, replies: list[str]) -> Problem | None:
    if len(replies) < MIN_REPLIES_FOR_SPREAD:
        return None
    spread = length_stats([word_count(r) for r in replies])
    if spread["cv"] is None or spread["cv"] >= LOW_SPREAD_CV:
        return None
    return Problem(str(path), (
        f"reply lengths are all alike: {spread['min']}-{spread['max']} words, mean {spread['mean']:.1f}, "
        f"coefficient of variation {spread['cv']:.2f} (below {LOW_SPREAD_CV}). A fine-tuned model copies the "
        "length of its training replies, so it will answer everything at about this length; add short and long replies."))


def grouped_problems(problems: list[Problem], kind: str, shown: int = 3) -> list[str]:
    """`file:line: kind: message` lines in order; a message that repeats more than `shown` + 2 times is
    shown `shown` times and then summed up in one line (a 4,800-line file of another tool's shape is
    one problem, not 4,800 lines)."""
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.message, []).append(problem)
    lines, seen = [], {}
    for problem in problems:
        group = groups[problem.message]
        count = seen[problem.message] = seen.get(problem.message, 0) + 1
        if len(group) <= shown + 2 or count <= shown:
            lines.append(f"{problem.where}: {kind}: {problem.message}")
        elif count == shown + 1:
            lines.append(f"{problem.where}: {kind}: ... and {len(group) - shown} more with the same {kind} "
                         f"(the last at {group[-1].where})")
    return lines


def check_dataset(path, model: str | Path | None = None, prompts: list[Path] = (),
                  max_seq_length: int = 512) -> CheckReport:
    """Every error (invalid records) and warning (duplicates, too long, eval overlap, low spread) of a dataset."""
    if max_seq_length < 8:
        raise DataError(f"--max-seq-length is {max_seq_length}; it must be at least 8 (tokens), like train.max_seq_length.")
    parsed = parse_dataset(path)
    examples = parsed.examples
    warnings = list(parsed.warnings)
    for d in duplicate_findings(examples):
        kind = "an exact" if d["kind"] == "exact" else f"a near (similarity {d['similarity']:.2f})"
        warnings.append(Problem(d["where"], (
            f"the prompt is {kind} duplicate of the one at {d['other']}; duplicates weigh one idea double "
            "and can leak between train and validation")))
    for d in overlap_findings(examples, prompts):
        warnings.append(Problem(d["where"], (
            f"the prompt {d['prompt']!r} matches the evaluation prompt at {d['eval_where']} "
            f"(similarity {d['similarity']:.2f}); a model tested on what it was trained on looks better than it is. "
            "Remove or rewrite one of them")))
    if model is not None and examples:
        tokenizer = load_tokenizer(model)
        for example, (tokens, _) in zip(examples, token_counts(examples, tokenizer)):
            if tokens > max_seq_length:
                warnings.append(Problem(example.source, (
                    f"{tokens} tokens, longer than the training max_seq_length of {max_seq_length}; training "
                    "truncates it and the end of the reply is never learned. Shorten it or raise max_seq_length")))
    replies = [e.reply for e in examples if e.reply is not None]
    low_spread = _spread_warning(path, replies)
    if low_spread:
        warnings.append(low_spread)
    return CheckReport(errors=parsed.errors, warnings=warnings, examples=len(examples), files=parsed.files)


# ---------------------------------------------------------------- stats


def _persona_path(path, persona: Path | None) -> Path | None:
    if persona is not None:
        return Path(persona)
    from .persona import persona_beside

    return persona_beside(path)


def histogram(values: list[int], max_bins: int = 10) -> list[dict]:
    """Equal-width bins with a round width (5, 10, 20, 25, 50, ...), covering min..max."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = next(w for w in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9)
                 if (high // w - low // w + 1) <= max_bins)
    start = low // width * width
    bins = []
    while start <= high:
        bins.append({"from": start, "to": start + width - 1, "count": sum(start <= v < start + width for v in values)})
        start += width
    return bins


def marker_table(replies: list[str], markers: list[str]) -> list[dict]:
    """Per marker: occurrences and replies containing it, most frequent first."""
    rows = []
    for marker in markers:
        counts = [count_markers(r, [marker])[marker] for r in replies]
        rows.append({"marker": marker, "count": sum(counts), "replies": sum(c > 0 for c in counts)})
    return sorted(rows, key=lambda r: (-r["count"], r["marker"]))


def dataset_stats(path, model: str | Path | None = None, prompts: list[Path] = (),
                  persona: Path | None = None) -> dict:
    """Counts, reply-length spread (words; tokens with a model), markers, duplicates, prompt overlap."""
    parsed: Parsed = parse_dataset(path)
    if parsed.errors:
        raise DataError(
            f"{path} has {len(parsed.errors)} invalid record(s), first: {parsed.errors[0]}. "
            f"Run `gemma-mlx data check {path}` and fix them first."
        )
    examples = parsed.examples
    replies = [e.reply for e in examples if e.reply is not None]
    reply_words = [word_count(r) for r in replies]
    stats = {
        "path": str(path),
        "files": {f: sum(e.source.rsplit(":", 1)[0] == f for e in examples) for f in parsed.files},
        "examples": len(examples),
        "shapes": parsed.shapes,
        "with_system_message": sum(bool(e.messages) and e.messages[0]["role"] == "system" for e in examples),
        "multi_turn": sum(bool(e.messages) and sum(m["role"] == "assistant" for m in e.messages) > 1 for e in examples),
        "prompt_words": length_stats([word_count(e.prompt) for e in examples]),
        "reply_words": length_stats(reply_words),
        "reply_words_histogram": histogram(reply_words),
        "duplicates": duplicate_findings(examples),
        "prompt_overlap": overlap_findings(examples, prompts),
        "prompt_files": [str(p) for p in prompts],
    }
    if model is not None:
        counts = token_counts(examples, load_tokenizer(model))
        reply_tokens = [r for _, r in counts if r is not None]
        stats["model"] = str(model)
        stats["example_tokens"] = length_stats([t for t, _ in counts])
        stats["reply_tokens"] = length_stats(reply_tokens)
        stats["reply_tokens_histogram"] = histogram(reply_tokens)
    persona_path = _persona_path(path, persona)
    if persona_path is not None:
        spec = load_persona(persona_path)
        table = marker_table(replies, spec.markers)
        stats["persona"] = {
            "file": str(persona_path), "name": spec.name, "markers": table,
            "replies_with_marker": sum(any(count_markers(r, spec.markers).values()) for r in replies),
            "out_of_character": [row for row in marker_table(replies, spec.out_of_character) if row["count"]],
        }
    return stats


def _spread_line(label: str, s: dict) -> str:
    if not s.get("n"):
        return f"{label}: none"
    cv = "n/a" if s["cv"] is None else f"{s['cv']:.2f}"
    return (f"{label}: min {s['min']}  q1 {s['q1']:g}  median {s['median']:g}  mean {s['mean']:.1f}  "
            f"q3 {s['q3']:g}  max {s['max']}  (cv {cv})")


def _histogram_lines(bins: list[dict], width: int = 40) -> list[str]:
    top = max((b["count"] for b in bins), default=0) or 1
    label = max((len(f"{b['from']}-{b['to']}") for b in bins), default=0)
    lines = []
    for b in bins:
        span, bar = f"{b['from']}-{b['to']}", "#" * round(width * b["count"] / top)
        lines.append(f"  {span:>{label}} | {bar:<{width}} {b['count']}")
    return lines


def render_stats(stats: dict) -> str:
    """The stats as a short readable text (the --json output carries the same numbers)."""
    shapes = ", ".join(f"{n} {k}" for k, n in sorted(stats["shapes"].items()))
    lines = [f"{stats['path']}: {plural(stats['examples'], 'example')} ({shapes})"]
    lines += [f"  {name}: {count}" for name, count in stats["files"].items()]
    lines.append(f"with a system message: {stats['with_system_message']}; multi-turn: {stats['multi_turn']}")
    lines.append(_spread_line("prompt words", stats["prompt_words"]))
    lines.append(_spread_line("reply words", stats["reply_words"]))
    lines += _histogram_lines(stats["reply_words_histogram"])
    if "reply_tokens" in stats:
        lines.append(_spread_line(f"example tokens ({stats['model']})", stats["example_tokens"]))
        lines.append(_spread_line("reply tokens", stats["reply_tokens"]))
        lines += _histogram_lines(stats["reply_tokens_histogram"])
    if "persona" in stats:
        p = stats["persona"]
        lines.append(f"persona markers ({p['name']}, {p['file']}): {p['replies_with_marker']} of "
                     f"{stats['reply_words']['n']} replies have at least one")
        lines += [f"  {row['marker']:<20} {row['count']:>4} times in {row['replies']} replies" for row in p["markers"][:15]]
        if p["out_of_character"]:
            lines.append("out-of-character phrases: " + ", ".join(f"{r['marker']} ({r['count']})" for r in p["out_of_character"]))
    lines.append(f"duplicate prompts: {len(stats['duplicates'])}")
    lines += [f"  {d['where']}: {d['kind']} duplicate of {d['other']} ({d['similarity']:.2f})" for d in stats["duplicates"]]
    if stats["prompt_files"]:
        lines.append(f"overlap with {', '.join(stats['prompt_files'])}: {len(stats['prompt_overlap'])}")
        lines += [f"  {d['where']}: matches {d['eval_where']} ({d['similarity']:.2f})" for d in stats["prompt_overlap"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- split


@dataclass
class SplitResult:
    out_dir: Path
    counts: dict[str, int]
    status: str  # "split" | "up-to-date"


def _record(example: Example) -> dict:
    """A split line: chat records as {"messages"} (prompt/completion ones too), text records as {"text"}."""
    return {"messages": example.messages} if example.messages is not None else {"text": example.text}


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps(_record(e), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")


def split_dataset(path, out: Path, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                  force: bool = False, progress: Progress = quiet, remake: bool = False) -> SplitResult:
    """Write train/valid/test.jsonl (mlx-lm's layout; chat records, text ones as text) + manifest; same inputs: a no-op."""
    out = Path(out)
    inputs = {"source_sha256": data_hash(path), "seed": seed,
              "valid_fraction": valid_fraction, "test_fraction": test_fraction}
    output = StageOutput("split", out, key=inputs,
                         inputs={"the dataset it splits": Path(path)} if Path(path).exists() else {})
    existing = check_output(output, force, progress, remake)
    if existing:
        progress(f"{out}: already split from the same data with the same settings, nothing to do")
        return SplitResult(out, existing["counts"], "up-to-date")
    started = time.perf_counter()
    examples = load_examples(path)
    if split_dir_files(path):
        progress(f"note: {path} is already split (train/valid/test.jsonl); its {len(examples)} examples are pooled and split afresh")
    splits = split_examples(examples, seed, valid_fraction, test_fraction)
    counts = {name: len(getattr(splits, name)) for name in ("train", "valid", "test")}
    empty = [name for name, fraction in (("valid", valid_fraction), ("test", test_fraction)) if fraction and not counts[name]]
    if empty:
        raise DataError(
            f"{path} has {len(examples)} example(s): too few to give the {' and '.join(empty)} set(s) even one "
            f"(valid {valid_fraction:g}, test {test_fraction:g} of them). Add examples, or set the fraction to 0 to "
            "do without that set."
        )
    with atomic_output_dir(out, force=True) as tmp:
        for name in ("train", "valid", "test"):
            _write_jsonl(tmp / f"{name}.jsonl", getattr(splits, name))
        finish_output(tmp, output, {
            "source": str(Path(path).resolve()) if Path(path).exists() else str(path), **inputs,
            "near_duplicate_jaccard": NEAR_DUPLICATE_JACCARD, "counts": counts,
            "seconds": round(time.perf_counter() - started, 3), "created": now_iso(), "versions": versions(),
        })
    progress(f"{out}: {counts['train']} train, {counts['valid']} valid, {counts['test']} test")
    return SplitResult(out, counts, "split")
