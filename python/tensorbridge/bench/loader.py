"""Data-loader benchmarks: batches on the host, and one DataLoader epoch end to end.

``bench_batches`` is the CPU benchmark's ``batch`` section (many small arrays, collate,
uint8 image normalization); ``bench_loader`` is its ``loader`` section on 'cpu' and the
last section of the GPU benchmark on 'cuda'.
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any

import numpy as np
import torch

from .. import _backend
from .._batch import LinkSender, send_batch, to_device, to_numpy_batch
from .._loader import Prefetcher, collate, images_to_tensor
from ._rows import Row
from ._runner import Method, Runner


def _batch_methods(arrays: list[np.ndarray], device: str) -> list[Method]:
    return [
        (
            "for a in batch: torch.from_numpy(a).to(dev)",
            True,
            lambda i: [torch.from_numpy(a).to(device, non_blocking=True) for a in arrays],
        ),
        ("tb.to_device(batch, dev)", False, lambda i: to_device(arrays, device)),
    ]


def _to_numpy_methods(tensors: list[torch.Tensor]) -> list[Method]:
    return [
        (
            "[t.detach().cpu().numpy() for t in batch]",
            True,
            lambda i: [t.detach().cpu().numpy() for t in tensors],
        ),
        ("tb.to_numpy_batch(batch)", False, lambda i: to_numpy_batch(tensors)),
    ]


def bench_batches(r: Runner) -> None:
    """Data-loader costs on the host: many small arrays, collate, image normalization."""
    sec = "batches, host-side cost per batch"
    for n in (10, 100, 1000):
        arrays = [np.random.rand(1024).astype(np.float32) for _ in range(n)]  # 4 KiB each
        r.group(sec, f"{n} arrays of 4 KiB to 'cpu'", 0, _batch_methods(arrays, "cpu"))
    for n in (10, 1000):
        tensors = [torch.rand(1024) for _ in range(n)]
        r.group(sec, f"{n} CPU tensors of 4 KiB to NumPy", 0, _to_numpy_methods(tensors))
    _packed_over_link(r, sec)
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


class _ReusedBuffer:
    """The destination buffer made once and reused, as the CUDA caching allocator hands
    a loop the same device block: a fresh host buffer per call would time the kernel's
    page faults, which device memory does not have. (The benchmark drops each result
    before the next call, so reusing it is safe here.)"""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def empty(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() != nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer


class _LinkSender(_ReusedBuffer, LinkSender):
    def __init__(self, link: Any) -> None:
        _ReusedBuffer.__init__(self)
        LinkSender.__init__(self, link)


HOST_SIDE = "the same, host side alone (packed into memory, no link)"


#: Arrays of 16 bytes: the host side's cost per array whatever its size (the copy is nil).
TINY_CASE = "1000 arrays of 16 B, packed into memory (no link)"


def summary(rows: list[Row]) -> str:
    """One line: the packed path's host-side cost per array (the slope from the fewest to
    the most arrays of its rows), against the target of 1 us, and the part of it that
    arrays of 16 bytes cost (the rest is the staging copy); empty without those rows."""
    host = [r for r in rows if r.method == HOST_SIDE and r.samples and r.measured()]
    points = sorted((int(r.case.split()[0]), r.median_s) for r in host if "of 4 KiB" in r.case)
    if len(points) < 2:
        return ""
    (n0, t0), (n1, t1) = points[0], points[-1]
    per_array = (t1 - t0) / (n1 - n0) * 1e6
    line = (
        f"batch: the packed path's host side costs {per_array:.2f} us per array (from {n0} "
        f"to {n1} arrays of 4 KiB: layout, staging copy, views; target 1 us)"
    )
    tiny = [r.median_s for r in rows if r.case == TINY_CASE and r.samples and r.measured()]
    if tiny:
        n = int(TINY_CASE.split()[0])
        line += f"; {tiny[0] / n * 1e6:.2f} us of it with arrays of 16 B (no copy to speak of)"
    return line


class _HostSide(_ReusedBuffer):
    """A sender that only packs (layout, staging copy by the copy threads): what the
    packed path costs the host before the link."""

    def send(self, plan: Any, buffer: torch.Tensor) -> None:
        plan.native.pack_into(buffer.numpy())

    def direct(self, leaf: torch.Tensor) -> bool:
        return False  # (the benchmark's batches are NumPy arrays)


#: Token ids or boxes of every length: one ragged group, most members after a few rows of
#: padding that start them on 16 bytes.
RAGGED_CASE = "1000 ragged arrays (256-1791 float32)"


def ragged_arrays(n: int) -> list[np.ndarray]:
    """n float32 arrays of 256 to 1791 elements (4 KiB on average), nearly all of
    different lengths."""
    rng = np.random.default_rng(n)
    return [rng.random(int(k), dtype=np.float32) for k in rng.integers(256, 1792, n)]


def _same_size(n: int) -> list[np.ndarray]:
    return [np.random.rand(1024).astype(np.float32) for _ in range(n)]  # 4 KiB each


def _packed_over_link(r: Runner, sec: str) -> None:
    """The GPU batch path of to_device (one native layout, staging by the copy threads, a
    few copies, a view and a split per group of arrays) over a simulated 25 GB/s link, against one
    pipeline transfer per array over the same link: the host-side cost per array of
    each, on a machine without a GPU."""
    C = _backend.ENGINE.C
    if C is None:
        return
    link = C.LinkSimulator(25.0, 0.0)
    sender, host = _LinkSender(link), _HostSide()
    cpu = torch.device("cpu")
    cases = [(f"{n} arrays of 4 KiB", _same_size(n)) for n in (10, 100, 1000)]
    cases.append((RAGGED_CASE, ragged_arrays(1000)))
    for case, arrays in cases:
        outs = [np.zeros(a.nbytes, np.uint8) for a in arrays]  # (touched: no page faults)

        def per_array(i: int, arrays: list[np.ndarray] = arrays, outs: Any = outs) -> None:
            for a, o in zip(arrays, outs, strict=True):
                link.to_device(a, o)

        def packed(i: int, arrays: list[np.ndarray] = arrays) -> None:
            send_batch(arrays, cpu, sender, None, False)

        def host_side(i: int, arrays: list[np.ndarray] = arrays) -> None:
            send_batch(arrays, cpu, host, None, False)

        r.group(
            sec,
            f"{case} over a simulated 25 GB/s link",
            0,
            [
                ("for a in batch: one pipeline transfer", True, per_array),
                ("tb.to_device's packed path", False, packed),
                (HOST_SIDE, False, host_side),
            ],
        )
    tiny = [np.random.rand(4).astype(np.float32) for _ in range(1000)]

    def tiny_host_side(i: int) -> None:
        send_batch(tiny, cpu, host, None, False)

    r.group(sec, TINY_CASE, 0, [("tb.to_device's packed path, host side", False, tiny_host_side)])


class _Images(torch.utils.data.Dataset[dict[str, Any]]):
    """uint8 HWC images with labels, as a decoding dataset would return them, from a pool
    of distinct random images made once: a sample costs no more than indexing, so the
    workers are not what the epoch waits for and the transfer shows."""

    def __init__(self, n: int, size: int, distinct: int = 16) -> None:
        self.n, self.size = n, size
        rng = np.random.default_rng(0)
        self.pool = rng.integers(0, 256, (min(n, distinct), size, size, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.pool[i % len(self.pool)], "label": i % 10}


class _Idle:
    """GPU time between model steps, per epoch: the gap from one step's end to the next
    one's start, summed over the epoch (CUDA events around each step)."""

    def __init__(self) -> None:
        self.per_step: list[float] = []  # seconds idle per gap, one value per epoch
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def around(self, step: Any, x: torch.Tensor) -> None:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step(x)
        end.record()
        self.events.append((begin, end))

    def epoch_done(self) -> None:
        torch.cuda.synchronize()
        ev, self.events = self.events, []
        if len(ev) > 1:
            gaps = [a[1].elapsed_time(b[0]) for a, b in itertools.pairwise(ev)]
            self.per_step.append(sum(gaps) / len(gaps) / 1e3)


