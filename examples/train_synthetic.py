#!/usr/bin/env python
"""Train a small CNN for a few steps on synthetic uint8 images, fed through tensorbridge.

    python examples/train_synthetic.py                  # CPU, or the GPU if there is one
    python examples/train_synthetic.py --device cuda --steps 50 --workers 4

The loader path: a Dataset of uint8 HWC images (as they come from JPEG decoders) ->
DataLoader workers -> tb.collate -> the pin-memory thread (a pinned copy on a GPU machine) ->
tb.Prefetcher (moves batch i+1 on a side stream while the model runs on batch i) ->
tb.images_to_tensor (uint8 crosses the link; one kernel scales, normalizes and turns
HWC into CHW on the device). The same loop runs on the CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import tensorbridge as tb

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class SyntheticImages(torch.utils.data.Dataset):
    """Images whose class is the brightest colour channel, so the model can learn something."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        label = int(rng.integers(0, 3))
        image = rng.integers(0, 160, (self.size, self.size, 3), dtype=np.uint8)
        image[..., label] += 90  # the class channel is brighter
        return {"image": image, "label": label, "index": i}


def build_model(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def train(
    device: str, steps: int, batch_size: int, workers: int, size: int, log=print
) -> list[float]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = SyntheticImages(steps * batch_size, size)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=tb.collate,
        # (the pin-memory thread pins the workers' batches; with num_workers=0, tb.collate
        # stacks into pinned memory itself and the thread passes its batches on as they are)
        pin_memory=dev.type == "cuda",
    )
    losses = []
    start = time.perf_counter()
    for step, batch in enumerate(tb.Prefetcher(loader, dev)):
        x = tb.images_to_tensor(batch["image"], mean=MEAN, std=STD)  # uint8 NHWC -> float NCHW
        loss = nn.functional.cross_entropy(model(x), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(tb.to_numpy(loss)))
        log(f"step {step:3d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    log(
        f"{len(losses)} steps, {len(losses) * batch_size / seconds:.0f} images/s on {dev} "
        f"(tensorbridge {tb.__version__}, {'extension' if tb.info()['extension'] else 'fallback'})"
    )
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="image height and width")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device: {tb.info()['cuda_reason']}")
    train(args.device, args.steps, args.batch_size, args.workers, args.size)


if __name__ == "__main__":
    main()
