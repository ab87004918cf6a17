"""Pinned host memory on any machine: empty_pinned and is_pinned.

Without CUDA nothing is pinned, and these calls still work. pin, unpin, pinned,
pinned_stats, set_pinned_budget and transfer_options act on a GPU and are tested in
test_gpu.py, the staging pool behind them in test_engine.py; the refusals of
empty_pinned, transfer_options and set_pinned_budget are in test_refusals.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorbridge as tb


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, "float16", torch.float64])
@pytest.mark.parametrize("shape", [(3, 4), 7, (), (0, 5)])
def test_empty_pinned(backend, shape, dtype):
    a = tb.empty_pinned(shape, dtype)
    expected_shape = (shape,) if isinstance(shape, int) else shape
    assert a.shape == expected_shape
    assert a.flags.c_contiguous and a.flags.writeable
    a[...] = 1
    assert tb.is_pinned(a) == (tb.info()["cuda"] and a.size > 0)


def test_empty_pinned_refuses_bad_shapes():
    with pytest.raises(ValueError, match="negative"):
        tb.empty_pinned((2, -1))
    with pytest.raises(TypeError, match="ints"):
        tb.empty_pinned((2.5,))
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        tb.is_pinned([1, 2])


def test_plain_arrays_are_not_pinned():
    assert tb.is_pinned(np.zeros(10)) is False
