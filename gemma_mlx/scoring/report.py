"""Render a comparison's results dict into comparison.txt, .md, .json, replies.jsonl and report.html.

The results dict (built by compare.py, shape checked by `validate_results` and documented in the
README) is the single source: every file is a view of it, so the four can never disagree. The HTML
page is self-contained (inline CSS and SVG, no scripts, no external assets) so it can be mailed or
opened offline years later; all model text is escaped.
"""

from __future__ import annotations

import csv
import html
import json
import re
import textwrap
from pathlib import Path

from ..families import FAMILIES
from ..manifest import write_json
from ..persona import phrase_pattern
from ..text import fold_apostrophes, plural
from ..plot import clean_axis, kept_label, line_chart
from .report_validations import validations_html, validations_markdown, validations_note

FORMAT = "gemma-mlx-compare/1"
# the normal endings (every family's turn end and <eos>); any other stop token is shown
QUIET_STOPS = (*dict.fromkeys(t for f in FAMILIES for t in (f.turn_end, f.eos)), None)
REPORT_FILES = ("comparison.txt", "comparison.md", "comparison.json", "replies.jsonl", "scorecard.csv", "report.html")


# ---------------------------------------------------------------------------- shape of the results

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

_SCORECARD = {
    "replies": int, "mean_words": _OPT_NUM, "median_words": _OPT_NUM, "words_stdev": _OPT_NUM,
    "words_cv": _OPT_NUM, "min_words": _OPT_NUM, "max_words": _OPT_NUM, "mean_words_vs_training": _OPT_NUM,
    "cut_rate": _OPT_NUM, "stop_rate": _OPT_NUM, "loop_rate": _OPT_NUM, "mid_sentence_rate": _OPT_NUM,
    "empty_rate": _OPT_NUM, "persona_marker_rate": _OPT_NUM, "out_of_character_hits": int, "out_of_character_rate": _OPT_NUM,
    "distinct_1": _OPT_NUM, "distinct_2": _OPT_NUM,
}
_REPLY = {
    "prompt_index": int, "sample_index": int, "text": str, "tokens": int, "finish_reason": str,
    "stop_token": _OPT_STR, "seconds": _NUM, "tokens_per_second": _NUM, "words": int, "cut": bool,
    "loop": bool, "mid_sentence": bool, "empty": bool, "markers": [str], "out_of_character": [str],
    "judge_score": (int, type(None)), "judge_raw": _OPT_STR,
}
SCHEMA = {
    "format": str, "created": str, "versions": dict, "settings": dict, "seed": int, "samples": int,
    "prompts": [{"index": int, "text": str, "source": str, "overlaps_training": bool}],
    "persona": {"path": _OPT_STR, "name": _OPT_STR, "markers": [str], "mined_markers": [str],
                "out_of_character": [str], "mining": str},
    "training_data": (dict, type(None)),
    "overlaps": [{"prompt_index": int, "prompt": str, "training_prompt": str, "training_source": str,
                  "similarity": _NUM}],
    "warnings": [str],
    "judge": (dict, type(None)),
    "models": [{
        "name": str, "spec": str, "path": str, "adapter_path": _OPT_STR, "stage": _OPT_STR, "is_base": bool,
        "manifest": (dict, type(None)), "load_seconds": _NUM, "generate_seconds": _NUM, "tokens": int,
        "tokens_per_second": _NUM, "peak_memory_gb": _NUM, "loss_curve": (dict, type(None)),
        "scorecard": {**_SCORECARD, "tokens_per_second": _NUM, "peak_memory_gb": _NUM,
                      "judge_mean": _OPT_NUM, "per_prompt": [{"prompt_index": int, **_SCORECARD}]},
        "replies": [_REPLY],
    }],
    "seconds": _NUM,
}
_RATES = ("cut_rate", "stop_rate", "loop_rate", "mid_sentence_rate", "empty_rate", "persona_marker_rate", "out_of_character_rate",
          "distinct_1", "distinct_2")


