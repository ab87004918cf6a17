"""CPU benchmark: tensorbridge beside the idioms it replaces, measured in the same run.

Run it with ``python -m tensorbridge bench``. It prints the machine, shows progress, then
one table per section: the median (with p10-p90) of each method, and the speed relative
to the best baseline of its row group.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import numpy as np
import torch

from .. import _backend
from .._convert import from_numpy, to_numpy
from . import _plot, integrations, link, loader
from ._report import format_report, machine
from ._results import output_problem, save
from ._rows import KiB, MiB, Parser, Report, fmt_size, parse_size, slug
from ._runner import Method, Runner, buffers_to_rotate

DEFAULT_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
SECTIONS = ("overhead", "out", "refused", "batch", "loader", "contended", "link", "integrations")
#: What runs without --sections: all but the copies beside busy processes, the simulated
#: link and the integrations (which need the hf, accelerate and lightning extras): opt in
#: with --sections contended, link or integrations.
DEFAULT_SECTIONS = SECTIONS[:-3]


def bench_overhead(r: Runner) -> None:
    """Per-call cost of converting tiny tensors and arrays (zero-copy paths)."""
    sec = "per-call overhead, tiny (16 x float32)"
    xs = [torch.randn(16) for _ in range(8)]
    r.group(
        sec,
        "tensor -> ndarray",
        0,
        [
            ("tb.to_numpy(x)", False, lambda i: to_numpy(xs[i & 7])),
            ("x.detach().cpu().numpy()", True, lambda i: xs[i & 7].detach().cpu().numpy()),
            ("x.numpy()", True, lambda i: xs[i & 7].numpy()),
        ],
    )
    gs = [torch.randn(16, requires_grad=True) for _ in range(8)]
    r.group(
        sec,
        "requires_grad tensor -> ndarray",
        0,
        [
            ("tb.to_numpy(x)", False, lambda i: to_numpy(gs[i & 7])),
            ("x.detach().cpu().numpy()", True, lambda i: gs[i & 7].detach().cpu().numpy()),
        ],
    )
    bs = [torch.randn(16).bfloat16() for _ in range(8)]
    r.group(
        sec,
        "bfloat16 tensor -> ndarray",
        0,
        [
            ("tb.to_numpy(x)  [ml_dtypes, zero-copy]", False, lambda i: to_numpy(bs[i & 7])),
            ("x.float().numpy()", True, lambda i: bs[i & 7].float().numpy()),
        ],
    )
    arrs = [np.random.rand(16).astype(np.float32) for _ in range(8)]
    r.group(
        sec,
        "ndarray -> tensor",
        0,
        [
            ("tb.from_numpy(a)", False, lambda i: from_numpy(arrs[i & 7])),
            ("torch.from_numpy(a)", True, lambda i: torch.from_numpy(arrs[i & 7])),
        ],
    )


def _out_methods(xs: list[torch.Tensor], out: np.ndarray) -> list[Method]:
    k = len(xs)
    return [
        ("tb.to_numpy(x, out=out)", False, lambda i: to_numpy(xs[i % k], out=out)),
        ("np.copyto(out, x.numpy())", True, lambda i: np.copyto(out, xs[i % k].numpy())),
        ("torch.from_numpy(out).copy_(x)", True, lambda i: torch.from_numpy(out).copy_(xs[i % k])),
    ]


#: How far `out` lies past the source, modulo 4 KiB, in the out section's "16 B apart"
#: rows: where NumPy arrays allocated one after another often lie (their heap blocks
#: are 16 bytes larger than the data), and where glibc's memcpy, from 2 KiB to 512 KiB on
#: AMD CPUs, is many times slower than at other distances.
OUT_GAP = 16


def _page_apart(nbytes: int, k: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """k random float32 sources of nbytes at one offset within a 4 KiB page, and an `out`
    OUT_GAP bytes past them modulo 4 KiB."""
    n = max(nbytes // 4, 1)
    pitch = -(-n * 4 // 4096) * 4096
    pool = np.empty(k * pitch + 2 * 4096, np.uint8)
    first = -pool.ctypes.data % 4096
    xs = [torch.from_numpy(pool[first + i * pitch :][: n * 4].view(np.float32)) for i in range(k)]
    for x in xs:
        x.copy_(torch.rand(n))
    spare = np.empty(n * 4 + 2 * 4096, np.uint8)
    start = (OUT_GAP - spare.ctypes.data) % 4096
    out = spare[start:][: n * 4].view(np.float32)
    return xs, out


def bench_out(r: Runner, sizes: Sequence[int]) -> None:
    """to_numpy(x, out=...) into a preallocated array, contiguous and transposed; below
    1 MiB also contiguous with `out` OUT_GAP bytes past the source modulo 4 KiB."""
    sec = "to_numpy(x, out=...) float32, GB/s"
    for nbytes in sizes:
        n = max(nbytes // 4, 1)
        side = int(np.sqrt(n))
        layouts = ["contiguous", "transposed"] + [f"{OUT_GAP} B apart"] * (nbytes < MiB)
        for layout in layouts:
            k = buffers_to_rotate(nbytes)
            if layout == "contiguous":
                xs = [torch.rand(n) for _ in range(k)]
                out = np.empty(n, np.float32)
            elif layout == "transposed":
                xs = [torch.rand(side, n // side).t() for _ in range(k)]
                out = np.empty(tuple(xs[0].shape), np.float32)
            else:
                xs, out = _page_apart(nbytes, k)
            out.fill(0)  # touch the pages before timing
            r.group(sec, layout, xs[0].numel() * 4, _out_methods(xs, out))


#: What each busy process of the contended section runs: a loop that ends when its parent
#: does, however that ends (a killed benchmark leaves no process spinning).
#: Run as ``python -c SPIN <parent pid>`` (given, since the parent may be gone already).
SPIN = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100000): pass"
)


def busy_process_count() -> int:
    """The busy processes of the contended section: half the cores this process may use
    (at least one), as a data loader's workers might keep busy."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on macOS)
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """count processes spinning (``SPIN``) for the length of the block; killed at its end,
    and ending by themselves with this process however it ends."""
    spin = [sys.executable, "-c", SPIN, str(os.getpid())]
    quiet = subprocess.DEVNULL
    procs = [subprocess.Popen(spin, stdin=quiet, stdout=quiet, stderr=quiet) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def bench_contended(r: Runner, sizes: Sequence[int]) -> None:
    """to_numpy(x, out=...) of contiguous tensors while other processes keep half the
    cores busy: where a copy split into fixed per-thread shares waits for a thread that is
    not scheduled (see ``_cuda.Routing``). Back to back, in samples of 50 ms so that each
    holds the occasional stall; and 2 ms apart, as a training loop's copies follow its
    steps, each sample the mean of 10 copies."""
    busy = busy_process_count()
    sec = f"to_numpy(x, out=...) float32 beside {busy} busy process{'es' * (busy > 1)}, GB/s"
    with busy_processes(busy):
        for nbytes in sizes:
            n = max(nbytes // 4, 1)
            xs = [torch.rand(n) for _ in range(buffers_to_rotate(nbytes))]
            out = np.empty(n, np.float32)
            out.fill(0)  # touch the pages before timing
            methods = _out_methods(xs, out)
            r.group(sec, "back to back", n * 4, methods, min_sample_s=0.05)
            r.group(sec, "2 ms apart", n * 4, methods, pause_s=2e-3)


def contended_sizes(sizes: Sequence[int]) -> list[int]:
    """The sizes of --sizes from 1 MiB (the host-copy routing's default threshold) to
    16 MiB, or 1 MiB."""
    return [s for s in sizes if 1 * MiB <= s <= 16 * MiB] or [1 * MiB]


def bench_refused(r: Runner, nbytes: int) -> None:
    """Cases torch refuses, beside the workarounds users write today."""
    sec = f"cases torch refuses, {fmt_size(nbytes)}, GB/s"
    n = nbytes // 4
    a = np.random.rand(n).astype(np.float32)
    rev = a[::-1]
    r.group(
        sec,
        "negative strides: ndarray -> tensor",
        nbytes,
        [
            ("tb.from_numpy(a[::-1])", False, lambda i: from_numpy(rev)),
            ("torch.from_numpy(a[::-1].copy())", True, lambda i: torch.from_numpy(rev.copy())),
        ],
    )
    be = a.astype(">f4")
    r.group(
        sec,
        "big-endian float32: ndarray -> tensor",
        nbytes,
        [
            ("tb.from_numpy(a)", False, lambda i: from_numpy(be)),
            (
                "torch.from_numpy(a.astype('<f4'))",
                True,
                lambda i: torch.from_numpy(be.astype("<f4")),
            ),
        ],
    )
    bf = torch.rand(nbytes // 2).bfloat16()
    try:
        import ml_dtypes  # noqa: F401

        r.group(
            sec,
            "bfloat16: tensor -> ndarray",
            nbytes,
            [
                ("tb.to_numpy(x)  [ml_dtypes view]", False, lambda i: to_numpy(bf)),
                ("x.float().numpy()", True, lambda i: bf.float().numpy()),
            ],
        )
    except ImportError:
        pass
    r.group(
        sec,
        "bfloat16 -> float32 ndarray",
        nbytes,
        [
            ("tb.to_numpy(x, dtype=np.float32)", False, lambda i: to_numpy(bf, dtype=np.float32)),
            ("x.float().numpy()", True, lambda i: bf.float().numpy()),
        ],
    )


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 15,
    sections: Sequence[str] = DEFAULT_SECTIONS,
    refused_size: int = 16 * MiB,
    progress: bool = True,
    link_gbs: float = link.DEFAULT_LINK_GBS,
    link_latency_us: float = link.DEFAULT_LATENCY_US,
) -> Report:
    """Runs the chosen sections and returns the rows and the machine description."""
    report = Report(machine())
    r = Runner(repeats, progress)
    if "overhead" in sections:
        bench_overhead(r)
    if "out" in sections:
        bench_out(r, sizes)
    if "refused" in sections:
        bench_refused(r, refused_size)
    if "batch" in sections:
        loader.bench_batches(r)
    if "loader" in sections:
        loader.bench_loader(r)
    if "contended" in sections:
        bench_contended(r, contended_sizes(sizes))
    if "link" in sections:
        limits = link.bench_link(r, sizes, link_gbs, link_latency_us)
        if limits:
            report.limits = limits
    if "integrations" in sections:
        integrations.bench_integrations(r)
    report.rows = r.rows
    return report


def result_basename(report: Report) -> str:
    """<date>-cpu-<cpu model>-<cores>c-<path>, the name of a saved result."""
    m = report.machine
    return f"{m['date'][:10]}-cpu-{slug(m['cpu'])}-{m['cores']}c-{m['path']}"


def _is_fallback_flag(arg: str) -> bool:
    # "--fallback" or a prefix argparse accepts for it ("--fa", "--fallb", ...)
    return arg.startswith("--f") and "--fallback".startswith(arg)


def _pump(src: IO[str], dst: IO[str]) -> None:
    for line in src:
        dst.write(line)
        dst.flush()


def _rerun_on_fallback(argv: Sequence[str]) -> int:
    """Runs this benchmark in a child process on the pure-Python path, streaming its output.

    The child gets TENSORBRIDGE_EXTENSION=off and the same arguments but --fallback,
    and imports this same tensorbridge (its directory goes first on sys.path).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); from tensorbridge.bench.cpu import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, *(a for a in argv if not _is_fallback_flag(a))]
    env = {**os.environ, _backend.MODE_ENV: "off"}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        errors = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr), daemon=True)
        errors.start()
        _pump(proc.stdout, sys.stdout)
        errors.join()
        return proc.wait()


def _memory_bytes() -> int:
    """This machine's physical memory in bytes (unbounded where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tensorbridge bench [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="python -m tensorbridge bench", description=__doc__)
    p.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=DEFAULT_SIZES,
        help="copy sizes for the out= section (default: 4K 64K 1M 4M 16M 64M 256M)",
    )
    p.add_argument("--repeats", type=int, default=15, help="samples per method (default 15)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(DEFAULT_SECTIONS),
        choices=SECTIONS,
        help="default: all but contended (out= copies beside busy processes), link (the "
        "pipeline over a simulated link, by --link-gbs) and integrations (datasets, "
        "accelerate, Lightning beside their default paths)",
    )
    p.add_argument(
        "--link-gbs",
        type=float,
        default=link.DEFAULT_LINK_GBS,
        help=f"the simulated link's bandwidth each way (default {link.DEFAULT_LINK_GBS:g} GB/s)",
    )
    p.add_argument(
        "--link-latency-us",
        type=float,
        default=link.DEFAULT_LATENCY_US,
        help=f"the simulated link's per-copy latency (default {link.DEFAULT_LATENCY_US:g} us)",
    )
    p.add_argument(
        "--refused-size",
        type=parse_size,
        default=16 * MiB,
        help="array size for the 'cases torch refuses' section (default 16M)",
    )
    p.add_argument(
        "--fallback",
        action="store_true",
        help="measure the pure-Python fallback path instead of the extension (runs the "
        f"benchmark again in a child process with {_backend.MODE_ENV}=off)",
    )
    p.add_argument(
        "--threads", type=int, help="threads for the compiled core's large copies (default: as set)"
    )
    p.add_argument("--save", metavar="DIR", help="also write DIR/<date>-<machine>.txt and .json")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw GB/s against size and each row's 'vs best' (needs matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2")
    if min(args.sizes) < 4 or args.refused_size < 4:
        p.error("--sizes and --refused-size: each size must be at least 4 bytes (one float32)")
    if (need := 3 * max(*args.sizes, args.refused_size)) > (have := _memory_bytes()):
        # (a source, an out and the baselines' temporaries: more than memory fails late)
        p.error(
            f"--sizes/--refused-size: the largest size needs about {need / 2**30:.1f} GiB of "
            f"memory with its baselines, and this machine has {have / 2**30:.1f} GiB"
        )
    if args.threads is not None:
        try:
            _backend.int_arg(args.threads, "--threads", 1, _backend.MAX_THREADS)
        except (TypeError, ValueError) as exc:
            p.error(str(exc))
    problem = output_problem(args.save, args.plot)
    if problem:
        p.error(problem)  # before the run, not after minutes of measuring
    if args.plot and not _plot.available():
        p.error(_plot.MISSING)  # before the run, not after minutes of measuring
    if "integrations" in args.sections and (absent := integrations.missing()):
        p.error(absent)

    if args.fallback and _backend.ENGINE.extension:
        return _rerun_on_fallback(argv)  # (already on the fallback path: measure it here)

    if args.threads is not None:
        _backend.set_num_threads(args.threads)

    if not (1e-6 <= args.link_gbs < math.inf and 0 <= args.link_latency_us <= 1e7):
        p.error("--link-gbs must be positive (1e-6 or more) and --link-latency-us 0 to 1e7")
    report = run(
        args.sizes,
        args.repeats,
        args.sections,
        args.refused_size,
        not args.quiet,
        args.link_gbs,
        args.link_latency_us,
    )
    text = format_report(report)
    lines = [line for line in (link.summary(report), loader.summary(report.rows)) if line]
    if lines:
        text += "\n\n" + "\n".join(lines)
    print(text)
    if args.save:
        base = save(report, text, args.save, result_basename(report))
        print(f"\nsaved {base}.txt and {base}.json", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def plot(report: Report, path: str) -> None:
    """GB/s against size for the sections measured at several sizes, and every 'vs best'."""
    m = report.machine
    title = (
        f"tensorbridge CPU benchmark, {m['path']} path (threads: {m['threads']}): "
        f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}"
    )
    _plot.plot(report, path, title, ratios=True)
