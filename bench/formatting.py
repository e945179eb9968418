"""Numbers as the published tables show them (seconds, bytes, ratios, counts) and the
Markdown table they go in."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def fmt_seconds(s: float) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def fmt_ms(s: float | None) -> str:
    """Seconds as milliseconds, one decimal (step-time tables)."""
    return "–" if s is None else f"{1000 * s:.1f}"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    if b < 2**30:
        return f"{b / 2**20:.0f} MiB"
    return f"{b / 2**30:.2f} GiB"


def fmt_ratio(r: float | None) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "–"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


def fmt_count(n: int) -> str:
    exp = math.log10(n) if n > 0 else 0
    return f"10^{exp:.0f}" if n > 0 and abs(exp - round(exp)) < 1e-9 else f"{n:,}"


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, Callable[[Any], str] | None]],
) -> str:
    """A Markdown table; ``columns`` = (key, header, formatter or None for str)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else (fmt(value) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
