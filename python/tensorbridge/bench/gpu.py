"""GPU benchmark: device<->host transfers beside torch's idioms, measured in the same run.

``python -m tensorbridge bench-gpu [--save DIR] [--plot FILE.png]``. Every row is a
wall-clock time from the call to completion (synchronizing inside the timed region),
reported in GB/s and as a fraction of P, the pinned peak measured at the start of the
same run (torch ``copy_(non_blocking=True)`` between a pinned tensor and the device,
256 MiB). Destination pages are touched before timing; small sizes rotate buffers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from .. import _backend, _pinned
from .._batch import to_device
from .._convert import to_numpy, to_tensor
from .._loader import collate, images_to_tensor
from .._registry import registration_options
from . import _plot, targets
from ._report import format_report, machine
from ._results import output_problem, save
from ._rows import GiB, KiB, MiB, Parser, Report, Row, parse_size, slug
from ._runner import Call, Method, Runner, buffers_to_rotate, measure_group
from .loader import RAGGED_CASE, bench_loader, ragged_arrays

DEFAULT_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB]
SECTIONS = ("d2h", "h2d", "both", "batch", "registered")
#: Where the transfer sections' (and bench-tune's) device tensors live and go: CUDA. (A
#: test runs them on "cpu", with torch's CUDA calls faked, so that a broken section shows
#: on any machine before a GPU's time goes to it.)
DEVICE = "cuda"


def gpu_machine() -> dict[str, Any]:
    """machine(), plus the GPU, its memory, torch's CUDA, the driver and the PCIe link."""
    m = machine()
    props = torch.cuda.get_device_properties(0)
    m.update(
        {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GiB, 1),
            "torch_cuda": torch.version.cuda,
        }
    )
    query = "driver_version,pcie.link.gen.current,pcie.link.width.current"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()[0]
        driver, gen, width = (v.strip() for v in out.split(","))
        m.update({"driver": driver, "pcie": f"gen {gen} x{width}"})
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        m.update({"driver": None, "pcie": None})
    return m


def synced(result: object) -> object:
    """Waits for the device, then returns result: ``lambda i: synced(t.copy_(...))``.

    The argument is evaluated first, so the call and its completion are both timed.
    """
    torch.cuda.synchronize()
    return result


def pinned_peak(repeats: int, nbytes: int = 256 * MiB) -> tuple[float, float]:
    """(P device->host, P host->device) in GB/s: a pinned tensor and the device, 256 MiB."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    d2h, h2d = measure_group(
        [
            lambda i: synced(host.copy_(dev, non_blocking=True)),
            lambda i: synced(dev.copy_(host, non_blocking=True)),
        ],
        repeats,
    )
    return nbytes / d2h[0] / 1e9, nbytes / h2d[0] / 1e9


@dataclasses.dataclass
class Limits:
    """The run's limits in GB/s: P (the pinned peak) and H (the host copy ceiling) each way."""

    P_d2h: float
    P_h2d: float
    H_d2h: float
    H_h2d: float

    def of(self, direction: str, memory: str) -> float:
        """The limit a row is judged against: P for pinned memory, min(P, H) for pageable;
        both directions at once: the sum of the two directions' limits."""
        if direction == "both":
            return self.of("d2h", memory) + self.of("h2d", memory)
        p = self.P_d2h if direction == "d2h" else self.P_h2d
        h = self.H_d2h if direction == "d2h" else self.H_h2d
        return p if memory == PINNED else min(p, h)


def host_ceiling(repeats: int, nbytes: int = 256 * MiB) -> tuple[float, float]:
    """(H device->host, H host->device) in GB/s: the copy between page-locked and pageable
    memory that staging does on the host, 256 MiB, with the engine's threads (torch's
    threads on the fallback path)."""
    if _backend.ENGINE.cuda_engine:
        C = _backend.ENGINE.core
        index = torch.cuda.current_device()
        d2h = statistics.median(C.cuda_host_ceiling(index, nbytes, False, repeats))
        h2d = statistics.median(C.cuda_host_ceiling(index, nbytes, True, repeats))
        return nbytes / d2h / 1e9, nbytes / h2d / 1e9
    pinned = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    d2h_s, h2d_s = measure_group(
        [lambda i: pageable.copy_(pinned), lambda i: pinned.copy_(pageable)], repeats
    )
    return nbytes / d2h_s[0] / 1e9, nbytes / h2d_s[0] / 1e9


