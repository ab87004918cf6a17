"""to_numpy against x.detach().cpu().numpy(), on every dtype and layout, both backends;
random as_strided views (hypothesis)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend, _cuda

from conftest import (
    ALL_DTYPES,
    LAYOUTS,
    ML_DTYPES,
    NATIVE_DTYPES,
    POISON,
    PROPERTY_SETTINGS,
    assert_holes_poisoned,
    assert_same,
    dtype_param,
    forced_fallback,
    layout_params,
    needs_ml,
    poisoned,
    random_tensor,
    reference_numpy,
    strided_out,
)

DTYPES = [dtype_param(d) for d in ALL_DTYPES]


@pytest.mark.parametrize("layout", layout_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_idiom_and_shares_like_numpy(backend, gen, dtype, layout):
    x = LAYOUTS[layout](dtype, gen)
    result = tb.to_numpy(x)
    expected = reference_numpy(x)
    assert_same(result, expected)
    # Shares memory exactly where .numpy() would: same address and strides.
    if dtype in NATIVE_DTYPES:
        view = x.numpy()
    else:
        view = x.view(torch.int16 if x.element_size() == 2 else torch.uint8).numpy()
    assert result.strides == view.strides
    if x.numel():
        assert result.ctypes.data == view.ctypes.data == x.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_go_through(backend, gen, dtype):
    x = random_tensor((4, 6), dtype, gen)[1:, ::2]
    result = tb.to_numpy(x)
    result[...] = result[::-1, ::-1]  # write through the view
    expected = reference_numpy(x)
    assert_same(result, expected)


@pytest.mark.parametrize("layout", layout_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_any_layout(backend, gen, dtype, layout):
    x = LAYOUTS[layout](dtype, gen)
    expected = reference_numpy(x)
    for order in ("C", "F"):
        out = poisoned(tuple(x.shape), expected.dtype, order)
        assert tb.to_numpy(x, out=out) is out
        assert_same(out, expected)
    view, big = strided_out(tuple(x.shape), expected.dtype)
    assert tb.to_numpy(x, out=view) is view
    assert_same(view, expected)
    assert_holes_poisoned(view, big)


@pytest.fixture
def routing(monkeypatch):
    """A fresh size routing for one test, recording which pool ran each large host copy
    it routed (True: torch's threads)."""
    fresh = _cuda.Routing()
    fresh.routes = []
    took = fresh.host_copy_took

    def recording(nbytes, seconds, on_torch):
        fresh.routes.append(on_torch)
        return took(nbytes, seconds, on_torch)

    monkeypatch.setattr(fresh, "host_copy_took", recording)
    monkeypatch.setattr(_cuda, "ROUTING", fresh)
    return fresh


@pytest.mark.parametrize(
    "dtype", [dtype_param(d) for d in (torch.float32, torch.int8, torch.float16, torch.complex128)]
)
def test_large_out_copies_leave_torch_threads_after_a_stall(backend, gen, routing, dtype):
    """Copies of at least host_torch_bytes into a contiguous out: the first on the calling
    thread, then on torch's threads until one stalls, then on the calling thread again;
    every one of them bit for bit the idiom's."""
    shape = (routing.host_torch_bytes // torch.empty((), dtype=dtype).element_size() + 7,)
    # (the sizes of all four copies lie in one size class, so share a reference)
    routing.host_stall_factor = math.inf  # no stall until step 2, however busy the machine
    for step in range(4):
        if step == 2:  # the next torch copy counts as a stall, whatever it takes
            routing.host_stall_factor, routing.host_stall_slack_s = 0.0, -1.0
        x = random_tensor(shape, dtype, gen)
        expected = reference_numpy(x)
        out = poisoned(shape, expected.dtype)
        assert tb.to_numpy(x, out=out) is out
        assert_same(out, expected)
    # (the pure-Python path has torch's copy only)
    assert routing.routes == ([False, True, True, False] if backend == "extension" else [True] * 4)


def test_large_out_copies_of_bool_keep_their_bytes_as_the_idiom(backend, routing):
    """A bool tensor's bytes other than 0 and 1 (a view of uint8 data) survive as
    x.numpy() keeps them, whatever the routing's state (torch's copy makes them 1)."""
    x = (torch.arange(routing.host_torch_bytes + 5) % 7).to(torch.uint8).view(torch.bool)
    expected = x.numpy()
    assert set(np.unique(expected.view(np.uint8))) == set(range(7))
    for _ in range(3):
        out = poisoned(tuple(x.shape), np.bool_)
        tb.to_numpy(x, out=out)
        assert_same(out, expected)
    assert routing.routes == []  # never routed


def test_routing_one_backoff_for_stalls_reported_together():
    r = _cuda.Routing()
    r.host_copy_took(1 << 20, 1e-4, on_torch=False)
    # (threads whose torch copies stalled together report one after the other)
    assert [r.host_copy_took(1 << 20, 1.0, on_torch=True) for _ in range(3)] == [True] * 3
    assert r._host_backoff == r.host_backoff_s


def test_large_out_copies_of_conjugate_views_are_resolved_on_either_pool(backend, gen, routing):
    shape = (routing.host_torch_bytes // 8 + 3,)
    routing.host_stall_factor = math.inf  # (however busy the machine)
    for step in range(3):
        x = random_tensor(shape, torch.complex64, gen).conj()
        expected = x.resolve_conj().numpy()
        out = poisoned(shape, expected.dtype)
        tb.to_numpy(x, out=out)
        assert_same(out, expected)
        if step == 0:  # (the calling thread leaves conjugate views to the full path)
            tb.to_numpy(x.resolve_conj(), out=poisoned(shape, expected.dtype))
    assert routing.routes == ([False, True, True] if backend == "extension" else [True] * 4)


def test_routing_judges_torch_host_copies_by_the_fastest_copy_of_their_size_seen():
    MiB = 1 << 20
    r = _cuda.Routing()
    assert not r.torch_host(MiB)  # nothing seen yet: the first copy runs on this thread
    assert not r.host_copy_took(4 * MiB, 8e-4, on_torch=False)  # 0.2 ms per MiB
    # (the reference holds for sizes within a factor of two: 4 MiB to 8 MiB - 1)
    assert r.torch_host(4 * MiB) and r.torch_host(8 * MiB - 1)
    assert not r.torch_host(4 * MiB - 1) and not r.torch_host(8 * MiB)
    # 3x the fastest copy seen, plus 1 ms, is no stall; more than that is one
    assert not r.host_copy_took(6 * MiB, 3 * 12e-4 + 0.9e-3, on_torch=True)
    assert r.torch_host(4 * MiB)
    assert r.host_copy_took(6 * MiB, 3 * 12e-4 + 1.1e-3, on_torch=True)
    assert not r.torch_host(4 * MiB)  # for host_backoff_s: on the calling thread
    # a slow copy on the calling thread is no stall; a fast one lowers the reference
    assert not r.host_copy_took(MiB, 1.0, on_torch=False)
    assert not r.host_copy_took(MiB, 1e-4, on_torch=False)
    assert r.host_copy_took(MiB, 3 * 1e-4 + 1.01e-3, on_torch=True)
    # the reference of one size class is not another's
    assert not r.host_copy_took(4 * MiB, 3 * 4e-4 + 1.1e-3, on_torch=True)
    assert not r.torch_host(MiB - 1)  # (under host_torch_bytes: never)
    assert "_host_best" not in repr(r) and _cuda.Routing() == _cuda.Routing()


def test_routing_waits_longer_for_torch_threads_that_stall_again(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(_cuda, "monotonic", lambda: clock[0])
    r = _cuda.Routing()
    r.host_copy_took(1 << 20, 1e-4, on_torch=False)
    waits = []
    for _ in range(8):  # each stall right after the last wait ended
        assert r.host_copy_took(1 << 20, 1.0, on_torch=True)
        start = clock[0]
        while not r.torch_host(1 << 20):
            clock[0] += 0.25
        waits.append(clock[0] - start)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0, 32.0]
    clock[0] += 1.0  # a stall a backoff's length after torch's threads got another try
    assert r.host_copy_took(1 << 20, 1.0, on_torch=True)
    assert not r.torch_host(1 << 20)
    clock[0] += 0.99
    assert not r.torch_host(1 << 20)
    clock[0] += 0.01
    assert r.torch_host(1 << 20)  # waited 1 s again
    assert "_host_best" not in repr(r) and _cuda.Routing() == _cuda.Routing()


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "holes", "expanded", "scalar-0d"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_true_never_shares(backend, gen, dtype, layout):
    x = LAYOUTS[layout](dtype, gen)
    result = tb.to_numpy(x, copy=True)
    assert_same(result, reference_numpy(x))
    assert not np.shares_memory(result, reference_numpy(x))
    assert result.flags.writeable


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in (torch.float32, torch.bfloat16)])
def test_requires_grad_is_detached(backend, gen, dtype):
    x = random_tensor((4, 6), dtype, gen).requires_grad_(True)
    y = x * 2  # a non-leaf with a graph
    assert_same(tb.to_numpy(y), reference_numpy(y))
    out = poisoned((4, 6), reference_numpy(x).dtype)
    tb.to_numpy(y, out=out)
    assert_same(out, reference_numpy(y))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_conjugate_view_is_resolved(backend, gen, dtype, with_out):
    x = random_tensor((5, 3), dtype, gen).conj()
    assert x.is_conj()
    with pytest.raises(RuntimeError):
        x.numpy()  # the idiom refuses
    expected = x.resolve_conj().numpy()
    if with_out:
        out = poisoned((5, 3), expected.dtype)
        tb.to_numpy(x, out=out)
        result = out
    else:
        result = tb.to_numpy(x)
    assert_same(result, expected)


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_negative_view_is_resolved(backend, gen, with_out):
    x = random_tensor((6,), torch.complex64, gen).conj().imag
    assert x.is_neg()
    expected = x.resolve_neg().numpy()
    if with_out:
        out = poisoned((6,), np.float32)
        tb.to_numpy(x, out=out)
        result = out
    else:
        result = tb.to_numpy(x)
    assert_same(result, expected)


@needs_ml
@pytest.mark.parametrize("dtype", [dtype_param(d) for d in ML_DTYPES])
def test_ml_dtypes_are_zero_copy_views(backend, gen, dtype):
    import ml_dtypes

    x = random_tensor((8, 3), dtype, gen)
    result = tb.to_numpy(x)
    assert result.dtype == np.dtype(getattr(ml_dtypes, str(dtype).replace("torch.", "")))
    assert result.ctypes.data == x.data_ptr()
    if dtype == torch.bfloat16:  # values, not only bits: same as torch's float32 upcast
        np.testing.assert_array_equal(result.astype(np.float32), x.float().numpy())


@pytest.mark.parametrize(
    ("src", "target", "idiom"),
    [
        (torch.bfloat16, np.float32, lambda x: x.float().numpy()),
        (torch.float32, np.float16, lambda x: x.half().numpy()),
        (torch.int32, np.float64, lambda x: x.double().numpy()),
        (torch.float64, torch.float32, lambda x: x.float().numpy()),
        (torch.uint8, np.int64, lambda x: x.long().numpy()),
    ],
    ids=["bf16->f32", "f32->f16", "i32->f64", "f64->torch.f32", "u8->i64"],
)
def test_dtype_converts(backend, gen, src, target, idiom):
    x = random_tensor((7, 5), src, gen).t()
    expected = idiom(x)
    assert_same(tb.to_numpy(x, dtype=target), expected)
    out = poisoned((5, 7), expected.dtype)
    tb.to_numpy(x, dtype=target, out=out)
    assert_same(out, expected)


def test_dtype_without_torch_equivalent_uses_numpy(backend, gen):
    x = random_tensor((3, 4), torch.float64, gen)
    result = tb.to_numpy(x, dtype=np.longdouble)
    assert result.dtype == np.longdouble
    np.testing.assert_array_equal(result, x.numpy().astype(np.longdouble))


@pytest.mark.parametrize("order", [">", "<"])
def test_out_with_other_byte_order_is_swapped(backend, gen, order):
    x = random_tensor((6, 5), torch.float32, gen).t()
    out = poisoned((5, 6), np.dtype(f"{order}f4"))
    tb.to_numpy(x, out=out)
    np.testing.assert_array_equal(out, x.numpy())


def test_numpy_input_passes_through(backend, gen):
    a = random_tensor((4, 5), torch.float32, gen).numpy()
    assert tb.to_numpy(a) is a
    c = tb.to_numpy(a, copy=True)
    assert_same(c, a)
    assert not np.shares_memory(c, a)
    out = poisoned((4, 5), np.float32)
    assert tb.to_numpy(a, out=out) is out
    assert_same(out, a)
    assert_same(tb.to_numpy(a, dtype=np.float64), a.astype(np.float64))


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_non_blocking_returns_a_transfer(backend, gen, with_out):
    x = random_tensor((16, 9), torch.float32, gen).t()
    out = poisoned((9, 16), np.float32) if with_out else None
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    assert isinstance(handle, tb.Transfer)
    assert handle.done()
    result = handle.wait()
    assert_same(result, x.numpy())
    assert handle.wait() is result  # waiting twice is fine
    if with_out:
        assert result is out
    assert "done" in repr(handle)


def test_non_blocking_refuses_bad_arguments_at_the_call(backend):
    out = poisoned((3,), np.float32)
    with pytest.raises(ValueError, match="shape"):
        tb.to_numpy(torch.zeros(4), out=out, non_blocking=True)
    assert (out.view(np.uint8) == POISON).all()


def test_parameter_subclass_converts(backend, gen):
    p = torch.nn.Parameter(random_tensor((3, 3), torch.float32, gen))
    assert_same(tb.to_numpy(p), p.detach().numpy())


def test_to_numpy_points_to_the_batch_functions(backend):
    with pytest.raises(TypeError, match="to_numpy_batch"):
        tb.to_numpy({"a": torch.ones(2)})
    with pytest.raises(TypeError, match="to_numpy_batch"):
        tb.to_numpy([torch.ones(2)])


# ------------------------------------------------------------------------- random views

PROPERTY_DTYPES = [
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


@st.composite
def tensors(draw):
    """A tensor viewed through torch.as_strided: any sizes, non-negative strides, offset."""
    dtype = draw(st.sampled_from(PROPERTY_DTYPES))
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
@PROPERTY_SETTINGS
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
