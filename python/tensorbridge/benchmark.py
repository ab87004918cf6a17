"""CPU benchmark: tensorbridge beside the idioms it replaces, measured in the same run.

Run it with ``python -m tensorbridge bench`` (or ``benchmarks/bench_cpu.py``). It prints
the machine, shows progress, then one table per section: the median (with p10-p90)
of each method, and the speed relative to the best baseline of its row group.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import _backend
from ._convert import from_numpy, to_numpy

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]


@dataclass
class Row:
    section: str
    case: str
    size: int  # bytes moved per call (0 for per-call overhead rows)
    method: str
    baseline: bool
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    peak_gbs: float | None = None  # the pinned peak P this row is compared with (GPU rows)

    def value(self) -> float:
        """GB/s for copies, microseconds per call for overhead rows."""
        return self.size / self.median_s / 1e9 if self.size else self.median_s * 1e6


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and software versions a result was measured on."""
    info = _backend.info()
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "tensorbridge": info["version"],
        "path": "extension" if info["extension"] else "fallback",
        "fallback_reason": info["fallback_reason"],
        "threads": info["threads"],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _calibrate(fn: Callable[[int], object], min_sample_s: float, warmup: int) -> int:
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


def _sample(fn: Callable[[int], object], number: int) -> float:
    t0 = time.perf_counter()
    for i in range(number):
        fn(i)
    return (time.perf_counter() - t0) / number


