"""A measured row, a run's report, the byte sizes the command lines print and take, and
their parser."""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass
class Row:
    """One method of one row group, as measured: the fields are the saved JSON's keys."""

    section: str
    case: str
    size: int  # bytes moved per call (0 for per-call overhead rows)
    method: str
    baseline: bool
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    peak_gbs: float | None = None  # the limit this row is judged against (GB/s), if any
    direction: str | None = None  # transfer rows: "d2h", "h2d" or "both"
    memory: str | None = None  # transfer rows: "pinned", "pageable-reused", "pageable-fresh",
    # "simulated"

    def measured(self) -> bool:
        """Whether the median is a positive, finite time: a row loaded from a hand-edited
        JSON file may hold 0, a negative number or NaN, which no ratio can be taken of."""
        return 0.0 < self.median_s < math.inf

    def value(self) -> float:
        """GB/s for copies, microseconds per call for overhead rows (NaN for a row that
        was not measured())."""
        if not self.measured():
            return math.nan
        return self.size / self.median_s / 1e9 if self.size else self.median_s * 1e6

    def is_view(self) -> bool:
        """A method that returns a view of its input (its name ends in 'view]', as in
        'tb.to_numpy(x)  [ml_dtypes view]') moves no bytes: GB/s would be meaningless."""
        return self.size > 0 and self.method.endswith("view]")


@dataclass
class Report:
    """The machine a run was measured on, and its rows in the order they were measured."""

    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    #: The run's limits in GB/s, measured in the same run: P_d2h and P_h2d (the link's
    #: page-locked rate each way), H_d2h and H_h2d (the host's pageable<->page-locked
    #: copy ceiling with the engine's threads); empty for runs without transfers.
    limits: dict[str, float] = field(default_factory=dict)


def fmt_size(n: int) -> str:
    """4096 -> '4 KiB', 1 << 30 -> '1 GiB'."""
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    """'4K', '64M', '1G', '1.5MiB' -> bytes (binary units); an argparse type."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4K, 64M, 1G)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


class Parser(argparse.ArgumentParser):
    """The benchmarks' argument parser: a help text that cannot be written (``--help >
    /dev/full``) is an error, which argparse's own printing drops (exit 0, no text)."""

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        out = file or sys.stdout or sys.stderr  # (stdout closed, `--help >&-`: argparse's)
        if out is not None:
            out.write(self.format_help())


def slug(text: str) -> str:
    """A device name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
