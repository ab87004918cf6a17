"""Results on disk: the printed table as .txt and the rows as .json.

The JSON is ``{"machine": {...}, "rows": [{field: value, ...}, ...]}`` with a row's
fields as in ``Row``; the files under benchmarks/results are in this form and ``load``
reads them back. Transfer runs add their limits at the top level (``P_d2h``, ``P_h2d``,
``H_d2h``, ``H_h2d``, in GB/s), and their transfer rows (those with a ``direction``)
three derived fields: ``gbs``; ``vs_best_baseline``, the fastest baseline's time over
this row's among the rows of the same section, case, size and memory (the table's 'vs
best'; None for baselines); and ``of_limit``, ``gbs`` over the limit the row is judged against
(``peak_gbs``: min(P, H) for pageable and simulated rows, P for pinned ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from ._report import vs_best
from ._rows import Report, Row


def write_json(
    path: str,
    machine: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    limits: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``{"machine": machine, **limits, "rows": rows}`` to path (one-space indent);
    limits holds the run's top-level fields (its limits, a sweep's recommendation)."""
    _replace(
        path, json.dumps({"machine": dict(machine), **(limits or {}), "rows": list(rows)}, indent=1)
    )


def _replace(path: str, text: str) -> None:
    """Writes text to path through a temporary file, so that a run killed while saving
    leaves the previous file whole, never a truncated one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def row_records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The rows as JSON objects, transfer rows with gbs, vs_best_baseline (the table's
    'vs best') and of_limit."""
    records = []
    for r, ratio in zip(rows, vs_best(rows), strict=True):
        d = dataclasses.asdict(r)
        if r.direction is not None and r.size:
            d["gbs"] = r.value()
            d["vs_best_baseline"] = ratio
            d["of_limit"] = r.value() / r.peak_gbs if r.peak_gbs else None
        records.append(d)
    return records


def unused_base(directory: str, basename: str) -> str:
    """directory/basename, or with -2, -3, ... appended where a .txt or .json of that name
    is there already (the same machine, the same day): the path stem of a new run's files."""
    base = os.path.join(directory, basename)
    n = 1
    while os.path.exists(base + ".txt") or os.path.exists(base + ".json"):
        n += 1
        base = os.path.join(directory, f"{basename}-{n}")
    return base


def save(report: Report, text: str, directory: str, basename: str, base: str | None = None) -> str:
    """Writes directory/basename.txt (text) and .json (the report); returns the path stem.

    Never overwrites an earlier run: when basename is taken (the same machine, the same
    day), the new files get -2, -3, ... appended. A run that saves as it goes passes the
    stem its first save returned as ``base``: its files are rewritten in place.
    """
    os.makedirs(directory, exist_ok=True)
    if base is None:
        base = unused_base(directory, basename)
    _replace(base + ".txt", text + "\n")
    write_json(base + ".json", report.machine, row_records(report.rows), report.limits)
    return base


def output_problem(save_dir: str | None, plot_path: str | None) -> str | None:
    """Why --save DIR or --plot FILE could not be written, checked before a run (so minutes
    of measuring are not lost to a typo in a path); None when both are fine."""
    if save_dir is not None:
        existing = os.path.abspath(save_dir)
        while not os.path.exists(existing):  # (save() creates the missing directories)
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not _can_write_in(existing):
            return f"--save {save_dir}: {existing} is not a directory this process can write to"
    if plot_path is not None:
        if os.path.isdir(plot_path):
            return f"--plot {plot_path} is a directory: name a file, e.g. {plot_path}/bench.png"
        suffix = os.path.splitext(plot_path)[1].lower().lstrip(".")
        if suffix not in PLOT_FORMATS:
            return (
                f"--plot {plot_path}: "
                + (
                    f"'.{suffix}' is not an image format matplotlib writes"
                    if suffix
                    else "the file has no extension"
                )
                + f": end it with .png (or .{', .'.join(PLOT_FORMATS[1:])})"
            )
        parent = os.path.dirname(os.path.abspath(plot_path))
        if not os.path.isdir(parent) or not _can_write_in(parent):
            return f"--plot {plot_path}: {parent} is not a directory this process can write to"
    return None


#: The file formats --plot takes (matplotlib's savefig, from the file's extension).
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")


def _can_write_in(directory: str) -> bool:
    """Whether a file can be made in directory: made and removed, since permission bits
    alone do not say (root passes os.access on read-only file systems such as /proc)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


_ROW_FIELDS = [f.name for f in dataclasses.fields(Row)]


def load(path: str) -> Report:
    """The report saved as path (.json): its machine description and its rows."""
    with open(path) as f:
        data = json.load(f)
    rows = [Row(**{k: row[k] for k in _ROW_FIELDS if k in row}) for row in data["rows"]]
    limits = {k: v for k, v in data.items() if k not in ("machine", "rows")}
    return Report(data["machine"], rows, limits)