def _check(value, spec, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:  # bool is an int in Python; not in JSON
            problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got bool")
        elif not isinstance(value, types):
            problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")


def validate_results(results: dict) -> list[str]:
    """Problems with a comparison.json dict (empty list: valid): keys, types, ranges, cross-references."""
    problems: list[str] = []
    _check(results, SCHEMA, "$", problems)
    if problems:
        return problems
    if results["format"] != FORMAT:
        problems.append(f"$.format: expected {FORMAT!r}, got {results['format']!r}")
    n_prompts = len(results["prompts"])
    for m, model in enumerate(results["models"]):
        where = f"$.models[{m}]"
        card = model["scorecard"]
        for name in _RATES:
            value = card[name]
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{where}.scorecard.{name}: {value} is not in [0, 1]")
        for name in ("mean_words", "median_words", "min_words", "max_words"):
            if card[name] is not None and card[name] < 0:
                problems.append(f"{where}.scorecard.{name}: {card[name]} is negative")
        expected = n_prompts * results["samples"]
        if len(model["replies"]) != expected:
            problems.append(f"{where}.replies: {len(model['replies'])} replies, expected {expected}")
        for r, reply in enumerate(model["replies"]):
            if not 0 <= reply["prompt_index"] < n_prompts:
                problems.append(f"{where}.replies[{r}].prompt_index: {reply['prompt_index']} out of range")
            if reply["finish_reason"] not in ("stop", "length"):
                problems.append(f"{where}.replies[{r}].finish_reason: {reply['finish_reason']!r}")
            if reply["cut"] != (reply["finish_reason"] == "length"):
                problems.append(f"{where}.replies[{r}].cut disagrees with finish_reason")
            if reply["judge_score"] is not None and not 1 <= reply["judge_score"] <= 5:
                problems.append(f"{where}.replies[{r}].judge_score: {reply['judge_score']} not in 1..5")
    return problems


# ---------------------------------------------------------------------------- number formatting

def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _words_spread(card: dict) -> str:
    if card["words_stdev"] is None:
        return "n/a"
    cv = "" if card["words_cv"] is None else f" (CV {card['words_cv']:.2f})"
    return f"{card['words_stdev']:.1f}{cv}"


# (label, function of a model's scorecard) in display order; the judge row appears only with a judge.
SCORE_ROWS = [
    ("replies", lambda c: str(c["replies"])),
    ("mean words", lambda c: _num(c["mean_words"])),
    ("median words", lambda c: _num(c["median_words"])),
    ("words stdev", _words_spread),
    ("words min-max", lambda c: "n/a" if c["min_words"] is None else f"{c['min_words']}-{c['max_words']}"),
    ("mean words / training", lambda c: _num(c["mean_words_vs_training"], 2)),
    ("stopped by itself", lambda c: _pct(c["stop_rate"])),
    ("cut by token limit", lambda c: _pct(c["cut_rate"])),
    ("loops (repeats itself)", lambda c: _pct(c["loop_rate"])),
    ("ended cleanly (stopped, no loop)", lambda c: _pct(c.get("clean_rate"))),
    ("ends mid-sentence (not cut)", lambda c: _pct(c["mid_sentence_rate"])),
    ("empty replies", lambda c: _pct(c["empty_rate"])),
    ("persona-marker rate", lambda c: _pct(c["persona_marker_rate"])),
    ("on topic (answers the prompt)", lambda c: _pct(c.get("on_topic_rate"))),
    ("out-of-character hits", lambda c: str(c["out_of_character_hits"])),
    ("distinct-1", lambda c: _num(c["distinct_1"], 2)),
    ("distinct-2", lambda c: _num(c["distinct_2"], 2)),
    ("judge mean (1-5)", lambda c: _num(c["judge_mean"], 2)),
    ("tokens/s", lambda c: _num(c["tokens_per_second"])),
    ("peak memory GB", lambda c: _num(c["peak_memory_gb"], 3)),
]
# The training data's reply lengths, shown beside the models' for the length rows.
_TRAINING_ROWS = {
    "mean words": lambda t: _num(t["mean"]),
    "median words": lambda t: _num(t["median"]),
    "words stdev": lambda t: _words_spread({"words_stdev": t["stdev"], "words_cv": t["cv"]}),
    "words min-max": lambda t: "n/a" if t["min"] is None else f"{t['min']}-{t['max']}",
    "replies": lambda t: str(t["n"]),
}


def scorecard_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the scorecard (metrics down, models across, training replies last)."""
    training = (results.get("training_data") or {}).get("reply_words")
    header = ["", *(m["name"] for m in results["models"])] + (["training replies"] if training else [])
    rows = []
    for label, cell in SCORE_ROWS:
        if label.startswith("judge") and not results.get("judge"):
            continue
        if label.startswith("on topic") and not results.get("on_topic"):
            continue
        row = [label, *(cell(m["scorecard"]) for m in results["models"])]
        if training:
            row.append(_TRAINING_ROWS[label](training) if label in _TRAINING_ROWS else "")
        rows.append(row)
    return header, rows


# The best value of a scorecard row, highlighted in every report: (scorecard key, "max" | "min" | "near1").
BEST = {
    "stopped by itself": ("stop_rate", "max"), "cut by token limit": ("cut_rate", "min"),
    "loops (repeats itself)": ("loop_rate", "min"), "ended cleanly (stopped, no loop)": ("clean_rate", "max"),
    "ends mid-sentence (not cut)": ("mid_sentence_rate", "min"), "empty replies": ("empty_rate", "min"),
    "persona-marker rate": ("persona_marker_rate", "max"), "on topic (answers the prompt)": ("on_topic_rate", "max"),
    "out-of-character hits": ("out_of_character_hits", "min"), "distinct-1": ("distinct_1", "max"),
    "distinct-2": ("distinct_2", "max"), "judge mean (1-5)": ("judge_mean", "max"),
    "mean words / training": ("mean_words_vs_training", "near1"),  # closest to the training replies' length
    "tokens/s": ("tokens_per_second", "max"), "peak memory GB": ("peak_memory_gb", "min"),
}


def best_columns(results: dict) -> dict[str, set[int]]:
    """For each scorecard row with a better direction, the models (indexes) holding its best value.

    Nothing is marked with a single model, or where every model has the same value (no one is better).
    """
    models = results["models"]
    found: dict[str, set[int]] = {}
    if len(models) < 2:
        return found
    for label, (key, mode) in BEST.items():
        values = [m["scorecard"].get(key) for m in models]
        known = [v for v in values if v is not None]
        if len(known) < 2 or len(set(known)) == 1:
            continue
        score = {"max": lambda v: v, "min": lambda v: -v, "near1": lambda v: -abs(v - 1.0)}[mode]
        top = max(score(v) for v in known)
        found[label] = {i for i, v in enumerate(values) if v is not None and score(v) == top}
    return found


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1] + " (tied)"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _verdicts(results: dict) -> list[tuple[str, str, str]]:
    """(scorecard key, what the winner did, how the number reads) for the headline's three questions:
    who ended cleanly, who stayed in voice, who answered best (the judge, else the on-topic rate)."""
    judged = results.get("judge") and any(m["scorecard"].get("judge_mean") is not None for m in results["models"])
    answered = ("judge_mean", "answered best", "judge {v:.1f}/5") if judged else (  # no usable judge score: on topic
        "on_topic_rate", "answered best", "{p} of replies on topic")
    return [("clean_rate", "ended cleanly most often", "{k}/{n} replies stopped by themselves without a loop"),
            ("persona_marker_rate", "stayed in voice most", "{p} of replies with a persona marker"), answered]


def headline(results: dict) -> str:
    """One sentence, built from the scorecard, saying which model ended cleanly, stayed in voice and
    answered best (ties named as ties); a question no number can answer is said to be unanswered."""
    models = results["models"]
    if not models:
        return "No models were compared."
    groups: list[tuple[list[str], list[str]]] = []  # (winners, what they did), in question order
    missing = []
    for key, did, shown in _verdicts(results):
        values = [(m["name"], m["scorecard"].get(key), m["scorecard"]["replies"]) for m in models]
        values = [(name, v, n) for name, v, n in values if v is not None]
        if not values:
            missing.append(did.split(" most")[0].replace("answered best", "answered best (no judge or on-topic score)"))
            continue
        best = max(v for _, v, _ in values)
        winners = [name for name, v, _ in values if v == best]
        n = values[0][2]
        number = shown.format(v=best, p=f"{100 * best:.0f}%", k=round(best * n), n=n)
        if len(models) == 1:
            did = did.replace(" most often", "").replace(" most", "").replace("answered best", "answered" if best else "answered none")
        text = f"{did} ({number})"
        if groups and groups[-1][0] == winners:
            groups[-1][1].append(text)
        else:
            groups.append((winners, [text]))
    sentence = "; ".join(f"{_names(winners)} {_and(did)}" for winners, did in groups) if groups else "No scores to compare"
    if missing:
        sentence += f" (not measured: {_and(missing)})"
    return sentence + "."


def reply_tags(reply: dict) -> list[str]:
    """Short notes shown beside a reply: cut and loop flags, unusual stop token, trailing off, judge score."""
    tags = []
    if reply["cut"]:
        tags.append(f"[cut at {reply['tokens']} tokens]")
    elif reply["stop_token"] not in QUIET_STOPS:
        tags.append(f"[stopped by {reply['stop_token']}]")
    if reply.get("loop"):
        tags.append("[loop]")
    if reply["mid_sentence"]:
        tags.append("[ends mid-sentence]")
    if reply.get("on_topic") is False:
        tags.append("[off topic]")
    if reply["out_of_character"]:
        tags.append("[out of character: " + ", ".join(reply["out_of_character"]) + "]")
    if reply["judge_score"] is not None:
        tags.append(f"[judge {reply['judge_score']}/5]")
    return tags


def _word_label(reply: dict) -> str:
    return plural(reply["words"], "word")


def _reply_heading(model: dict, reply: dict, samples: int) -> str:
    sample = f", sample {reply['sample_index'] + 1}" if samples > 1 else ""
    return " ".join([f"{model['name']}{sample} ({_word_label(reply)})", *reply_tags(reply)])


def _replies_for(results: dict, prompt_index: int):
    for model in results["models"]:
        for reply in model["replies"]:
            if reply["prompt_index"] == prompt_index:
                yield model, reply


def _settings_line(results: dict) -> str:
    s = results["settings"]
    mode = "greedy" if not s.get("temperature") else f"temperature {s['temperature']}, top-p {s.get('top_p')}"
    best = f", best of {results['best_of']} candidates" if results.get("best_of", 1) > 1 else ""
    return f"{mode}, max {s.get('max_tokens')} tokens, seed {results['seed']}, {results['samples']} sample(s) per prompt{best}"


def _markers_line(results: dict) -> str:
    persona = results["persona"]
    parts = [f"{len(persona['markers'])} from the persona spec"]
    if persona["mined_markers"]:
        parts.append(f"{len(persona['mined_markers'])} mined: " + ", ".join(persona["mined_markers"]))
    return "Persona markers: " + "; ".join(parts)


# ---------------------------------------------------------------------------- comparison.txt

def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _marked_rows(results: dict, mark) -> tuple[list[str], list[list[str]]]:
    """The scorecard table with mark(cell) applied to each row's best model cells."""
    header, rows = scorecard_table(results)
    best = best_columns(results)
    return header, [[cell if i == 0 or i - 1 not in best.get(row[0], ()) else mark(cell) for i, cell in enumerate(row)]
                    for row in rows]


def render_scorecard_text(results: dict) -> str:
    """The scorecard as a plain-text table (also what the CLI prints), best values starred."""
    header, rows = _marked_rows(results, lambda cell: f"*{cell}")
    note = "\n* best in its row" if best_columns(results) else ""
    return _text_table(header, rows) + note


def render_text(results: dict) -> str:
    """The side-by-side text a person reads first."""
    out = [f"gemma-mlx compare, {results['created']}", f"Verdict: {headline(results)}", f"Settings: {_settings_line(results)}"]
    out += [f"Model {m['name']}: {m['spec']}" for m in results["models"]]
    out.append(_markers_line(results))
    out += [f"WARNING: {w}" for w in results["warnings"]]
    for prompt in results["prompts"]:
        out += ["", f"=== Prompt {prompt['index'] + 1}/{len(results['prompts'])}: {prompt['text']}"]
        for model, reply in _replies_for(results, prompt["index"]):
            out.append(f"--- {_reply_heading(model, reply, results['samples'])}")
            body = reply["text"].strip() or "(empty reply)"
            out += [textwrap.fill(p, 100) if p.strip() else "" for p in body.split("\n")]
    out += ["", "=== Scorecard", render_scorecard_text(results)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- comparison.md

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(results: dict) -> str:
    out = ["# gemma-mlx comparison", "", f"**Verdict:** {_md_cell(headline(results))}", "",
           f"*{results['created']}*, {_settings_line(results)}", ""]
    out += [f"- **{m['name']}**: `{m['spec']}`" for m in results["models"]]
    out += ["", _markers_line(results), ""]
    out += [f"> **Warning:** {w}" for w in results["warnings"]]
    header, rows = _marked_rows(results, lambda cell: f"**{cell}**")
    out += ["", "## Scorecard", "", "| " + " | ".join(_md_cell(h) for h in header) + " |",
            "|" + "---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    out += ["", "Bold: the best value in its row."] if best_columns(results) else []
    out += validations_markdown(results)
    for prompt in results["prompts"]:
        out += ["", f"## {prompt['index'] + 1}. {_md_cell(prompt['text'])}"]
        for model, reply in _replies_for(results, prompt["index"]):
            # a fence longer than any backtick run in the reply, so model text cannot close it early
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", reply["text"])), default=0))
            out += ["", f"**{_reply_heading(model, reply, results['samples'])}**", "",
                    fence + "text", reply["text"].strip() or "(empty reply)", fence]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- report.html

def loss_svg(curve: dict, title: str, y_range: tuple[float, float] | None = None) -> str:
    """The training run's train/validation loss by epoch, drawn by plot.py like the run's loss.svg:
    the clean greedy endings that chose the kept adapters on the right axis, the kept epoch marked."""
    series = {"train loss": [tuple(p) for p in curve.get("train") or []],
              "validation loss": [tuple(p) for p in curve.get("valid") or []]}
    right = clean_axis([tuple(p) for p in curve.get("clean") or []], curve.get("clean_of"))
    kept = curve.get("kept_epoch")
    return line_chart(series, title, "epoch", "loss", y_range, right=right,
                      mark_x=(kept, kept_label(kept)) if kept is not None else None)


def shared_loss_range(curves: list[dict]) -> tuple[float, float] | None:
    """One y range over every model's curves, so the report's charts can be compared at a glance."""
    losses = [point[1] for curve in curves for split in ("train", "valid") for point in curve.get(split) or []]
    return (min(losses), max(losses)) if losses else None


def highlight(text: str, phrases: list[str]) -> str:
    """HTML-escaped text with the given phrases wrapped in <mark>, matched as the scorecard counts them
    (persona.phrase_pattern: whole words, any case, curly apostrophes as straight ones)."""
    pattern = phrase_pattern(phrases)
    if pattern is None:
        return html.escape(text)
    pieces, last = [], 0
    for match in pattern.finditer(fold_apostrophes(text)):
        pieces += [html.escape(text[last:match.start()]), f"<mark>{html.escape(text[match.start():match.end()])}</mark>"]
        last = match.end()
    pieces.append(html.escape(text[last:]))
    return "".join(pieces)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
padding:0 16px;color:#222}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555}.warn{background:#fff4e0;border-left:4px solid #f0a020;padding:6px 10px;margin:6px 0}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #ddd;padding:5px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left;white-space:nowrap}table.grid th{white-space:normal}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.grid{table-layout:fixed;width:100%}table.grid td{white-space:pre-wrap;word-wrap:break-word}
table.grid th.p{width:16%}.tags{display:block;margin-top:6px;font-size:12px;white-space:normal}
.tag{display:inline-block;border-radius:3px;padding:0 5px;margin:2px 3px 0 0;background:#eee;color:#333}
.tag.cut{background:#fde2e1;color:#a00}.tag.stop{background:#e6ecff;color:#224}.tag.mid{background:#fff0c8}
.tag.ooc{background:#f9d3f2;color:#707}mark{background:#d9f5d0;padding:0 1px}
.curves{display:flex;flex-wrap:wrap;gap:18px}.curves figure{margin:0;width:560px;max-width:100%}
.curves svg{width:100%;height:auto}figcaption{font-size:13px;color:#444}
code{background:#f3f3f3;padding:0 3px}.note{font-size:13px;color:#555;max-width:900px}
td.best{background:#d9f5d0;font-weight:bold}.headline{font-size:17px;background:#f4f8ff;border-left:4px solid #3a6fd8;
padding:8px 12px;max-width:1000px}
"""


def _tag_html(tag: str) -> str:
    kind = ("cut" if tag.startswith(("[cut", "[loop")) else "stop" if tag.startswith("[stopped")
            else "mid" if tag.startswith("[ends") else "ooc" if tag.startswith("[out") else "")
    if tag.startswith("[") and tag.endswith("]"):  # one bracket each side: "[stopped by [multimodal]]" keeps its own
        tag = tag[1:-1]
    return f'<span class="tag {kind}">{html.escape(tag)}</span>'


def render_html(results: dict) -> str:
    e = html.escape
    persona = results["persona"]
    markers = persona["markers"] + persona["mined_markers"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>gemma-mlx comparison {e(results['created'])}</title><style>{_CSS}</style></head><body>",
           "<h1>gemma-mlx comparison</h1>", f'<p class="headline">{e(headline(results))}</p>',
           f'<p class="meta">{e(results["created"])} &middot; {e(_settings_line(results))}</p>']
    out += [f'<div class="warn">{e(w)}</div>' for w in results["warnings"]]

    out.append("<h2>Models and settings</h2><table><tr><th>model</th><th>source</th><th>stage</th>"
               "<th>load s</th><th>generate s</th><th>tokens</th></tr>")
    for m in results["models"]:
        out.append(f"<tr><td>{e(m['name'])}</td><td><code>{e(m['spec'])}</code></td><td>{e(m['stage'] or 'no manifest')}"
                   f"{' (base)' if m['is_base'] else ''}</td><td class=n>{m['load_seconds']:.1f}</td>"
                   f"<td class=n>{m['generate_seconds']:.1f}</td><td class=n>{m['tokens']}</td></tr>")
    settings = results["settings"]
    out.append("</table><table><tr>" + "".join(f"<th>{e(k)}</th>" for k in settings) + "</tr><tr>"
               + "".join(f"<td class=n>{e(json.dumps(v))}</td>" for v in settings.values()) + "</tr></table>")

    header, rows = scorecard_table(results)
    best = best_columns(results)
    out.append("<h2>Scorecard</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    out += ["<tr>" + f"<th>{e(r[0])}</th>" + "".join(
        f'<td class="{"n best" if i in best.get(r[0], ()) else "n"}">{e(c)}</td>' for i, c in enumerate(r[1:])) + "</tr>"
        for r in rows]
    out.append("</table>" + ('<p class="note">Highlighted: the best value in its row.</p>' if best else ""))
    out.append(f'<p class="note">{e(_markers_line(results))}. {e(persona["mining"])} Highlighted in the '
               "replies below. Out-of-character phrases: " + e(", ".join(persona["out_of_character"]) or "none") + ".</p>")
    if results.get("judge"):
        out.append(f'<p class="note">Judge: <code>{e(results["judge"]["model"])}</code> scored each reply 1-5 '
                   f'({e(results["judge"]["rubric"])}). Unparseable answers count as no score.</p>')

    out.append('<h2>Replies</h2><table class="grid"><tr><th class="p">prompt</th>'
               + "".join(f"<th>{e(m['name'])}</th>" for m in results["models"]) + "</tr>")
    for prompt in results["prompts"]:
        overlap = ' <span class="tag mid">in training data</span>' if prompt["overlaps_training"] else ""
        cells = []
        for model in results["models"]:
            replies = [r for r in model["replies"] if r["prompt_index"] == prompt["index"]]
            parts = []
            for r in replies:
                sample = [f"sample {r['sample_index'] + 1}"] if results["samples"] > 1 else []
                tags = "".join(_tag_html(t) for t in [*sample, _word_label(r), *reply_tags(r)])
                body = highlight(r["text"].strip(), markers) or "<em>(empty reply)</em>"
                parts.append(f'{body}<span class="tags">{tags}</span>')
            cells.append("<td>" + "<hr>".join(parts) + "</td>")
        out.append(f'<tr><th class="p">{e(prompt["text"])}{overlap}</th>{"".join(cells)}</tr>')
    out.append("</table>")

    curves = [m for m in results["models"] if m["loss_curve"]]
    out.append("<h2>Training loss</h2>")
    if curves:
        out.append('<div class="curves">')
        y_range = shared_loss_range([m["loss_curve"] for m in curves])
        for m in curves:
            out.append(f"<figure>{loss_svg(m['loss_curve'], m['name'], y_range)}<figcaption>"
                       f"<code>{e(m['loss_curve']['source'])}</code></figcaption></figure>")
        out.append("</div>")
        tables = [(m, validations_html(m["loss_curve"])) for m in curves]
        if any(table for _, table in tables):
            out.append("<h2>Training validations</h2>")
            out += [f"<h3>{e(m['name'])}</h3>{table}" for m, table in tables if table]
            out.append(f'<p class="note">{validations_note()}</p>')
    else:
        out.append('<p class="note">No training run found for these models (a converted base model has none).</p>')
    out.append(f'<p class="note">Versions: {e(", ".join(f"{k} {v}" for k, v in results["versions"].items()))}. '
               "Everything on this page is also in comparison.json.</p></body></html>")
    return "\n".join(out) + "\n"


def reply_rows(results: dict) -> list[dict]:
    """One flat record per reply (model, prompt, text, flags): what pandas and `datasets` read in one call."""
    prompts = {p["index"]: p["text"] for p in results["prompts"]}
    keep = ("sample_index", "text", "words", "tokens", "finish_reason", "stop_token", "cut", "loop", "mid_sentence",
            "empty", "markers", "out_of_character", "judge_score", "seconds")
    return [{"model": m["name"], "prompt_index": r["prompt_index"], "prompt": prompts[r["prompt_index"]],
             **{k: r[k] for k in keep}} for m in results["models"] for r in m["replies"]]


def scorecard_rows(results: dict) -> list[dict]:
    """One flat record per model: who it is, its whole scorecard (not per prompt), timings and the
    kept epoch; scorecard.csv, the table pandas (`pd.read_csv`) and spreadsheets read as it is."""
    rows = []
    for m in results["models"]:
        card = {k: v for k, v in m["scorecard"].items() if k != "per_prompt"}
        rows.append({"model": m["name"], "spec": m["spec"], "stage": m["stage"], "is_base": m["is_base"], **card,
                     "load_seconds": m["load_seconds"], "generate_seconds": m["generate_seconds"], "tokens": m["tokens"],
                     "kept_epoch": (m.get("loss_curve") or {}).get("kept_epoch")})
    return rows


def write_scorecard_csv(path: Path, results: dict) -> None:
    rows = scorecard_rows(results)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_reports(directory: Path, results: dict) -> list[Path]:
    """Write the report files into directory (which the caller makes atomic)."""
    directory = Path(directory)
    write_json(directory / "comparison.json", {**results, "headline": headline(results)})
    with open(directory / "replies.jsonl", "w", encoding="utf-8") as handle:
        for row in reply_rows(results):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_scorecard_csv(directory / "scorecard.csv", results)
    (directory / "comparison.txt").write_text(render_text(results))
    (directory / "comparison.md").write_text(render_markdown(results))
    (directory / "report.html").write_text(render_html(results))
    return [directory / name for name in REPORT_FILES]