def _summary(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return statistics.median(samples), q[0], q[-1]


def measure_group(
    fns: Sequence[Callable[[int], object]],
    repeats: int,
    min_sample_s: float = 2e-3,
    warmup: int = 3,
) -> list[tuple[float, float, float, int]]:
    """(median, p10, p90, calls per sample) seconds per call for each fn(i).

    Samples are taken round-robin (a sample of each method, then the next round), so a
    machine that speeds up or slows down during the run affects every method alike.
    Each sample runs fn enough times to last about min_sample_s, so per-call times of a
    few hundred nanoseconds are resolved; fn gets the call index to rotate buffers.
    """
    numbers = [_calibrate(fn, min_sample_s, warmup) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            samples[k].append(_sample(fn, numbers[k]))
    return [(*_summary(s), n) for s, n in zip(samples, numbers, strict=True)]


def measure(
    fn: Callable[[int], object], repeats: int, min_sample_s: float = 2e-3, warmup: int = 3
) -> tuple[float, float, float, int]:
    """(median, p10, p90, calls per sample) seconds per call of fn(i)."""
    return measure_group([fn], repeats, min_sample_s, warmup)[0]


class _Runner:
    def __init__(self, repeats: int, progress: bool) -> None:
        self.repeats = repeats
        self.progress = progress
        self.rows: list[Row] = []

    def group(
        self,
        section: str,
        case: str,
        size: int,
        methods: Sequence[tuple[str, bool, Callable[[int], object]]],
        peak_gbs: float | None = None,
    ) -> None:
        if self.progress:
            label = f"{section}: {case}" + (f" {_fmt_size(size)}" if size else "")
            print(f"  measuring {label} ...", file=sys.stderr, flush=True)
        results = measure_group([fn for _, _, fn in methods], self.repeats)
        for (name, baseline, _), (med, p10, p90, _) in zip(methods, results, strict=True):
            self.rows.append(
                Row(section, case, size, name, baseline, med, p10, p90, self.repeats, peak_gbs)
            )


def _fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def _buffers(nbytes: int, count_hint: int = 64 * MiB) -> int:
    """How many source buffers to rotate among so small sizes do not stay in cache."""
    return max(1, min(16, count_hint // max(nbytes, 1)))


# --------------------------------------------------------------------------- sections


def bench_overhead(r: _Runner) -> None:
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


def _out_methods(xs: list[torch.Tensor], out: np.ndarray):
    k = len(xs)
    return [
        ("tb.to_numpy(x, out=out)", False, lambda i: to_numpy(xs[i % k], out=out)),
        ("np.copyto(out, x.numpy())", True, lambda i: np.copyto(out, xs[i % k].numpy())),
        ("torch.from_numpy(out).copy_(x)", True, lambda i: torch.from_numpy(out).copy_(xs[i % k])),
    ]


def bench_out(r: _Runner, sizes: Sequence[int]) -> None:
    """to_numpy(x, out=...) into a preallocated array, contiguous and transposed."""
    sec = "to_numpy(x, out=...) float32, GB/s"
    for nbytes in sizes:
        n = max(nbytes // 4, 1)
        side = int(np.sqrt(n))
        for layout in ("contiguous", "transposed"):
            k = _buffers(nbytes)
            if layout == "contiguous":
                xs = [torch.rand(n) for _ in range(k)]
            else:
                xs = [torch.rand(side, n // side).t() for _ in range(k)]
            out = np.empty(tuple(xs[0].shape), np.float32)
            out.fill(0)  # touch the pages before timing
            r.group(sec, layout, xs[0].numel() * 4, _out_methods(xs, out))


def bench_refused(r: _Runner, nbytes: int) -> None:
    """Cases torch refuses, beside the workarounds users write today."""
    sec = f"cases torch refuses, {_fmt_size(nbytes)}, GB/s"
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


def _batch_methods(arrays: list[np.ndarray], device: str) -> list:
    from ._batch import to_device

    return [
        (
            "for a in batch: torch.from_numpy(a).to(dev)",
            True,
            lambda i: [torch.from_numpy(a).to(device, non_blocking=True) for a in arrays],
        ),
        ("tb.to_device(batch, dev)", False, lambda i: to_device(arrays, device)),
    ]


def bench_batches(r: _Runner) -> None:
    """Data-loader costs on the host: many small arrays, collate, image normalization."""
    from ._loader import collate, images_to_tensor

    sec = "batches, host-side cost per batch"
    for n in (10, 100, 1000):
        arrays = [np.random.rand(1024).astype(np.float32) for _ in range(n)]  # 4 KiB each
        r.group(sec, f"{n} arrays of 4 KiB to 'cpu'", 0, _batch_methods(arrays, "cpu"))
    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "label": i} for i in range(64)
    ]
    r.group(
        sec,
        "collate 64 x (64x64x3 uint8 + label)",
        0,
        [
            (
                "torch.utils.data.default_collate",
                True,
                lambda i: torch.utils.data.default_collate(samples),
            ),
            ("tb.collate", False, lambda i: collate(samples)),
        ],
    )
    images = rng.integers(0, 256, (32, 128, 128, 3), dtype=np.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    r.group(
        sec,
        "normalize 32 x 128x128x3 uint8 -> NCHW",
        0,
        [
            (
                "from_numpy(x).float().div(255).sub(m).div(s).permute().contiguous()",
                True,
                lambda i: (
                    torch.from_numpy(images)
                    .float()
                    .div(255)
                    .sub(mean)
                    .div(std)
                    .permute(0, 3, 1, 2)
                    .contiguous()
                ),
            ),
            (
                "tb.images_to_tensor(x, mean=m, std=s)",
                False,
                lambda i: images_to_tensor(images, mean=mean.tolist(), std=std.tolist()),
            ),
        ],
    )


class _Images(torch.utils.data.Dataset):
    """Synthetic uint8 HWC images with labels, as a JPEG-decoding dataset would return."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(i)
        return {
            "image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8),
            "label": i % 10,
        }


def _loader_methods(
    device: str, images: int, batch: int, size: int, workers: int, step_s: float
) -> list:
    from ._loader import Prefetcher, collate, images_to_tensor

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    cuda = device.startswith("cuda")
    data = _Images(images, size)

    def model_step(x: torch.Tensor) -> None:  # a model step of fixed cost
        if cuda:
            torch.cuda._sleep(int(step_s * 1.4e9))
        else:
            time.sleep(step_s)

    stock = torch.utils.data.DataLoader(
        data, batch_size=batch, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0
    )
    ours = torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=False,
        persistent_workers=workers > 0,
    )

    def epoch_stock(i: int) -> None:
        for b in stock:
            x = b["image"].to(device, non_blocking=True)
            b["label"].to(device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div(255).sub(m).div(s)
            model_step(x)
        if cuda:
            torch.cuda.synchronize()

    def epoch_ours(i: int) -> None:
        for b in Prefetcher(ours, device):
            model_step(images_to_tensor(b["image"], mean=mean, std=std))
        if cuda:
            torch.cuda.synchronize()

    return [
        ("default_collate + pin_memory + .to(dev, non_blocking=True)", True, epoch_stock),
        ("tb.collate + tb.Prefetcher + tb.images_to_tensor", False, epoch_ours),
    ]


def bench_loader(
    r: _Runner,
    device: str = "cpu",
    images: int = 256,
    batch: int = 32,
    size: int = 64,
    workers: int = 2,
    step_s: float = 2e-3,
) -> None:
    """End to end: one epoch through a DataLoader with a model step of fixed cost."""
    steps = -(-images // batch)
    r.group(
        f"end to end on {device}: one epoch, {images} images of {size}x{size}x3 uint8, "
        f"{workers} workers, {steps} model steps of {step_s * 1e3:g} ms (compute alone "
        f"{steps * step_s * 1e3:g} ms)",
        "epoch",
        0,
        _loader_methods(device, images, batch, size, workers, step_s),
    )


# --------------------------------------------------------------------------- report


def format_report(report: Report) -> str:
    m = report.machine
    lines = [
        "tensorbridge CPU benchmark",
        f"  date      {m['date']}",
        f"  machine   {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"  software  python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
        f"tensorbridge {m['tensorbridge']}",
        f"  path      {m['path']} (threads: {m['threads']})"
        + (f": {m['fallback_reason']}" if m["fallback_reason"] else ""),
        "  method    median of N samples, taken round-robin across the methods of a row;",
        "            p10-p90 in brackets; 'vs best' = median against the fastest baseline",
        "            of the same row group (>1 is faster than it).",
    ]
    sections: dict[str, list[Row]] = {}
    for row in report.rows:
        sections.setdefault(row.section, []).append(row)
    for sec, rows in sections.items():
        lines += ["", f"## {sec}", ""]
        unit = "us/call" if rows[0].size == 0 else "GB/s"
        with_peak = any(r.peak_gbs for r in rows)
        header = (
            f"{'case':<38} {'size':>9}  {'method':<42} {unit:>9} {'p10-p90':>17} {'vs best':>8}"
            + (f" {'of P':>6}" if with_peak else "")
        )

        lines += [header, "-" * len(header)]
        groups: dict[tuple[str, int], list[Row]] = {}
        for row in rows:
            groups.setdefault((row.case, row.size), []).append(row)
        for (case, size), grp in groups.items():
            best = min((g.median_s for g in grp if g.baseline), default=None)
            for j, g in enumerate(grp):
                if size:
                    lo, hi = size / g.p90_s / 1e9, size / g.p10_s / 1e9
                    val = f"{g.value():9.2f}"
                    spread = f"[{lo:7.2f}-{hi:7.2f}]"
                else:
                    val = f"{g.value():9.3f}"
                    spread = f"[{g.p10_s * 1e6:7.3f}-{g.p90_s * 1e6:7.3f}]"
                ratio = "" if g.baseline or best is None else f"{best / g.median_s:7.2f}x"
                c = case if j == 0 else ""
                s = (_fmt_size(size) if size else "") if j == 0 else ""
                peak = f" {g.value() / g.peak_gbs:6.2f}" if with_peak and g.peak_gbs else ""
                lines.append(f"{c:<38} {s:>9}  {g.method:<42} {val} {spread:>17} {ratio:>8}{peak}")
    return "\n".join(lines)


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 15,
    sections: Sequence[str] = ("overhead", "out", "refused", "batch", "loader"),
    refused_size: int = 16 * MiB,
    progress: bool = True,
) -> Report:
    """Runs the chosen sections and returns the rows and the machine description."""
    report = Report(machine())
    r = _Runner(repeats, progress)
    if "overhead" in sections:
        bench_overhead(r)
    if "out" in sections:
        bench_out(r, sizes)
    if "refused" in sections:
        bench_refused(r, refused_size)
    if "batch" in sections:
        bench_batches(r)
    if "loader" in sections:
        bench_loader(r)
    report.rows = r.rows
    return report


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4K, 64M, 1G)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def result_basename(report: Report) -> str:
    m = report.machine
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", m["cpu"]).strip("-").lower()
    return f"{m['date'][:10]}-cpu-{cpu}-{m['cores']}c-{m['path']}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tensorbridge bench", description=__doc__)
    p.add_argument(
        "--sizes",
        type=_parse_size,
        nargs="+",
        default=DEFAULT_SIZES,
        help="copy sizes for the out= section (default: 4K 64K 1M 4M 16M 64M 256M)",
    )
    p.add_argument("--repeats", type=int, default=15, help="samples per method (default 15)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["overhead", "out", "refused", "batch", "loader"],
        choices=["overhead", "out", "refused", "batch", "loader"],
    )
    p.add_argument(
        "--refused-size",
        type=_parse_size,
        default=16 * MiB,
        help="array size for the 'cases torch refuses' section (default 16M)",
    )
    p.add_argument(
        "--fallback",
        action="store_true",
        help="measure the pure-Python fallback path instead of the extension",
    )
    p.add_argument(
        "--threads", type=int, help="threads for the compiled core's large copies (default: as set)"
    )
    p.add_argument("--save", metavar="DIR", help="also write DIR/<date>-<machine>.txt and .json")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2")

    if args.threads is not None:
        _backend.set_num_threads(args.threads)

    def go() -> Report:
        return run(args.sizes, args.repeats, args.sections, args.refused_size, not args.quiet)

    if args.fallback:
        with _backend.forced_fallback():
            report = go()
    else:
        report = go()
    text = format_report(report)
    print(text)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        base = os.path.join(args.save, result_basename(report))
        with open(base + ".txt", "w") as f:
            f.write(text + "\n")
        with open(base + ".json", "w") as f:
            json.dump(
                {"machine": report.machine, "rows": [asdict(x) for x in report.rows]}, f, indent=1
            )
        print(f"\nsaved {base}.txt and {base}.json", file=sys.stderr)
    return 0
