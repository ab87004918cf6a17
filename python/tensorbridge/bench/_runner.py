"""How every benchmark measures: warm-up, samples of calibrated length, round-robin order.

A method is ``(name, is_baseline, fn)``; ``fn(i)`` gets the call index, so it can rotate
among several source buffers (``buffers_to_rotate``) and small sizes do not stay in cache.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence

from ._rows import MiB, Row, fmt_size

#: A benchmarked call: fn(i) with i the call index.
Call = Callable[[int], object]
#: (method name as printed, whether it is a baseline, the call).
Method = tuple[str, bool, Call]


def _calibrate(fn: Call, min_sample_s: float, warmup: int) -> int:
    """Calls per sample so that one sample lasts about min_sample_s (after a warm-up)."""
    for i in range(warmup):
        fn(i)
    number = 1
    while True:
        t0 = time.perf_counter()
        for i in range(number):
            fn(i)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample_s or number >= 1 << 20:
            return number
        number *= 2 if elapsed == 0 else max(2, min(10, int(min_sample_s / elapsed) + 1))


def _sample(fn: Call, number: int, first: int = 0) -> float:
    t0 = time.perf_counter()
    for i in range(first, first + number):
        fn(i)
    return (time.perf_counter() - t0) / number


def _summary(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    # inclusive: p10/p90 stay within the samples (the default extrapolates past them,
    # which gives impossible, even negative, times for a few samples)
    q = (
        statistics.quantiles(samples, n=10, method="inclusive")
        if len(samples) >= 2
        else samples * 9
    )
    return statistics.median(samples), q[0], q[-1]


def measure_group(
    fns: Sequence[Call],
    repeats: int,
    min_sample_s: float = 2e-3,
    warmup: int = 3,
) -> list[tuple[float, float, float, int]]:
    """(median, p10, p90, calls per sample) seconds per call for each fn(i).

    Samples are taken round-robin (a sample of each method, then the next round), so a
    machine that speeds up or slows down during the run affects every method alike.
    Each sample runs fn enough times to last about min_sample_s, so per-call times of a
    few hundred nanoseconds are resolved; fn gets the call index to rotate buffers (it
    counts on across a method's samples, so even one call per sample rotates).
    """
    numbers = [_calibrate(fn, min_sample_s, warmup) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k, fn in enumerate(fns):
            # the call index runs on from sample to sample, so rotation reaches every buffer
            samples[k].append(_sample(fn, numbers[k], r * numbers[k]))
    return [(*_summary(s), n) for s, n in zip(samples, numbers, strict=True)]


def measure_paced(
    fns: Sequence[Call], repeats: int, pause_s: float, calls: int = 10, warmup: int = 3
) -> list[tuple[float, float, float, int]]:
    """Like measure_group, but every call follows a pause of pause_s that is not timed, as
    a training loop's copies follow its steps (threads that sleep in between must wake):
    a sample is the mean of ``calls`` such calls, so occasional slow ones count in it."""
    for fn in fns:
        for i in range(warmup):
            fn(i)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k, fn in enumerate(fns):
            total = 0.0
            for i in range(r * calls, (r + 1) * calls):
                time.sleep(pause_s)
                t0 = time.perf_counter()
                fn(i)
                total += time.perf_counter() - t0
            samples[k].append(total / calls)
    return [(*_summary(s), calls) for s in samples]


def measure(
    fn: Call, repeats: int, min_sample_s: float = 2e-3, warmup: int = 3
) -> tuple[float, float, float, int]:
    """(median, p10, p90, calls per sample) seconds per call of fn(i)."""
    return measure_group([fn], repeats, min_sample_s, warmup)[0]


def buffers_to_rotate(nbytes: int, count_hint: int = 64 * MiB) -> int:
    """How many source buffers to rotate among so small sizes do not stay in cache."""
    return max(1, min(16, count_hint // max(nbytes, 1)))


class Runner:
    """Measures row groups one after another and keeps their rows, in order."""

    def __init__(self, repeats: int, progress: bool) -> None:
        self.repeats = repeats
        self.progress = progress
        self.rows: list[Row] = []

    def group(
        self,
        section: str,
        case: str,
        size: int,
        methods: Sequence[Method],
        peak_gbs: float | None = None,
        min_sample_s: float = 2e-3,
        pause_s: float = 0.0,
    ) -> None:
        """Measures the methods of one row group together: samples of about min_sample_s
        (see measure_group), or, with a pause_s, of calls that each follow such a pause
        (see measure_paced)."""
        if self.progress:
            label = f"{section}: {case}" + (f" {fmt_size(size)}" if size else "")
            print(f"  measuring {label} ...", file=sys.stderr, flush=True)
        fns = [fn for _, _, fn in methods]
        if pause_s > 0:
            results = measure_paced(fns, self.repeats, pause_s)
        else:
            results = measure_group(fns, self.repeats, min_sample_s)
        for (name, baseline, _), (med, p10, p90, _) in zip(methods, results, strict=True):
            self.rows.append(
                Row(section, case, size, name, baseline, med, p10, p90, self.repeats, peak_gbs)
            )
