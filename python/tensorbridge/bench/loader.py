"""Data-loader benchmarks: batches on the host, and one DataLoader epoch end to end.

``bench_batches`` is the CPU benchmark's ``batch`` section (many small arrays, collate,
uint8 image normalization); ``bench_loader`` is its ``loader`` section on 'cpu' and the
last section of the GPU benchmark on 'cuda'.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .. import _backend
from .._batch import LinkSender, send_batch, to_device
from .._loader import Prefetcher, collate, images_to_tensor
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


def bench_batches(r: Runner) -> None:
    """Data-loader costs on the host: many small arrays, collate, image normalization."""
    sec = "batches, host-side cost per batch"
    for n in (10, 100, 1000):
        arrays = [np.random.rand(1024).astype(np.float32) for _ in range(n)]  # 4 KiB each
        r.group(sec, f"{n} arrays of 4 KiB to 'cpu'", 0, _batch_methods(arrays, "cpu"))
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


class _HostSide:
    """A sender that only packs (layout, staging copy by the copy threads): what the
    packed path costs the host before the link."""

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def send(self, plan: Any, buffer: torch.Tensor) -> None:
        plan.native.pack_into(buffer.numpy())


def _packed_over_link(r: Runner, sec: str) -> None:
    """The GPU batch path of to_device (one native layout, staging by the copy threads, a
    few copies, one view per dtype and shape) over a simulated 25 GB/s link, against one
    pipeline transfer per array over the same link: the host-side cost per array of
    each, on a machine without a GPU."""
    C = _backend.ENGINE.C
    if C is None:
        return
    link = C.LinkSimulator(25.0, 0.0)
    sender = LinkSender(link)
    cpu = torch.device("cpu")
    for n in (10, 100, 1000):
        arrays = [np.random.rand(1024).astype(np.float32) for _ in range(n)]
        outs = [np.empty(a.nbytes, np.uint8) for a in arrays]

        def per_array(i: int, arrays: list[np.ndarray] = arrays, outs: Any = outs) -> None:
            for a, o in zip(arrays, outs, strict=True):
                link.to_device(a, o)

        def packed(i: int, arrays: list[np.ndarray] = arrays) -> None:
            send_batch(arrays, cpu, sender, None, False)

        def host_side(i: int, arrays: list[np.ndarray] = arrays) -> None:
            send_batch(arrays, cpu, _HostSide(), None, False)

        r.group(
            sec,
            f"{n} arrays of 4 KiB over a simulated 25 GB/s link",
            0,
            [
                ("for a in batch: one pipeline transfer", True, per_array),
                ("tb.to_device's packed path", False, packed),
                ("the same, host side alone (packed into memory, no link)", False, host_side),
            ],
        )


class _Images(torch.utils.data.Dataset[dict[str, Any]]):
    """Synthetic uint8 HWC images with labels, as a JPEG-decoding dataset would return."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(i)
        return {
            "image": rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8),
            "label": i % 10,
        }


def _loader_methods(
    device: str, images: int, batch: int, size: int, workers: int, step_s: float
) -> list[Method]:
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
    r: Runner,
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
