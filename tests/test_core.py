"""The compiled strided copy against np.copyto: random layouts, itemsizes, swaps, threads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbridge import _backend

from conftest import HAS_EXTENSION, run_in_threads

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")

ITEM_DTYPES = ["u1", "<u2", "<u4", "<u8", "<c16", "V3", "V6"]


def _random(shape, dtype, rng) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@st.composite
def strided_views(draw, max_dims=4):
    """A random view of a random array: slices with steps (negative too) and a transpose."""
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    steps = st.sampled_from([1, 1, 2, 3, -1, -2])
    slices = tuple(slice(draw(st.integers(0, n - 1)), None, draw(steps)) for n in shape)
    perm = tuple(draw(st.permutations(range(ndim))))
    return shape, slices, perm


@settings(max_examples=200, deadline=None)
@given(
    src=strided_views(),
    dst_perm=st.data(),
    dst_reverse=st.booleans(),
    dtype=st.sampled_from(ITEM_DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_copy_matches_numpy(src, dst_perm, dst_reverse, dtype, seed):
    rng = np.random.default_rng(seed)
    s_shape, s_slices, s_perm = src
    a = _random(s_shape, dtype, rng)[(*s_slices, Ellipsis)].transpose(s_perm)
    # The destination: every other element of a poisoned buffer, in another axis order.
    perm = tuple(dst_perm.draw(st.permutations(range(a.ndim))))
    big = _random(tuple(2 * a.shape[p] + 1 for p in perm), dtype, rng)
    holes = (*(slice(1, 2 * a.shape[p], 2) for p in perm), Ellipsis)
    out = big[holes].transpose(np.argsort(perm))
    if dst_reverse and out.ndim:
        out = out[::-1]
    before = big.copy()
    _backend.ENGINE.C.copy(out, a, 0)
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(a).tobytes()
    mask = np.ones(big.shape, bool)
    mask[holes] = False
    assert big[mask].tobytes() == before[mask].tobytes()  # nothing written outside out


@pytest.mark.parametrize("dtype", ["<u2", "<i4", "<f8", "<c8", "<c16"])
@pytest.mark.parametrize("layout", ["contiguous", "reversed", "transposed"])
def test_byte_swap_matches_numpy(dtype, layout):
    rng = np.random.default_rng(1)
    a = _random((37, 41), dtype, rng).astype(np.dtype(dtype).newbyteorder(">"))
    a = {"contiguous": a, "reversed": a[::-1, ::-1], "transposed": a.T}[layout]
    out = np.empty(a.shape, np.dtype(dtype))
    unit = a.dtype.itemsize // 2 if a.dtype.kind == "c" else a.dtype.itemsize
    _backend.ENGINE.C.copy(out, a, unit)
    assert out.tobytes() == a.astype(np.dtype(dtype)).tobytes()


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "reversed", "holes"])
def test_parallel_split_matches(threads, layout):
    rng = np.random.default_rng(threads)
    a = _random((301, 517), "<f4", rng)
    a = {"contiguous": a, "transposed": a.T, "reversed": a[::-1], "holes": a[::2, 1::3]}[layout]
    out = np.zeros(a.shape, a.dtype)
    old = _backend.ENGINE.C.get_num_threads()
    try:
        _backend.set_num_threads(threads)
        assert _backend.get_num_threads() == threads
        _backend.ENGINE.C.copy(out, a, 0, 1024)  # tiny parallel threshold: always split
    finally:
        _backend.set_num_threads(old)
    np.testing.assert_array_equal(out, a)


def test_many_threads_copy_at_once():
    """More Python threads than cores, each splitting its copies over the shared pool."""
    rng = np.random.default_rng(7)
    sources = [_random((257, 131 + i), "<f8", rng) for i in range(12)]

    def work(i):
        src = sources[i].T if i % 2 else sources[i][::-1]
        for _ in range(20):
            out = np.full(src.shape, np.nan)
            _backend.ENGINE.C.copy(out, src, 0, 4096)
            np.testing.assert_array_equal(out, src)

    run_in_threads(work, len(sources))


def test_invalid_arguments_raise():
    C = _backend.ENGINE.C
    with pytest.raises(ValueError, match="same shape"):
        C.copy(np.zeros(3), np.zeros(4), 0)
    with pytest.raises(ValueError, match="itemsize"):
        C.copy(np.zeros(3), np.zeros(3, np.float32), 0)
    with pytest.raises(ValueError, match="swap unit"):
        C.copy(np.zeros(3, "V3"), np.zeros(3, "V3"), 2)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        C.copy(ro, np.ones(3), 0)
    assert (ro == 0).all()


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match=r"1 <= n <="):
        _backend.set_num_threads(0)
    with pytest.raises(TypeError, match="int"):
        _backend.set_num_threads(2.5)
