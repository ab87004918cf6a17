"""to_numpy_batch: outs matched to the batch, non_blocking handles, refusals; random nested
batches through to_device and back, on both paths."""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend, _batch

from conftest import (
    POISON,
    assert_same,
    forced_fallback,
    poisoned,
    random_tensor,
    reference_numpy,
)


def test_to_numpy_batch_round_trip_into_outs(backend):
    rng = np.random.default_rng(2)
    batch = {"a": torch.randn(3, 4).t(), "b": [torch.arange(5), "keep"], "c": 1}
    outs = {"a": poisoned((4, 3), np.float32, "F"), "b": [None, None], "c": None}
    result = tb.to_numpy_batch(batch, out=outs)
    assert result["a"] is outs["a"]
    assert_same(result["a"], batch["a"].numpy())
    assert_same(result["b"][0], batch["b"][0].numpy())
    assert result["b"][1] == "keep" and result["c"] == 1
    handle = tb.to_numpy_batch(batch, non_blocking=True)
    assert isinstance(handle, tb.Transfer)
    assert_same(handle.wait()["a"], batch["a"].numpy())
    del rng


def test_to_numpy_batch_refuses_mismatched_out(backend):
    with pytest.raises(ValueError, match="same shape"):
        tb.to_numpy_batch({"a": torch.ones(2), "b": torch.ones(2)}, out={"a": None})


def test_to_numpy_batch_refuses_mismatched_keys_naming_them_plainly(backend):
    with pytest.raises(
        ValueError,
        match=r"^to_numpy_batch: out must hold the batch's keys "
        r"\['a', 'b'\], got \['a'\]",
    ):
        tb.to_numpy_batch({"a": torch.ones(2), "b": torch.ones(2)}, out={"a": None})


@pytest.mark.parametrize(
    ("bad_out", "exc", "match"),
    [
        (lambda: np.empty(4, np.float32), ValueError, r'out\["b"\]\[1\] has shape \(4,\)'),
        (
            lambda: np.empty(5, np.float64),
            TypeError,
            r'out\["b"\]\[1\] has dtype float64 .*: pass an out\["b"\]\[1\] of dtype float32\.$',
        ),
        (lambda: np.empty(5, np.float32)[:0:-1][::-1].copy()[:0], ValueError, r'out\["b"\]\[1\]'),
        (lambda: np.broadcast_to(np.empty(1, np.float32), (5,)), ValueError, r'out\["b"\]\[1\]'),
        (lambda: [0.0] * 5, TypeError, r'out\["b"\]\[1\] must be a numpy.ndarray'),
    ],
    ids=["shape", "dtype", "empty", "read-only", "list"],
)
def test_to_numpy_batch_out_refusals_name_the_out_and_write_nothing(backend, bad_out, exc, match):
    """With hundreds of leaves, a refused out must say which one; the others stay as
    they were, and a dtype refusal suggests no dtype= (to_numpy_batch takes none)."""
    gen = torch.Generator().manual_seed(5)
    batch = {
        "a": random_tensor((3, 2), torch.float32, gen),
        "b": [7, random_tensor((5,), torch.float32, gen)],
    }
    out = {"a": poisoned((3, 2), np.float32), "b": [None, bad_out()]}
    with pytest.raises(exc, match=r"^to_numpy_batch: .*" + match) as info:
        tb.to_numpy_batch(batch, out=out)
    assert "pass dtype=" not in str(info.value)
    assert (out["a"].view(np.uint8) == POISON).all()


def test_to_numpy_batch_refuses_an_out_for_a_plain_value(backend):
    """A value is returned as it is: an out given for it would be silently ignored."""
    good = poisoned((2,), np.float32)
    for junk in ("garbage", np.empty(2, np.float32)):
        with pytest.raises(TypeError, match=r"^to_numpy_batch: out\[1\] must be None: .* int"):
            tb.to_numpy_batch([torch.ones(2), 5], out=[good, junk])
        assert (good.view(np.uint8) == POISON).all()


@pytest.mark.parametrize("with_out", [False, True])
def test_to_numpy_batch_dtype_refusal_suggests_converting_the_tensor(backend, with_out):
    batch = {"c": torch.zeros(2, dtype=torch.complex64).to(torch.complex32)}
    pattern = r'^to_numpy_batch: batch\["c"\]: .*x\.to\(torch\.complex64\)'
    with pytest.raises(TypeError, match=pattern) as info:
        tb.to_numpy_batch(batch, out={"c": None} if with_out else None)
    assert "dtype=" not in str(info.value)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            lambda: torch.ones(3).to_sparse(),
            r'^to_numpy_batch: batch\["bad"\] needs a dense \(strided\) tensor',
        ),
        (
            lambda: torch.ones(3, device="meta"),
            r'^to_numpy_batch: batch\["bad"\] cannot convert a meta tensor',
        ),
    ],
    ids=["sparse", "meta"],
)
@pytest.mark.parametrize("with_out", [False, True])
def test_to_numpy_batch_refuses_a_bad_leaf_in_its_own_name_writing_nothing(
    backend, bad, match, with_out
):
    good = random_tensor((4, 3), torch.float32, torch.Generator().manual_seed(3))
    out = {"good": poisoned((4, 3), np.float32), "bad": None} if with_out else None
    with pytest.raises(TypeError, match=match):
        tb.to_numpy_batch({"good": good, "bad": bad()}, out=out)
    if out is not None:
        assert (out["good"].view(np.uint8) == POISON).all()


