"""Inline SVG charts for the comparison report: strip plots of per-call latencies and bar charts, drawn as text
(no script, nothing fetched). Every label is escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

from gateway.compare.stats import (
    DASH,
    percentile,
)


def escape_html(text: object) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(value))
    return next(m * step for m in (1, 2, 5, 10) if m * step >= value)


# Plot geometry in px: row labels left of SVG_LEFT, then the axis, then room for the value printed after a bar.
SVG_WIDTH, SVG_LEFT, SVG_PLOT = 760, 180, 500


def _chart(label: str, names: Sequence[str], hi: float, unit: str, marks: Callable[[int, int], list[str]]) -> str:
    """Row labels, gridlines and an axis from 0 to ``hi`` in five steps; ``marks(i, y)`` draws row i centred on y."""
    height = 40 + 30 * len(names)
    parts = [f'<text x="{SVG_LEFT - 8}" y="{height - 6}" text-anchor="end">{escape_html(unit)}</text>']
    for step in range(6):
        x = SVG_LEFT + SVG_PLOT * step / 5
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="10" y2="{height - 22}"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{hi * step / 5:g}</text>')
    for i, name in enumerate(names):
        y = 25 + 30 * i
        parts += [f'<text x="{SVG_LEFT - 8}" y="{y + 4}" text-anchor="end">{escape_html(name)}</text>', *marks(i, y)]
    return (
        f'<svg class="plot" width="{SVG_WIDTH}" height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" role="img" '
        f'aria-label="{escape_html(label)}"><title>{escape_html(label)}</title>{"".join(parts)}</svg>'
    )


def _no_mark(y: int, text: str = "no data") -> list[str]:
    return [f'<text x="{SVG_LEFT + 6}" y="{y + 4}" class="nodata">{escape_html(text)}</text>']


def strip_plot(label: str, series: Sequence[tuple[str, Sequence[float]]], unit: str) -> str:
    """Every call as a dot, with a box from p25 to p75 and a bar at the median; all models share one axis."""
    hi = _nice_max(max((v for _, vs in series for v in vs), default=0.0))

    def marks(i: int, y: int) -> list[str]:
        values = series[i][1]
        if not values:
            return _no_mark(y)
        q1, q2, q3 = (SVG_LEFT + percentile(values, q) * SVG_PLOT / hi for q in (25, 50, 75))
        return [
            f'<rect class="box" x="{q1:.1f}" y="{y - 9}" width="{max(q3 - q1, 1):.1f}" height="18"/>',
            f'<line class="median" x1="{q2:.1f}" x2="{q2:.1f}" y1="{y - 11}" y2="{y + 11}"/>',
            # A fixed jitter pattern spreads equal values apart and keeps the file identical across runs.
            *(f'<circle class="dot" cx="{SVG_LEFT + v * SVG_PLOT / hi:.1f}" cy="{y + (j * 5) % 13 - 6}" r="2.5"/>'
              for j, v in enumerate(values)),
        ]  # fmt: skip

    return _chart(label, [name for name, _ in series], hi, unit, marks)


def bar_chart(label: str, items: Sequence[tuple[str, float | None]], unit: str, fmt: Callable[[float], str]) -> str:
    hi = _nice_max(max((v for _, v in items if v is not None), default=0.0))

    def marks(i: int, y: int) -> list[str]:
        value = items[i][1]
        if value is None:
            return _no_mark(y, f"{DASH} (no data)")
        width = value * SVG_PLOT / hi
        return [
            f'<rect class="bar" x="{SVG_LEFT}" y="{y - 9}" width="{width:.1f}" height="18"/>',
            f'<text x="{SVG_LEFT + width + 6:.1f}" y="{y + 4}">{escape_html(fmt(value))}</text>',
        ]

    return _chart(label, [name for name, _ in items], hi, unit, marks)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """The names of the points no other point beats: none has a lower or equal x (cost, time) and a higher or
    equal y (quality) with one of the two strictly better. In order of x."""
    front = [
        (x, name)
        for name, x, y in points
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in points)
    ]
    return [name for _, name in sorted(front)]


def scatter(label: str, points: Sequence[tuple[str, float, float]], x_unit: str, fmt_x: Callable[[float], str]) -> str:
    """Quality (y, 0-100%) against cost or time (x, from 0), one labelled dot per arm; the Pareto front's dots
    are marked (class ``pareto``) and joined by a line."""
    if not points:
        return '<p class="nodata">no data</p>'
    width, height, left, bottom, top = 760, 340, 70, 40, 15
    plot_w, plot_h = width - left - 150, height - bottom - top
    hi = _nice_max(max(x for _, x, _ in points))
    front = pareto_front(points)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * plot_w / hi, top + (1.0 - y) * plot_h

    parts = []
    for step in range(6):
        gx, _ = at(hi * step / 5, 0)
        _, gy = at(0, step / 5)
        parts.append(f'<line class="grid" x1="{gx:.1f}" x2="{gx:.1f}" y1="{top}" y2="{top + plot_h}"/>')
        parts.append(
            f'<text x="{gx:.1f}" y="{height - 22}" text-anchor="middle">{escape_html(fmt_x(hi * step / 5))}</text>'
        )
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{gy:.1f}" y2="{gy:.1f}"/>')
        parts.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{step * 20}%</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{escape_html(x_unit)}</text>'
    )
    by_name = {name: (x, y) for name, x, y in points}
    if len(front) > 1:
        line = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(*by_name[n]) for n in front))
        parts.append(f'<polyline class="front" points="{line}"/>')
    for name, x, y in points:
        px, py = at(x, y)
        cls = "pareto" if name in front else "point"
        parts.append(f'<circle class="{cls}" cx="{px:.1f}" cy="{py:.1f}" r="5"><title>{escape_html(name)}</title>'
                     "</circle>")  # fmt: skip
        parts.append(f'<text x="{px + 8:.1f}" y="{py + 4:.1f}">{escape_html(name)}</text>')
    return (
        f'<svg class="plot scatter" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape_html(label)}"><title>{escape_html(label)}</title>{"".join(parts)}</svg>'
    )
