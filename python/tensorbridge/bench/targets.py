"""The engine's and the batch path's targets, judged from a GPU run's own rows.

``bench-gpu`` ends its report with one line per target, so that a run says at once what
it met: each target names the rows it reads, the figure they give (the worst where a
target holds for every size) and the bound. A target whose rows the run did not measure
(a section left out, or cut short) says so instead of passing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ._report import vs_best
from ._rows import MiB, Report, Row, fmt_size

#: The transfer sections of bench-gpu (titles start so).
D2H, H2D = "device -> host", "host -> device"
REGISTRATION = "registration cache"
BOTH = "both directions at once"
BATCHES = "batches of small arrays -> device"
IMAGES = "uint8 images -> normalized float NCHW on the device"
EPOCH = "end to end on cuda"
LOOP = "for a in batch: torch.from_numpy(a).to(dev, non_blocking=True)"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One target: what it asks, what the run measured, and whether that meets it (None
    where the run has no rows for it)."""

    target: str
    measured: str
    met: bool | None

    def line(self) -> str:
        mark = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return f"  [{mark}] {self.target}: {self.measured}"


def _rows(report: Report, keep: Callable[[Row], bool]) -> list[tuple[Row, float | None]]:
    """The measured rows keep() selects, each with its 'vs best' (a row with a zero or
    NaN median counts as not measured, so a target it alone would judge says so)."""
    return [
        (row, ratio)
        for row, ratio in zip(report.rows, vs_best(report.rows), strict=True)
        if row.measured() and keep(row)
    ]


def _tb(row: Row) -> bool:
    return not row.baseline


def never_slower(report: Report) -> Verdict:
    target = "never slower than torch: every transfer row >= 1.0x its best baseline"
    rows = [
        (row, ratio)
        for row, ratio in _rows(report, lambda r: _tb(r) and r.section.startswith((D2H, H2D)))
        if ratio is not None
    ]
    if not rows:
        return Verdict(target, "no transfer rows", None)
    row, ratio = min(rows, key=lambda rr: rr[1] or 0.0)
    return Verdict(
        target,
        f"worst {ratio:.2f}x ({row.method}, {fmt_size(row.size)}, {row.direction})",
        ratio >= 1.0,
    )


def _fraction_of_p(report: Report, row: Row) -> float | None:
    p = report.limits.get("P_d2h" if row.direction == "d2h" else "P_h2d")
    return row.value() / p if p else None


def _worst_fraction(
    target: str, rows: list[tuple[Row, float]], bound: float, what: str, unit: str = ""
) -> Verdict:
    """The verdict of a target every row must meet: the lowest fraction, and its row."""
    if not rows:
        return Verdict(target, f"no {what} rows from 16 MiB", None)
    row, frac = min(rows, key=lambda rf: rf[1])
    where = f"{row.direction}, {fmt_size(row.size)}"
    return Verdict(target, f"worst {frac:.2f}{unit} ({where})", frac >= bound)


def registered(report: Report) -> Verdict:
    target = "a reused pageable array (registered) >= 0.9 P from 16 MiB, both ways"
    rows: list[tuple[Row, float]] = []
    for row, _ in _rows(report, lambda r: _tb(r) and r.section.startswith(REGISTRATION)):
        frac = _fraction_of_p(report, row)
        if row.method.endswith("[registered]") and row.size >= 16 * MiB and frac is not None:
            rows.append((row, frac))
    return _worst_fraction(target, rows, 0.9, "registered", " P")


def staged(report: Report) -> Verdict:
    target = "a pageable array staged (not registered) >= 0.8 min(P, H) from 16 MiB"
    rows: list[tuple[Row, float]] = []
    for row, _ in _rows(report, lambda r: _tb(r) and r.section.startswith(REGISTRATION)):
        # (memory it cannot register, reused: a fresh array's first sighting also
        # stages, but its time is mostly the new array's page faults, not the pipeline)
        if "[staged:" in row.method and row.size >= 16 * MiB and row.peak_gbs:
            rows.append((row, row.value() / row.peak_gbs))
    return _worst_fraction(target, rows, 0.8, "staged")


