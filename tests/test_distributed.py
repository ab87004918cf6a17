"""Two ranks on one node, as torchrun starts them: torch.distributed with the gloo backend
on the CPU (on a GPU machine each rank also moves its batches to its rank_device()). Each
rank feeds a Prefetcher from a DataLoader with collate_fn=tb.collate (tests/ddp_worker.py),
checks its batches against default_collate and reports its share of the node; an
all_reduce proves both ranks ran and covered the dataset between them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tensorbridge import _backend, _ranks

from conftest import HAS_CUDA

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
WORLD = 2
MIB = 1 << 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(workers: int, seed: int) -> list[dict]:
    """Starts WORLD ranks of ddp_worker.py with torchrun's variables; their JSON reports."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in (_ranks.BUDGET_ENV, _ranks.THREADS_ENV, "PYTHONWARNINGS")
    }
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        TB_TEST_SEED=str(seed),
        TB_TEST_WORKERS=str(workers),
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", str(WORKER)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD)
    ]
    reports, errors = [], []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            errors.append(f"rank {rank} timed out:\n{err[-3000:]}")
            continue
        if proc.returncode != 0:
            errors.append(f"rank {rank} exited with {proc.returncode}:\n{err[-3000:]}")
        else:
            reports.append(json.loads(out.strip().splitlines()[-1]))
    assert not errors, "\n".join(errors)
    return sorted(reports, key=lambda r: r["rank"])


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "one-worker"])
def test_two_ranks_split_the_node_and_both_feed_correct_batches(request, workers):
    seed = zlib.crc32(request.node.nodeid.encode())
    reports = launch(workers, seed)
    assert [r["rank"] for r in reports] == list(range(WORLD))
    share = max(_ranks.node_pinned_budget() // WORLD, 64 * MIB)
    threads = max(1, min(12, len(os.sched_getaffinity(0)) // WORLD))
    samples = 96  # (ddp_worker.SAMPLES, an even split: DistributedSampler pads nothing)
    for r in reports:
        ranks = r["ranks"]
        assert ranks["local_rank"] == r["rank"] and ranks["local_world_size"] == WORLD
        assert (ranks["pinned_budget"], ranks["pinned_budget_source"]) == (share, "rank share")
        if _backend._LOADED is not None:
            assert (ranks["threads"], ranks["threads_source"]) == (threads, "rank share")
        else:  # (one copy thread, whatever the share)
            assert (ranks["threads"], ranks["threads_source"]) == (1, "pure-Python path")
        assert ranks["reason"] is None
        if _backend._LOADED is not None:  # the compiled core runs with the share too
            assert r["core_threads"] == threads == r["threads"]
            if r["core_budget"] is not None:
                assert r["core_budget"] == share
        if HAS_CUDA:  # (four ranks on two GPUs would share them two by two)
            assert ranks["device"] == f"cuda:{r['rank'] % torch.cuda.device_count()}"
        else:
            assert ranks["device"] is None
        assert r["batches"] == samples // WORLD // 8
        # the all_reduce: samples and ids of both shards, and the ranks 1 + 2
        assert r["totals"] == [samples, sum(range(samples)), 1 + 2, samples // 8]