def _sleep_cycles_per_second() -> float:
    """The rate of the GPU's clock that ``torch.cuda._sleep`` counts, measured with CUDA
    events (the clock differs between GPUs and with their load)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # (the first call pays for loading the kernel)
    cycles = 20_000_000
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (begin.elapsed_time(end) / 1e3)


def _loader_methods(
    device: str,
    images: int,
    batch: int,
    size: int,
    workers: int,
    step_s: float,
    idle: dict[str, _Idle],
    cuda: bool,
) -> list[Method]:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    data = _Images(images, size)

    cycles = int(step_s * _sleep_cycles_per_second()) if cuda else 0

    def model_step(x: torch.Tensor) -> None:  # a model step of fixed cost
        if cuda:
            torch.cuda._sleep(cycles)
        else:
            time.sleep(step_s)

    def loader(**kwargs: Any) -> torch.utils.data.DataLoader[Any]:
        return torch.utils.data.DataLoader(
            data,
            batch_size=batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            **kwargs,
        )

    stock = loader(pin_memory=cuda)
    ours = loader(collate_fn=collate, pin_memory=cuda)
    packed = loader(collate_fn=functools.partial(collate, packed=True), pin_memory=cuda)
    names = ("stock", "ours", "packed")
    for name in names:
        idle[name] = _Idle()

    def run(name: str, x: torch.Tensor) -> None:
        if cuda:
            idle[name].around(model_step, x)
        else:
            model_step(x)

    def done(name: str) -> None:
        if cuda:
            idle[name].epoch_done()

    def epoch_stock(i: int) -> None:
        for b in stock:
            x = b["image"].to(device, non_blocking=True)
            b["label"].to(device, non_blocking=True)
            run("stock", x.permute(0, 3, 1, 2).float().div(255).sub(m).div(s))
        done("stock")

    def epoch_ours(i: int) -> None:
        for b in Prefetcher(ours, device):
            run("ours", images_to_tensor(b["image"], mean=mean, std=std))
        done("ours")

    def epoch_packed(i: int) -> None:
        for b in Prefetcher(packed, device):
            run("packed", images_to_tensor(b["image"], mean=mean, std=std))
        done("packed")

    return [
        ("default_collate + pin_memory + .to(dev, non_blocking=True)", True, epoch_stock),
        ("tb.collate + pin_memory + tb.Prefetcher + tb.images_to_tensor", False, epoch_ours),
        (
            "tb.collate(packed=True) + pin_memory + tb.Prefetcher + tb.images_to_tensor",
            False,
            epoch_packed,
        ),
    ]


def bench_loader(
    r: Runner,
    device: str = "cpu",
    images: int = 256,
    batch: int = 32,
    size: int = 64,
    workers: int = 2,
    step_s: float = 2e-3,
    gpu: bool | None = None,
) -> None:
    """End to end: one epoch through a DataLoader with a model step of fixed cost; on a
    GPU also the GPU's idle time between model steps, per step.

    ``gpu`` (default: whether ``device`` is a CUDA device) picks the GPU's way: the stock
    loader pins its batches, the model step is a GPU kernel of fixed length and CUDA
    events time the gaps between steps. (A test takes it on the CPU, with those calls
    faked.)
    """
    cuda = torch.device(device).type == "cuda" if gpu is None else gpu
    steps = -(-images // batch)
    case = (
        f"one epoch, {images} images of {size}x{size}x3 uint8, batches of {batch}, "
        f"{workers} workers, {steps} model steps of {step_s * 1e3:g} ms (compute alone "
        f"{steps * step_s * 1e3:g} ms)"
    )
    idle: dict[str, _Idle] = {}
    methods = _loader_methods(device, images, batch, size, workers, step_s, idle, cuda)
    r.group(f"end to end on {device}", case, 0, methods)
    if not cuda:
        return
    for (name, baseline, _), key in zip(methods, ("stock", "ours", "packed"), strict=True):
        # the timed epochs only (an epoch lasts one sample): not the warm-up's, whose first
        # one starts the workers
        values = sorted(idle[key].per_step[-r.repeats :])
        if not values:
            continue
        r.rows.append(
            Row(
                f"end to end on {device}",
                "GPU idle between model steps, per step (CUDA events)",
                0,
                name,
                baseline,
                _quantile(values, 0.5),
                _quantile(values, 0.1),
                _quantile(values, 0.9),
                len(values),
            )
        )


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
