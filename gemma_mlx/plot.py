"""A dependency-free SVG line chart for loss curves: opens in any browser, diffs as text."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720, 420
MARGIN = dict(left=64, right=44, top=40, bottom=52)  # the right margin holds a second axis
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


@dataclass
class RightAxis:
    """Series drawn against a second y axis at the right, from 0 to `high` (default: their largest value)."""

    series: dict[str, list[tuple[float, float]]]
    label: str
    high: float | None = None


def nice_step(span: float, count: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about `count` ticks over `span`."""
    import math

    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def nice_range(low: float, high: float, count: int = 5) -> tuple[float, float, float]:
    """(low, high, step) widened to round tick values, so an axis reads 2.0, 2.5, 3.0 and not 2.13, 2.61."""
    import math

    if high <= low:
        high = low + 1.0
    step = nice_step(high - low, count)
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _ticks(low: float, high: float, step: float) -> list[float]:
    return [round(low + i * step, 10) for i in range(int(round((high - low) / step)) + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               y_range: tuple[float, float] | None = None, right: "RightAxis | None" = None,
               mark_x: tuple[float, str] | None = None) -> str:
    """An SVG document plotting each named series of (x, y) points; markers for sparse series.

    `y_range` fixes the y axis (so several charts share one scale); axes get round tick values.
    `right` adds series on a second y axis at the right (another unit, such as a count);
    `mark_x` = (x, label) draws a dashed vertical line there, e.g. at the epoch that was kept.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xs += [p[0] for values in (right.series.values() if right else ()) for p in values]
    xs += [mark_x[0]] if mark_x else []
    x_low, x_high, x_step = nice_range(min(xs), max(xs))
    y_low, y_high, y_step = nice_range(*(y_range or (min(ys), max(ys))))
    plot_w = WIDTH - MARGIN["left"] - MARGIN["right"]
    plot_h = HEIGHT - MARGIN["top"] - MARGIN["bottom"]

    def sx(x):
        return MARGIN["left"] + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y):
        return MARGIN["top"] + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<rect x="{MARGIN["left"]}" y="{MARGIN["top"]}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>',
    ]
    for y in _ticks(y_low, y_high, y_step):
        parts.append(f'<line x1="{MARGIN["left"]}" x2="{MARGIN["left"] + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{MARGIN["left"] - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in _ticks(x_low, x_high, x_step):
        parts.append(f'<text x="{sx(x):.1f}" y="{MARGIN["top"] + plot_h + 18}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{MARGIN["left"] + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="16" y="{MARGIN["top"] + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {MARGIN["top"] + plot_h / 2})">{escape(y_label)}</text>')
    lines = [(name, values, sy, "") for name, values in series.items()]
    if right is not None:
        r_high = right.high if right.high is not None else max([p[1] for v in right.series.values() for p in v] or [1.0])
        r_low, r_high, r_step = nice_range(0.0, max(r_high, 1.0))

        def sy_right(y):
            return MARGIN["top"] + (1 - (y - r_low) / (r_high - r_low)) * plot_h

        for y in _ticks(r_low, r_high, r_step):
            parts.append(f'<text x="{MARGIN["left"] + plot_w + 6}" y="{sy_right(y) + 4:.1f}">{y:g}</text>')
        middle = MARGIN["top"] + plot_h / 2
        parts.append(f'<text x="{WIDTH - 10}" y="{middle}" text-anchor="middle" '
                     f'transform="rotate(90 {WIDTH - 10} {middle})">{escape(right.label)}</text>')
        lines += [(name, values, sy_right, ' stroke-dasharray="6 3"') for name, values in right.series.items()]
    if mark_x is not None:
        x = sx(mark_x[0])
        parts.append(f'<line class="kept" x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN["top"]}" y2="{MARGIN["top"] + plot_h}" '
                     'stroke="#444" stroke-width="1.5" stroke-dasharray="2 3"/>')
        left_side = x > MARGIN["left"] + plot_w / 2  # the label stays inside the plot
        parts.append(f'<text x="{x - 5 if left_side else x + 5:.1f}" y="{MARGIN["top"] + plot_h - 8}" '
                     f'text-anchor="{"end" if left_side else "start"}" font-weight="bold">{escape(mark_x[1])}</text>')
    for n, (name, values, to_y, dash) in enumerate(lines):
        colour = COLOURS[n % len(COLOURS)]
        if values:
            path = " ".join(f"{sx(x):.1f},{to_y(y):.1f}" for x, y in values)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            if len(values) <= 60:
                parts.extend(f'<circle cx="{sx(x):.1f}" cy="{to_y(y):.1f}" r="3" fill="{colour}"/>' for x, y in values)
        legend_y = MARGIN["top"] + 16 + 18 * n
        legend_x = MARGIN["left"] + plot_w - 150
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 24}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" stroke-width="3"/>')
        parts.append(f'<text x="{legend_x + 30}" y="{legend_y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def kept_label(epoch: float) -> str:
    return f"kept: epoch {epoch:g}"


def clean_axis(points: list[tuple[float, float]], of: int | None) -> RightAxis | None:
    """The selection metric on its own axis: clean greedy endings at each validation (None without any)."""
    if not points:
        return None
    label = f"clean greedy endings (of {of})" if of else "clean greedy endings"
    return RightAxis({"clean endings (right axis)": points}, label, of)


def loss_curve_svg(metrics: list[dict], title: str, kept_epoch: float | None = None) -> str:
    """Train and validation loss against (fractional) epoch, from metrics.jsonl records, with the
    clean-endings count that picks the kept adapters (right axis) and the kept epoch marked."""
    series = {
        "train loss": [(m["epoch"], m["loss"]) for m in metrics if m["split"] == "train"],
        "validation loss": [(m["epoch"], m["loss"]) for m in metrics if m["split"] == "valid"],
    }
    valid = [m for m in metrics if m["split"] == "valid" and m.get("gen_clean") is not None]
    right = clean_axis([(m["epoch"], m["gen_clean"]) for m in valid], max((m.get("gen_replies") or 0 for m in valid), default=0))
    mark = (kept_epoch, kept_label(kept_epoch)) if kept_epoch is not None else None
    return line_chart(series, title, "epoch", "loss (cross-entropy per trained token)", right=right, mark_x=mark)
