"""A small server-rendered SVG line chart (no JavaScript, no CDN)."""

from __future__ import annotations

import math
from html import escape

W, H = 640, 260
PAD_L, PAD_R, PAD_T, PAD_B = 52, 16, 16, 40


_Y_LIMIT = 1e300


def _plottable(y) -> bool:
    try:
        return not isinstance(y, bool) and math.isfinite(y)
    except (TypeError, OverflowError):
        return False


def _clamp(y) -> float:
    return max(-_Y_LIMIT, min(_Y_LIMIT, float(y)))


def loss_chart_svg(points, *, title: str = "Loss per round") -> str:
    """``points``: objects with ``round``, ``heldout``, ``train``, ``accepted``. Returns an inline SVG."""
    series = {
        "held-out loss": [(p.round, p.heldout) for p in points if p.heldout is not None],
        "mean worker train loss": [(p.round, p.train) for p in points if p.train is not None],
    }
    # Stored values are plotted whatever they are: clamp to a range where the scale arithmetic below
    # (spans, margins, ratios) stays finite, and drop what is not a number at all.
    series = {name: [(x, _clamp(y)) for x, y in pts if _plottable(y)] for name, pts in series.items()}
    values = [y for s in series.values() for _, y in s]
    if not values:
        return ""
    xs = [x for s in series.values() for x, _ in s]
    x_max = max(max(xs), 1)
    y_min, y_max = min(values), max(values)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    span = y_max - y_min
    y_min, y_max = y_min - 0.05 * span, y_max + 0.05 * span

    def px(x):
        return PAD_L + (W - PAD_L - PAD_R) * x / x_max

    def py(y):
        return PAD_T + (H - PAD_T - PAD_B) * (1 - (y - y_min) / (y_max - y_min))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for i in range(5):
        y = y_min + (y_max - y_min) * i / 4
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e9ecef"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{py(y) + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#868e96">{y:.4g}</text>')
    step = max(1, round(x_max / 10))
    for x in range(0, x_max + 1, step):
        parts.append(f'<text x="{px(x):.1f}" y="{H - PAD_B + 16}" font-size="11" text-anchor="middle" '
                     f'fill="#868e96">{x}</text>')
    parts.append(f'<text x="{(PAD_L + W - PAD_R) / 2:.0f}" y="{H - 6}" font-size="11" text-anchor="middle" '
                 f'fill="#495057">round</text>')
    colors = {"held-out loss": "#3b5bdb", "mean worker train loss": "#f08c00"}
    for idx, (name, pts) in enumerate(series.items()):
        color = colors[name]
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="5 4"' if idx else ""
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{path}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}">'
                         f'<title>{escape(name)}, round {x}: {y:.4f}</title></circle>')
        lx = PAD_L + 10 + idx * 190
        parts.append(f'<rect x="{lx}" y="{PAD_T}" width="12" height="4" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="{PAD_T + 6}" font-size="11" fill="#495057">{escape(name)}</text>')
    for p in points:
        if p.accepted is False and p.heldout is not None:
            parts.append(f'<circle cx="{px(p.round):.1f}" cy="{py(p.heldout):.1f}" r="6" fill="none" '
                         f'stroke="#fa5252" stroke-width="2"><title>round {p.round}: step rejected</title></circle>')
    parts.append("</svg>")
    return "".join(parts)
