"""Plots of a run, for ``--plot FILE.png`` (needs matplotlib: the ``plot`` extra).

One panel per row group measured at several sizes (GB/s against size, a line per method,
baselines dashed, the pinned peak P drawn where rows carry it), and optionally one panel
with every row's 'vs best' as a bar.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from ._report import vs_best
from ._rows import Report, Row, fmt_size

MISSING = "--plot needs matplotlib: pip install matplotlib (or the package's 'plot' extra)"


def available() -> bool:
    """Whether matplotlib can be imported (checked before a run, not after it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _size_panels(rows: Sequence[Row], sections: Sequence[str] | None) -> dict[str, list[Row]]:
    """The rows of each (section, case) measured at two or more sizes, titled by section
    (and case, where a section has several such cases), in the order measured."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.size and (sections is None or row.section in sections):
            groups.setdefault((row.section, row.case), []).append(row)
    groups = {k: g for k, g in groups.items() if len({r.size for r in g}) > 1}
    if sections is not None:
        groups = dict(sorted(groups.items(), key=lambda kv: list(sections).index(kv[0][0])))
    per_section: dict[str, int] = {}
    for sec, _ in groups:
        per_section[sec] = per_section.get(sec, 0) + 1
    return {
        (f"{sec}: {case}" if per_section[sec] > 1 else sec): g for (sec, case), g in groups.items()
    }


def plot(
    report: Report,
    path: str,
    title: str,
    *,
    sections: Sequence[str] | None = None,
    ratios: bool = False,
) -> None:
    """Writes the plot to path (PNG): the size panels of ``sections`` (all by default),
    then, with ``ratios``, a panel of every 'vs best' ratio of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = _size_panels(report.rows, sections)
    bars = [
        (f"{row.case}{f' {fmt_size(row.size)}' if row.size else ''}: {row.method}", ratio)
        for row, ratio in zip(report.rows, vs_best(report.rows), strict=True)
        if ratios and ratio is not None
    ]
    if not panels and not bars:
        raise ValueError("nothing to plot: no row group was measured at several sizes")
    ncols = max(1, len(panels))
    heights = ([4.8] if panels else []) + ([0.6 + 0.22 * len(bars)] if bars else [])
    fig = plt.figure(figsize=(max(6.5 * ncols, 10 if bars else 0), sum(heights)))
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    for k, (name, rows) in enumerate(panels.items()):
        ax = fig.add_subplot(grid[0, k])
        for method in dict.fromkeys(row.method for row in rows):
            mine = [row for row in rows if row.method == method]
            pts = [(row.size, row.value()) for row in mine if not row.is_view()]
            style = "--" if mine[0].baseline else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method)
        lim, direction = report.limits, rows[0].direction
        if lim and direction in ("d2h", "h2d"):  # the two limits transfer rows are judged by
            for name, color in (("P", "gray"), ("H", "C3")):
                value = lim[f"{name}_{direction}"]
                ax.axhline(value, color=color, linewidth=0.8, linestyle=":")
                ax.text(rows[0].size, value, f" {name} = {value:.1f} GB/s", va="bottom", fontsize=8)
        elif rows[0].peak_gbs:
            peak = rows[0].peak_gbs
            ax.axhline(peak, color="gray", linewidth=0.8)
            ax.text(rows[0].size, peak, f" P = {peak:.1f} GB/s", va="bottom", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per call")
        ax.set_ylabel("GB/s")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if bars:
        ax = fig.add_subplot(grid[len(heights) - 1, :])
        ys = range(len(bars))
        values = [ratio for _, ratio in bars]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        drawn = ax.barh(ys, values, color=colors)
        ax.bar_label(drawn, [f"{v:.2f}x" for v in values], fontsize=7, padding=2)
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_yticks(list(ys), [label for label, _ in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("vs best baseline of the row group (>1 is faster)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long labels widen it, never cut
    plt.close(fig)
