"""Promises about memory and references across the API: no growth over conversion loops,
no Python reference leaked on an error path."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch

import tensorbridge as tb


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _one_round(i: int) -> None:
    x = torch.rand(256, 257).t()
    out = np.empty((257, 256), np.float32)
    tb.to_numpy(x, out=out)
    tb.to_numpy(x, copy=True)
    tb.to_numpy(x.bfloat16(), dtype=np.float32)
    tb.from_numpy(out[::-1]).sum()
    tb.from_numpy(out.astype(">f4"))
    tb.to_device({"a": out, "b": [out[:3], 1]}, "cpu")
    tb.collate([{"x": out[:8]}, {"x": out[8:16]}])
    tb.to_numpy(x, non_blocking=True).wait()
    for bad in (
        lambda: tb.to_numpy(x, out=out[:3]),
        lambda: tb.from_numpy(np.array(["s"])),
        lambda: tb.to_numpy([x]),
    ):
        try:
            bad()
        except (TypeError, ValueError):
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_converting_in_a_loop_does_not_grow_memory(backend):
    for i in range(30):  # warm up: allocator pools, caches, the thread pool
        _one_round(i)
    gc.collect()
    before = rss_bytes()
    for i in range(300):  # each round moves about 2 MB; a leak of one array would show 300x
        _one_round(i)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 32 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 rounds"


@pytest.mark.parametrize(
    "call",
    [
        lambda a, t: tb.to_numpy(t, out=a[:2]),
        lambda a, t: tb.to_numpy(t, out=a.astype(np.int32)),
        lambda a, t: tb.to_tensor(a, out=torch.zeros(3)),
        lambda a, t: tb.to_numpy_batch({"x": t}, out={"x": a, "y": a}),
        lambda a, t: tb.from_numpy(a.astype("datetime64[s]")),
        lambda a, t: tb.images_to_tensor(a),
    ],
    ids=["out-shape", "out-dtype", "to_tensor-out", "batch-out", "from_numpy-dtype", "images"],
)
def test_no_reference_leaks_on_error_paths(backend, call):
    a = np.arange(4, dtype=np.float32)
    t = torch.arange(4.0)
    before = sys.getrefcount(a), sys.getrefcount(t)
    for _ in range(10):
        with pytest.raises((TypeError, ValueError)):
            call(a, t)
    gc.collect()
    assert (sys.getrefcount(a), sys.getrefcount(t)) == before
