"""Inline SVG line charts rendered on the server: no JavaScript library, no CDN, works offline.

A chart's size does not grow with the rounds: at most `MAX_TICKS` round labels, a dot per
round only up to `MAX_DOTS` rounds, and where a line has more points than pixel columns it
keeps each column's first, lowest, highest and last point (M4 decimation: the line drawn is
the same). A run of 60,000 rounds drew a label and a dot for every round: a 103 MB page.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from html import escape

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
MAX_TICKS = 8  # round labels on the x axis
MAX_DOTS = 60  # rounds up to which each round gets a dot


def line_chart(
    title: str,
    rounds: Sequence[int],
    series: dict[str, Sequence[float | None]],
    width: int = 460,
    height: int = 220,
    y_label: str = "",
) -> str:
    """An SVG chart with one polyline (and a dot per round) for each named series."""
    left, right, top, bottom = 56, 12, 44, 34
    values = [v for vs in series.values() for v in vs if v is not None]
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{escape(title)}</text>',
    ]
    if not values or not rounds:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text></svg>')
        return "".join(parts)
    low, high = min(values), max(values)
    if high / 2 - low / 2 == 0:  # flat (or apart by less than y() can divide by): a visible band (within floats)
        pad = max(abs(low) * 0.05, 0.5)
        low, high = max(low - pad, -sys.float_info.max), min(high + pad, sys.float_info.max)
    first, last = min(rounds), max(rounds)
    span_x = max(last - first, 1)

    def x(r: int) -> float:
        return left + (r - first) / span_x * (width - left - right)

    def y(v: float) -> float:  # in halves: high - low of losses near +-1e308 overflows to inf, and inf / inf is NaN
        return top + (high / 2 - v / 2) / (high / 2 - low / 2) * (height - top - bottom)

    for i in range(5):  # horizontal grid with value labels
        value = low * (1 - i / 4) + high * (i / 4)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end" class="tick">{_short(value)}</text>'
        )
    for r in round_ticks(first, last):
        parts.append(f'<text x="{x(r):.1f}" y="{height - bottom + 14}" text-anchor="middle" class="tick">{r}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle" class="tick">round'
        f"{' — ' + escape(y_label) if y_label else ''}</text>"
    )
    for index, (name, vs) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        points = [(x(r), y(v)) for r, v in zip(rounds, vs, strict=True) if v is not None]
        if not points:
            continue
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in decimate(points))
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" fill="none" stroke="{color}" '
            f'stroke-width="2" points="{path}"/>'
        )
        if len(points) <= MAX_DOTS:
            parts.extend(
                f'<circle class="point" data-series="{escape(name)}" cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>'
                for px, py in points
            )
        parts.append(
            f'<rect x="{left + index * 100}" y="24" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + 14 + index * 100}" y="33" class="legend">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def round_ticks(first: int, last: int, most: int = MAX_TICKS) -> list[int]:
    """Rounds to label between `first` and `last`: at most `most`, every 1, 2 or 5 times a power of ten."""
    steps = (m * 10**e for e in itertools.count() for m in (1, 2, 5))
    step = next(s for s in steps if (last - first) // s + 1 <= most)
    start = -(-first // step) * step  # the first multiple of `step` from `first` on
    return list(range(start, last + 1, step))


def decimate(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points of a line, keeping per pixel column (x rounded down) its first, lowest,
    highest and last point, in order: the same line as drawn, from at most 4 points a column."""
    kept = []
    for _, group in itertools.groupby(points, key=lambda p: int(p[0])):
        column = list(group)
        by_y = sorted(range(len(column)), key=lambda i: column[i][1])
        kept.extend(column[i] for i in sorted({0, by_y[0], by_y[-1], len(column) - 1}))
    return kept


def _short(value: float) -> str:
    """Tick label: 3 significant digits, k / M for large numbers."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"
