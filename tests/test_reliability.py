"""Promises about memory, references and lifetimes; fuzzing of the batch functions."""

from __future__ import annotations

import collections
import contextlib
import gc
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend

from conftest import (
    assert_same,
    poisoned,
    random_tensor,
    reference_numpy,
)


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


# ------------------------------------------------------------------------- fuzzing batches

Point = collections.namedtuple("Point", "a b")
LEAF_DTYPES = [
    torch.float32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.float16,
    torch.complex64,
    torch.bfloat16,
]


@st.composite
def leaves(draw):
    kind = draw(st.sampled_from(["array", "tensor", "plain"]))
    if kind == "plain":
        return draw(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats()))
    dtype = draw(st.sampled_from(LEAF_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = random_tensor(shape, dtype, g)
    if t.ndim >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)
    if kind == "tensor" or dtype == torch.bfloat16:
        return t
    a = t.numpy()
    return a[::-1] if a.ndim and draw(st.booleans()) else a


batches = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(st.sampled_from(["x", "y", "z"]), children, max_size=3),
        st.builds(Point, children, children),
    ),
    max_leaves=8,
)


def _check_same(moved, original):
    if isinstance(original, dict):
        assert moved.keys() == original.keys()
        for k in original:
            _check_same(moved[k], original[k])
    elif isinstance(original, (list, tuple)):
        assert type(moved) is type(original) and len(moved) == len(original)
        for m, o in zip(moved, original, strict=True):
            _check_same(m, o)
    elif isinstance(original, (np.ndarray, torch.Tensor)):
        expected = reference_numpy(original) if isinstance(original, torch.Tensor) else original
        got = reference_numpy(moved) if isinstance(moved, torch.Tensor) else moved
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(expected).tobytes()
        assert got.shape == expected.shape
    else:
        assert moved is original or (moved != moved and original != original)


@pytest.mark.parametrize("path", ["extension", "fallback"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches)
def test_batch_functions_round_trip(path, batch):
    if path == "extension" and _backend.C is None:
        pytest.skip("extension not available")
    ctx = _backend.forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        moved = tb.to_device(batch, "cpu")
        _check_same(moved, batch)
        back = tb.to_numpy_batch(moved)
        _check_same(back, batch)