#: Memory kinds of transfer rows: the limit a row is judged against follows from it.
PINNED, REUSED, FRESH = "pinned", "pageable-reused", "pageable-fresh"
#: A measured method with the memory it moves from or into.
TransferMethod = tuple[str, bool, Call, str]


def _group(
    r: Runner,
    section: str,
    case: str,
    nbytes: int,
    methods: Sequence[TransferMethod],
    direction: str,
    limits: Limits,
) -> None:
    """Measures one row group and tags its rows with direction, memory and their limit."""
    r.group(section, case, nbytes, [(name, base, fn) for name, base, fn, _ in methods])
    for row, (_, _, _, memory) in zip(r.rows[-len(methods) :], methods, strict=True):
        row.direction = direction
        row.memory = memory
        row.peak_gbs = limits.of(direction, memory)


def _d2h_methods(
    ts: list[torch.Tensor],
    out: np.ndarray,
    torch_out: np.ndarray,
    pinned_t: torch.Tensor,
    pinned_out: np.ndarray,
) -> list[TransferMethod]:
    """``out`` is tensorbridge's reused array (which its registration cache page-locks
    once it comes back), ``torch_out`` the baselines' own: torch never copies into
    memory that tensorbridge page-locked."""
    k = len(ts)
    return [
        ("t.cpu().numpy()", True, lambda i: ts[i % k].cpu().numpy(), FRESH),
        ("tb.to_numpy(t)", False, lambda i: to_numpy(ts[i % k]), FRESH),
        (
            "np.copyto(out, t.cpu().numpy())",
            True,
            lambda i: np.copyto(torch_out, ts[i % k].cpu().numpy()),
            REUSED,
        ),
        (
            "torch.from_numpy(out).copy_(t)",
            True,
            lambda i: torch.from_numpy(torch_out).copy_(ts[i % k]),
            REUSED,
        ),
        (
            "tb.to_numpy(t, out=out)  [pageable]",
            False,
            lambda i: to_numpy(ts[i % k], out=out),
            REUSED,
        ),
        (
            "pinned.copy_(t, non_blocking=True); sync",
            True,
            lambda i: synced(pinned_t.copy_(ts[i % k], non_blocking=True)),
            PINNED,
        ),
        (
            "tb.to_numpy(t, out=out)  [pinned out]",
            False,
            lambda i: to_numpy(ts[i % k], out=pinned_out),
            PINNED,
        ),
    ]


def bench_d2h(r: Runner, sizes: Sequence[int], limits: Limits) -> None:
    """Device to host: into a fresh array, a reused pageable array and a pinned one."""
    for nbytes in sizes:
        n = nbytes // 4
        ts = [torch.rand(n, device=DEVICE) for _ in range(buffers_to_rotate(nbytes, 256 * MiB))]
        out, torch_out = np.ones(n, np.float32), np.ones(n, np.float32)  # pages touched
        pinned_out = _pinned.empty_pinned((n,), np.float32)
        pinned_out.fill(1)
        methods = _d2h_methods(ts, out, torch_out, torch.ones(n, pin_memory=True), pinned_out)
        _group(r, "device -> host, float32", "to an array", nbytes, methods, "d2h", limits)


def _h2d_methods(
    arrs: list[np.ndarray], torch_arrs: list[np.ndarray], pinned_a: np.ndarray
) -> list[TransferMethod]:
    """``arrs`` are tensorbridge's reused sources (page-locked by its registration cache
    once they come back), ``torch_arrs`` the baselines' own copies: pin_memory() of a
    page-locked array would skip its copy."""
    k = len(arrs)
    return [
        (
            "torch.from_numpy(a).cuda()",
            True,
            lambda i: synced(torch.from_numpy(torch_arrs[i % k]).cuda()),
            REUSED,
        ),
        (
            "torch.from_numpy(a).pin_memory().cuda(non_blocking=True)",
            True,
            lambda i: synced(
                torch.from_numpy(torch_arrs[i % k]).pin_memory().cuda(non_blocking=True)
            ),
            REUSED,
        ),
        (
            "tb.to_tensor(a, 'cuda')  [pageable]",
            False,
            lambda i: synced(to_tensor(arrs[i % k], DEVICE)),
            REUSED,
        ),
        (
            "torch.from_numpy(a).cuda(non_blocking=True)  [pinned a]",
            True,
            lambda i: synced(torch.from_numpy(pinned_a).cuda(non_blocking=True)),
            PINNED,
        ),
        (
            "tb.to_tensor(a, 'cuda')  [pinned a]",
            False,
            lambda i: synced(to_tensor(pinned_a, DEVICE)),
            PINNED,
        ),
    ]


