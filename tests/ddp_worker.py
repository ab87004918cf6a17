"""One rank of tests/test_distributed.py, started as torchrun would start it (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

It joins a gloo process group, feeds a tensorbridge Prefetcher from a DataLoader over its
DistributedSampler shard with collate_fn=tb.collate, checks every batch against
default_collate of the same samples, and all-reduces what it saw, so the parent can tell
that both ranks ran and that together they covered the dataset. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

import tensorbridge as tb
from tensorbridge import _backend

SAMPLES = 96
BATCH = 8


class Samples(Dataset):
    """Fresh random samples of several kinds: an image, float boxes, an int label, an id."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (SAMPLES, 16, 16, 3), dtype=np.uint8)
        self.boxes = rng.standard_normal((SAMPLES, 4)).astype(np.float32)
        self.labels = rng.integers(0, 10, SAMPLES)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.images[i],
            "boxes": self.boxes[i],
            "label": int(self.labels[i]),
            "id": i,
        }


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seed = int(os.environ["TB_TEST_SEED"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    info = tb.info()
    device = tb.rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    dataset = Samples(seed)  # the same on every rank; the sampler shards it
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        collate_fn=tb.collate,
        num_workers=int(os.environ.get("TB_TEST_WORKERS", "0")),
    )
    order = list(sampler)  # this rank's indices, in the order the loader takes them
    seen = ids = batches = 0
    for i, batch in enumerate(tb.Prefetcher(loader, device)):
        expected = default_collate([dataset[j] for j in order[i * BATCH : (i + 1) * BATCH]])
        assert set(batch) == set(expected), (set(batch), set(expected))
        for key, want in expected.items():
            got = batch[key]
            assert isinstance(got, torch.Tensor) and got.device.type == device.type, key
            got = got.cpu()
            assert got.dtype == want.dtype and got.shape == want.shape, (key, got, want)
            assert torch.equal(got, want), key
        seen += len(expected["id"])
        ids += int(expected["id"].sum())
        batches += 1

    totals = torch.tensor([seen, ids, rank + 1, batches], dtype=torch.int64)
    dist.all_reduce(totals)  # every rank gets the sums: both ran, together they covered all
    C = _backend._LOADED
    print(
        json.dumps(
            {
                "rank": rank,
                "ranks": info["ranks"],
                "threads": info["threads"],
                "core_budget": (
                    C.cuda_pinned_stats()["budget"] if hasattr(C, "cuda_pinned_stats") else None
                ),
                "core_threads": C.get_num_threads() if C is not None else None,
                "batches": batches,
                "totals": totals.tolist(),
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
