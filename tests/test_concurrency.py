"""Many threads converting at once (more than cores), each into its own outputs."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import assert_same, poisoned, random_tensor, reference_numpy, run_in_threads


def test_many_threads_convert_concurrently(backend):
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        barrier.wait()
        for j in range(25):
            # sizes on both sides of the parallel threshold, several layouts
            shape = (64 + i, 33) if j % 3 else (512, 260 + i)
            x = random_tensor(shape, torch.float32 if i % 2 else torch.bfloat16, g)
            x = x.t() if j % 2 else x[1:, ::2]
            expected = reference_numpy(x)
            out = poisoned(tuple(x.shape), expected.dtype, "F" if j % 4 == 1 else "C")
            if j % 3 == 0:
                assert tb.to_numpy(x, out=out, non_blocking=True).wait() is out
            else:
                assert tb.to_numpy(x, out=out) is out
            assert_same(out, expected)
            assert_same(tb.to_numpy(x, copy=True), expected)
            a = np.ascontiguousarray(expected)[::-1]
            if a.dtype.kind != "V":
                np.testing.assert_array_equal(tb.from_numpy(a).numpy(), a)

    run_in_threads(work, 16)


def _child_convert(seed: int) -> bool:
    # No torch compute in the child: torch's own OpenMP pool hangs in a process forked
    # after the parent used it (DataLoader workers call torch.set_num_threads(1) for that).
    base = np.random.default_rng(seed).random((800, 700), dtype=np.float32)
    x = torch.from_numpy(base).t()  # > 256 KiB and transposed: the core's pool splits it
    out = poisoned(tuple(x.shape), np.float32)
    tb.to_numpy(x, out=out)
    big = torch.from_numpy(np.ascontiguousarray(base))  # contiguous, > 1 MiB
    out2 = poisoned(tuple(big.shape), np.float32)
    tb.to_numpy(big, out=out2)
    a = np.ascontiguousarray(out)[::-1]
    return (
        bool(np.array_equal(out, base.T))
        and bool(np.array_equal(out2, base))
        and bool(np.array_equal(tb.from_numpy(a).numpy(), a))
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_convert_correctly(backend):
    """Both thread pools (the core's, torch's) are warm when the parent forks: the children's
    conversions must neither hang nor go wrong."""
    torch.rand(2000, 2000).sum()  # starts torch's OpenMP threads in the parent
    x = torch.rand(2048, 1024).t()
    tb.to_numpy(x, out=np.empty(tuple(x.shape), np.float32))  # start the pool's workers
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.map_async(_child_convert, range(6)).get(timeout=120)
    assert results == [True] * 6
