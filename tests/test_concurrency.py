"""Many threads converting at once (more than cores), each into its own outputs."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import assert_same, poisoned, random_tensor, reference_numpy


def test_many_threads_convert_concurrently(backend):
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        try:
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
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])


def _child_convert(seed: int) -> bool:
    g = torch.Generator().manual_seed(seed)
    x = random_tensor((700, 800), torch.float32, g).t()  # > 256 KiB: the pool splits it
    out = poisoned(tuple(x.shape), np.float32)
    tb.to_numpy(x, out=out)
    a = np.ascontiguousarray(out)[::-1]
    return bool(np.array_equal(out, x.numpy())) and bool(
        np.array_equal(tb.from_numpy(a).numpy(), a)
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_convert_correctly(backend):
    """The parent's thread pool is busy and warm when it forks: children must not hang."""
    x = torch.rand(2048, 1024).t()
    tb.to_numpy(x, out=np.empty(tuple(x.shape), np.float32))  # start the pool's workers
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.map_async(_child_convert, range(6)).get(timeout=120)
    assert results == [True] * 6