def per_call(report: Report) -> Verdict:
    target = "pinned memory: within 3 us of torch's own pinned copy at every size"
    groups: dict[tuple[str, int], list[Row]] = {}
    for row, _ in _rows(
        report, lambda r: r.section.startswith((D2H, H2D)) and r.memory == "pinned"
    ):
        groups.setdefault((row.section, row.size), []).append(row)
    excess = []
    for rows in groups.values():
        base = [r.median_s for r in rows if r.baseline]
        excess += [(r, r.median_s - min(base)) for r in rows if base and not r.baseline]
    if not excess:
        return Verdict(target, "no pinned rows", None)
    row, worst = max(excess, key=lambda re: re[1])
    return Verdict(
        target,
        f"worst {worst * 1e6:+.1f} us ({row.direction}, {fmt_size(row.size)})",
        worst <= 3e-6,
    )


def both_ways(report: Report) -> Verdict:
    target = "both directions at once >= 1.6 P in total, reused buffers"
    p = (report.limits.get("P_d2h", 0.0) + report.limits.get("P_h2d", 0.0)) / 2
    rows = [row for row, _ in _rows(report, lambda r: _tb(r) and r.section.startswith(BOTH))]
    if not rows or not p:
        return Verdict(target, "no rows of both directions", None)
    row = min(rows, key=lambda r: r.value())
    frac = row.value() / p
    return Verdict(
        target, f"worst {frac:.2f} P ({row.value():.1f} GB/s, {fmt_size(row.size)})", frac >= 1.6
    )


def _against_loop(report: Report, n: int) -> float | None:
    """tb.to_device of n arrays of 4 KiB against the per-array .to() loop."""
    case = f"{n} x 4 KiB"
    rows = [r for r, _ in _rows(report, lambda r: r.section.startswith(BATCHES) and r.case == case)]
    loop = [r.median_s for r in rows if r.baseline and r.method == LOOP]
    ours = [r.median_s for r in rows if not r.baseline]
    return loop[0] / min(ours) if loop and ours else None


def batches(report: Report) -> list[Verdict]:
    out = []
    for n, bound in ((1000, 10.0), (10, 1.0)):
        target = f"{n} arrays of 4 KiB: tb.to_device >= {bound:g}x the per-array .to() loop"
        ratio = _against_loop(report, n)
        out.append(
            Verdict(target, "no such rows", None)
            if ratio is None
            else Verdict(target, f"{ratio:.2f}x", ratio >= bound)
        )
    return out


def _best_ratio(report: Report, section: str, case: str, target: str, bound: float) -> Verdict:
    ratios = [
        ratio
        for _, ratio in _rows(
            report, lambda r: _tb(r) and r.section.startswith(section) and r.case.startswith(case)
        )
        if ratio is not None
    ]
    if not ratios:
        return Verdict(target, "no such rows", None)
    return Verdict(target, f"{max(ratios):.2f}x", max(ratios) >= bound)


def verdicts(report: Report) -> list[Verdict]:
    """Every target, judged from the report's rows and limits."""
    return [
        never_slower(report),
        registered(report),
        staged(report),
        per_call(report),
        both_ways(report),
        *batches(report),
        _best_ratio(
            report,
            IMAGES,
            "64 samples",
            "images from tb.collate, normalized: >= 2x the loader's idioms",
            2.0,
        ),
        _best_ratio(
            report,
            EPOCH,
            "one epoch",
            "one DataLoader epoch: >= 1.3x default_collate + pin_memory + .to()",
            1.3,
        ),
    ]


def lines(found: Sequence[Verdict]) -> list[str]:
    """The printed block: a heading, then one line per target."""
    met = sum(v.met is True for v in found)
    return [f"targets ({met} of {len(found)} met in this run):", *(v.line() for v in found)]
