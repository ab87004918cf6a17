"""The Transfer handle that non_blocking calls return: done(), wait() (twice too), repr,
failures raised from wait(), and dropping the source or the handle while a copy is in flight.

What each non_blocking call returns is tested with the call (test_to_numpy.py,
test_to_numpy_batch.py); GPU copies in flight are in test_gpu.py and test_hostile.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import assert_same, poisoned, random_tensor


def test_transfer_failed_raises_from_wait():
    handle = tb.Transfer.failed(RuntimeError("cudaErrorLaunchFailure: boom"))
    assert handle.done()
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        handle.wait()
    with pytest.raises(RuntimeError):
        handle.wait()
    assert "failed" in repr(handle)


def test_transfer_pending_blocks_then_completes():
    state = {"done": False}

    def block():
        state["done"] = True

    handle = tb.Transfer(np.arange(3), poll=lambda: state["done"], block=block)
    assert not handle.done()
    assert "pending" in repr(handle)
    np.testing.assert_array_equal(handle.wait(), np.arange(3))
    assert handle.done()


def test_dropping_sources_and_handles_is_safe(backend, gen):
    x = random_tensor((300, 400), torch.float32, gen)
    expected = x.numpy().copy()
    out = poisoned((300, 400), np.float32)
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    del x
    gc.collect()
    assert handle.wait() is out and handle.wait() is out  # waited twice: fine
    assert_same(out, expected)
    for _ in range(5):  # handles dropped without wait()
        tb.to_numpy(random_tensor((50, 50), torch.float64, gen), non_blocking=True)
    gc.collect()
