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
    """A fresh size routing for one test, recording the route of each large host copy it
    routed (True: torch's threads)."""
    fresh = _cuda.Routing()
    object.__setattr__(fresh, "routes", [])  # (not a knob: Routing refuses unknown names)
    took = fresh.host_copy_took

    def recording(nbytes, seconds, on_torch):
        fresh.routes.append(on_torch)
        took(nbytes, seconds, on_torch)

    object.__setattr__(fresh, "host_copy_took", recording)  # (this test's instance only)
    monkeypatch.setattr(_cuda, "ROUTING", fresh)
    return fresh


@pytest.fixture
def clock(monkeypatch):
    """The routing's clock, moved by hand (seconds)."""
    now = [100.0]
    monkeypatch.setattr(_cuda, "monotonic", lambda: now[0])
    return now


MiB = 1 << 20


@pytest.mark.parametrize(
    "dtype", [dtype_param(d) for d in (torch.float32, torch.int8, torch.float16, torch.complex128)]
)
@pytest.mark.parametrize("route", ["fastest", "torch", "caller"])
def test_large_out_copies_match_the_idiom_on_every_route(backend, gen, routing, dtype, route):
    """Copies of at least host_torch_bytes into a contiguous out, on the route asked for
    (measured: two on the calling thread, then torch's threads), every one of them bit
    for bit the idiom's."""
    shape = (routing.host_torch_bytes // torch.empty((), dtype=dtype).element_size() + 7,)
    routing.host_route = route
    for _ in range(4):
        x = random_tensor(shape, dtype, gen)
        expected = reference_numpy(x)
        out = poisoned(shape, expected.dtype)
        assert tb.to_numpy(x, out=out) is out
        assert_same(out, expected)
    if backend != "extension":
        assert routing.routes == []  # (the pure-Python path has torch's copy only)
    elif route == "fastest":
        assert routing.routes[:3] == [False, False, True]
    else:
        assert routing.routes == [route == "torch"] * 4


def test_large_out_copies_of_bool_keep_their_bytes_as_the_idiom(backend, routing):
    """A bool tensor's bytes other than 0 and 1 (a view of uint8 data) survive as
    x.numpy() keeps them, whatever the routing's state (torch's copy makes them 1)."""
    x = (torch.arange(routing.host_torch_bytes + 5) % 7).to(torch.uint8).view(torch.bool)
    expected = x.numpy()
    assert set(np.unique(expected.view(np.uint8))) == set(range(7))
    routing.host_route = "torch"
    for _ in range(3):
        out = poisoned(tuple(x.shape), np.bool_)
        tb.to_numpy(x, out=out)
        assert_same(out, expected)
    assert routing.routes == []  # never routed


@pytest.mark.parametrize("route", ["fastest", "torch", "caller"])
@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_large_out_copies_of_conjugate_and_negative_views_are_resolved_unrouted(
    backend, gen, routing, route, bit
):
    """torch's copy resolves them, on any route: the routing neither times them nor
    starts a try it could not finish (the calling thread cannot resolve them)."""
    shape = (routing.host_torch_bytes // 8 + 3,)
    routing.host_route = route
    for step in range(8):
        plain = random_tensor(shape, torch.complex64, gen)
        x = plain.conj() if bit == "conj" else plain._neg_view()
        expected = x.resolve_conj().resolve_neg().numpy()
        out = poisoned(shape, expected.dtype)
        tb.to_numpy(x, out=out)
        assert_same(out, expected)
        if step % 2:  # (plain copies between: the routing's tries go on around them)
            tb.to_numpy(plain, out=poisoned(shape, expected.dtype))
    assert len(routing.routes) == (4 if backend == "extension" else 0)


@pytest.mark.parametrize("route", ["fastest", "torch", "caller"])
def test_large_out_copies_the_routing_cannot_take_leave_it_as_it_was(backend, gen, routing, route):
    """A misaligned or overlapping out takes the full path, unrouted: a try under way
    is neither started nor left unfinished by it."""
    n = routing.host_torch_bytes // 4 + 5
    routing.host_route = route
    x = random_tensor((n,), torch.float32, gen)
    raw = poisoned((4 * n + 1,), np.uint8)
    out = raw[1:].view(np.float32)  # (misaligned)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, x.numpy())
    shared = torch.from_numpy(poisoned((n + 8,), np.float32))
    with pytest.raises(ValueError, match="shares memory"):
        tb.to_numpy(shared[8:], out=shared[:n].numpy())
    assert routing.routes == []


def measured(r, sizes, costs):
    """Copies of these sizes, each on the route the routing says, at costs[on_torch]
    seconds per MiB."""
    for nbytes in sizes:
        on_torch = r.torch_host(nbytes)
        r.host_copy_took(nbytes, costs[on_torch] * nbytes / MiB, on_torch)


def test_routing_measures_both_routes_then_takes_the_cheaper_per_size_class(clock):
    r = _cuda.Routing()
    # a class starts on the calling thread: its first copy warms up, uncounted
    assert not r.torch_host(MiB)
    r.host_copy_took(MiB, 5e-3, on_torch=False)
    assert not r.torch_host(MiB)
    r.host_copy_took(MiB, 100e-6, on_torch=False)
    # then a try of torch's threads: a first copy uncounted (it may wake them), then
    # host_try_copies judged together (sizes in [1 MiB, 2 MiB) share what was measured)
    copies = [(MiB, 400e-6), (MiB + 5, 100e-6), (2 * MiB - 1, 100e-6), (MiB, 50e-6), (MiB, 50e-6)]
    for nbytes, seconds in copies:
        assert r.torch_host(nbytes)
        r.host_copy_took(nbytes, seconds, on_torch=True)
    assert r.torch_host(MiB)  # cheaper per byte
    assert not r.torch_host(2 * MiB)  # another class starts afresh
    measured(r, [4 * MiB] * 8, {False: 1e-4, True: 3e-4})
    assert not r.torch_host(4 * MiB) and not r.torch_host(7 * MiB)
    assert r.torch_host(MiB)
    assert not r.torch_host(MiB - 1)  # (under host_torch_bytes: never)
    assert not r.torch_host(0)
    r.host_copy_took(0, 1.0, on_torch=True)  # (nothing to learn from)
    assert "_host" not in repr(r) and _cuda.Routing() == _cuda.Routing()


def test_routing_weighs_a_rare_stall_against_the_whole_window(clock):
    """A stall now and then in a long run of fast torch copies keeps them on torch's
    threads; stalls that cost more than the calling thread would move them. A route's
    first copies stand for a whole window."""
    r = _cuda.Routing()
    measured(r, [MiB] * 8, {False: 150e-6, True: 100e-6})
    r.host_copy_took(MiB, 20e-3, on_torch=True)  # a stall right after the first copies
    assert r.torch_host(MiB)
    for _ in range(2000):
        measured(r, [MiB], {True: 100e-6})
    # one stall of 20 ms: 20 µs more per copy over the 1024 copies of the window
    r.host_copy_took(MiB, 20e-3, on_torch=True)
    assert r.torch_host(MiB)
    for _ in range(100):
        measured(r, [MiB], {True: 100e-6})
    r.host_copy_took(MiB, 20e-3, on_torch=True)
    assert r.torch_host(MiB)  # (2 stalls: about 0.04 ms more per copy)
    r.host_copy_took(MiB, 20e-3, on_torch=True)  # 3: about 0.07 ms more
    assert not r.torch_host(MiB)


def test_routing_tries_the_other_route_and_puts_off_tries_that_lose(clock):
    r = _cuda.Routing()
    measured(r, [MiB] * 8, {False: 100e-6, True: 8e-3})  # torch's first try stalled
    assert not r.torch_host(MiB)
    waits = []
    for _ in range(8):  # every try of torch's threads stalls at once: two copies
        start = clock[0]
        while not r.torch_host(MiB) and clock[0] < start + 100:
            r.host_copy_took(MiB, 100e-6, on_torch=False)
            clock[0] += 0.25
        waits.append(clock[0] - start)
        r.host_copy_took(MiB, 8e-3, on_torch=True)  # (uncounted)
        assert r.torch_host(MiB)
        r.host_copy_took(MiB, 8e-3, on_torch=True)
        assert not r.torch_host(MiB)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0, 32.0]
    # the busy processes have gone: the next try's copies win, and the copies move
    clock[0] += 32
    assert [r.torch_host(MiB) for _ in range(5)] == [True] * 5  # (asked before reported)
    r.host_copy_took(MiB, 400e-6, on_torch=True)  # (waking them: uncounted)
    for _ in range(4):
        r.host_copy_took(MiB, 60e-6, on_torch=True)
    assert r.torch_host(MiB)
    # a won try keeps the wait it had (a try that won by luck brings back no short
    # waits): the calling thread is tried 32 s later, and loses after 3 copies, once
    # they have cost more than 4 on torch's threads
    clock[0] += 31.9
    assert r.torch_host(MiB)
    clock[0] += 0.1
    for _ in range(4):  # (the first uncounted)
        assert not r.torch_host(MiB)
        r.host_copy_took(MiB, 100e-6, on_torch=False)
    assert r.torch_host(MiB)


def test_routing_moves_on_averages_only_to_a_route_cheaper_by_a_margin(clock):
    """Two routes about as fast: jitter of a few percent moves nothing; a route 10%
    slower than the other's average loses the copies, once."""
    r = _cuda.Routing()
    measured(r, [MiB] * 8, {False: 100e-6, True: 99e-6})
    assert r.torch_host(MiB)
    rng = np.random.default_rng(5)
    routes = []
    for _ in range(3000):  # (within the wait: no try starts)
        on_torch = r.torch_host(MiB)
        routes.append(on_torch)
        r.host_copy_took(MiB, 100e-6 * (1 + rng.uniform(0.0, 0.06)), on_torch)
    assert all(routes)  # (up to 4% dearer than the calling thread's 100 µs, on average)
    for _ in range(2000):
        r.host_copy_took(MiB, 110e-6, on_torch=True)
    assert not r.torch_host(MiB)
    moves = 0
    for _ in range(300):
        on_torch = r.torch_host(MiB)
        r.host_copy_took(MiB, 100e-6, on_torch)
        moves += on_torch
    assert moves == 0


def stalls_until_moved(r, limit=20):
    """Stalls of 8 ms on torch's threads until the copies leave them: how many. (Read
    from the state, since asking torch_host may start a try.)"""
    for count in range(1, limit + 1):
        r.host_copy_took(MiB, 8e-3, on_torch=True)
        if not r._host[MiB.bit_length()].on_torch:
            return count
    return None


def test_routing_puts_off_tries_whose_route_soon_loses_again(clock):
    """A try that came out cheaper by luck, then stalls within the wait: the next try
    waits twice as long; a route that held longer than the wait resets it."""
    r = _cuda.Routing()
    measured(r, [MiB] * 8, {False: 100e-6, True: 8e-3})
    clock[0] += 1.0
    for _ in range(5):
        assert r.torch_host(MiB)
        r.host_copy_took(MiB, 60e-6, on_torch=True)  # a lucky try
    assert stalls_until_moved(r) == 1  # (all that is known of torch's threads: the try)
    clock[0] += 1.99
    assert not r.torch_host(MiB)
    clock[0] += 0.01
    assert r.torch_host(MiB)  # after 2 s, not 1
    for _ in range(5):
        r.host_copy_took(MiB, 60e-6, on_torch=True)
    clock[0] += 5.0  # holds for longer than the wait
    assert stalls_until_moved(r) == 1
    clock[0] += 0.99
    assert not r.torch_host(MiB)
    clock[0] += 0.01
    assert r.torch_host(MiB)  # 1 s again


def test_routing_ends_a_losing_try_at_once_and_follows_a_forced_route(clock):
    r = _cuda.Routing()
    measured(r, [MiB] * 8, {False: 100e-6, True: 60e-6})
    clock[0] += 1.0
    assert not r.torch_host(MiB)  # a try of the calling thread...
    r.host_copy_took(MiB, 100e-6, on_torch=False)  # (uncounted)
    r.host_copy_took(MiB, 1e-3, on_torch=False)  # ...that has cost more than 4 torch copies
    assert r.torch_host(MiB)  # is over
    r.host_route = "caller"
    assert not r.torch_host(MiB) and not r.torch_host(64 * MiB)
    r.host_route = "torch"
    assert r.torch_host(MiB) and r.torch_host(64 * MiB)
    assert not r.torch_host(MiB - 1)  # (under host_torch_bytes: never)


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


@pytest.mark.parametrize(
    ("knob", "value", "error"),
    [
        ("host_route", "Torch", ValueError),
        ("host_route", None, ValueError),
        ("host_try_s", 0, ValueError),
        ("host_try_s", -1.0, ValueError),
        ("host_try_s", math.nan, ValueError),
        ("host_try_s", math.inf, ValueError),
        ("host_try_s", "1", TypeError),
        ("host_try_copies", 0, ValueError),
        ("host_try_copies", 2.5, TypeError),
        ("host_window_bytes", 0, ValueError),
        ("host_window_bytes", math.inf, TypeError),
        ("host_torch_bytes", -5, ValueError),
        ("host_torch_bytes", True, TypeError),
        ("small_d2h", "512K", TypeError),
        ("small_d2h", -1, ValueError),
        ("small_h2d", math.nan, TypeError),
        ("batch_pinned_direct", -1, ValueError),
        ("batch_pinned_direct", "64K", TypeError),
        ("small_direct", "no", TypeError),
        ("small_direct", 2, TypeError),
        ("small_direct", 1.0, TypeError),
    ],
)
def test_routing_knobs_are_checked_when_set(knob, value, error):
    r = _cuda.Routing()
    before = getattr(r, knob)
    with pytest.raises(error, match=knob):
        setattr(r, knob, value)
    assert getattr(r, knob) == before
    with pytest.raises(error, match=knob):
        _cuda.Routing(**{knob: value})
    setattr(r, knob, before)  # (valid values pass)
    r.host_try_s, r.host_try_copies = np.int64(2), np.int32(3)  # (NumPy numbers too)
    assert (r.host_try_s, r.host_try_copies) == (2.0, 3) and type(r.host_try_s) is float


def test_a_misspelled_routing_knob_is_refused_naming_the_knob():
    r = _cuda.Routing()
    with pytest.raises(AttributeError, match=r"no knob 'host_rout': did you mean 'host_route'"):
        r.host_rout = "caller"
    with pytest.raises(AttributeError, match=r"no knob 'speed'; its knobs: \('small_d2h'"):
        r.speed = 1
    assert not hasattr(r, "host_rout") and r.host_route == "fastest"
    with pytest.raises(AttributeError, match=r"no knob 'torch_d2h' \(it is a method\)"):
        r.torch_d2h = 5
    assert r.torch_d2h(1) is True  # (still the method)


def test_the_small_direct_knob_takes_the_flags_others_take():
    r = _cuda.Routing()
    for value, expected in ((1, True), (np.True_, True), (0, False), (np.False_, False)):
        r.small_direct = value
        assert r.small_direct is expected
