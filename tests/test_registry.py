"""The registration cache (reused pageable arrays page-locked in place), on the CPU.

The cache takes its driver calls as injected operations. ``FakeDriver`` records them and
checks what a driver would enforce: nothing registered twice or overlapping, exactly
what was registered unregistered, once, and the budget. So every rule of the policy
(which arrays, after how many sightings, until when, within what budget, under threads
and forks) runs here without a GPU. The wiring in ``_cuda.to_host`` / ``to_device`` runs
here over a fake engine (the promises: a registered source is waited for, even
non-blocking; a registered ``out`` behaves as a pinned one). The budget the pool shares
with the registrations is tested in the real pool in test_engine.py, the CUDA calls
themselves in test_gpu.py.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import mmap
import operator
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import types

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _convert, _cuda, _registry
from tensorbridge._registry import RegistrationCache

from conftest import run_in_threads

MIN = 64 << 10  # the tests' min_bytes: small arrays, so many fit in memory at once


def addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


class FakeDriver:
    """RegistrationOps that record every call and note every broken rule in ``errors``
    (an assertion raised in a weakref callback would only be printed)."""

    def __init__(self, budget: int = 1 << 40, pool_held: int = 0) -> None:
        self.lock = threading.Lock()
        self.registered: dict[int, int] = {}  # address -> nbytes, page-locked now
        self.log: list[tuple[str, int, int]] = []
        self.errors: list[str] = []
        self.budget = budget
        self.pool_held = pool_held  # bytes the staging pool holds
        self.reserved = 0
        self.refuse: set[int] = set()  # addresses the driver will not register
        self.on_unregister = None
        self.devices: list[int] = []  # the device each register call named

    def register(self, owner: np.ndarray, device: int) -> bool:
        # (the cache's own address function, so a test that moves memory moves it here too)
        address, nbytes = _registry._address(owner), owner.nbytes
        with self.lock:
            self.log.append(("register", address, nbytes))
            self.devices.append(device)
            for a, n in self.registered.items():
                if a < address + nbytes and address < a + n:
                    self.errors.append(f"register {address:#x}+{nbytes} overlaps {a:#x}+{n}")
            if self.reserved > self.budget // 2 or self.reserved + self.pool_held > self.budget:
                self.errors.append(f"registered over the budget: {self.reserved} reserved")
            if address in self.refuse:
                return False
            self.registered[address] = nbytes
        return True

    def unregister(self, address: int, nbytes: int) -> None:
        if self.on_unregister is not None:
            self.on_unregister(address, nbytes)
        with self.lock:
            self.log.append(("unregister", address, nbytes))
            if self.registered.pop(address, None) != nbytes:
                self.errors.append(f"unregister {address:#x}+{nbytes}: not registered as such")

    def reserve(self, nbytes: int) -> bool:
        with self.lock:
            if self.pool_held + self.reserved + nbytes > self.budget:
                return False
            self.reserved += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self.lock:
            self.reserved -= nbytes
            if self.reserved < 0:
                self.errors.append("gave back more than was reserved")

    def limit(self) -> int:
        return self.budget // 2

    def calls(self, what: str) -> list[tuple[int, int]]:
        with self.lock:
            return [(a, n) for w, a, n in self.log if w == what]


def make(driver: FakeDriver | None = None, **kw) -> tuple[RegistrationCache, FakeDriver]:
    driver = driver or FakeDriver()
    kw.setdefault("min_bytes", MIN)
    return RegistrationCache(driver, **kw), driver


def used(cache: RegistrationCache, a: np.ndarray) -> bool:
    """One transfer's view of the cache: whether a is registered (DMA'd directly)."""
    with cache.lease(a) as registered:
        return registered


# ------------------------------------------------------------------------- when


@pytest.mark.parametrize("sightings", [1, 2, 3])
def test_registers_on_the_nth_sighting_then_hits(sightings):
    cache, drv = make(sightings=sightings)
    a = np.zeros(MIN, np.uint8)
    got = [used(cache, a) for _ in range(sightings + 2)]
    assert got == [False] * (sightings - 1) + [True] * 3
    assert drv.registered == {addr(a): a.nbytes}
    assert drv.calls("register") == [(addr(a), a.nbytes)]  # once, not per transfer
    s = cache.stats()
    assert (s["sightings"], s["registrations"], s["registered_hits"]) == (sightings, 1, 2)
    assert (s["registered_bytes"], s["registered_arrays"]) == (a.nbytes, 1)
    assert drv.errors == []


def test_the_default_policy_registers_on_the_second_sighting_from_4_mib():
    cache, drv = make(min_bytes=_registry.DEFAULT_MIN_BYTES)
    small, big = np.zeros((4 << 20) - 1, np.uint8), np.zeros(4 << 20, np.uint8)
    assert [used(cache, small) for _ in range(3)] == [False] * 3
    assert [used(cache, big) for _ in range(3)] == [False, True, True]
    assert drv.registered == {addr(big): big.nbytes}


def test_covers_says_which_memory_the_cache_registered(monkeypatch):
    """covers(address, nbytes): whether a span meets a registration (a tensor over a
    registered array is leased by no one, but its memory is the array's); a span beside
    it, or one whose registration was dropped, does not. A batch's page-locked tensor
    over such memory is packed, not sent directly (its owner thinks it pageable)."""
    cache, drv = make()
    base = np.zeros(2 * MIN, np.uint8)
    start = addr(base)
    assert not cache.covers(start, base.nbytes)
    assert [used(cache, base) for _ in range(2)] == [False, True]
    assert cache.covers(start, 1) and cache.covers(start + base.nbytes - 1, 1)
    assert cache.covers(start - 8, 9) and cache.covers(start + MIN, 4 * MIN)
    assert not cache.covers(start - 8, 8) and not cache.covers(start + base.nbytes, 8)
    view = torch.from_numpy(base)[MIN:]
    monkeypatch.setattr(_registry, "CACHE", cache)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, device=None: True)
    assert not tb._batch._pinned_by_its_owner(view)  # (the cache's: packed)
    assert tb._batch._pinned_by_its_owner(torch.from_numpy(np.zeros(MIN, np.uint8)))
    assert cache.covers_tensor(view) and cache.covers_tensor(torch.from_numpy(base)[::2])
    assert not cache.covers_tensor(torch.from_numpy(np.zeros(8, np.uint8)))
    # torch's own copy from such a tensor (one the engine cannot view) is not left
    # running after the call: to_tensor asks it for a blocking copy
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(
        torch.Tensor,
        "copy_",
        lambda self, src, non_blocking=False: copies.append(non_blocking) or real_copy(self, src),
    )
    out = torch.empty(MIN, dtype=torch.uint8)
    tb.to_tensor(view, out=out, non_blocking=True)
    tb.to_tensor(torch.from_numpy(np.zeros(MIN, np.uint8)), out=out, non_blocking=True)
    assert copies == [False, True]
    cache.clear()
    assert not cache.covers(start, base.nbytes) and tb._batch._pinned_by_its_owner(view)
    assert not cache.covers_tensor(view)
    assert drv.errors == []


def test_views_of_a_registered_array_use_its_registration():
    cache, drv = make()
    base = np.zeros(2 * MIN, np.uint8)
    assert [used(cache, base) for _ in range(2)] == [False, True]
    for view in (base.view(np.float32), base.reshape(2, MIN), base[: MIN + 8], base[MIN:]):
        assert used(cache, view), view.shape
    assert drv.registered == {addr(base): base.nbytes}  # the whole buffer, once
    assert len(drv.calls("register")) == 1


def test_sightings_count_per_owner_address_and_size():
    cache, drv = make()
    base = np.zeros(2 * MIN, np.uint8)
    first, second = base[:MIN], base[MIN:]
    assert not used(cache, first)
    assert not used(cache, second)  # another address: its own first sighting
    assert not used(cache, base[: MIN + 8])  # another size: its own first sighting
    assert used(cache, first)  # first's second sighting registers the owner's buffer
    assert drv.registered == {addr(base): base.nbytes}
    assert used(cache, second)


def test_the_address_it_tracks_is_where_the_data_starts():
    """_address reads the compiled core's span (a tenth of __array_interface__'s cost):
    for every contiguous array it is asked about, where the data starts."""
    base = np.zeros((64, 32), np.float32)
    for a in (
        base,
        base[3:],
        base[5:9],
        base.T,
        np.asfortranarray(base)[:, 2:],
        base[4:5, ::-1][:, :1],
    ):
        assert a.flags.c_contiguous or a.flags.f_contiguous
        assert _registry._address(a) == a.__array_interface__["data"][0]


def test_the_cache_works_over_a_core_built_without_cuda(monkeypatch):
    """A core built with -DTB_ENABLE_CUDA=OFF has no array_span: the address then comes
    from NumPy, and the policy runs as before."""
    monkeypatch.setattr(_backend, "_LOADED", types.SimpleNamespace())  # (no GPU calls)
    cache, drv = make()
    a = np.zeros(MIN, np.uint8)
    assert _registry._address(a[8:]) == a.__array_interface__["data"][0] + 8
    assert [used(cache, a) for _ in range(3)] == [False, True, True]
    assert drv.registered == {addr(a): MIN} and drv.errors == []


def test_a_new_array_at_a_freed_ones_address_is_a_first_sighting():
    cache, drv = make()
    a = np.empty(MIN, np.uint8)
    key = (id(a), addr(a))
    assert not used(cache, a)
    del a
    b = np.empty(MIN, np.uint8)
    if (id(b), addr(b)) != key:
        pytest.skip("the allocator gave the new array another object or address")
    assert not used(cache, b)  # (keyed by id and address alone, this would register)
    assert drv.calls("register") == []


# ------------------------------------------------------------------------- which arrays


class _Sub(np.ndarray):
    pass


def _memmap(tmp_path):
    return np.memmap(tmp_path / "m.bin", dtype=np.uint8, mode="w+", shape=(MIN,))


# Arrays whose memory the cache must never register, however often they come back.
NOT_TRACKED = {
    "transposed": lambda tmp: np.zeros((256, MIN // 256), np.uint8).T,
    "strided": lambda tmp: np.zeros(2 * MIN, np.uint8)[::2],
    "byte-swapped": lambda tmp: np.zeros(MIN // 2, np.uint16).view(
        np.dtype(np.uint16).newbyteorder()
    ),
    "below min_bytes": lambda tmp: np.zeros(MIN - 1, np.uint8),
    "empty": lambda tmp: np.zeros(0, np.uint8),
    "np.memmap": _memmap,
    "a view of an np.memmap": lambda tmp: _memmap(tmp)[:],
    "bytearray": lambda tmp: np.frombuffer(bytearray(MIN), np.uint8),
    "bytes": lambda tmp: np.frombuffer(bytes(MIN), np.uint8),
    "mmap": lambda tmp: np.frombuffer(mmap.mmap(-1, MIN), np.uint8),
    "ctypes": lambda tmp: np.ctypeslib.as_array((ctypes.c_uint8 * MIN)()),
    "torch tensor's memory": lambda tmp: torch.zeros(MIN, dtype=torch.uint8).numpy(),
    "an ndarray subclass owns it": lambda tmp: np.zeros(MIN, np.uint8).view(_Sub).copy(),
    "a slice of a larger array": lambda tmp: np.zeros(2 * MIN + 4, np.uint8)[: MIN + 1],
    "as_strided": lambda tmp: np.lib.stride_tricks.as_strided(np.zeros(MIN, np.uint8)),
    "object dtype": lambda tmp: np.empty(MIN // 8, object),
}
# And ones it registers, so the table above cannot pass by refusing everything.
TRACKED = {
    "plain": lambda tmp: np.zeros(MIN, np.uint8),
    "exactly min_bytes of float64": lambda tmp: np.zeros(MIN // 8),
    "C view of an F-ordered array": lambda tmp: np.zeros((16, MIN // 16), order="F").T,
    "half of its array": lambda tmp: np.zeros(2 * MIN, np.uint8)[MIN:],
    "a subclass view of a plain array": lambda tmp: np.zeros(MIN, np.uint8).view(_Sub),
    "read-only view": lambda tmp: np.zeros(MIN, np.uint8)[:].view(),
}


@pytest.mark.parametrize("case", list(NOT_TRACKED))
def test_memory_it_cannot_track_is_never_registered(case, tmp_path):
    cache, drv = make(sightings=1)
    a = NOT_TRACKED[case](tmp_path)
    assert [used(cache, a) for _ in range(4)] == [False] * 4
    assert drv.calls("register") == [] and cache.stats()["sightings"] == 0


@pytest.mark.parametrize("case", list(TRACKED))
def test_arrays_numpy_owns_are_registered(case, tmp_path):
    cache, drv = make(sightings=1)
    a = TRACKED[case](tmp_path)
    if case == "read-only view":
        a.setflags(write=False)
    assert used(cache, a)
    owner = a if a.base is None else a.base
    assert drv.registered == {addr(owner): owner.nbytes}


# ------------------------------------------------------------------------- until when


def _numpy_holds(nbytes: int) -> bool:
    """NumPy still holds an allocation of exactly nbytes (its tracemalloc domain)."""
    domain = np.lib.tracemalloc_domain
    return any(t.domain == domain and t.size == nbytes for t in tracemalloc.take_snapshot().traces)


def test_unregistered_when_the_owner_dies_before_numpy_frees_its_memory():
    """The weakref callback runs inside NumPy's dealloc, before the data is freed."""
    nbytes = MIN + 24  # (an odd size, to find its allocation among NumPy's)
    cache, drv = make(sightings=1)
    seen: list[tuple[int, int, bool]] = []
    drv.on_unregister = lambda a, n: seen.append((a, n, _numpy_holds(nbytes)))
    tracemalloc.start()
    try:
        owner = np.empty(nbytes, np.uint8)
        address = addr(owner)
        assert used(cache, owner)
        view = owner.reshape(1, -1)
        del owner  # the view still holds the memory: nothing happens
        assert seen == [] and drv.registered == {address: nbytes}
        del view
        # unregistered at once, exactly what was registered, while NumPy still held it...
        assert seen == [(address, nbytes, True)]
        assert not _numpy_holds(nbytes)  # ...and freed right after (the check can tell)
    finally:
        tracemalloc.stop()
    s = cache.stats()
    assert (s["releases"], s["registered_bytes"], s["registered_arrays"]) == (1, 0, 0)
    assert drv.registered == {} and drv.reserved == 0 and drv.errors == []


