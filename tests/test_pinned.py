"""Pinned host memory on any machine: empty_pinned and is_pinned.

Without CUDA nothing is pinned, and these calls still work. pin, unpin, pinned,
pinned_stats, set_pinned_budget and transfer_options act on a GPU and are tested in
test_gpu.py, the staging pool behind them in test_engine.py; the refusals of
empty_pinned, transfer_options and set_pinned_budget are in test_refusals.py.
"""

from __future__ import annotations

import ctypes
import gc
import operator
import signal
import types
from typing import Any

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
    for shape in (3.0, "3", True, None):  # (a float was "'float' object is not iterable")
        with pytest.raises(TypeError, match=r"shape must be an int or a tuple of ints, got"):
            tb.empty_pinned(shape)
    with pytest.raises(TypeError, match=r"dtype=None: pass a dtype"):  # (NumPy's float64)
        tb.empty_pinned((3,), None)
    assert tb.empty_pinned(np.array([2, 3])).shape == (2, 3)  # (any sequence of ints)
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        tb.is_pinned([1, 2])


def test_plain_arrays_are_not_pinned():
    assert tb.is_pinned(np.zeros(10)) is False


def test_integer_knobs_take_numpy_integers_and_refuse_other_types():
    """Every integer knob is checked by one rule: Python or NumPy integers, no bools."""
    saved = tb.transfer_options()
    try:
        got = tb.transfer_options(chunk_bytes=np.int64(1 << 20), buffers=np.int32(3))
        assert got["chunk_bytes"] == 1 << 20 and got["buffers"] == 3
        assert type(got["chunk_bytes"]) is int
        tb.set_pinned_budget(np.int64(1 << 30))
        assert tb.Prefetcher([], "cpu", depth=np.int8(3)).depth == 3
        for call in (
            lambda: tb.transfer_options(chunk_bytes=8.0e6),
            lambda: tb.transfer_options(buffers=True),
            lambda: tb.set_pinned_budget(1.5),
            lambda: tb.Prefetcher([], "cpu", depth="2"),
        ):
            with pytest.raises(TypeError, match="must be an int"):
                call()
        with pytest.raises(ValueError, match="from 0 to"):
            tb.set_pinned_budget(2**70)
    finally:
        tb.transfer_options(**saved)


def test_transfer_options_changes_nothing_when_one_knob_is_refused():
    saved = tb.transfer_options()
    try:
        with pytest.raises(ValueError, match="buffers"):
            tb.transfer_options(chunk_bytes=4096, buffers=1)
        assert tb.transfer_options() == saved
    finally:
        tb.transfer_options(**saved)


class _FakePinningCore:
    """The compiled core's pinning calls over a table, as cuda_engine.cu keeps it
    (reference counted by address and size), with the real Ctrl-C wrapper."""

    def __init__(self, call_through_interrupts: Any) -> None:
        self.refs: dict[tuple[int, int], int] = {}
        self.unregistered: list[tuple[int, int]] = []
        self.call_through_interrupts = call_through_interrupts

    @staticmethod
    def array_span(a: np.ndarray) -> tuple[int, int]:
        return a.__array_interface__["data"][0], a.nbytes

    def cuda_host_register(self, a: np.ndarray) -> bool:
        key = self.array_span(a)
        self.refs[key] = self.refs.get(key, 0) + 1
        return True

    def cuda_host_unregister(self, address: int, nbytes: int) -> bool:
        key = (address, nbytes)
        if key not in self.refs:
            return False
        self.unregistered.append(key)
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
        return True


@pytest.fixture
def fake_pinning(monkeypatch):
    """tb.pin and tb.unpin over _FakePinningCore, as on a machine with a GPU (the compiled
    core in use: it runs the finalizers, and knows the main thread)."""
    from tensorbridge import _backend, _pinned

    through = getattr(_backend._LOADED, "call_through_interrupts", None)
    if through is None:
        pytest.skip("needs the compiled core")
    core = _FakePinningCore(through)
    monkeypatch.setattr(_backend, "ENGINE", types.SimpleNamespace(cuda_engine=True, core=core))
    monkeypatch.setattr(_backend, "_LOADED", core)
    monkeypatch.setattr(_pinned, "_PINS", {}, raising=False)
    return core


def test_a_pinned_array_is_unpinned_as_it_dies_once_per_pin(fake_pinning):
    a = np.zeros(1000)
    key = fake_pinning.array_span(a)
    tb.pin(a)
    tb.pin(a)
    tb.unpin(a)  # (one of the two pins: its array's death must not unpin it again)
    assert fake_pinning.refs == {key: 1}
    del a
    gc.collect()
    assert fake_pinning.refs == {} and fake_pinning.unregistered == [key, key]
    b = np.zeros(1000)
    tb.pin(b)
    tb.unpin(b)
    fake_pinning.cuda_host_register(b)  # (the same memory registered since, by another)
    del b
    gc.collect()
    assert len(fake_pinning.refs) == 1  # b's unpinned pin did not drop the other's


def test_unpinning_a_view_takes_the_views_pin_not_the_arrays(fake_pinning):
    """b and a view of all of it are the same memory: unpinning the view drops the
    view's pin, so the view's death does not unpin b, which still holds its own."""
    b = np.zeros(1000)
    v = b[:]
    key = fake_pinning.array_span(b)
    tb.pin(b)
    tb.pin(v)
    tb.unpin(v)
    del v
    gc.collect()
    assert fake_pinning.refs == {key: 1}  # b's pin stands
    del b
    gc.collect()
    assert fake_pinning.refs == {}


def test_a_ctrl_c_pending_as_a_pinned_array_dies_still_unpins_it(fake_pinning):
    """weakref.finalize's call is Python code: a Ctrl-C pending as the array died ended it
    before it unpinned (and atexit then unpinned memory freed long before). The pin's
    callback runs through the core, which calls it again and raises the Ctrl-C after."""
    from tensorbridge import _pinned

    arrays = [tb.pin(np.zeros(1000))]
    key = fake_pinning.array_span(arrays[0])
    set_interrupt = ctypes.pythonapi.PyErr_SetInterrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            # C calls only: the callback's first instruction is the first to see it
            list(map(operator.methodcaller("__call__"), [set_interrupt, arrays.clear]))
            _nothing()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fake_pinning.refs == {} and fake_pinning.unregistered == [key]
    assert _pinned._PINS == {}


def _nothing() -> None:
    """A call: where Python raises a pending Ctrl-C."""
