"""A dependency-free SVG line chart for loss curves: opens in any browser, diffs as text."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 720, 420
MARGIN = dict(left=64, right=20, top=40, bottom=52)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


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
               y_range: tuple[float, float] | None = None) -> str:
    """An SVG document plotting each named series of (x, y) points; markers for sparse series.

    `y_range` fixes the y axis (so several charts share one scale); axes get round tick values.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
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
    for n, (name, values) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        if values:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            if len(values) <= 60:
                parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in values)
        legend_y = MARGIN["top"] + 16 + 18 * n
        legend_x = MARGIN["left"] + plot_w - 150
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 24}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" stroke-width="3"/>')
        parts.append(f'<text x="{legend_x + 30}" y="{legend_y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def loss_curve_svg(metrics: list[dict], title: str) -> str:
    """Train and validation loss against (fractional) epoch, from metrics.jsonl records."""
    series = {
        "train loss": [(m["epoch"], m["loss"]) for m in metrics if m["split"] == "train"],
        "validation loss": [(m["epoch"], m["loss"]) for m in metrics if m["split"] == "valid"],
    }
    return line_chart(series, title, "epoch", "loss (cross-entropy per trained token)")