def test_a_batch_of_cpu_leaves_converts_as_the_idiom_per_leaf(backend):
    gen = torch.Generator().manual_seed(4)
    batch = {
        "x": random_tensor((5, 3), torch.float32, gen).t(),
        "conj": random_tensor((4,), torch.complex64, gen).conj(),
        "neg": random_tensor((4,), torch.float64, gen)._neg_view(),
        "grad": random_tensor((2, 2), torch.float32, gen).requires_grad_(),
        "half": [random_tensor((3,), torch.bfloat16, gen), np.arange(3)],
        "p": torch.nn.Parameter(random_tensor((2,), torch.float32, gen)),
        "n": 7,
        "s": "keep",
    }
    got = tb.to_numpy_batch(batch)
    for key in ("x", "conj", "neg", "grad", "p"):
        assert_same(got[key], reference_numpy(batch[key]))
    assert_same(got["half"][0], reference_numpy(batch["half"][0]))
    assert got["half"][1] is batch["half"][1]
    assert got["n"] == 7 and got["s"] == "keep"
    assert isinstance(got["half"], list) and list(got) == list(batch)
    # memory shared where x.numpy() would share it (conj/neg bits are resolved: copies)
    shared = {"x": True, "grad": True, "p": True, "conj": False, "neg": False}
    for key, expected in shared.items():
        assert (got[key].ctypes.data == batch[key].data_ptr()) is expected, key


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
    if path == "extension" and _backend.ENGINE.C is None:
        pytest.skip("extension not available")
    ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        moved = tb.to_device(batch, "cpu")
        _check_same(moved, batch)
        back = tb.to_numpy_batch(moved)
        _check_same(back, batch)


def test_the_one_pass_gather_aligns_every_array_for_its_dtype():
    """The GPU path of to_numpy_batch, run on CPU tensors: groups of narrow elements with
    odd byte counts (3 bools, 5 bfloat16s) ahead of wider ones must not leave an int64 or
    complex128 array at an address that is not a multiple of its itemsize."""
    leaves = [
        torch.tensor([True, False, True]),
        torch.randn(5).bfloat16(),
        torch.arange(6).reshape(2, 3).t(),
        torch.randn(3, dtype=torch.complex128),
        torch.randn(33, 7),
    ]
    got = _batch.in_one_pass(
        leaves, [None] * len(leaves), list(range(len(leaves))), lambda flat: flat.numpy().copy()
    )
    for i, t in enumerate(leaves):
        assert got[i].flags.aligned and got[i].ctypes.data % got[i].itemsize == 0, i
        assert np.array_equal(got[i], tb.to_numpy(t)), i


def test_the_one_pass_gather_equals_to_numpy_per_tensor():
    """The GPU path of to_numpy_batch (grouped by dtype and shape, one stack per group,
    one transfer), run on CPU tensors: every array equals to_numpy of its tensor, outs
    (poisoned first) are written in full, and views come from one host buffer."""
    gen = torch.Generator().manual_seed(1234)
    leaves = [torch.randn(7, generator=gen) for _ in range(20)]
    leaves += [torch.randn(3, 4, generator=gen).T for _ in range(5)]  # strided
    leaves += [torch.randint(0, 9, (2, 3), generator=gen) for _ in range(5)]
    leaves += [torch.randn(3, dtype=torch.complex64, generator=gen).conj() for _ in range(3)]
    leaves += [torch.randn(4, generator=gen)._neg_view(), torch.randn(2, requires_grad=True)]
    leaves += [torch.ones(0, 3), torch.tensor(2.5), torch.randn(5, generator=gen).half()]
    outs: list = [None] * len(leaves)
    for i in (3, 22, 26, 33):
        outs[i] = np.full(tuple(leaves[i].shape), 99, dtype=tb.to_numpy(leaves[i]).dtype)
    idx = list(range(len(leaves)))
    moved = []

    def to_host(flat):
        moved.append(flat.numel())
        return flat.numpy().copy()

    got = _batch.in_one_pass(leaves, outs, idx, to_host)
    assert len(moved) == 1  # one transfer
    for i, t in enumerate(leaves):
        expected = tb.to_numpy(t)
        assert got[i].dtype == expected.dtype and got[i].shape == expected.shape
        assert np.array_equal(got[i], expected), i
        if outs[i] is not None:
            assert got[i] is outs[i]