def test_an_evicted_or_dropped_registration_is_not_unregistered_again_at_death():
    cache, drv = make(sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    cache.clear()
    del a
    assert len(drv.calls("unregister")) == 1 and drv.errors == []


def test_numpy_refuses_to_resize_a_tracked_array_so_its_memory_cannot_move():
    cache, drv = make(sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    with pytest.raises(ValueError, match="resize"):
        a.resize(2 * MIN, refcheck=False)
    assert drv.registered == {addr(a): MIN}
    cache.clear()  # forgets it: NumPy lets it go
    a.resize(2 * MIN, refcheck=False)
    assert used(cache, a)  # the new buffer: a new registration
    assert drv.registered == {addr(a): 2 * MIN} and drv.errors == []


def test_a_registration_whose_memory_moved_is_dropped_on_the_next_sighting(monkeypatch):
    """NumPy 1.x lets ``a.data = ...`` move an array's memory: simulated here by moving
    the address the cache (and the fake driver) read."""
    cache, drv = make()
    a = np.zeros(MIN, np.uint8)
    old = addr(a)
    assert [used(cache, a) for _ in range(2)] == [False, True]
    real = _registry._address
    monkeypatch.setattr(_registry, "_address", lambda x: real(x) + (1 << 40))
    assert not used(cache, a)  # the stale registration dropped: a first sighting
    assert drv.calls("unregister") == [(old, MIN)]
    assert used(cache, a)  # registered where the memory now is
    assert drv.registered == {old + (1 << 40): MIN}
    assert cache.stats()["evictions"] == 1 and drv.errors == []


# ------------------------------------------------------------------------- the budget


def test_registrations_stay_within_half_the_budget_evicting_the_least_recently_used():
    cache, drv = make(FakeDriver(budget=6 * MIN), sightings=1)
    arrays = [np.zeros(MIN, np.uint8) for _ in range(5)]
    assert all(used(cache, a) for a in arrays[:3])  # the share: 3 * MIN
    assert used(cache, arrays[0])  # now arrays[1] is the least recently used
    assert used(cache, arrays[3])
    assert set(drv.registered) == {addr(arrays[i]) for i in (0, 2, 3)}
    assert used(cache, arrays[4])  # evicts arrays[2]
    assert set(drv.registered) == {addr(arrays[i]) for i in (0, 3, 4)}
    s = cache.stats()
    assert (s["evictions"], s["registered_bytes"]) == (2, 3 * MIN)
    assert drv.reserved == 3 * MIN and drv.errors == []


def test_the_staging_pool_keeps_its_blocks_and_registrations_evict_each_other():
    # The share allows four arrays, but the pool holds five of the eight: room for three.
    cache, drv = make(FakeDriver(budget=8 * MIN, pool_held=5 * MIN), sightings=1)
    arrays = [np.zeros(MIN, np.uint8) for _ in range(4)]
    assert all(used(cache, a) for a in arrays)
    assert set(drv.registered) == {addr(a) for a in arrays[1:]}  # arrays[0] made room
    assert drv.reserved == 3 * MIN and cache.stats()["evictions"] == 1 and drv.errors == []


def test_no_room_means_the_staged_path_not_an_error():
    cache, drv = make(FakeDriver(budget=MIN))  # the share, MIN // 2, holds no array
    a = np.zeros(MIN, np.uint8)
    assert [used(cache, a) for _ in range(4)] == [False] * 4
    s = cache.stats()
    assert s["budget_refusals"] == 3 and s["registrations"] == 0
    assert drv.calls("register") == [] and drv.reserved == 0


def test_two_arrays_that_do_not_fit_together_do_not_take_turns():
    """Room for one: alternating two arrays keeps the first registered (evicting it for
    the other, and back, would cost a registration and a device sync every time)."""
    cache, drv = make(FakeDriver(budget=2 * MIN))
    a, b = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    for _ in range(20):
        used(cache, a)
        used(cache, b)
    assert drv.calls("register") == [(addr(a), MIN)]
    s = cache.stats()
    assert s["evictions"] == 0 and s["budget_refusals"] == 19
    # Once a has not been used since b's last sighting, b takes its place.
    assert used(cache, b)
    assert drv.registered == {addr(b): MIN} and cache.stats()["evictions"] == 1
    assert drv.errors == []


def test_a_lower_budget_evicts_the_least_recently_used():
    cache, drv = make(sightings=1)
    arrays = [np.zeros(MIN, np.uint8) for _ in range(3)]
    for a in arrays:
        used(cache, a)
    used(cache, arrays[0])
    cache.trim(MIN)
    assert drv.registered == {addr(arrays[0]): MIN}
    assert cache.stats()["registered_bytes"] == MIN and drv.reserved == MIN


# ------------------------------------------------------------------------- in use


def test_a_registration_in_use_is_dropped_only_when_its_transfer_ends():
    cache, drv = make()
    a = np.zeros(MIN, np.uint8)
    assert [used(cache, a) for _ in range(2)] == [False, True]
    with cache.lease(a) as registered:
        assert registered
        cache.clear()  # (the DMA of this transfer may be in flight)
        assert drv.registered == {addr(a): MIN}
    assert drv.registered == {} and cache.stats()["evictions"] == 1
    assert not used(cache, a)  # forgotten: a first sighting again


def test_a_registration_in_use_is_never_evicted_to_make_room():
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a, b = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    used(cache, a)
    with cache.lease(a):
        assert not used(cache, b)
        assert drv.registered == {addr(a): MIN}
    assert cache.stats()["budget_refusals"] == 1


@pytest.mark.parametrize(
    "then", ["make room", "clear", "clear, then its next sighting", "off, then its next sighting"]
)
def test_a_lease_cut_short_holds_its_registration_only_while_it_lives(then):
    """A Ctrl-C between lease() and its ``with``, or as the ``with`` ends before __exit__
    runs, leaves a lease that never gives its registration back: the registration stays
    in use while that lease lives (its frame, or the interrupt's traceback), and can be
    evicted once it is gone."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a, b = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    assert used(cache, a)
    cut = cache.lease(a)
    assert cut.__enter__()  # (and its __exit__ never runs)

    def evict() -> None:
        if then == "make room":
            used(cache, b)
        elif then.startswith("off"):
            cache.configure(enabled=False)  # (registration_options(enabled=False))
        else:
            cache.clear()

    evict()
    assert drv.registered == {addr(a): MIN}  # in use: kept
    del cut
    if then.endswith("sighting"):  # (doomed by the clear: dropped, and this one staged)
        assert not used(cache, a)
    else:
        evict()
    assert drv.registered == ({addr(b): MIN} if then == "make room" else {})
    assert cache.stats()["evictions"] == 1 and drv.errors == []
    assert drv.reserved == cache._reserved == (MIN if then == "make room" else 0)
    if then.startswith("off"):
        assert not used(cache, a) and drv.registered == {}  # (off: not registered again)


def test_a_driver_refusal_takes_the_staged_path_and_is_not_asked_again():
    drv = FakeDriver()
    cache, _ = make(drv, sightings=1)
    a = np.zeros(MIN, np.uint8)
    drv.refuse.add(addr(a))
    assert [used(cache, a) for _ in range(5)] == [False] * 5
    assert len(drv.calls("register")) == 1
    s = cache.stats()
    assert s["register_failures"] == 1 and s["registered_bytes"] == 0 and drv.reserved == 0


def test_a_driver_error_while_registering_takes_the_staged_path():
    drv = FakeDriver()

    def broken(owner):
        raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")

    drv.register = broken
    cache, _ = make(drv, sightings=1)
    assert not used(cache, np.zeros(MIN, np.uint8))
    assert cache.stats()["register_failures"] == 1 and drv.reserved == 0


def fail_next_unregister(drv):
    """The driver's next unregistration fails, as a device error would."""
    real = drv.unregister

    def fails_once(address, nbytes):
        drv.unregister = real
        raise RuntimeError("cudaErrorLaunchFailure")

    drv.unregister = fails_once


def test_a_failed_unregistration_keeps_the_registration_for_its_owners_death():
    cache, drv = make(sightings=1)
    a = np.zeros(MIN, np.uint8)
    used(cache, a)
    fail_next_unregister(drv)
    with pytest.raises(RuntimeError, match="LaunchFailure"):
        cache.trim(0)
    assert drv.registered == {addr(a): MIN}  # still registered, still tracked
    del a
    assert drv.registered == {} and drv.reserved == 0 and drv.errors == []


def test_a_failed_eviction_fails_that_transfer_and_leaves_the_cache_consistent():
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)  # room for one
    a, b = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    used(cache, a)
    fail_next_unregister(drv)
    with pytest.raises(RuntimeError, match="LaunchFailure"):
        used(cache, b)  # making room for b evicts a, whose unregistration fails
    assert drv.registered == {addr(a): MIN} and drv.reserved == MIN
    assert cache.stats()["registered_bytes"] == MIN
    del a  # still unregistered at its death
    assert used(cache, b)  # and b is not stuck half-registered
    assert drv.registered == {addr(b): MIN} and drv.reserved == MIN and drv.errors == []


def test_an_interrupt_while_registering_gives_back_what_it_took():
    """A KeyboardInterrupt (not an Exception) that lands after the driver page-locked the
    array, before its call returned: the registration is undone and its budget given
    back, so the memory is not left pinned and the share is whole for later arrays."""
    cache, drv = make(FakeDriver(budget=4 * MIN), sightings=1)  # a share of 2 arrays
    real = drv.register

    def interrupted(owner, device):
        real(owner, device)
        raise KeyboardInterrupt

    drv.register = interrupted
    a = np.zeros(MIN, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        used(cache, a)
    drv.register = real
    assert drv.registered == {} and drv.reserved == 0 and cache._reserved == 0
    assert cache.stats()["registered_bytes"] == 0
    b, c = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    assert used(cache, b) and used(cache, c)  # both fit: nothing of a's is held
    assert used(cache, a)  # a itself registers normally afterwards
    assert drv.errors == []


@pytest.fixture
def ctrl_c_raises():
    """SIGINT's handler as in an interactive Python (a test run may inherit it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c_after(call):
    """call, then a Ctrl-C (a real SIGINT) as it returns, where Python raises it."""

    def interrupted(*args):
        result = call(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    return interrupted


#: Whether owners' weakref callbacks run through the compiled core, where a Ctrl-C that
#: ends one is delivered to the program afterwards (without it, Python prints it).
THROUGH_CORE = hasattr(_backend._LOADED, "call_through_interrupts")


def _ctrl_c_as_dropped(arrays: list) -> None:
    """Drops the arrays in ``arrays``, whose callbacks meet a Ctrl-C: through the core it
    reaches the program (raised here, after the callbacks), not printed; without it,
    Python prints it as the callback's error."""
    if THROUGH_CORE:
        unraisable: list = []
        old_hook = sys.unraisablehook
        sys.unraisablehook = unraisable.append
        try:
            with pytest.raises(KeyboardInterrupt):
                arrays.clear()
                _next_instruction()
        finally:
            sys.unraisablehook = old_hook
        assert arrays == [] and unraisable == []
    else:
        unraisable = _errors_printed_as(arrays)
        assert [type(u.exc_value) for u in unraisable] == [KeyboardInterrupt]


def _next_instruction() -> None:
    """A call: where Python raises a Ctrl-C that is pending."""


def _ctrl_c_before(call):
    """A Ctrl-C (a real SIGINT), then call: inside a hold, the Ctrl-C is raised as the
    hold ends."""

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return call(*args)

    return interrupted


def _errors_printed_as(arrays: list) -> list:
    """Drops the arrays in ``arrays``: the errors their weakref callbacks raised, which
    Python prints (unraisable) rather than raises."""
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        arrays.clear()
    finally:
        sys.unraisablehook = old_hook
    return unraisable


def test_a_ctrl_c_as_the_pool_reserves_waits_until_the_registration_counts(ctrl_c_raises):
    """A Ctrl-C landing in the pool's reserve call was raised as the call returned, before
    the cache knew that it had reserved: those bytes were lost for good. It is raised once
    the registration is done and counted, and the transfer it interrupted leases nothing."""
    handler = signal.getsignal(signal.SIGINT)
    cache, drv = make(FakeDriver(budget=4 * MIN), sightings=1)
    drv.reserve = _ctrl_c_after(FakeDriver.reserve.__get__(drv))
    a = np.zeros(MIN, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        used(cache, a)
    del drv.reserve
    assert signal.getsignal(signal.SIGINT) is handler
    assert drv.registered == {addr(a): MIN} and drv.reserved == cache._reserved == MIN
    assert cache.stats()["registered_bytes"] == MIN and used(cache, a)  # a hit
    cache.trim(0)  # (not held by a lease the interrupted transfer never gave back)
    assert drv.registered == {} and drv.reserved == cache._reserved == 0
    assert drv.errors == []


def test_a_ctrl_c_as_the_driver_unregisters_waits_until_the_books_are_settled(ctrl_c_raises):
    """A Ctrl-C as an eviction's unregister call returned put the registration back as
    still page-locked (unregistered again at the array's death: a driver error) and kept
    its reservation. It is raised once the eviction is done."""
    cache, drv = make(FakeDriver(budget=4 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    drv.unregister = _ctrl_c_after(FakeDriver.unregister.__get__(drv))
    with pytest.raises(KeyboardInterrupt):
        cache.trim(0)
    del drv.unregister
    assert drv.registered == {} and drv.reserved == cache._reserved == 0
    assert cache.stats()["registered_bytes"] == 0
    del a
    assert drv.errors == [] and len(drv.calls("unregister")) == 1


def test_a_ctrl_c_while_a_moved_registration_is_dropped_strands_nothing(monkeypatch, ctrl_c_raises):
    """A Ctrl-C raised as the stale registration of moved memory was dropped (before the
    new one was made) left the new one pending for good: the array was never registered
    again while it lived. Its lease gives it back now."""
    cache, drv = make(sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    real = _registry._address
    monkeypatch.setattr(_registry, "_address", lambda x: real(x) + (1 << 40))
    drv.unregister = _ctrl_c_after(FakeDriver.unregister.__get__(drv))
    with pytest.raises(KeyboardInterrupt):
        used(cache, a)
    del drv.unregister
    assert used(cache, a)  # registered where the memory now is, not "pending elsewhere"
    assert drv.registered == {addr(a) + (1 << 40): MIN}
    cache.trim(0)  # (no lease left behind: it can be evicted)
    assert drv.registered == {} and drv.reserved == cache._reserved == 0
    assert drv.errors == []


class _CtrlCAtEviction(dict):
    """The cache's counters, sending a real SIGINT as an eviction is counted: right after
    the registration is claimed, before it is dropped."""

    armed = True

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key == "evictions" and self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("how", ["trim", "clear", "off", "doomed at release", "moved"])
def test_a_ctrl_c_between_an_evictions_claim_and_its_drop_strands_nothing(
    monkeypatch, ctrl_c_raises, how
):
    """A Ctrl-C after an eviction claimed a registration, before it was unregistered, left
    the memory page-locked and reserved for good (its array's death no longer found it)."""
    cache, drv = make(FakeDriver(budget=8 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    cache._counts = _CtrlCAtEviction(cache._counts)
    with pytest.raises(KeyboardInterrupt):
        if how == "trim":
            cache.trim(0)
        elif how == "clear":
            cache.clear()
        elif how == "off":
            cache.configure(enabled=False)
        elif how == "moved":
            real = _registry._address
            monkeypatch.setattr(_registry, "_address", lambda x: real(x) + (1 << 40))
            used(cache, a)
        else:
            with cache.lease(a):
                cache.trim(0)  # (in use: doomed, dropped as its lease ends)
    cache.configure(enabled=True)
    cache.trim(0)
    assert drv.registered == {} and drv.reserved == cache._reserved == 0
    assert cache.stats()["registered_bytes"] == 0 and drv.errors == []


def test_the_users_handler_is_put_back_even_when_another_signal_raises_in_the_way(
    monkeypatch, ctrl_c_raises
):
    """A handler of another signal (a timeout's SIGALRM, DataLoader's SIGCHLD) raising
    inside the call that restores SIGINT's left the cache's holder installed for good:
    every later Ctrl-C was swallowed."""
    previous = signal.getsignal(signal.SIGINT)
    real, calls = signal.signal, []

    def interrupted_once(signum, handler):
        calls.append(handler)
        if handler is previous and calls.count(previous) == 1:
            raise TimeoutError("SIGALRM's handler")  # (before anything changes, as CPython)
        return real(signum, handler)

    monkeypatch.setattr(_registry.signal, "signal", interrupted_once)
    with pytest.raises(TimeoutError):
        with _registry._interrupts_held():
            pass
    assert signal.getsignal(signal.SIGINT) is previous and calls.count(previous) == 2


def test_a_ctrl_c_off_the_main_thread_or_under_another_handler_is_left_alone():
    """Only the main thread holds a Ctrl-C, and only under a Python handler: one that is
    ignored stays ignored (nothing raised, the handler as it was)."""
    handler, seen = signal.getsignal(signal.SIGINT), []

    def off_main() -> None:
        with _registry._interrupts_held():  # (signal.signal would raise ValueError here)
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert seen == [handler]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _registry._interrupts_held():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("call", ["unregister", "unreserve"])
def test_a_ctrl_c_as_an_array_dies_settles_the_books_first(ctrl_c_raises, call):
    """A Ctrl-C as the owner's callback called the driver was raised in that call: the
    memory stayed registered (or the pool's bytes reserved) for good. It is held until
    the books are settled, then raised as the callback's error (printed: a finalizer's)."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    setattr(drv, call, _ctrl_c_before(getattr(drv, call)))  # (raised in the driver's call)
    arrays = [a]
    del a
    try:
        _ctrl_c_as_dropped(arrays)
    finally:
        delattr(drv, call)
    assert drv.registered == {} and drv.reserved == 0 and drv.errors == []
    s = cache.stats()
    assert (s["registered_bytes"], s["releases"]) == (0, 1) and cache._reserved == 0
    b = np.zeros(MIN, np.uint8)
    assert used(cache, b)  # (the whole share is there)


def test_a_ctrl_c_as_an_array_dies_before_the_hold_is_set_up_strands_nothing(
    ctrl_c_raises, monkeypatch
):
    """Setting up the hold takes a few calls: a Ctrl-C among them ended the callback
    before it claimed the registration, which then outlived its memory. The callback
    settles it on the way out."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    real = threading.current_thread

    def ctrl_c_lands_now():  # (the hold's first call)
        monkeypatch.setattr(threading, "current_thread", real)
        os.kill(os.getpid(), signal.SIGINT)  # (raised at the next call)
        return real()

    monkeypatch.setattr(threading, "current_thread", ctrl_c_lands_now)
    arrays = [a]
    del a
    _ctrl_c_as_dropped(arrays)
    assert drv.registered == {} and drv.reserved == 0 and drv.errors == []
    assert cache.stats()["registered_bytes"] == 0 and cache._reserved == 0


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
@pytest.mark.parametrize("times", [1, 3])
def test_a_ctrl_c_pending_as_an_array_dies_strands_nothing(ctrl_c_raises, times):
    """A Ctrl-C pending as the owner's callback starts is raised on its first instruction,
    before it has done anything: the registration outlived its memory. Through the core
    the callback is called again and the Ctrl-C delivered after it. (``times``: Ctrl-Cs
    in all, each after the first landing as the callback is called again.)"""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    set_interrupt = ctypes.pythonapi.PyErr_SetInterrupt  # (a Ctrl-C pending from its return)
    real, left, calls = cache._owner_freed, [times - 1], []

    def freed(*args):
        calls.append(args)
        if left[0]:
            left[0] -= 1
            set_interrupt()  # (raised on the next instruction: before the real callback)
        return real(*args)

    cache._owner_freed = freed  # (before the registration takes it as its callback)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    arrays = [a]
    del a
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            # C calls only, so nothing meets the Ctrl-C before the callback's first line
            list(map(operator.methodcaller("__call__"), [set_interrupt, arrays.clear]))
            _next_instruction()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == [] and arrays == [] and len(calls) == times
    assert drv.registered == {} and drv.reserved == 0 and drv.errors == []
    s = cache.stats()
    assert (s["registered_bytes"], s["releases"]) == (0, 1) and cache._reserved == 0


def _dropped(arrays: list) -> tuple[list, list]:
    """Drops ``arrays`` on the main thread: (the KeyboardInterrupts raised there after,
    the errors Python printed as callbacks' errors)."""
    raised: list = []
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        try:
            arrays.clear()
            _next_instruction()
        except KeyboardInterrupt as exc:
            raised.append(exc)
        _next_instruction()  # (a second one would be raised here)
    finally:
        sys.unraisablehook = old_hook
    return raised, unraisable


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
def test_a_ctrl_c_reaches_the_program_once_and_through_its_own_handler_once():
    """One Ctrl-C that lands as an owner's callback unregisters: the program's SIGINT
    handler runs once, and the KeyboardInterrupt it raised is the one the program gets
    (re-raised, not a second signal)."""
    presses: list = []

    def handler(signum, frame):
        presses.append(signum)
        raise KeyboardInterrupt(f"press {len(presses)}")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
        a = np.zeros(MIN, np.uint8)
        assert used(cache, a)
        drv.unregister = _ctrl_c_before(drv.unregister)  # (held: raised as the hold ends)
        arrays = [a]
        del a
        raised, unraisable = _dropped(arrays)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [str(e) for e in raised] == ["press 1"] and len(presses) == 1
    assert unraisable == [] and drv.registered == {} and drv.reserved == 0


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
@pytest.mark.parametrize("order", ["driver error, then Ctrl-C", "Ctrl-C, then driver error"])
def test_a_driver_error_beside_a_ctrl_c_is_printed_and_the_ctrl_c_still_comes(ctrl_c_raises, order):
    """The Ctrl-C must not hide the driver's error (printed, as a finalizer's error), nor
    the driver's error the Ctrl-C (raised in the program after the callback)."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    real, calls = drv.unregister, []

    def unregister(*args):
        calls.append(args)
        if order == "driver error, then Ctrl-C":
            os.kill(os.getpid(), signal.SIGINT)  # (held: raised as the hold ends, over the error)
            real(*args)
            raise RuntimeError("cudaErrorLaunchFailure: unregister failed")
        real(*args)
        if len(calls) == 1:
            raise KeyboardInterrupt  # (the first call; the second finds nothing to do)
        raise AssertionError("unregistered twice")

    drv.unregister = unregister
    if order == "Ctrl-C, then driver error":  # the retry fails with another error
        real_settle = cache._settle_freed
        settles: list = []

        def settle(token):
            settles.append(token)
            if len(settles) == 2:
                raise RuntimeError("cudaErrorLaunchFailure: the retry failed")
            return real_settle(token)

        cache._settle_freed = settle
    arrays = [a]
    del a
    raised, unraisable = _dropped(arrays)
    assert len(raised) == 1 and len(calls) == 1
    assert [str(u.exc_value) for u in unraisable] == [
        "cudaErrorLaunchFailure: unregister failed"
        if order == "driver error, then Ctrl-C"
        else "cudaErrorLaunchFailure: the retry failed"
    ]
    assert raised[0].__context__ is None or order != "driver error, then Ctrl-C"
    assert drv.registered == {} and drv.reserved == 0


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
@pytest.mark.parametrize("where", ["first instruction", "held"])
def test_the_exception_a_program_handles_as_an_array_dies_is_not_printed_as_the_callbacks(
    ctrl_c_raises, where
):
    """An array that dies inside the program's `except` block: the KeyboardInterrupt the
    callback meets has the program's exception as its context, which is not an error of
    the callback's to print."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    if where == "held":
        drv.unregister = _ctrl_c_before(drv.unregister)  # (held: raised as the hold ends)
    arrays = [a]
    del a
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                raise ValueError("the program's own")
            except ValueError:
                calls = [arrays.clear]
                if where == "first instruction":
                    calls.insert(0, ctypes.pythonapi.PyErr_SetInterrupt)
                list(map(operator.methodcaller("__call__"), calls))
                _next_instruction()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == [] and drv.registered == {} and drv.reserved == 0


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
def test_a_keyboard_interrupt_off_the_main_thread_is_not_moved_to_it(ctrl_c_raises):
    """Only the main thread receives Ctrl-C: a KeyboardInterrupt a callback raises on
    another thread is that callback's error (printed), not one to raise in the main
    thread nor to call the callback again for."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    real, calls = cache._settle_freed, []

    def settle(token):
        calls.append(token)
        real(token)
        raise KeyboardInterrupt("raised on a worker")

    cache._settle_freed = settle
    arrays = [a]
    del a
    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        worker = threading.Thread(target=arrays.clear)
        worker.start()
        worker.join()
        _next_instruction()  # (nothing pending here)
    finally:
        sys.unraisablehook = old_hook
    assert len(calls) == 1 and [str(u.exc_value) for u in unraisable] == ["raised on a worker"]
    assert drv.registered == {} and drv.reserved == 0


@pytest.mark.skipif(not THROUGH_CORE, reason="needs the compiled core")
def test_two_quick_ctrl_cs_as_an_array_dies_strand_nothing(ctrl_c_raises, monkeypatch):
    """One Ctrl-C as the hold is set up, a second just after the registration is
    claimed: the callback, called again, claims it under the hold (nothing claimed
    outside it to be lost), and the program gets one KeyboardInterrupt."""
    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    real = threading.current_thread

    def ctrl_c_lands_now():  # (the hold's first call)
        monkeypatch.setattr(threading, "current_thread", real)
        os.kill(os.getpid(), signal.SIGINT)  # (raised at the next call)
        return real()

    class Live(dict):
        def pop(self, *args):
            entry = super().pop(*args)
            if entry is not None:
                os.kill(os.getpid(), signal.SIGINT)  # (the claim: now under the hold)
            return entry

    cache._live = Live(cache._live)
    monkeypatch.setattr(threading, "current_thread", ctrl_c_lands_now)
    arrays = [a]
    del a
    raised, unraisable = _dropped(arrays)
    assert len(raised) == 1 and unraisable == []
    assert drv.registered == {} and drv.reserved == 0
    s = cache.stats()
    assert (s["registered_bytes"], s["releases"]) == (0, 1) and cache._reserved == 0


def test_a_ctrl_c_as_the_books_of_a_dead_array_are_settled_loses_nothing(ctrl_c_raises):
    """The next call settles a dead array's books (its callback takes no lock); a Ctrl-C
    between taking the entry and counting it lost its bytes from the share for good."""

    class Freed(collections.deque):
        def popleft(self):
            entry = super().popleft()
            os.kill(os.getpid(), signal.SIGINT)  # (raised at the next call)
            return entry

    cache, drv = make(FakeDriver(budget=2 * MIN), sightings=1)
    cache._freed = Freed()
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    del a
    with pytest.raises(KeyboardInterrupt):
        cache.stats()
    s = cache.stats()
    assert (s["registered_bytes"], s["releases"]) == (0, 1) and cache._reserved == 0
    b = np.zeros(MIN, np.uint8)
    assert used(cache, b) and drv.errors == []


def test_an_unregistration_failing_at_the_owners_death_still_settles_the_books():
    cache, drv = make(FakeDriver(budget=4 * MIN), sightings=1)
    a = np.zeros(MIN, np.uint8)
    assert used(cache, a)
    fail_next_unregister(drv)
    arrays = [a]
    del a
    unraisable = _errors_printed_as(arrays)  # (the callback's error is printed, not raised)
    assert len(unraisable) == 1 and "LaunchFailure" in str(unraisable[0].exc_value)
    s = cache.stats()
    assert (s["registered_bytes"], s["registered_arrays"], s["releases"]) == (0, 0, 1)
    assert drv.reserved == 0 and cache._reserved == 0
    b, c = np.zeros(MIN, np.uint8), np.zeros(MIN, np.uint8)
    assert used(cache, b) and used(cache, c)  # the whole share is there


def test_a_budget_lowered_while_an_array_registers_holds_for_it_too():
    """set_pinned_budget's trim runs while another thread is inside the driver's
    register call: that registration, counted after the trim, must fit the new budget."""
    drv = FakeDriver(budget=8 * MIN)
    cache, _ = make(drv, sightings=1)
    a = np.zeros(2 * MIN, np.uint8)
    real = drv.register

    def lowered_meanwhile(owner, device):
        ok = real(owner, device)
        drv.budget = 2 * MIN  # a share of one MIN: a no longer fits
        cache.trim()
        return ok

    drv.register = lowered_meanwhile
    assert not used(cache, a)  # staged: it does not fit the budget it would be counted in
    drv.register = real
    assert drv.registered == {} and drv.reserved == 0 and cache._reserved == 0
    assert cache.stats()["registered_bytes"] == 0 and cache.stats()["budget_refusals"] == 1
    assert drv.errors == []


def test_set_pinned_budget_from_inside_the_cache_changes_nothing():
    """As from a finalizer the collector ran inside the cache: refused before the budget
    changes, not half-applied."""
    before = tb.info()["ranks"]["pinned_budget"]
    with _registry.CACHE._lock:  # (this thread inside the cache)
        with pytest.raises(RuntimeError, match="finalizer"):
            tb.set_pinned_budget(before // 2 + 1)
    assert tb.info()["ranks"]["pinned_budget"] == before


def test_a_keyboard_interrupt_never_leaves_the_cache_locked():
    """Ctrl-C landing anywhere in the cache's calls (SIGINT sent to this thread every 50 us
    while it transfers): afterwards the cache's lock is free, for this thread and others."""
    cache, _ = make(sightings=1)
    arrays = [np.zeros(MIN, np.uint8) for _ in range(4)]
    armed = [False]

    def handler(signum, frame):
        if armed[0]:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    stop = threading.Event()

    def pester():
        while not stop.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(50e-6)

    t = threading.Thread(target=pester, daemon=True)
    interrupts = 0
    try:
        t.start()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            armed[0] = True
            try:
                for a in arrays:
                    used(cache, a)
                cache.stats()
            except KeyboardInterrupt:
                interrupts += 1
            finally:
                armed[0] = False
    finally:
        stop.set()
        t.join()
        time.sleep(0.05)  # (a signal already sent is handled by the disarmed handler)
        signal.signal(signal.SIGINT, previous)
    assert interrupts > 10  # (the signals did land inside the cache's calls)
    assert not cache._lock._is_owned()
    got = []

    def take_and_give_back():
        got.append(cache._lock.acquire(timeout=5))
        if got[-1]:
            cache._lock.release()

    other = threading.Thread(target=take_and_give_back)
    other.start()
    other.join()
    assert got == [True]
    assert used(cache, np.zeros(MIN, np.uint8)) in (True, False)  # (and it still works)


def test_a_finalizer_inside_the_cache_that_uses_it_neither_hangs_nor_corrupts_it():
    """Garbage collection can run a user's __del__ on a thread that holds the cache's lock;
    a __del__ that transfers an array (what to_tensor(a, "cuda") does) must not wait for
    itself: its transfer is staged. Reading the stats works there; changing the options
    is refused clearly. (The finalizer is run at the point the collector could run it.)"""
    cache, drv = make(sightings=1)
    keep = np.zeros(MIN, np.uint8)
    assert used(cache, keep)  # registered before: the finalizer's transfer finds it
    inside = []
    real = cache._drop_freed_locked

    def finalizer_runs_here():
        real()
        if not inside:
            inside.append("running")
            inside.append(used(cache, keep))  # staged, not a hit: the cache is mid-call
            inside.append(used(cache, np.zeros(MIN, np.uint8)))
            inside.append(cache.stats()["registered_bytes"])
            with pytest.raises(RuntimeError, match=r"finalizer.*outside the finalizer"):
                cache.configure(sightings=3)
            with pytest.raises(RuntimeError, match="finalizer"):
                cache.trim(0)

    cache._drop_freed_locked = finalizer_runs_here
    fresh = np.zeros(MIN, np.uint8)
    t = threading.Thread(target=lambda: inside.append(used(cache, fresh)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "a finalizer's transfer waited for the lock its thread holds"
    assert inside == ["running", False, False, MIN, True]  # then the outer call went on
    cache._drop_freed_locked = real
    assert cache.configure()["sightings"] == 1  # the refused change left nothing behind
    assert drv.registered == {addr(keep): MIN, addr(fresh): MIN} and drv.errors == []
    assert used(cache, keep)  # hits again


# ------------------------------------------------------------------------- switches


def test_turned_off_it_drops_everything_and_registers_nothing():
    cache, drv = make(sightings=1)
    arrays = [np.zeros(MIN, np.uint8) for _ in range(2)]
    assert all(used(cache, a) for a in arrays)
    assert cache.configure(enabled=False)["enabled"] is False
    assert drv.registered == {} and drv.reserved == 0
    assert [used(cache, arrays[0]) for _ in range(3)] == [False] * 3
    assert len(drv.calls("register")) == 2
    cache.configure(enabled=True, sightings=2)
    assert [used(cache, arrays[0]) for _ in range(2)] == [False, True]


def test_min_bytes_and_sightings_apply_to_the_next_transfers():
    cache, _ = make(min_bytes=2 * MIN, sightings=3)
    a = np.zeros(MIN, np.uint8)
    assert [used(cache, a) for _ in range(3)] == [False] * 3
    assert cache.configure(min_bytes=MIN, sightings=1) == {
        "enabled": True,
        "min_bytes": MIN,
        "sightings": 1,
    }
    assert used(cache, a)


def test_registration_options_checks_and_round_trips():
    saved = tb.registration_options()
    try:
        got = tb.registration_options(enabled=np.bool_(True), min_bytes=np.int64(8 << 20))
        assert got == {"enabled": True, "min_bytes": 8 << 20, "sightings": saved["sightings"]}
        assert type(got["min_bytes"]) is int and type(got["enabled"]) is bool
        assert tb.registration_options(sightings=3)["sightings"] == 3
        assert tb.registration_options(enabled=0)["enabled"] is False
        assert tb.registration_options(enabled=1)["enabled"] is True
        for call, exc in (
            (lambda: tb.registration_options(enabled="no"), TypeError),
            (lambda: tb.registration_options(enabled=2), TypeError),
            (lambda: tb.registration_options(enabled=1.0), TypeError),
            (lambda: tb.registration_options(min_bytes=1.5), TypeError),
            (lambda: tb.registration_options(sightings=True), TypeError),
            (lambda: tb.registration_options(min_bytes=0), ValueError),
            (lambda: tb.registration_options(sightings=0), ValueError),
        ):
            with pytest.raises(exc):
                call()
        assert tb.registration_options()["sightings"] == 3  # a refusal changed nothing
    finally:
        tb.registration_options(**saved)
    assert tb.registration_options() == saved


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, True), ("1", True), ("on", True), ("0", False), ("off", False)]
)
def test_the_environment_switch_is_read_at_import(value, enabled):
    env = {k: v for k, v in os.environ.items() if k != _registry.REGISTER_ENV}
    if value is not None:
        env[_registry.REGISTER_ENV] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = "import tensorbridge as tb; print(tb.registration_options()['enabled'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(enabled)


def test_an_unknown_environment_value_fails_at_import_naming_the_values():
    env = dict(os.environ, **{_registry.REGISTER_ENV: "maybe"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-c", "import tensorbridge"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "TENSORBRIDGE_REGISTER='maybe' is not understood" in proc.stderr
    assert "set it to 0" in proc.stderr


def test_pinned_stats_report_the_cache_on_both_paths(backend):
    stats = tb.pinned_stats()
    cache = _registry.CACHE.stats()
    assert {k: stats[k] for k in cache} == cache
    assert set(cache) >= {"registered_bytes", "registrations", "registered_hits", "evictions"}


# ------------------------------------------------------------------------- threads, forks


def test_an_owner_freed_on_a_thread_inside_the_cache_does_not_deadlock():
    """Garbage collection can free an owner (and run its callback) on a thread that holds
    the cache's lock: the callback must not wait for it."""
    cache, drv = make(sightings=1)

    class Holder:
        pass

    h = Holder()
    h.cycle, h.array = h, np.zeros(MIN, np.uint8)
    used(cache, h.array)
    del h  # now only garbage collection frees the array
    done = []

    def collect_inside_the_cache():
        with cache._lock:
            gc.collect()
            done.append(dict(drv.registered))

    t = threading.Thread(target=collect_inside_the_cache, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the owner's callback waited for the cache's lock"
    assert done == [{}]  # unregistered during the collection
    s = cache.stats()
    assert (s["releases"], s["registered_bytes"]) == (1, 0) and drv.errors == []


def test_threads_share_the_cache_and_the_driver_sees_a_consistent_story():
    drv = FakeDriver(budget=8 * MIN)  # registrations: four arrays at most
    cache, _ = make(drv)
    shared = [np.zeros(MIN, np.uint8) for _ in range(6)]
    problems: list[str] = []

    def work(i: int) -> None:
        rng = random.Random(i)
        for _ in range(400):
            r = rng.random()
            if r < 0.7:
                a = rng.choice(shared)[rng.choice([0, 0, 8]) :]
                with cache.lease(a) as registered:
                    # registered: the memory stays registered until the transfer ends
                    if registered and drv.registered.get(addr(a.base)) != MIN:
                        problems.append("leased but not registered")
            elif r < 0.9:
                fresh = np.zeros(MIN, np.uint8)
                used(cache, fresh)
                used(cache, fresh)
                del fresh  # its callback, on this thread
            elif r < 0.97:
                cache.trim(rng.choice([0, 2 * MIN]))
            else:
                cache.configure(enabled=rng.random() < 0.7)

    run_in_threads(work, 8, timeout=120)
    assert problems == [] and drv.errors == []
    cache.configure(enabled=True)
    s = cache.stats()
    assert s["registered_bytes"] == sum(drv.registered.values()) == drv.reserved
    assert s["registered_arrays"] == len(drv.registered)
    cache.clear()
    assert drv.registered == {} and drv.reserved == 0
    registers, unregisters = drv.calls("register"), drv.calls("unregister")
    assert len(registers) == len(unregisters) > 0 and drv.errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_forgets_the_parents_registrations_without_unregistering(monkeypatch):
    drv = FakeDriver()
    monkeypatch.setattr(_registry.CACHE, "_ops", drv)
    saved = tb.registration_options()
    tb.registration_options(min_bytes=MIN, sightings=1)
    try:
        a = np.zeros(MIN, np.uint8)
        assert used(_registry.CACHE, a)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the at-fork hook has reset the cache
            try:
                stats = _registry.CACHE.stats()
                del a  # a copy of the parent's array: nothing to unregister here
                gc.collect()
                b = np.zeros(MIN, np.uint8)
                works = used(_registry.CACHE, b)  # the child's own cache still works
                report = [len(drv.calls("unregister")), stats["registered_arrays"], int(works)]
                os.write(write, " ".join(map(str, report)).encode())
            finally:
                os._exit(0)
        os.close(write)
        child = os.read(read, 100).decode().split()
        os.close(read)
        os.waitpid(pid, 0)
        assert child == ["0", "0", "1"]
        assert drv.registered == {addr(a): MIN}  # the parent's registration is intact
        del a
        assert drv.registered == {} and drv.errors == []
    finally:
        tb.registration_options(**saved)


# ------------------------------------------------------------------------- the wiring


class _Pending:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.waited = False

    def done(self) -> bool:
        return self.waited

    def wait(self) -> None:
        self.waited = True
        self.log.append("waited")


class FakeCore:
    """The compiled module's GPU calls over host memory: 'device' pointers are host ones."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.pinned: set[int] = set()  # addresses page-locked by the user
        self.pendings: list[_Pending] = []
        self.asked: list[int] = []  # the device each is_host_pinned call named
        self.registered = dict  # (the fixture hands it the driver's registrations)

    def is_host_pinned(self, a: np.ndarray, device: int = -1) -> bool:
        self.asked.append(device)
        return addr(a) in self.pinned

    def array_span(self, a: np.ndarray) -> tuple[int, int]:
        assert a.flags.c_contiguous  # (the paths ask it of contiguous arrays only)
        return addr(a), a.nbytes

    def cuda_copy_async(self, device, stream, dst, src, nbytes, to_host, keepalive):
        ctypes.memmove(dst, src, nbytes)
        self.log.append("dma")
        self.pendings.append(_Pending(self.log))
        return self.pendings[-1]

    def cuda_copy_pinned(self, device, stream, host, device_ptr, nbytes, to_host):
        """The core's check: the user's page-locked memory, not a range the cache
        registered (those keep the cache's use order)."""
        assert nbytes == host.nbytes and host.flags.c_contiguous
        if addr(host) not in self.pinned or addr(host) in self.registered():
            return False
        if to_host:
            ctypes.memmove(addr(host), device_ptr, nbytes)
        else:
            ctypes.memmove(device_ptr, addr(host), nbytes)
        self.log.append("direct")
        return True

    def cuda_copy_small(self, device, stream, host, device_ptr, nbytes, to_host):
        assert nbytes == host.nbytes and host.flags.c_contiguous
        if to_host:
            ctypes.memmove(addr(host), device_ptr, nbytes)
        else:
            ctypes.memmove(device_ptr, addr(host), nbytes)
        self.log.append("small")

    def cuda_copy_to_host(self, device, stream, src, dst, chunk, buffers, swap):
        ctypes.memmove(addr(dst), src, dst.nbytes)
        self.log.append("staged")

    def cuda_copy_to_device(self, device, stream, src, dst, chunk, buffers, swap, wait):
        ctypes.memmove(dst, addr(src), src.nbytes)
        self.log.append("staged")


@pytest.fixture
def fake_gpu(monkeypatch):
    """_cuda's GPU paths over host memory, with a fresh cache over a FakeDriver."""
    core = FakeCore()
    cache, drv = make()
    core.registered = lambda: drv.registered
    added: list[_Pending] = []
    monkeypatch.setattr(
        _backend, "ENGINE", types.SimpleNamespace(core=core, C=None, cuda_engine=True)
    )
    monkeypatch.setattr(_registry, "CACHE", cache)
    monkeypatch.setattr(_cuda, "_completions", types.SimpleNamespace(add=added.append))
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return types.SimpleNamespace(core=core, cache=cache, driver=drv, completions=added)


N = 1 << 19  # float32 elements: 2 MiB, over the small-copy routing's limits


@pytest.mark.parametrize("non_blocking", [False, True])
def test_wiring_a_reused_source_is_registered_and_waited_for(fake_gpu, non_blocking):
    """Host to device from a registered source returns with the source free to reuse,
    non_blocking too (unlike a user's own pinned source)."""
    a = np.zeros(N, np.float32)
    out = torch.empty(N)
    for k in range(4):
        a[:] = np.random.default_rng(k).random(N, dtype=np.float32)
        fake_gpu.core.log.clear()
        got = _cuda.to_device(a, torch.device("cuda", 0), None, non_blocking, out)
        assert got is out and np.array_equal(out.numpy(), a)
        assert fake_gpu.core.log == (["staged"] if k == 0 else ["dma", "waited"])
    assert fake_gpu.completions == []
    assert fake_gpu.driver.registered == {addr(a): a.nbytes}
    assert fake_gpu.cache.stats()["registered_hits"] == 2


def test_wiring_a_users_pinned_source_is_still_not_waited_for(fake_gpu):
    a = np.ones(N, np.float32)
    fake_gpu.core.pinned.add(addr(a))
    fake_gpu.driver.refuse.add(addr(a))  # (as _CudaOps refuses memory pinned elsewhere)
    out = torch.empty(N)
    for _ in range(3):
        _cuda.to_device(a, torch.device("cuda", 0), None, True, out)
    assert fake_gpu.core.log == ["dma"] * 3
    assert len(fake_gpu.completions) == 3 and not any(p.waited for p in fake_gpu.completions)
    assert fake_gpu.driver.registered == {}


@pytest.mark.parametrize("non_blocking", [False, True])
def test_wiring_a_reused_out_is_registered_and_behaves_as_a_pinned_one(fake_gpu, non_blocking):
    out = np.zeros(N, np.float32)
    for k in range(3):
        x = torch.from_numpy(np.random.default_rng(k).random(N, dtype=np.float32))
        fake_gpu.core.log.clear()
        got = _cuda.to_host(x, out, np.dtype(np.float32), non_blocking)
        if non_blocking:
            assert isinstance(got, tb.Transfer)
            if k:  # a direct DMA: finished by wait(), not before
                assert fake_gpu.core.log == ["dma"]
            got = got.wait()
        assert got is out and np.array_equal(out, x.numpy())
        assert fake_gpu.core.log == (["staged"] if k == 0 else ["dma", "waited"])
    assert fake_gpu.driver.registered == {addr(out): out.nbytes}


@pytest.fixture
def cuda_looking(fake_gpu, monkeypatch):
    """fake_gpu, with CPU tensors passing for CUDA ones in the public calls' fast paths
    (``to_numpy``/``to_tensor`` ask ``is_cuda``, resolve the device, allocate on it)."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    monkeypatch.setattr(_backend, "resolve_device", lambda device, fn: torch.device(device))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: empty(*a, **k))
    return fake_gpu


def test_wiring_the_direct_pinned_path_of_the_public_calls(cuda_looking, monkeypatch):
    """A page-locked out or source of the user's takes one direct copy, in the right
    direction and size; pageable memory, a registered array or a strided tensor take
    the full paths (staged, or the cache's DMA)."""
    core = cuda_looking.core
    x = torch.from_numpy(np.random.default_rng(0).random(N, dtype=np.float32))
    out = np.zeros(N, np.float32)
    core.pinned.add(addr(out))
    cuda_looking.driver.refuse.add(addr(out))  # (pinned elsewhere: the cache leaves it)
    assert tb.to_numpy(x, out=out) is out
    assert np.array_equal(out, x.numpy()) and core.log == ["direct"]
    core.log.clear()
    t = tb.to_tensor(out, "cuda")
    assert torch.equal(t, x) and core.log == ["direct"]
    core.log.clear()
    # a strided tensor: the full path, which reads the permuted copy (still one DMA)
    x2 = torch.from_numpy(np.random.default_rng(1).random((N // 2, 2), dtype=np.float32))
    out2 = out.reshape(2, N // 2)
    assert tb.to_numpy(x2.t(), out=out2) is out2
    assert np.array_equal(out2, x2.t().numpy()) and core.log == ["dma", "waited"]
    # pageable memory: staged the first time, then registered and DMA'd by the cache
    core.log.clear()
    a = np.random.default_rng(2).random(N, dtype=np.float32)
    for _ in range(3):
        t = tb.to_tensor(a, "cuda")
        assert torch.equal(t, torch.from_numpy(a))
    assert core.log == ["staged", "dma", "waited", "dma", "waited"]
    assert addr(a) in cuda_looking.driver.registered
    # a pageable out that comes back, from a tensor that requires grad too: the same,
    # straight from to_numpy's fast path to the engine's (not through the full path)
    core.log.clear()

    def full_path(*args, **kwargs):
        raise AssertionError("a plain out went through the full path's checks")

    monkeypatch.setattr(_convert, "_to_numpy", full_path)
    back = np.full(N, np.nan, np.float32)
    for k in range(3):
        y = torch.from_numpy(np.random.default_rng(3 + k).random(N, dtype=np.float32))
        back[:] = np.nan  # (poisoned: every byte must be written)
        assert tb.to_numpy(y.requires_grad_(k == 2), out=back) is back
        assert np.array_equal(back, y.detach().numpy())
    assert core.log == ["staged", "dma", "waited", "dma", "waited"]
    assert addr(back) in cuda_looking.driver.registered


def test_wiring_small_copies_take_the_direct_call_where_the_routing_says(cuda_looking, monkeypatch):
    core = cuda_looking.core
    x = torch.from_numpy(np.random.default_rng(3).random(1000, dtype=np.float32))
    out = np.zeros(1000, np.float32)
    assert tb.to_numpy(x, out=out) is out and np.array_equal(out, x.numpy())
    assert core.log == []  # torch's copy_, by default
    monkeypatch.setattr(_cuda.ROUTING, "small_direct", True)
    out = np.zeros(1000, np.float32)
    assert tb.to_numpy(x, out=out) is out and np.array_equal(out, x.numpy())
    fresh = tb.to_numpy(x)
    assert np.array_equal(fresh, x.numpy()) and not np.shares_memory(fresh, x.numpy())
    t = tb.to_tensor(out, "cuda")
    assert torch.equal(t, x) and not np.shares_memory(t.numpy(), out)
    assert core.log == ["small"] * 3
    # what the direct call cannot take (a conjugate view) still goes through torch
    z = torch.from_numpy(np.ones(8, np.complex64) * 1j).conj()
    assert np.array_equal(tb.to_numpy(z, out=np.empty(8, np.complex64)), np.full(8, -1j))
    assert core.log == ["small"] * 3


def test_wiring_registers_and_asks_with_the_transfers_device(fake_gpu, monkeypatch):
    """The driver calls name the transfer's GPU: with another current, a registration
    would make a context (and hold its memory) on a GPU the process never used."""
    a, out = np.ones(N, np.float32), torch.empty(N)
    for _ in range(2):
        _cuda.to_device(a, torch.device("cuda", 2), None, False, out)
    assert fake_gpu.driver.devices == [2] and set(fake_gpu.core.asked) <= {2}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # 'cuda' means cuda:3
    back = np.zeros(N, np.float32)
    for _ in range(2):
        _cuda.to_host(out, back, np.dtype(np.float32), False)
    assert fake_gpu.driver.devices == [2, 3] and set(fake_gpu.core.asked) <= {2, 3}
    assert np.array_equal(back, a)


def test_wiring_with_registration_off_every_transfer_is_staged(fake_gpu):
    fake_gpu.cache.configure(enabled=False)
    a, out = np.ones(N, np.float32), torch.empty(N)
    for _ in range(3):
        _cuda.to_device(a, torch.device("cuda", 0), None, False, out)
        _cuda.to_host(out, a, np.dtype(np.float32), False)
    assert fake_gpu.core.log == ["staged"] * 6 and fake_gpu.driver.log == []


def test_the_cuda_ops_leave_memory_pinned_elsewhere_alone(monkeypatch):
    calls: list[tuple] = []
    fake = types.SimpleNamespace(
        is_host_pinned=lambda a, device: calls.append(("is_pinned", device)) or pinned,
        cuda_host_register=lambda a, device: calls.append(("register", device)) or True,
        cuda_host_unregister=lambda address, n: calls.append(("unregister", address, n)),
        cuda_reserve_pinned=lambda n: calls.append(("reserve", n)) or True,
        cuda_unreserve_pinned=lambda n: calls.append(("unreserve", n)),
        cuda_pinned_stats=lambda: {"budget": 1000},
    )
    monkeypatch.setattr(_backend, "_LOADED", fake)
    ops = _registry._CudaOps()
    a = np.zeros(8)
    pinned = True
    assert ops.register(a, 1) is False and calls == [("is_pinned", 1)]
    pinned = False
    assert ops.register(a, 2) is True and calls[-2:] == [("is_pinned", 2), ("register", 2)]
    ops.unregister(5, 6)
    assert ops.reserve(7) and calls[-2:] == [("unregister", 5, 6), ("reserve", 7)]
    assert ops.limit() == 500
    monkeypatch.setattr(_backend, "_LOADED", None)  # the pure-Python path: nothing to call
    assert not ops.register(a, 0) and not ops.reserve(1) and ops.limit() == 0