def bench_h2d(r: Runner, sizes: Sequence[int], limits: Limits) -> None:
    """Host to device from an array: pageable (the same arrays coming back) and pinned."""
    for nbytes in sizes:
        n = nbytes // 4
        rng = np.random.default_rng(nbytes)
        arrs = [
            rng.random(n, dtype=np.float32) for _ in range(buffers_to_rotate(nbytes, 256 * MiB))
        ]
        torch_arrs = [a.copy() for a in arrs]
        pinned_a = _pinned.empty_pinned((n,), np.float32)
        pinned_a[:] = arrs[0]
        methods = _h2d_methods(arrs, torch_arrs, pinned_a)
        _group(r, "host -> device, float32", "from an array", nbytes, methods, "h2d", limits)


def _both_methods(
    t: torch.Tensor,
    outs: tuple[np.ndarray, np.ndarray],
    arrs: tuple[np.ndarray, np.ndarray],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> list[TransferMethod]:
    """The download and the upload from two threads, each on its own stream (two copy
    engines; on one stream the GPU would run them one after the other). ``outs`` and
    ``arrs``: (tensorbridge's, torch's) reused arrays, apart so that torch never moves
    memory tensorbridge's registration cache page-locked."""
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def on(stream: torch.cuda.Stream, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.cuda.stream(stream):
                return fn()

        return run

    def pair(down: Callable[[], object], up: Callable[[], object]) -> None:
        f1, f2 = pool.submit(on(streams[0], down)), pool.submit(on(streams[1], up))
        f1.result()
        f2.result()
        torch.cuda.synchronize()

    (out, torch_out), (a, torch_a) = outs, arrs
    return [
        (
            "torch: from_numpy(out).copy_(t) + from_numpy(a).cuda()",
            True,
            lambda i: pair(
                lambda: torch.from_numpy(torch_out).copy_(t),
                lambda: torch.from_numpy(torch_a).cuda(),
            ),
            REUSED,
        ),
        (
            "tb: to_numpy(t, out=out) + to_tensor(a, 'cuda')",
            False,
            lambda i: pair(lambda: to_numpy(t, out=out), lambda: to_tensor(a, DEVICE)),
            REUSED,
        ),
    ]


def bench_both(r: Runner, sizes: Sequence[int], limits: Limits) -> None:
    """Both directions at once, from two threads (a loader uploading while results come
    back), each on its own stream."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for nbytes in [s for s in sizes if s >= 16 * MiB]:
            n = nbytes // 4
            a = np.random.default_rng(n).random(n, dtype=np.float32)
            methods = _both_methods(
                torch.rand(n, device=DEVICE),
                (np.ones(n, np.float32), np.ones(n, np.float32)),
                (a, a.copy()),
                pool,
            )
            section = "both directions at once, float32"
            _group(r, section, "down + up", 2 * nbytes, methods, "both", limits)


def _gpu_batch_methods(arrays: list[np.ndarray]) -> list[Method]:
    return [
        (
            "for a in batch: torch.from_numpy(a).to(dev, non_blocking=True)",
            True,
            lambda i: synced([torch.from_numpy(a).to(DEVICE, non_blocking=True) for a in arrays]),
        ),
        (
            "per-leaf pinning: from_numpy(a).pin_memory().to(dev, non_blocking=True)",
            True,
            lambda i: synced(
                [torch.from_numpy(a).pin_memory().to(DEVICE, non_blocking=True) for a in arrays]
            ),
        ),
        ("tb.to_device(batch, dev)", False, lambda i: synced(to_device(arrays, DEVICE))),
    ]


def bench_batches(r: Runner, peak: float) -> None:
    """Many small arrays to the device, and uint8 images normalized on the device."""
    for size in (4 * KiB, 64 * KiB):
        for n in (10, 100, 1000, 10000):
            if n * size > 1 * GiB // 2:
                continue
            rng = np.random.default_rng(n)
            arrays = [rng.random(size // 4, dtype=np.float32) for _ in range(n)]
            r.group(
                "batches of small arrays -> device",
                f"{n} x {size // KiB} KiB",
                n * size,
                _gpu_batch_methods(arrays),
                peak_gbs=peak,
            )
    ragged = ragged_arrays(1000)
    r.group(
        "batches of small arrays -> device",
        RAGGED_CASE,
        sum(a.nbytes for a in ragged),
        _gpu_batch_methods(ragged),
        peak_gbs=peak,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    torch_images = images.copy()  # (never page-locked by tensorbridge's registration cache)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m = torch.tensor(mean, device=DEVICE)
    sd = torch.tensor(std, device=DEVICE)
    r.group(
        "uint8 images -> normalized float NCHW on the device",
        "64 x 224x224x3",
        images.nbytes,
        [
            (
                "from_numpy(x).cuda().float().div(255).sub(m).div(s).permute().contiguous()",
                True,
                lambda i: synced(
                    torch.from_numpy(torch_images)
                    .cuda()
                    .float()
                    .div(255)
                    .sub(m)
                    .div(sd)
                    .permute(0, 3, 1, 2)
                    .contiguous()
                ),
            ),
            (
                "tb.images_to_tensor(x, 'cuda', mean=m, std=s)",
                False,
                lambda i: synced(images_to_tensor(images, DEVICE, mean=mean, std=std)),
            ),
        ],
        peak_gbs=peak,
    )
    _images_from_collate(r, peak, mean, std)


def _images_from_collate(r: Runner, peak: float, mean: list[float], std: list[float]) -> None:
    """A batch of image samples collated in the main process, then normalized on the
    device: the loader's idioms from the samples on, beside tb.collate (which stacks into
    page-locked memory) + images_to_tensor. A third tensorbridge row stacks on the core's
    copy threads instead of np.stack's one thread: whether collate should do so."""
    samples = [
        np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8) for i in range(64)
    ]
    m = torch.tensor(mean, device=DEVICE)
    sd = torch.tensor(std, device=DEVICE)
    C = _backend.ENGINE.C

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255).sub(m).div(sd).permute(0, 3, 1, 2).contiguous()

    methods: list[Method] = [
        (
            "default_collate(s).cuda() + float().div(255).sub(m).div(s).permute().contiguous()",
            True,
            lambda i: synced(normalize(default_collate(samples).cuda())),
        ),
        (
            "default_collate(s).pin_memory().cuda(non_blocking=True) + the same",
            True,
            lambda i: synced(
                normalize(default_collate(samples).pin_memory().cuda(non_blocking=True))
            ),
        ),
        (
            "tb.images_to_tensor(tb.collate(s), 'cuda', mean=m, std=s)",
            False,
            lambda i: synced(images_to_tensor(collate(samples), DEVICE, mean=mean, std=std)),
        ),
    ]
    if C is not None:

        def on_copy_threads(i: int) -> object:
            pinned = torch.empty((len(samples), 224, 224, 3), dtype=torch.uint8, pin_memory=True)
            stack_on_copy_threads(samples, pinned.numpy())
            return synced(images_to_tensor(pinned, DEVICE, mean=mean, std=std))

        name = "the same, stacked on the copy threads (not what collate does yet)"
        methods.append((name, False, on_copy_threads))
    r.group(
        "uint8 images -> normalized float NCHW on the device",
        "64 samples of 224x224x3, collated in the main process",
        len(samples) * samples[0].nbytes,
        methods,
        peak_gbs=peak,
    )
    # A dict batch, as a loader's: the collated (page-locked) image field crosses in one
    # DMA from where it is, the labels (one small array) on their own; the idiom pins
    # each field again and moves it with its own copy. A section of its own: no images
    # are normalized here, and the images' target reads its section's "64 samples" rows.
    dicts = [{"image": x, "label": i % 10} for i, x in enumerate(samples)]

    def idiom(i: int) -> object:
        batch = default_collate(dicts)
        return synced({k: v.pin_memory().to(DEVICE, non_blocking=True) for k, v in batch.items()})

    r.group(
        "collated batches -> device",
        "64 samples (224x224x3 image, label) collated in the main process",
        len(samples) * samples[0].nbytes,
        [
            (
                "default_collate(s), then .pin_memory().to(dev, non_blocking=True) per field",
                True,
                idiom,
            ),
            (
                "tb.to_device(tb.collate(s), dev)",
                False,
                lambda i: synced(to_device(collate(dicts), DEVICE)),
            ),
        ],
        peak_gbs=peak,
    )


