"""The machine header and the tables: one per section, with the 'vs best' column."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _backend
from ._rows import Report, Row, fmt_size


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and software versions a result was measured on."""
    info = _backend.info()
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "tensorbridge": info["version"],
        "path": "extension" if info["extension"] else "fallback",
        "fallback_reason": info["fallback_reason"],
        "threads": info["threads"],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_report(report: Report, title: str = "tensorbridge CPU benchmark") -> str:
    """The machine header, then one table per section in the order the rows were measured.

    'vs best' is the fastest baseline's median over the method's median within a row
    group (the rows sharing a case and size); 'of P' appears when rows carry a peak. A
    method that returns a view (``Row.is_view``) moves no bytes: it shows 'view' instead
    of GB/s, and no ratio. The last line is the summary: each section's geometric mean
    of its 'vs best' ratios.
    """
    m = report.machine
    lines = [
        title,
        f"  date      {m['date']}",
        f"  machine   {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"  software  python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
        f"tensorbridge {m['tensorbridge']}",
        f"  path      {m['path']} (threads: {m['threads']})"
        + (f": {m['fallback_reason']}" if m["fallback_reason"] else ""),
        "  method    median of N samples, taken round-robin across the methods of a row;",
        "            p10-p90 in brackets; 'vs best' = median against the fastest baseline",
        "            of the same row group (>1 is faster than it).",
    ]
    if report.limits:
        lim = report.limits
        lines += [
            "  limits    measured in this run, GB/s: link (page-locked, one copy) "
            f"P d2h {lim['P_d2h']:.2f}, h2d {lim['P_h2d']:.2f};",
            "            host copy ceiling with the engine's threads (pageable <-> page-locked) "
            f"H d2h {lim['H_d2h']:.2f}, h2d {lim['H_h2d']:.2f};",
            "            'of lim' = GB/s over min(P, H) (pinned rows: over P); 'vs best' compares",
            "            rows moving the same kind of memory (pinned, pageable reused or fresh)",
        ]
    sections: dict[str, list[Row]] = {}
    for row in report.rows:
        sections.setdefault(row.section, []).append(row)
    for sec, rows in sections.items():
        lines += ["", f"## {sec}", ""]
        lines += _table(rows)
    lines += ["", summary(report.rows)]
    return "\n".join(lines)


def vs_best(rows: Sequence[Row]) -> list[float | None]:
    """Each row's 'vs best': the fastest baseline's median over its own, among the rows of
    its group (same section, case, size and memory kind); None for baselines, views, and
    rows with no baseline to compare with, and rows not measured() (a zero or NaN median)."""

    def key(row: Row) -> tuple[str, str, int, str | None]:
        # (transfer rows compare with baselines moving the same kind of memory)
        return (row.section, row.case, row.size, row.memory)

    best: dict[tuple[str, str, int, str | None], float] = {}
    for row in rows:
        if row.baseline and row.measured():
            best[key(row)] = min(best.get(key(row), math.inf), row.median_s)
    return [
        None
        if row.baseline or row.is_view() or not row.measured() or key(row) not in best
        else best[key(row)] / row.median_s
        for row in rows
    ]


def _short(section: str) -> str:
    """A section's title up to its first ', ' or ': ' outside brackets."""
    depth = 0
    for i, ch in enumerate(section):
        depth += (ch in "([") - (ch in ")]")
        if depth == 0 and section.startswith((", ", ": "), i):
            return section[:i]
    return section


def summary(rows: Sequence[Row]) -> str:
    """One line: for each section, the geometric mean of its 'vs best' ratios (and how
    many rows have one)."""
    by_section: dict[str, list[float]] = {}
    for row, ratio in zip(rows, vs_best(rows), strict=True):
        found = by_section.setdefault(row.section, [])
        if ratio is not None:
            found.append(ratio)
    shown = {sec: ratios for sec, ratios in by_section.items() if ratios}
    shorts = [_short(sec) for sec in shown]
    parts = []
    for sec, ratios in shown.items():
        # (sections whose short titles coincide, a section per direction, keep theirs)
        label = _short(sec) if shorts.count(_short(sec)) == 1 else sec
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        parts.append(f"{label} {mean:.2f}x ({len(ratios)})")
    return "summary, geometric mean of 'vs best' per section (rows): " + (
        "; ".join(parts) if parts else "no row has a baseline to compare with"
    )


def _table(rows: list[Row]) -> list[str]:
    """The section's rows under a header, each column as wide as its widest cell."""
    unit = "us/call" if rows[0].size == 0 else "GB/s"
    with_peak = any(r.peak_gbs for r in rows)
    digits = 2 if rows[0].size else 3
    spreads: list[tuple[str, str] | None] = []
    for row in rows:
        if row.is_view():
            spreads.append(None)
        elif row.size:
            spreads.append(
                (f"{row.size / row.p90_s / 1e9:.2f}", f"{row.size / row.p10_s / 1e9:.2f}")
            )
        else:
            spreads.append((f"{row.p10_s * 1e6:.3f}", f"{row.p90_s * 1e6:.3f}"))
    lo_w = max((len(s[0]) for s in spreads if s), default=0)
    hi_w = max((len(s[1]) for s in spreads if s), default=0)
    cells = [
        ["case", "size", "method", unit, "p10-p90", "vs best"]
        # (rows with a memory kind are judged against min(P, H); older ones against P alone)
        + ([("of lim" if any(r.memory for r in rows) else "of P")] if with_peak else [])
    ]
    seen: set[tuple[str, int]] = set()
    for row, spread, ratio in zip(rows, spreads, vs_best(rows), strict=True):
        first = (row.case, row.size) not in seen  # the group's first row names it
        seen.add((row.case, row.size))
        line = [
            row.case if first else "",
            fmt_size(row.size) if first and row.size else "",
            row.method,
            "view" if spread is None else f"{row.value():.{digits}f}",
            "" if spread is None else f"[{spread[0]:>{lo_w}}-{spread[1]:>{hi_w}}]",
            "" if ratio is None else f"{ratio:.2f}x",
        ]
        if with_peak:
            line.append(
                f"{row.value() / row.peak_gbs:.2f}" if row.peak_gbs and spread is not None else ""
            )
        cells.append(line)
    widths = [max(len(c[k]) for c in cells) for k in range(len(cells[0]))]
    left = (True, False, True, False, False, False, False)  # case and method read left to right

    def fmt(cell_row: list[str]) -> str:
        parts = [
            c.ljust(w) if left[k] else c.rjust(w)
            for k, (c, w) in enumerate(zip(cell_row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    header = fmt(cells[0])
    return [header, "-" * len(header), *(fmt(c) for c in cells[1:])]
