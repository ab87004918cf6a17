"""Sweeps the GPU engine's knobs and prints median GB/s for each setting.

The defaults in python/tensorbridge/_cuda.py (chunk size, staging buffers, the size
below which torch's own copy is used) and the copy thread count come from this sweep:

    python -m tensorbridge bench-tune [--repeats 7] [--save DIR]

Two parts, each measured round-robin within a group (see tensorbridge.bench._runner):

1. small copies: torch's synchronous copy against the staging pipeline, per size, both
   directions, pageable NumPy memory: where the pipeline starts to win is the threshold;
2. the pipeline on pageable memory at 16 and 256 MiB: chunk size x buffers, for several
   copy thread counts.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .. import _backend, _cuda
from .._convert import to_numpy, to_tensor
from .._registry import registration_options
from . import gpu
from ._results import output_problem, unused_base, write_json
from ._rows import KiB, MiB, Parser, slug
from ._runner import Call, buffers_to_rotate, measure_group

Measured = list[tuple[float, float, float, int]]


@contextmanager
def _engine_only() -> Iterator[None]:
    """Every size through the staging pipeline (no hand-off of small copies to torch)."""
    saved = _cuda.ROUTING.small_d2h, _cuda.ROUTING.small_h2d
    _cuda.ROUTING.small_d2h = _cuda.ROUTING.small_h2d = 0
    try:
        yield
    finally:
        _cuda.ROUTING.small_d2h, _cuda.ROUTING.small_h2d = saved


@contextmanager
def _direct_small() -> Iterator[None]:
    """Every size through ``copy_small`` (one compiled call, no staging, no torch)."""
    r = _cuda.ROUTING
    saved = r.small_d2h, r.small_h2d, r.small_direct
    r.small_d2h = r.small_h2d = 1 << 62
    r.small_direct = True
    try:
        yield
    finally:
        r.small_d2h, r.small_h2d, r.small_direct = saved


def _small_pair(nbytes: int, repeats: int) -> tuple[Measured, Measured]:
    """(d2h, h2d) measurements of [torch's copy, the direct call, the engine] at one size."""
    n = nbytes // 4
    k = buffers_to_rotate(nbytes)
    ts = [torch.rand(n, device=gpu.DEVICE) for _ in range(k)]
    out = np.ones(n, np.float32)
    rng = np.random.default_rng(nbytes)
    arrays = [rng.random(n, dtype=np.float32) for _ in range(k)]

    def through(context: Callable[[], Any], fn: Callable[[int], object]) -> Call:
        def call(i: int) -> None:
            with context():
                fn(i)

        return call

    def d2h(i: int) -> object:
        return to_numpy(ts[i % k], out=out)

    def h2d(i: int) -> object:
        return to_tensor(arrays[i % k], gpu.DEVICE)

    return (
        measure_group(
            [
                lambda i: torch.from_numpy(out).copy_(ts[i % k]),
                through(_direct_small, d2h),
                through(_engine_only, d2h),
            ],
            repeats,
        ),
        measure_group(
            [
                lambda i: torch.from_numpy(arrays[i % k]).cuda(),
                through(_direct_small, h2d),
                through(_engine_only, h2d),
            ],
            repeats,
        ),
    )


def small_copies(repeats: int) -> list[dict[str, Any]]:
    """Part 1: torch's copy, the direct call and the engine from 4 KiB to 4 MiB, both
    directions."""
    rows: list[dict[str, Any]] = []
    for nbytes in [4 * KiB, 16 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 4 * MiB]:
        d2h, h2d = _small_pair(nbytes, repeats)
        for direction, res in (("d2h", d2h), ("h2d", h2d)):
            torch_gbs, direct_gbs, engine_gbs = (nbytes / m[0] / 1e9 for m in res)
            rows.append(
                {
                    "part": "small",
                    "direction": direction,
                    "bytes": nbytes,
                    "torch_gbs": torch_gbs,
                    "direct_gbs": direct_gbs,
                    "engine_gbs": engine_gbs,
                }
            )
            print(
                f"small {direction} {nbytes // KiB:>6} KiB  torch {torch_gbs:7.2f} GB/s"
                f"  direct {direct_gbs:7.2f} GB/s  engine {engine_gbs:7.2f} GB/s"
                f"  direct/torch {direct_gbs / torch_gbs:.2f}  engine/torch "
                f"{engine_gbs / torch_gbs:.2f}",
                flush=True,
            )
    return rows


def recommended_routing(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The size routing that part 1 measured, as ``_cuda.Routing``'s fields: per
    direction (``small_d2h``, ``small_h2d``), the largest size at which torch's copy beat
    the engine, so that the engine takes only sizes above every one it lost at (0: it
    never lost); and ``small_direct``, whether the direct call was at least as fast as
    torch's copy at every size below those (False where the sweep did not time it)."""
    small = [r for r in rows if r["part"] == "small"]
    routing: dict[str, Any] = {}
    for direction in ("d2h", "h2d"):
        lost = [
            r["bytes"]
            for r in small
            if r["direction"] == direction and r["engine_gbs"] < r["torch_gbs"]
        ]
        routing[f"small_{direction}"] = max(lost, default=0)
    routed = [r for r in small if r["bytes"] <= routing[f"small_{r['direction']}"]]
    routing["small_direct"] = bool(routed) and all(
        "direct_gbs" in r and r["direct_gbs"] >= r["torch_gbs"] for r in routed
    )
    return routing


def _routing_text(routing: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v}" if isinstance(v, bool) else f"{k} {v // KiB} KiB" for k, v in routing.items()
    )


def _config_call(
    direction: str, c: int, b: int, t: torch.Tensor, out: np.ndarray, a: np.ndarray
) -> Call:
    if direction == "d2h":
        return lambda i: (_cuda.transfer_options(c, b), to_numpy(t, out=out))
    return lambda i: (_cuda.transfer_options(c, b), to_tensor(a, gpu.DEVICE))


def pipeline(
    repeats: int,
    threads: Sequence[int],
    chunks: Sequence[int],
    buffers: Sequence[int],
    sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """Part 2: chunk size x staging buffers x copy threads at each size, both directions."""
    rows: list[dict[str, Any]] = []
    configs = [(c, b) for c in chunks for b in buffers]
    saved = _cuda.transfer_options()
    try:
        for nbytes in sizes:
            n = nbytes // 4
            t = torch.rand(n, device=gpu.DEVICE)
            out = np.ones(n, np.float32)
            a = np.random.default_rng(n).random(n, dtype=np.float32)
            for nthreads in threads:
                _backend.set_num_threads(nthreads)
                for direction in ("d2h", "h2d"):
                    calls = [_config_call(direction, c, b, t, out, a) for c, b in configs]
                    res = measure_group(calls, repeats)
                    cells = []
                    for (c, b), r in zip(configs, res, strict=True):
                        gbs = nbytes / r[0] / 1e9
                        cells.append(f"{c // MiB}M/{b}:{gbs:5.1f}")
                        rows.append(
                            {
                                "part": "pipeline",
                                "direction": direction,
                                "bytes": nbytes,
                                "threads": nthreads,
                                "chunk_bytes": c,
                                "buffers": b,
                                "gbs": gbs,
                                "p10_gbs": nbytes / r[2] / 1e9,
                                "p90_gbs": nbytes / r[1] / 1e9,
                            }
                        )
                    best = max(nbytes / r[0] / 1e9 for r in res)
                    print(
                        f"pipeline {direction} {nbytes // MiB:>4} MiB threads {nthreads:>2}"
                        f"  best {best:5.1f} GB/s | {' '.join(cells)}",
                        flush=True,
                    )
    finally:
        _cuda.transfer_options(**saved)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tensorbridge bench-tune [options]``; returns the exit status."""
    p = Parser(
        prog="python -m tensorbridge bench-tune",
        description="Sweeps the GPU engine's knobs and prints median GB/s for each setting.",
    )
    p.add_argument("--repeats", type=int, default=7, help="samples per setting (default 7)")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="copy thread counts to sweep (default: a quarter, half and all of the cores)",
    )
    p.add_argument(
        "--chunks-mib",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="pipeline chunk sizes in MiB (default: 1 2 4 8 16)",
    )
    # (the copy threads a transfer uses are at most buffers // 2: the grid reaches them)
    p.add_argument(
        "--buffers",
        type=int,
        nargs="+",
        default=[4, 8, 16, 32],
        help="staging blocks in flight per transfer, 2 to 64 (default: 4 8 16 32)",
    )
    p.add_argument(
        "--sizes-mib",
        type=int,
        nargs="+",
        default=[16, 256],
        help="transfer sizes of the pipeline sweep in MiB (default: 16 256)",
    )
    p.add_argument(
        "--skip-small",
        action="store_true",
        help="skip the small copies' part (torch's copy against the engine, which sets "
        "the routing's small_* sizes)",
    )
    p.add_argument("--save", metavar="DIR", help="also write DIR/<date>-tune-<gpu>.json")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2")
    knobs = (args.threads or [1]) + args.chunks_mib + args.buffers + args.sizes_mib
    if min(knobs) < 1:
        p.error("--threads, --chunks-mib, --buffers and --sizes-mib take numbers from 1 up")
    # (what the engine accepts, checked here: not after minutes of measuring)
    if max(args.threads or [1]) > _backend.MAX_THREADS:
        p.error(f"--threads takes numbers up to {_backend.MAX_THREADS}")
    if min(args.buffers) < 2 or max(args.buffers) > 64:
        p.error("--buffers takes numbers from 2 to 64 (staging blocks per transfer)")
    if max(args.chunks_mib) > 1 << 20:
        p.error("--chunks-mib takes numbers up to 1048576 (1 TiB)")
    problem = output_problem(args.save, None)
    if problem:
        p.error(problem)  # before the sweep, not after minutes of measuring
    if not (torch.cuda.is_available() and _backend.ENGINE.cuda_engine):
        reason = _backend.cuda_status()[2] or "torch.cuda.is_available() is False."
        print(
            f"bench-tune: needs a GPU and tensorbridge's compiled CUDA engine: {reason}",
            file=sys.stderr,
        )
        return 2
    cores = os.cpu_count() or 1
    most = min(cores, _backend.MAX_THREADS)
    threads = args.threads or sorted({max(1, most // 4), max(1, most // 2), most})
    saved_threads = _backend.get_num_threads()
    m = gpu.gpu_machine()
    print(f"GPU {m['gpu']}, driver {m['driver']}, PCIe {m['pcie']}, {cores} cores", flush=True)
    t0 = time.time()
    # The sweep reuses its arrays: the registration cache would page-lock them, and torch
    # and every setting would time the same direct DMA.
    saved_registration = registration_options()
    registration_options(enabled=False)
    try:
        rows = [] if args.skip_small else small_copies(args.repeats)
        rows += pipeline(
            args.repeats,
            threads,
            [c * MiB for c in args.chunks_mib],
            args.buffers,
            [s * MiB for s in args.sizes_mib],
        )
    finally:
        registration_options(**saved_registration)
        _backend.set_num_threads(saved_threads)
    print(f"sweep took {time.time() - t0:.0f} s")
    top: dict[str, Any] = {}
    if not args.skip_small:
        current = {
            "small_d2h": _cuda.ROUTING.small_d2h,
            "small_h2d": _cuda.ROUTING.small_h2d,
            "small_direct": _cuda.ROUTING.small_direct,
        }
        top = {"routing": current, "recommended_routing": recommended_routing(rows)}
        print(
            "routing (torch's copy, or the direct call where small_direct, at or below these "
            f"sizes, the engine above): now {_routing_text(current)}; measured here "
            f"{_routing_text(top['recommended_routing'])}"
        )
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        # (never over an earlier sweep: the same GPU the same day gets -2, -3, ...)
        base = unused_base(args.save, f"{time.strftime('%Y-%m-%d')}-tune-{slug(m['gpu'])}")
        path = base + ".json"
        write_json(path, m, rows, top)
        print(f"saved {path}")
    return 0
