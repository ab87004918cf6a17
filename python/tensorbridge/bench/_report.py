"""The machine header and the tables: one per section, with the 'vs best' column."""

from __future__ import annotations

import datetime as _dt
import os
import platform
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
    group (the rows sharing a case and size); 'of P' appears when rows carry a peak.
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
    return "\n".join(lines)


def _table(rows: list[Row]) -> list[str]:
    unit = "us/call" if rows[0].size == 0 else "GB/s"
    with_peak = any(r.peak_gbs for r in rows)
    # (rows with a memory kind are judged against min(P, H); older ones against P alone)
    of = "of lim" if any(r.memory for r in rows) else "of P"
    header = (
        f"{'case':<38} {'size':>9}  {'method':<42} {unit:>9} {'p10-p90':>17} {'vs best':>8}"
        + (f" {of:>6}" if with_peak else "")
    )
    lines = [header, "-" * len(header)]
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.case, row.size), []).append(row)
    for (case, size), grp in groups.items():
        # the fastest baseline moving the same kind of memory (all rows, for older results)
        best_of = {
            mem: min((g.median_s for g in grp if g.baseline and g.memory == mem), default=None)
            for mem in {g.memory for g in grp}
        }
        for j, g in enumerate(grp):
            best = best_of[g.memory]
            if size:
                lo, hi = size / g.p90_s / 1e9, size / g.p10_s / 1e9
                val = f"{g.value():9.2f}"
                spread = f"[{lo:7.2f}-{hi:7.2f}]"
            else:
                val = f"{g.value():9.3f}"
                spread = f"[{g.p10_s * 1e6:7.3f}-{g.p90_s * 1e6:7.3f}]"
            ratio = "" if g.baseline or best is None else f"{best / g.median_s:7.2f}x"
            c = case if j == 0 else ""
            s = (fmt_size(size) if size else "") if j == 0 else ""
            peak = f" {g.value() / g.peak_gbs:6.2f}" if with_peak and g.peak_gbs else ""
            lines.append(f"{c:<38} {s:>9}  {g.method:<42} {val} {spread:>17} {ratio:>8}{peak}")
    return lines
