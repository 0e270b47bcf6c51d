"""Small server-rendered SVG line charts (no JavaScript, no CDN).

Ticks fall on round numbers (1, 2 or 5 × a power of ten) and the legend sits above the plot, where it
covers no point.
"""

from __future__ import annotations

import math
from html import escape

W, H = 640, 280
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 34, 40
LEGEND_Y = 14
PALETTE = ["#3b5bdb", "#f08c00", "#2f9e44", "#ae3ec9", "#e8590c", "#1098ad", "#5c940d", "#c2255c"]

_Y_LIMIT = 1e300


def _plottable(y) -> bool:
    try:
        return not isinstance(y, bool) and math.isfinite(y)
    except (TypeError, OverflowError):
        return False


def _clamp(y) -> float:
    return max(-_Y_LIMIT, min(_Y_LIMIT, float(y)))


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Tick values covering [lo, hi] at a step of 1, 2 or 5 × 10^k, about ``target`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, target - 1)
    if raw <= 0 or not math.isfinite(raw):
        return [lo, hi]
    exp = math.floor(math.log10(raw))
    base = 10.0 ** exp
    step = next((m * base for m in (1, 2, 5, 10) if m * base >= raw), 10 * base)
    start = math.floor(lo / step) * step
    ticks, i = [], 0
    while i <= 1000:
        value = start + i * step
        ticks.append(round(value, max(0, -exp + 1)))
        if value >= hi - step * 1e-9:
            break
        i += 1
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-3:
        return f"{value:.2g}"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6g}"


def _fmt_x(value: float) -> str:
    magnitude = abs(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if magnitude >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:g}"


def line_chart_svg(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str,
                   marks: list[tuple[float, float, str]] = (), integer_x: bool = False) -> str:
    """``series``: name → [(x, y)]; ``marks``: (x, y, note) ringed in red (rejected steps). Returns an SVG."""
    series = {name: [(float(x), _clamp(y)) for x, y in pts if _plottable(y) and _plottable(x)]
              for name, pts in series.items()}
    values = [y for s in series.values() for _, y in s]
    if not values:
        return ""
    xs = [x for s in series.values() for x, _ in s]
    x_min, x_max = min(0.0, min(xs)), max(max(xs), 1.0)
    y_min, y_max = min(values), max(values)
    if y_max - y_min < 1e-9 * max(1.0, abs(y_max)):
        y_min, y_max = y_min - 0.5, y_max + 0.5
    span = y_max - y_min
    y_ticks = nice_ticks(y_min - 0.05 * span, y_max + 0.05 * span)
    y_lo, y_hi = min(y_ticks[0], y_min), max(y_ticks[-1], y_max)
    if integer_x:
        step = max(1, math.ceil((x_max - x_min) / 10))
        x_ticks = [float(x) for x in range(int(x_min), int(x_max) + 1, step)]
    else:
        x_ticks = nice_ticks(x_min, x_max, target=6)
        x_max = max(x_max, x_ticks[-1])

    def px(x):
        return PAD_L + (W - PAD_L - PAD_R) * (x - x_min) / ((x_max - x_min) or 1.0)

    def py(y):
        return PAD_T + (H - PAD_T - PAD_B) * (1 - (y - y_lo) / ((y_hi - y_lo) or 1.0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for y in y_ticks:
        if y < y_lo - 1e-12 or y > y_hi + 1e-12:
            continue
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e9ecef"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{py(y) + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#868e96">{escape(_fmt(y))}</text>')
    for x in x_ticks:
        label = f"{int(x)}" if integer_x else _fmt_x(x)
        parts.append(f'<text x="{px(x):.1f}" y="{H - PAD_B + 16}" font-size="11" text-anchor="middle" '
                     f'fill="#868e96">{escape(label)}</text>')
    parts.append(f'<text x="{(PAD_L + W - PAD_R) / 2:.0f}" y="{H - 6}" font-size="11" text-anchor="middle" '
                 f'fill="#495057">{escape(x_label)}</text>')
    legend_x = PAD_L
    for idx, (name, pts) in enumerate(series.items()):
        color = PALETTE[idx % len(PALETTE)]
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="5 4"' if idx % 2 else ""
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{path}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}">'
                         f'<title>{escape(name)}, {escape(x_label)} {escape(_fmt_x(x))}: {y:.4f}</title></circle>')
        # The legend runs along the top margin, above the plot area, so it never hides a point.
        parts.append(f'<rect x="{legend_x}" y="{LEGEND_Y - 4}" width="14" height="4" fill="{color}"/>'
                     f'<text x="{legend_x + 18}" y="{LEGEND_Y + 2}" font-size="11" fill="#495057">'
                     f'{escape(name)}</text>')
        legend_x += 30 + 6.5 * len(name)
    for x, y, note in marks:
        if _plottable(x) and _plottable(y):
            parts.append(f'<circle cx="{px(float(x)):.1f}" cy="{py(_clamp(y)):.1f}" r="6" fill="none" '
                         f'stroke="#fa5252" stroke-width="2"><title>{escape(note)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def loss_chart_svg(points, *, title: str = "Loss per round") -> str:
    """``points``: objects with ``round``, ``heldout``, ``train``, ``accepted``. Returns an inline SVG."""
    series = {
        "held-out loss": [(p.round, p.heldout) for p in points if p.heldout is not None],
        "mean worker train loss": [(p.round, p.train) for p in points if p.train is not None],
    }
    marks = [(p.round, p.heldout, f"round {p.round}: step rejected") for p in points
             if p.accepted is False and p.heldout is not None]
    return line_chart_svg(series, title=title, x_label="round", marks=marks, integer_x=True)


def loss_tokens_chart_svg(named_points: dict[str, list], *, title: str) -> str:
    """Held-out loss against tokens trained: one line per run (``TokenPoint`` lists), for one run's page or
    for runs compared side by side."""
    series = {name: [(p.tokens, p.heldout) for p in pts if p.heldout is not None] for name, pts in named_points.items()}
    marks = [(p.tokens, p.heldout, f"{name}, round {p.round}: step rejected")
             for name, pts in named_points.items() for p in pts if p.accepted is False and p.heldout is not None]
    return line_chart_svg(series, title=title, x_label="tokens trained", marks=marks)
