"""tensorbridge's benchmarks: each method beside the idioms it replaces, in the same run.

Command lines: ``python -m tensorbridge bench`` (``cpu``), ``bench-gpu`` (``gpu``) and
``bench-tune`` (``tune``).

- ``_rows``: ``Row`` (one measured method: name, size, median, p10, p90, baseline or
  not), ``Report`` (a run's machine and rows), size formatting and parsing;
- ``_runner``: how everything is measured: warm-up, samples of calibrated length taken
  round-robin across the methods of a row group, rotating source buffers;
- ``_report``: the machine description and the tables, with the 'vs best' column, and
  the summary line (each section's geometric mean of 'vs best');
- ``_results``: saving a run as .txt and .json, and loading the .json back;
- ``_plot``: ``--plot FILE.png`` of both benchmarks (GB/s against size, 'vs best' bars);
- ``cpu``: conversions on the host (per-call overhead, ``out=``, what torch refuses);
- ``loader``: batches, collate, image normalization and a DataLoader epoch end to end;
- ``gpu``: device<->host transfers against the pinned peak, and batches to the device;
- ``tune``: the sweep of the GPU engine's knobs that set the defaults in ``_cuda``.
"""

from ._results import load, save
from ._rows import Report, Row
from ._runner import measure, measure_group

__all__ = ["Report", "Row", "load", "measure", "measure_group", "save"]
