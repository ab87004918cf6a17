"""Property tests: random shapes, strides and offsets through the public API, both paths."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend

from conftest import assert_same, forced_fallback, poisoned, random_tensor, reference_numpy

DTYPES = [
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.bool,
    torch.bfloat16,
]
SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def tensors(draw):
    """A tensor viewed through torch.as_strided: any sizes, non-negative strides, offset."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    strides = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    offset = draw(st.integers(0, 17))
    span = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=False) if n) + 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = random_tensor((span,), dtype, g)
    x = base.as_strided(shape, strides, offset)
    if draw(st.booleans()) and dtype.is_complex:
        x = x.conj()
    return x


@pytest.mark.parametrize("path", ["extension", "fallback"])
@SETTINGS
@given(x=tensors(), order=st.sampled_from(["C", "F"]), copy=st.booleans())
def test_to_numpy_properties(path, x, order, copy):
    if path == "extension" and _backend.ENGINE.C is None:
        pytest.skip("extension not available")
    ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        expected = reference_numpy(x)
        assert_same(tb.to_numpy(x, copy=copy), expected)
        out = poisoned(tuple(x.shape), expected.dtype, order)
        tb.to_numpy(x, out=out)
        assert_same(out, expected)


@st.composite
def arrays(draw):
    """Random NumPy views: steps (negative too), transposes, byte order, offsets."""
    dtype = np.dtype(draw(st.sampled_from(["u1", "i2", "i4", "f4", "f8", "c8", "c16", "?"])))
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder("S")
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    a = base.view(dtype).reshape(shape)
    if dtype.kind == "b":
        a = (base[: a.size] & 1).astype(bool).reshape(shape)
    slices = tuple(
        slice(draw(st.integers(0, n - 1)), None, draw(st.sampled_from([1, 2, -1, -3])))
        for n in shape
    )
    return a[(*slices, Ellipsis)].transpose(draw(st.permutations(range(ndim))))


@pytest.mark.parametrize("path", ["extension", "fallback"])
@SETTINGS
@given(a=arrays())
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


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("path", ["extension", "fallback"])
@SETTINGS
@given(a=arrays(), cast=st.sampled_from([None, torch.float64, torch.int32, np.float32]))
def test_to_tensor_properties(path, a, cast):
    if path == "extension" and _backend.ENGINE.C is None:
        pytest.skip("extension not available")
    ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        t = tb.to_tensor(a, "cpu", dtype=cast)
        native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        expected = torch.from_numpy(native)
        if cast is not None:
            expected = expected.to(tb._dtypes.as_torch_dtype(cast))
        assert t.dtype == expected.dtype and t.shape == expected.shape
        # bytes, not values: random bits make NaNs, and both sides cast with torch
        assert reference_numpy(t).tobytes() == reference_numpy(expected).tobytes()
        out = torch.empty(a.shape, dtype=expected.dtype)
        assert tb.to_tensor(a, out=out, dtype=cast) is out
        assert reference_numpy(out).tobytes() == reference_numpy(expected).tobytes()
