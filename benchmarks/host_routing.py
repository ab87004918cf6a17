"""How the host-copy routing of ``to_numpy(x, out=out)`` does against each of its routes.

Contiguous float32 copies into a reused C-contiguous ``out`` from 1 MiB run on torch's
intra-op threads or on the calling thread alone, whichever has measured cheaper
(``tensorbridge._cuda.Routing``). This times the routing ("fastest") beside the same
call pinned to each route (``host_route = "torch"`` / ``"caller"``) and the idioms,
one copy of each in turn (shuffled every round), for a few seconds per case, in the
conditions a data loader meets: a quiet machine or half the cores busy; copies back to
back, each after a 2 ms sleep (a GPU step), or each after a 256x256 matmul (CPU torch
ops). Each route keeps its own routing state.

It reports the mean per copy, stalls included (a data loader pays the mean), with the
median beside it; then the best pinned route's mean over the routing's ('vs routes',
above 1 when the routing is faster) and the best idiom's ('vs idioms': the idioms do
none of tensorbridge's checks of ``out``).

    python benchmarks/host_routing.py [--seconds 8] [--sizes 1 4 16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import tensorbridge as tb
from tensorbridge import _cuda
from tensorbridge.bench._report import machine
from tensorbridge.bench.cpu import busy_process_count, busy_processes

MiB = 1 << 20
NAMES = ("tb (fastest)", "tb (torch)", "tb (caller)", "np.copyto", "torch copy_")


def methods(nbytes: int) -> dict[str, Callable[[], object]]:
    x = torch.rand(nbytes // 4)
    out = np.empty(nbytes // 4, np.float32)
    out.fill(0)  # (touch the pages before timing)
    xn = x.numpy()

    def routed(route: str) -> Callable[[], object]:
        routing = _cuda.Routing(host_route=route)  # type: ignore[arg-type]

        def copy() -> object:
            _cuda.ROUTING = routing
            return tb.to_numpy(x, out=out)

        return copy

    fns: dict[str, Callable[[], object]] = {
        "tb (fastest)": routed("fastest"),
        "tb (torch)": routed("torch"),
        "tb (caller)": routed("caller"),
        "np.copyto": lambda: np.copyto(out, xn),
        "torch copy_": lambda: torch.from_numpy(out).copy_(x),
    }
    assert tuple(fns) == NAMES
    return fns


def run_case(nbytes: int, step: str, seconds: float) -> dict[str, list[float]]:
    fns = methods(nbytes)
    a = torch.rand(256, 256)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        random.shuffle(order)
        for name in order:
            if step == "2 ms sleep":
                time.sleep(2e-3)
            elif step == "matmul":
                a @ a
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="per case (default 8)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="MiB")
    args = p.parse_args()
    if args.seconds <= 0:
        p.error("--seconds must be above 0")
    m = machine()
    if m["path"] != "extension":
        print(
            "the host-copy routing needs the compiled core (the pure-Python path has",
            file=sys.stderr,
        )
        print("torch's copy only): nothing to compare", file=sys.stderr)
        return 1
    busy = busy_process_count()
    print("tensorbridge host-copy routing against its routes")
    print(f"  date      {m['date']}")
    print(f"  machine   {m['cpu']}, {m['cores']} cores, {m['platform']}")
    print(
        f"  software  python {m['python']}, numpy {m['numpy']}, torch {m['torch']},"
        f" tensorbridge {m['tensorbridge']}"
    )
    print(f"  threads   torch {torch.get_num_threads()}, tensorbridge {m['threads']}")
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # (not on macOS)
        cores = os.cpu_count() or 1
    if busy >= cores:
        print("  (one core: the busy process takes all of it, not half)")
    print(f"  method    one copy of each in turn, {args.seconds:g} s per case; mean (median) µs")
    header = f"{'load':8s} {'step':12s} {'size':>6s}  " + "  ".join(f"{n:>16s}" for n in NAMES)
    header += f"  {'vs routes':>11s}  {'vs idioms':>11s}"
    print(f"\n{header}\n" + "-" * len(header))
    saved = _cuda.ROUTING
    try:
        for load in ("quiet", f"{busy} busy"):
            with busy_processes(busy if load != "quiet" else 0):
                for step in ("back to back", "2 ms sleep", "matmul"):
                    for mib in args.sizes:
                        times = run_case(mib * MiB, step, args.seconds)
                        means = {k: statistics.fmean(v) * 1e6 for k, v in times.items()}
                        medians = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                        fastest = means["tb (fastest)"]
                        routes = min(means["tb (torch)"], means["tb (caller)"]) / fastest
                        idioms = min(means["np.copyto"], means["torch copy_"]) / fastest
                        cells = "  ".join(
                            f"{f'{means[n]:.0f} ({medians[n]:.0f})':>16s}" for n in NAMES
                        )
                        row = f"{load:8s} {step:12s} {mib:>2d} MiB  {cells}"
                        print(f"{row}  {routes:>10.2f}x  {idioms:>10.2f}x", flush=True)
    finally:
        _cuda.ROUTING = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