def stack_on_copy_threads(samples: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """``np.stack(samples, out=out)`` by the compiled core's copy threads: one packed
    layout of the samples, copied into ``out`` (C-contiguous, of the stacked shape and
    dtype) in one call. Needs the compiled core, and samples whose packed layout has no
    gaps (each sample a multiple of 256 bytes, as images of 224x224x3 are)."""
    C = _backend.ENGINE.C
    if C is None:
        raise RuntimeError("stacking on the copy threads needs the compiled core")
    if not isinstance(out, np.ndarray) or not isinstance(samples, list):
        raise TypeError(
            f"stack_on_copy_threads takes a list of arrays and an ndarray out, got "
            f"{type(samples).__name__} and {type(out).__name__}: use numpy.stack(samples, out=out)"
        )
    layout = C.PackedArrays(samples)
    stacked = (len(samples), *samples[0].shape) if samples else (0,)
    if (
        len(layout.groups) != 1
        or out.shape != stacked
        or out.dtype != samples[0].dtype
        or not out.flags.c_contiguous
        or layout.nbytes != out.nbytes
    ):
        raise ValueError(
            f"out ({out.shape} {out.dtype}, C-contiguous: {out.flags.c_contiguous}) is not the "
            f"samples stacked, or their packed layout ({layout.nbytes} bytes in "
            f"{len(layout.groups)} groups) has gaps: use numpy.stack(samples, out=out)"
        )
    layout.pack_into(out.reshape(-1).view(np.uint8))
    return out


def _tag(rows: list[Row], direction: str, memory: str, limits: Limits) -> None:
    for row in rows:
        row.direction, row.memory = direction, memory
        row.peak_gbs = limits.of(direction, memory)


def _registering(call: Callable[[], object]) -> None:
    """call() with registration on the first sighting: what registering an array costs,
    unregistering it when it is freed (here, as the call returns) included."""
    saved = registration_options()["sightings"]
    registration_options(sightings=1)
    try:
        call()
    finally:
        registration_options(sightings=saved)


def _reused_methods(
    t: torch.Tensor, a: np.ndarray, out: np.ndarray, plain: np.ndarray, untracked: np.ndarray
) -> tuple[list[Method], list[Method]]:
    """(device -> host, host -> device): torch on a plain pageable array, tb staged (memory
    the cache cannot register) and tb on an array it registers during the warm-up."""
    d2h: list[Method] = [
        ("torch.from_numpy(out).copy_(t)", True, lambda i: torch.from_numpy(plain).copy_(t)),
        (
            "tb.to_numpy(t, out=out)  [staged: memory it cannot register]",
            False,
            lambda i: to_numpy(t, out=untracked),
        ),
        ("tb.to_numpy(t, out=out)  [registered]", False, lambda i: to_numpy(t, out=out)),
    ]
    h2d: list[Method] = [
        ("torch.from_numpy(a).cuda()", True, lambda i: synced(torch.from_numpy(plain).cuda())),
        (
            "tb.to_tensor(a, 'cuda')  [staged: memory it cannot register]",
            False,
            lambda i: synced(to_tensor(untracked, DEVICE)),
        ),
        ("tb.to_tensor(a, 'cuda')  [registered]", False, lambda i: synced(to_tensor(a, DEVICE))),
    ]
    return d2h, h2d


def _registering_methods(t: torch.Tensor, a: np.ndarray) -> tuple[list[Method], list[Method]]:
    """(device -> host, host -> device) into or from a fresh array every call: torch, tb
    on a first sighting (staged), tb registering it (and unregistering it at its free)."""
    n = a.size
    d2h: list[Method] = [
        (
            "torch.from_numpy(np.empty(n)).copy_(t)",
            True,
            lambda i: torch.from_numpy(np.empty(n, np.float32)).copy_(t),
        ),
        (
            "tb.to_numpy(t, out=np.empty(n))  [first sighting: staged]",
            False,
            lambda i: to_numpy(t, out=np.empty(n, np.float32)),
        ),
        (
            "tb.to_numpy(t, out=np.empty(n))  [registers; unregisters at free]",
            False,
            lambda i: _registering(lambda: to_numpy(t, out=np.empty(n, np.float32))),
        ),
    ]
    h2d: list[Method] = [
        (
            "torch.from_numpy(a.copy()).cuda()",
            True,
            lambda i: synced(torch.from_numpy(a.copy()).cuda()),
        ),
        (
            "tb.to_tensor(a.copy(), 'cuda')  [first sighting: staged]",
            False,
            lambda i: synced(to_tensor(a.copy(), DEVICE)),
        ),
        (
            "tb.to_tensor(a.copy(), 'cuda')  [registers; unregisters at free]",
            False,
            lambda i: _registering(lambda: synced(to_tensor(a.copy(), DEVICE))),
        ),
    ]
    return d2h, h2d


#: The largest fresh array the registration section page-locks per call.
_MAX_FRESH = 256 * MiB


def _bench_registered_size(r: Runner, nbytes: int, limits: Limits) -> None:
    n = nbytes // 4
    t = torch.rand(n, device=DEVICE)
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    plain = a.copy()  # given to torch only: never registered
    untracked = np.frombuffer(bytearray(nbytes), np.float32)  # memory the cache cannot track
    untracked[:] = a
    reused = _reused_methods(t, a, np.ones(n, np.float32), plain, untracked)
    registering = _registering_methods(t, a)
    for k, (direction, label) in enumerate((("d2h", "device -> host"), ("h2d", "host -> device"))):
        section = f"registration cache, {label}, float32"
        for case, methods, memory in (
            ("reused array", reused[k], REUSED),
            ("registering a fresh array", registering[k], FRESH),
        ):
            if memory == FRESH and nbytes > _MAX_FRESH:
                continue  # (seconds a call: page faults of a fresh array, then its page-locking)
            r.group(section, case, nbytes, methods)
            _tag(r.rows[-len(methods) :], direction, memory, limits)


def bench_registered(r: Runner, sizes: Sequence[int], limits: Limits) -> None:
    """Pageable arrays that come back, page-locked in place by the registration cache.

    For each direction and size, two row groups, judged as pageable rows are, against
    min(P, H) (the JSON also carries gbs: a registered array is one direct DMA, which
    only P limits):

    - a reused array: the same pageable array every call (registered during the warm-up),
      beside torch's copy of a pageable array and tensorbridge's staged path (memory the
      cache cannot register: a bytearray's);
    - registering a fresh array: a new array every call, registered on that sighting and
      unregistered when it is freed (what a reused array pays once), beside the same call
      as a first sighting (staged) and torch's copy with a fresh array; up to 256 MiB.
    """
    saved = registration_options()
    try:
        registration_options(enabled=True)
        for nbytes in [s for s in sizes if s >= saved["min_bytes"]]:
            _bench_registered_size(r, nbytes, limits)  # (its arrays unregistered as it returns)
    finally:
        registration_options(**saved)


def plot(report: Report, path: str) -> None:
    """GB/s against size for every method, one panel per direction."""
    transfer = ("device -> host", "host -> device", "both directions")
    sections = sorted({row.section for row in report.rows if row.section.startswith(transfer)})
    m = report.machine
    title = f"tensorbridge on {m['gpu']} ({m.get('pcie')}), {m['cpu']}"
    _plot.plot(report, path, title, sections=sections)


def _text(report: Report, limits: Limits) -> str:
    """The printed report: the tables, then the machine's GPU, the limits and the pool."""
    m = report.machine
    done = ", ".join(
        f"{name} ({seconds:.0f} s)" for name, seconds in m.get("section_seconds", {}).items()
    )
    failed = m.get("failed_sections") or []
    return "\n".join(
        [
            format_report(report, title="tensorbridge GPU benchmark"),
            "",
            f"GPU {m['gpu']}, driver {m.get('driver')}, PCIe {m.get('pcie')}, torch CUDA "
            f"{m['torch_cuda']}; transfers through the {m['engine']}.",
            f"P (pinned peak, 256 MiB): device->host {limits.P_d2h:.2f} GB/s, host->device "
            f"{limits.P_h2d:.2f} GB/s; H (host copy ceiling, 256 MiB): device->host "
            f"{limits.H_d2h:.2f} GB/s, host->device {limits.H_h2d:.2f} GB/s. 'of lim' is each "
            "transfer row's GB/s over P (pinned) or min(P, H) (pageable) of its direction "
            "(both: over the sum).",
            f"sections run, in order: {done or 'none'}"
            + (f"; failed: {', '.join(failed)} (see the run's log)" if failed else ""),
            f"pinned pool after the run: {_pinned.pinned_stats()}",
            "",
            *targets.lines(targets.verdicts(report)),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tensorbridge bench-gpu [options]``; returns the exit status.

    Sections run in the order given. With --save, the files are rewritten after every
    section, so a run stopped part-way (a time limit) keeps what it measured; a section
    that fails is reported and the run goes on with the next (exit status 1).
    """
    p = Parser(prog="python -m tensorbridge bench-gpu", description=__doc__)
    p.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=DEFAULT_SIZES,
        help="transfer sizes (default: 4K 64K 1M 4M 16M 64M 256M 1G)",
    )
    p.add_argument("--repeats", type=int, default=15, help="samples per method (default 15)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help="measured in the order given (default: %(default)s)",
    )
    p.add_argument(
        "--save",
        metavar="DIR",
        help="also write DIR/<date>-gpu-<name>.txt and .json, rewritten after each section",
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw GB/s against size (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    problem = output_problem(args.save, args.plot)
    if problem:
        p.error(problem)  # before the run, not after minutes of measuring
    if min(args.sizes) < 4:
        p.error("--sizes: each size must be at least 4 bytes (one float32)")
    if args.plot and not _plot.available():
        p.error(_plot.MISSING)
    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            reason = f"torch {torch.__version__} is a CPU build: install a CUDA build of torch."
        else:  # (the driver's view, where the core can ask it: no driver, no device...)
            asked = _backend.ENGINE.C is not None and _backend._cuda_probe()["compiled"]
            reason = (asked and _backend.cuda_status()[2]) or "torch.cuda.is_available() is False."
        print(f"bench-gpu: needs a GPU, and torch has none here: {reason}", file=sys.stderr)
        return 2
    if args.repeats < 2:
        p.error("--repeats must be at least 2")
    report = Report(gpu_machine())
    engine = _backend.ENGINE.cuda_engine
    report.machine["engine"] = "compiled CUDA engine" if engine else "torch fallback"
    r = Runner(args.repeats, not args.quiet)
    p_d2h, p_h2d = pinned_peak(args.repeats)
    h_d2h, h_h2d = host_ceiling(args.repeats)
    limits = Limits(p_d2h, p_h2d, h_d2h, h_h2d)
    report.limits = dataclasses.asdict(limits)
    report.machine["pinned_peak_gbs"] = {"d2h": round(p_d2h, 2), "h2d": round(p_h2d, 2)}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    report.machine["section_seconds"] = seconds
    report.machine["failed_sections"] = failed

    def batch() -> None:
        bench_batches(r, p_h2d)
        # Sized so that the host-to-device copies matter: 38.5 MB batches, a 5 ms step,
        # samples that cost no more than indexing (the workers keep up).
        bench_loader(r, "cuda", images=4096, batch=256, size=224, workers=8, step_s=5e-3)

    sections: dict[str, Callable[[], None]] = {
        "d2h": lambda: bench_d2h(r, args.sizes, limits),
        "h2d": lambda: bench_h2d(r, args.sizes, limits),
        "both": lambda: bench_both(r, args.sizes, limits),
        "batch": batch,
        "registered": lambda: bench_registered(r, args.sizes, limits),
    }
    base = None
    for name in dict.fromkeys(args.sections):
        started = time.perf_counter()
        try:
            sections[name]()
        except Exception:  # one broken section costs that section, not the others' results
            traceback.print_exc()
            print(f"bench-gpu: section {name!r} failed (above); going on", file=sys.stderr)
            failed.append(name)
        seconds[name] = round(time.perf_counter() - started, 1)
        report.rows = r.rows
        if args.save:
            base = save(
                report,
                _text(report, limits),
                args.save,
                f"{report.machine['date'][:10]}-gpu-{slug(report.machine['gpu'])}",
                base,
            )
    text = _text(report, limits)
    print(text)
    if args.save:
        print(f"\nsaved {base}.txt and {base}.json", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 1 if failed else 0
