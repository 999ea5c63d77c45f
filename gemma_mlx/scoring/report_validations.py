"""The training run's per-validation table in compare's reports (report.html and comparison.md).

Training writes the table into summary.json as `validations` (one row per validation: what its greedy
replies did and the score that ranks them, the kept one marked); `inputs.read_loss_curve` carries it
into a model's `loss_curve`. Shown beside the loss chart, it says *why* an epoch was kept: a chart
shows that the loss went down, the table shows whether the replies ended, how long they were against
the validation replies, and whether they answered the message.
A summary.json written by hand or by an older version may lack the table or some of its columns:
those cells read "-", and a model without the table has no table.
"""

from __future__ import annotations

import html

from ..text import plural


def _number(value, pattern: str) -> str:
    """A cell for a number, "-" for a missing or non-numeric one (an older or hand-edited summary)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return pattern.format(value)


def _clean(row: dict) -> str:
    clean, replies = row.get("clean"), row.get("replies")
    if isinstance(clean, int) and isinstance(replies, int) and not isinstance(clean, bool):
        return f"{clean}/{replies}"
    return "-"


def validation_rows(curve: dict | None) -> list[dict]:
    """The table's rows from a model's loss curve: the dict rows only (nothing for a model without it)."""
    rows = (curve or {}).get("validations")
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def kept_label(curve: dict) -> str:
    """How the kept row is marked: this model's adapters, or the run's choice when the model is the run's
    last step (compare was given `last/`; the chart does not mark the kept epoch then either)."""
    return "kept" if curve.get("kept_epoch") is not None else "kept by the run (this model is its last step)"


def validation_table(curve: dict | None) -> tuple[list[str], list[list[str]], int | None]:
    """(header, rows of cells, index of the kept row or None) of a model's per-validation table.

    The on-topic column appears only when some validation measured it (train with `best_by: score`
    and an on-topic model); a run without greedy validation replies has only epoch, step and loss.
    """
    rows = validation_rows(curve)
    if not rows:
        return [], [], None
    topic = any(isinstance(r.get("on_topic_rate"), (int, float)) for r in rows)
    header = ["epoch", "step", "loss", "clean endings", "mean words", "words vs validation replies",
              *(["on topic"] if topic else []), "score", ""]
    cells, kept = [], None
    for i, r in enumerate(rows):
        if r.get("kept") is True and kept is None:
            kept = i
        cells.append([_number(r.get("epoch"), "{:g}"), _number(r.get("step"), "{}"), _number(r.get("loss"), "{:.4f}"),
                      _clean(r), _number(r.get("mean_words"), "{:.1f}"), _number(r.get("words_vs_valid"), "{:.2f}x"),
                      *([_number(r.get("on_topic_rate"), "{:.0%}")] if topic else []), _number(r.get("score"), "{:.2f}"),
                      kept_label(curve) if i == kept else ""])
    return header, cells, kept


_NOTE = ("One row per validation of the training run: its greedy replies' clean endings (stopped by "
         "themselves, no loop), their mean words and that against the validation replies' own, the share "
         "on topic (when measured), and the score that ranks validations under `best_by: score` (clean "
         "endings x length fidelity x on topic).")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def validations_markdown(results: dict) -> list[str]:
    """comparison.md's "Training validations" section: one table per model whose run wrote one."""
    models = [(m, validation_table(m.get("loss_curve"))) for m in results["models"]]
    models = [(m, table) for m, table in models if table[1]]
    if not models:
        return []
    out = ["", "## Training validations", "", _NOTE]
    for model, (header, rows, kept) in models:
        source = model["loss_curve"].get("source", "")
        out += ["", f"**{_md(model['name'])}** ({plural(len(rows), 'validation')}, from `{source}`)", "",
                "| " + " | ".join(_md(h) for h in header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
        for i, row in enumerate(rows):
            row = [f"**{c}**" if i == kept and c else c for c in row]  # the kept row in bold
            out.append("| " + " | ".join(_md(c) for c in row) + " |")
    return out


def validations_html(curve: dict | None) -> str:
    """A model's per-validation table for report.html (empty when its run wrote none), the kept row
    highlighted like the scorecard's best values."""
    header, rows, kept = validation_table(curve)
    if not rows:
        return ""
    e = html.escape
    out = ['<table class="validations"><tr>' + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = "n best" if i == kept else "n"
        out.append(f'<tr{" class=kept" if i == kept else ""}>'
                   + "".join(f'<td class="{cls}">{e(c)}</td>' for c in row) + "</tr>")
    return "".join(out) + "</table>"


def validations_note() -> str:
    """The sentence under report.html's tables, saying what the columns are."""
    return html.escape(_NOTE)
