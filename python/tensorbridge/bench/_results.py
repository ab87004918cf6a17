"""Results on disk: the printed table as .txt and the rows as .json.

The JSON is ``{"machine": {...}, "rows": [{field: value, ...}, ...]}`` with a row's
fields as in ``Row``; the files under benchmarks/results are in this form and ``load``
reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ._rows import Report, Row


def write_json(path: str, machine: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes ``{"machine": machine, "rows": rows}`` to path (one-space indent, as always)."""
    with open(path, "w") as f:
        json.dump({"machine": dict(machine), "rows": list(rows)}, f, indent=1)


def save(report: Report, text: str, directory: str, basename: str) -> str:
    """Writes directory/basename.txt (text) and .json (the report); returns the path stem.

    Never overwrites an earlier run: when basename is taken (the same machine, the same
    day), the new files get -2, -3, ... appended.
    """
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, basename)
    n = 1
    while os.path.exists(base + ".txt") or os.path.exists(base + ".json"):
        n += 1
        base = os.path.join(directory, f"{basename}-{n}")
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    write_json(base + ".json", report.machine, [dataclasses.asdict(r) for r in report.rows])
    return base


_ROW_FIELDS = [f.name for f in dataclasses.fields(Row)]


def load(path: str) -> Report:
    """The report saved as path (.json): its machine description and its rows."""
    with open(path) as f:
        data = json.load(f)
    rows = [Row(**{k: row[k] for k in _ROW_FIELDS if k in row}) for row in data["rows"]]
    return Report(data["machine"], rows)
