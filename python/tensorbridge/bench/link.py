"""The staged pipeline over a simulated link: how close the scheduler comes to the limit.

``python -m tensorbridge bench --sections link [--link-gbs 2] [--link-latency-us 5]``
runs the real C++ pipeline and pinned pool (the code the CUDA engine runs) over a
simulated host<->device link (``tensorbridge._C.LinkSimulator``: one copy engine per
direction, a per-copy latency, copies of one stream in order), so its efficiency is
measured on a machine without a GPU. Each row is reported as a fraction of
min(link, H), where H is the host's own copy ceiling: the engine's threads copying
between pageable and page-locked memory, measured in the same run. The default link
(1 GB/s each way) sits well under a machine's H even with both directions at once and
the simulator's own copies competing for the same memory, so the rows measure the
schedule; a faster link (``--link-gbs``) measures a host nearer its ceiling.

The baseline is the same pipeline with one copy thread and two staging blocks (the
schedule of a serial staged copy); the rows of both use the chunk size of the policy.
Both directions at once (the download on another thread and stream) are judged against
min(2 x link, the mean of H_d2h and H_h2d), their size being the bytes moved both ways.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _backend
from .._cuda import staging_plan
from ._rows import MiB, Report, Row
from ._runner import Call, Method, Runner, buffers_to_rotate

DEFAULT_LINK_GBS = 1.0
DEFAULT_LATENCY_US = 5.0
#: The size H and the link's own rate are measured at (out of most CPUs' caches).
CEILING_BYTES = 256 * MiB
SECTION = "simulated link (pipeline over a modeled host<->device link)"


def ceilings(sim: Any, nbytes: int = CEILING_BYTES, repeats: int = 5) -> dict[str, float]:
    """H_h2d, H_d2h (the host copy ceilings) and the link's own rate, one page-locked copy
    each way (P_h2d, P_d2h), in GB/s: medians of `repeats` copies of nbytes."""
    out: dict[str, float] = {}
    for direction, to_pinned in (("h2d", True), ("d2h", False)):
        secs = sim.host_ceiling(nbytes, to_pinned, repeats)
        out[f"H_{direction}"] = nbytes / statistics.median(secs) / 1e9
    host = np.ones(nbytes, np.uint8)
    device = np.ones(nbytes, np.uint8)  # (both touched: no page faults inside the timing)
    for direction, to_host in (("h2d", False), ("d2h", True)):
        sim.copy(device, host, to_host)  # warm-up
        times = []
        for _ in range(max(2, repeats // 2)):
            t0 = time.perf_counter()
            sim.copy(device, host, to_host)
            times.append(time.perf_counter() - t0)
        out[f"P_{direction}"] = nbytes / statistics.median(times) / 1e9
    return out


def _methods(sim: Any, direction: str, nbytes: int, threads: int, stream: int = 0) -> list[Method]:
    """Serial staging (the baseline), then the pipeline as the policy sizes it."""
    chunk, buffers = staging_plan(nbytes, threads)
    n = nbytes // 4
    k = buffers_to_rotate(nbytes, 128 * MiB)
    rng = np.random.default_rng(nbytes)
    arrays = [rng.random(n, dtype=np.float32) for _ in range(k)]
    device = np.ones(nbytes, np.uint8)
    outs = [np.ones(n, np.float32) for _ in range(k)]  # pages touched before timing

    def call(serial: bool) -> Call:
        kw = {
            "chunk_bytes": chunk,
            "buffers": 2 if serial else buffers,
            "threads": 1 if serial else threads,
            "stream": stream,
        }
        if direction == "h2d":
            return lambda i: sim.to_device(arrays[i % k], device, **kw)
        return lambda i: sim.to_host(device, outs[i % k], **kw)

    workers = max(1, min(threads, buffers // 2))
    return [
        ("serial staging (1 copy thread, 2 blocks)", True, call(True)),
        (f"tb pipeline (up to {workers} copy threads)", False, call(False)),
    ]


def _both_methods(sim: Any, nbytes: int, threads: int) -> list[Method]:
    """Both directions at once: the download on another thread and another stream."""
    ups = _methods(sim, "h2d", nbytes, threads, stream=0)
    downs = _methods(sim, "d2h", nbytes, threads, stream=1)

    def pair(up: Call, down: Call) -> Call:
        def call(i: int) -> None:
            t = threading.Thread(target=down, args=(i,))
            t.start()
            up(i)
            t.join()

        return call

    return [
        (name, baseline, pair(up, down))
        for (name, baseline, up), (_, _, down) in zip(ups, downs, strict=True)
    ]


def bench_link(
    r: Runner,
    sizes: Sequence[int],
    link_gbs: float = DEFAULT_LINK_GBS,
    latency_us: float = DEFAULT_LATENCY_US,
) -> dict[str, float] | None:
    """Measures the link rows into r; returns the run's limits (P_*, H_*, link), or None
    (with a message) on the pure-Python path, which has no pipeline to measure."""
    C = _backend.ENGINE.C
    if C is None or not hasattr(C, "LinkSimulator"):
        print(
            "bench: skipping the link section: the compiled core is not in use "
            f"({_backend.ENGINE.fallback_reason})",
            file=sys.stderr,
        )
        return None
    sim = C.LinkSimulator(link_gbs, latency_us)
    threads = _backend.get_num_threads()
    limits = ceilings(sim)
    limits["link_gbs"] = link_gbs
    limits["latency_us"] = latency_us
    lim = {d: min(link_gbs, limits[f"H_{d}"]) for d in ("d2h", "h2d")}
    for direction, label in (("h2d", "host -> device"), ("d2h", "device -> host")):
        for nbytes in sizes:
            methods = _methods(sim, direction, nbytes, threads)
            r.group(SECTION, f"{label}, pageable float32", nbytes, methods, peak_gbs=lim[direction])
            _tag(r.rows[-len(methods) :], direction, lim[direction])
    both_limit = min(2 * link_gbs, (limits["H_d2h"] + limits["H_h2d"]) / 2)
    for nbytes in [s for s in sizes if s >= 16 * MiB]:
        methods = _both_methods(sim, nbytes, threads)
        r.group(SECTION, "both directions at once", 2 * nbytes, methods, peak_gbs=both_limit)
        _tag(r.rows[-len(methods) :], "both", both_limit)
    return limits


def _tag(rows: list[Row], direction: str, limit: float) -> None:
    for row in rows:
        row.direction = direction
        row.memory = "simulated"
        row.peak_gbs = limit


def summary(report: Report, from_bytes: int = 16 * MiB) -> str:
    """One line: the worst fraction of the limit the pipeline reached from from_bytes up."""
    rows = [
        r
        for r in report.rows
        if r.memory == "simulated" and not r.baseline and r.size >= from_bytes and r.peak_gbs
    ]
    if not rows:
        return ""
    worst = min(rows, key=lambda r: r.value() / (r.peak_gbs or 1))
    frac = worst.value() / (worst.peak_gbs or 1)
    return (
        f"link: the pipeline reached at least {frac:.2f} of min(link, H) from "
        f"{from_bytes // MiB} MiB (worst: {worst.case}, {worst.size // MiB} MiB; target 0.8)"
    )
