"""from_numpy against torch.from_numpy, both backends: every dtype, byte order and view,
sharing exactly where torch shares; random NumPy views (hypothesis)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given

import tensorbridge as tb
from tensorbridge import _backend

from conftest import (
    ML_DTYPES,
    NP_DTYPES,
    PROPERTY_SETTINGS,
    dtype_param,
    forced_fallback,
    fresh,
    numpy_views,
    random_tensor,
    reference_numpy,
)

# name -> view of a fresh array `a` (at least 3-d, shape (6, 8, 10))
VIEWS = {
    "contiguous": lambda a: a,
    "fortran": lambda a: np.asfortranarray(a),
    "transposed": lambda a: a.transpose(2, 0, 1),
    "offset-holes": lambda a: a[1:, ::3, 2::2],
    "reversed": lambda a: a[::-1],
    "reversed-inner": lambda a: a[:, :, ::-1],
    "reversed-all-holes": lambda a: a[::-2, ::-1, ::-3],
    "broadcast": lambda a: np.broadcast_to(a[:1], a.shape),
    "scalar-0d": lambda a: a[0, 0, 0, ...],
    "empty": lambda a: a[:0],
    "empty-reversed": lambda a: a[:0:-1][:0],
}


def expected_tensor(a: np.ndarray) -> torch.Tensor:
    """What a user writes today: make a native, positively strided copy, then from_numpy."""
    return torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True))


def assert_tensor_same(t: torch.Tensor, expected: torch.Tensor) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == expected.dtype and t.shape == expected.shape and t.device.type == "cpu"
    assert reference_numpy(t).tobytes() == reference_numpy(expected.contiguous()).tobytes()


BYTE_ORDERS = [pytest.param(d, "native", id=f"{d}-native") for d in NP_DTYPES] + [
    pytest.param(d, "swapped", id=f"{d}-swapped") for d in NP_DTYPES if d.itemsize > 1
]


# torch warns when a read-only (broadcast) view is shared, as torch.from_numpy does here
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize(("np_dtype", "order"), BYTE_ORDERS)
def test_matches_torch_and_shares_where_torch_does(backend, gen, np_dtype, view, order):
    base = fresh(np_dtype, gen)
    if order == "swapped":
        base = base.astype(np_dtype.newbyteorder("S"))
    a = VIEWS[view](base)
    t = tb.from_numpy(a)
    assert_tensor_same(t, expected_tensor(a))
    try:
        shared = torch.from_numpy(a)
    except (ValueError, TypeError):
        shared = None  # torch refuses: tensorbridge copies, once
    if shared is not None and a.size:
        assert t.data_ptr() == shared.data_ptr() and t.stride() == shared.stride()
    elif a.size:
        assert not np.shares_memory(t.numpy(), a)
        # one compact copy; broadcast dimensions stay broadcast (stride 0), never expanded
        broadcast = [n > 1 and s == 0 for n, s in zip(a.shape, a.strides, strict=True)]
        assert [s == 0 for s, b in zip(t.stride(), broadcast, strict=True) if b] == [True] * sum(
            broadcast
        )
        assert t[(*(slice(0, 1) if b else slice(None) for b in broadcast), ...)].is_contiguous()


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in ML_DTYPES])
def test_ml_dtypes_arrays_are_zero_copy(backend, gen, dtype):
    x = random_tensor((5, 7), dtype, gen)
    a = reference_numpy(x)[:, ::2]  # an ml_dtypes array with holes
    t = tb.from_numpy(a)
    assert t.dtype == dtype
    assert t.data_ptr() == a.ctypes.data
    assert reference_numpy(t).tobytes() == np.ascontiguousarray(a).tobytes()
    rev = tb.from_numpy(a[::-1])  # negative strides: one copy
    assert reference_numpy(rev).tobytes() == np.ascontiguousarray(a[::-1]).tobytes()


def test_readonly_array_is_shared_like_torch(backend, gen):
    a = fresh(np.dtype(np.float32), gen)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns once per process
        t = tb.from_numpy(a)
    assert t.data_ptr() == a.ctypes.data


def test_subclass_is_accepted(backend):
    m = np.ma.masked_array(np.arange(6.0), mask=[0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(tb.from_numpy(m).numpy(), m.data)


@pytest.mark.parametrize("path", ["extension", "fallback"])
@PROPERTY_SETTINGS
@given(a=numpy_views())
def test_from_numpy_properties(path, a):
    if path == "extension" and _backend.ENGINE.C is None:
        pytest.skip("extension not available")
    ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        t = tb.from_numpy(a)
        native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        assert t.shape == a.shape
        assert t.dtype == tb.from_numpy(native).dtype
        assert np.ascontiguousarray(t.numpy()).tobytes() == native.tobytes()
