"""Page-locking reused pageable arrays in place: the registration cache.

Data loaders hand the same NumPy arrays back batch after batch: the ``out`` of
``to_numpy(t, out=out)``, the source of ``to_tensor(a, "cuda")``. A pageable array goes
through the staged pipeline every time (a host copy into pinned staging blocks, then the
DMA); an array that comes back is worth page-locking in place (``cudaHostRegister``), so
that every later transfer is one direct DMA. :class:`RegistrationCache` decides which
arrays, when, and until when; the CUDA calls are injected (:class:`RegistrationOps`), so
the whole policy is tested on a machine without a GPU.

The policy:

- **Which arrays.** C-contiguous, native byte order, at least ``min_bytes`` (4 MiB: each
  registration costs a ``cudaHostRegister`` and, when dropped, a device synchronization,
  which the few microseconds a small transfer would save do not win back; and it keeps
  the registrations few), and whose memory's
  owner can be tracked: ``a.base`` is walked to the final owner, which must be a plain
  ``numpy.ndarray`` that owns its data (NumPy allocated it and frees it in its dealloc).
  That whole buffer is registered, once for all the views into it, and only when the
  view covers at least half of it (a slice never page-locks a large array). Memory that
  something else owns (``np.memmap``, bytes, bytearray, mmap, torch tensors, other
  libraries' buffers, an ndarray subclass's own data) is never registered: nothing says
  when it goes.
- **When.** On the ``sightings``-th transfer (the 2nd) of the same owner, address and
  size; earlier ones take the staged path as before. Sightings are held by weak
  reference, so a new array that happens to get a freed one's address is a new array.
- **Until when.** NumPy's ``array_dealloc`` clears an array's weak references before it
  frees the data (numpy/_core/src/multiarray/arrayobject.c), so a weakref callback on the
  owner unregisters the memory before it is freed. A registration is also dropped to
  make room (least recently used first), when the budget shrinks, when registration is
  turned off, and when the owner's memory has moved (NumPy 1.x's ``a.data = ...``; NumPy
  refuses ``a.resize()`` on an array something holds a weak reference to, so a tracked
  array cannot be reallocated under a registration).
- **How much.** Registered bytes are reserved from the pinned staging pool's budget
  (``set_pinned_budget``), so the pool's blocks and the registrations never exceed it
  together, and registrations take at most half of it, so staging keeps room for the
  arrays that cannot be registered. Making room evicts only registrations used less
  recently than the new array was last seen: two arrays that do not fit together do not
  take turns evicting each other (each turn would cost a registration and a device
  synchronization); the newcomer keeps the staged path instead.

Switches: ``TENSORBRIDGE_REGISTER=0`` (read at import) turns registration off;
:func:`registration_options` turns it off or on at run time and sets ``min_bytes`` and
``sightings``. :func:`tensorbridge.pinned_stats` reports the counters.

Threads and forks: the cache's lock guards its tables and is never held across a driver
call (a registration, or an unregistration, which synchronizes the devices). An owner's
weakref callback may run on any thread at any time, garbage collection included, even on
a thread inside the cache: it never takes the lock. It claims the registration by
popping it from a dict (one atomic step), unregisters, and leaves the bookkeeping to the
next locked call. Whoever claims a registration unregisters it, and holds the owner alive
until it has; a transfer holds a lease on the registration it uses until its DMA is
queued, and leased registrations are never claimed (the unregistration's device
synchronization then waits for that DMA). A user's finalizer (``__del__``) that the
collector runs on a thread inside the cache finds the lock held by its own thread: a
transfer it makes takes the staged path, the stats read as they stand, and a change of
options or budget is refused (RuntimeError) before anything changes, rather than waiting
for itself. A registration that fails, or that a KeyboardInterrupt raised from inside the driver's
call ends, is undone and its reservation given back. A Ctrl-C (SIGINT) that arrives while
the main thread registers or unregisters is held until the driver's call and the books of
its result are both done, then raised: it never parts them. A
forked child forgets the parent's registrations without unregistering them: they belong
to the parent's CUDA context.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import itertools
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol, TypedDict

import numpy as np
import torch

from . import _backend
from ._copy import byte_span

REGISTER_ENV = "TENSORBRIDGE_REGISTER"
DEFAULT_MIN_BYTES = 4 << 20
DEFAULT_SIGHTINGS = 2
MAX_SIGHTED = 64  # arrays seen but not registered that the cache remembers


def share_of(budget: int) -> int:
    """The most bytes registrations may hold under a pinned budget: half of it, so that
    staging keeps room for the arrays that cannot be registered."""
    return budget // 2


_FOREVER = float("inf")


class RegistrationOps(Protocol):
    """The driver calls the cache makes (production: the CUDA engine's; tests: fakes)."""

    def register(self, owner: np.ndarray, device: int) -> bool:
        """Page-locks ``owner``'s whole buffer with GPU ``device`` current (-1: one the
        engine works on); False when refused (already page-locked elsewhere, or the driver
        would not)."""
        ...

    def unregister(self, address: int, nbytes: int) -> None:
        """Unlocks what ``register`` locked (after synchronizing the devices)."""
        ...

    def reserve(self, nbytes: int) -> bool:
        """Takes nbytes of the pinned budget; False when the staging pool has no room."""
        ...

    def unreserve(self, nbytes: int) -> None:
        """Gives bytes taken by ``reserve`` back."""
        ...

    def limit(self) -> int:
        """The most bytes registrations may hold (half the pinned budget)."""
        ...


class RegistrationOptions(TypedDict):
    """:func:`registration_options`' settings."""

    enabled: bool
    min_bytes: int
    sightings: int


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Holds a Ctrl-C (SIGINT) that arrives inside the block and raises it as the block
    ends, so that a driver call and the books of its result are never parted by a
    KeyboardInterrupt (Python raises one between any two calls). Only the main thread
    receives signals; elsewhere, or where SIGINT's handler is not a Python function
    (ignored, or the OS default that ends the process), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held: list[FrameType | None] = []

    def holder(signum: int, frame: FrameType | None) -> None:
        held.append(frame)

    try:
        signal.signal(signal.SIGINT, holder)
        yield
    finally:
        # Another signal's handler (a timeout, SIGCHLD, SIGTERM) may raise inside the
        # restoring call, before it changes anything: it is retried (a few times: an
        # error that recurs is raised), and that error raised afterwards, so the user's
        # handler is put back; a held Ctrl-C is delivered all the same.
        error: BaseException | None = None
        for _ in range(_RESTORE_TRIES):
            try:
                if signal.getsignal(signal.SIGINT) is holder:
                    signal.signal(signal.SIGINT, previous)
                break
            except BaseException as exc:  # (any signal handler's error)
                error = error or exc
        if held:
            try:
                previous(signal.SIGINT, held[-1])  # (the default handler raises KeyboardInterrupt)
            except BaseException as interrupt:
                if error is not None:
                    raise interrupt from error
                raise
        if error is not None:
            raise error


#: How often _interrupts_held tries to put SIGINT's handler back.
_RESTORE_TRIES = 8


class _Entry:
    """One owner's registration: pending (being registered) until its token is in
    ``_live``; claimed (to be unregistered by the claimer) once popped from it."""

    __slots__ = ("address", "doomed", "last_used", "leases", "nbytes", "oid", "ref", "token")

    def __init__(
        self,
        token: int,
        oid: int,
        address: int,
        nbytes: int,
        last_used: int,
        ref: weakref.ref[np.ndarray],
    ) -> None:
        self.token = token
        self.oid = oid  # id(owner): its key in _owners
        self.address = address
        self.nbytes = nbytes
        self.last_used = last_used
        self.ref = ref
        # the leases of the transfers using it now, by weak reference: never claimed while
        # one lives (a lease whose `with` a Ctrl-C cut short dies with its frame)
        self.leases: list[weakref.ref[_Lease]] = []
        self.doomed = False  # to be dropped as soon as nothing uses it

    def in_use(self) -> bool:
        """Whether a lease holds it (the caller holds the cache's lock); forgets the dead."""
        if self.leases:
            self.leases = [ref for ref in self.leases if ref() is not None]
        return bool(self.leases)

    def hold(self, lease: _Lease) -> None:
        """Gives it to ``lease`` (the caller holds the cache's lock)."""
        self.leases.append(weakref.ref(lease))
        lease._entry = self

    def let_go(self, lease: _Lease) -> None:
        """Takes it back from ``lease`` (the caller holds the cache's lock)."""
        leases = self.leases  # (the dead ones go in in_use)
        for i, ref in enumerate(leases):
            if ref() is lease:
                del leases[i]
                return


class _Sighting:
    __slots__ = ("count", "ref", "refused", "seen_at")

    def __init__(self, ref: weakref.ref[np.ndarray], count: int, seen_at: int) -> None:
        self.ref = ref
        self.count = count
        self.seen_at = seen_at
        self.refused = False  # the driver refused it: not asked again while remembered


def _address(a: np.ndarray) -> int:
    """The address of a contiguous array's first byte (the only arrays it is asked about).
    The compiled core's array_span takes a tenth of ``__array_interface__``'s microsecond,
    which trackable() pays twice per transfer."""
    span = getattr(_backend._LOADED, "array_span", None)  # (a core built with CUDA has it)
    if span is not None:
        return int(span(a)[0])  # (positive strides: where its data starts)
    return int(a.__array_interface__["data"][0])


def trackable(a: np.ndarray, min_bytes: int) -> tuple[np.ndarray, int, int, int, int] | None:
    """(owner, address, nbytes, owner's address, owner's nbytes) when ``a`` qualifies for
    registration (see the module's policy), else None."""
    if not a.flags.c_contiguous or not a.dtype.isnative or a.dtype.hasobject:
        return None
    nbytes = a.nbytes
    if nbytes < min_bytes or nbytes == 0:
        return None
    owner = a
    while owner.base is not None:
        base = owner.base
        if not isinstance(base, np.ndarray):
            return None  # memory another object owns (mmap, bytes, a tensor...)
        owner = base
    if type(owner) is not np.ndarray or not owner.flags.owndata:
        return None
    if not (owner.flags.c_contiguous or owner.flags.f_contiguous):
        return None
    address, owner_address, owner_nbytes = _address(a), _address(owner), owner.nbytes
    if owner_nbytes > 2 * nbytes:
        return None
    if not owner_address <= address <= owner_address + owner_nbytes - nbytes:
        return None
    return owner, address, nbytes, owner_address, owner_nbytes


def _held_here(lock: threading.RLock) -> bool:
    """Whether this thread holds ``lock`` (threading.Condition asks RLock the same way)."""
    return bool(lock._is_owned())  # type: ignore[attr-defined]


_IN_FINALIZER = (
    "called from a finalizer (__del__ or a weakref callback) that garbage collection ran "
    "inside tensorbridge's registration cache: call it outside the finalizer"
)


class _Lease:
    """``with cache.lease(a) as registered:``; the registration stays until the block ends.

    The entry holds the lease by weak reference from the moment it is given (under the
    cache's lock), and ``lease()`` gives it back if anything (a KeyboardInterrupt) ends it
    early. A Ctrl-C in the few instructions between ``lease()`` returning and the
    ``with``, or as the ``with`` ends, before ``__exit__`` has given it back, leaves no
    count behind: the lease dies with the frame (or the interrupt's traceback) that holds
    it, and the entry is free to evict from then on. (No finalizer runs: Python runs a
    pending signal's handler as a ``__del__`` starts, and the Ctrl-C would be lost.)"""

    __slots__ = ("__weakref__", "_cache", "_entry")

    def __init__(self, cache: RegistrationCache, entry: _Entry | None) -> None:
        self._cache = cache
        self._entry = entry

    def __enter__(self) -> bool:
        return self._entry is not None

    def __exit__(self, *exc: object) -> None:
        entry, self._entry = self._entry, None  # (first: released once, whatever comes)
        if entry is not None:
            self._cache._release(entry, self)


class RegistrationCache:
    """Registers reused pageable arrays for direct DMA (the policy: see the module).

    ``lease(a)`` is the one call transfers make: ``with cache.lease(a) as registered:``
    says whether ``a``'s memory is registered by the cache now (on a hit, or registered
    on this sighting), and keeps it registered until the block ends.
    """

    def __init__(
        self,
        ops: RegistrationOps,
        *,
        enabled: bool = True,
        min_bytes: int = DEFAULT_MIN_BYTES,
        sightings: int = DEFAULT_SIGHTINGS,
        max_sighted: int = MAX_SIGHTED,
    ) -> None:
        self._ops = ops
        self._enabled = enabled
        self._min_bytes = min_bytes
        self._sightings = sightings
        self._max_sighted = max_sighted
        self._tokens = itertools.count()  # never reset: a token is never reused
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        # Reentrant, so that garbage collection running a finalizer (a __del__) on a thread
        # inside the cache can never make the thread wait for itself; the public calls
        # check _held_here first and do not change anything from such a finalizer. (A
        # C-level lock taken by `with`: a KeyboardInterrupt cannot leave it held.)
        self._lock = threading.RLock()
        # id(owner) -> its registration, least recently used first
        self._owners: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        # token -> registration whose memory is registered; whoever pops it unregisters it
        self._live: dict[int, _Entry] = {}
        # claimed by an owner's weakref callback, still to be dropped from _owners
        self._freed: collections.deque[_Entry] = collections.deque()
        # (id(owner), address, nbytes) -> sightings, least recent first
        self._seen: collections.OrderedDict[tuple[int, int, int], _Sighting] = (
            collections.OrderedDict()
        )
        self._clock = 0  # counts qualifying transfers: the LRU's time
        self._reserved = 0  # bytes reserved for registrations, pending ones included
        self._registered = 0  # bytes registered now
        self._counts = dict.fromkeys(
            (
                "registrations",
                "registered_hits",
                "sightings",
                "evictions",
                "releases",
                "register_failures",
                "budget_refusals",
            ),
            0,
        )

    # ------------------------------------------------------------------ options, stats

    def refuse_in_finalizer(self) -> None:
        """Raises RuntimeError when this thread is inside the cache already: a finalizer
        (a ``__del__``) that garbage collection ran there, changing options or budget,
        which it must not do halfway through the cache's own call."""
        if _held_here(self._lock):
            raise RuntimeError(f"tensorbridge's registration cache was {_IN_FINALIZER}.")

    def configure(
        self,
        enabled: bool | None = None,
        min_bytes: int | None = None,
        sightings: int | None = None,
    ) -> RegistrationOptions:
        """Sets (when given) and returns the options; turning it off drops everything."""
        self.refuse_in_finalizer()
        with self._lock:
            if min_bytes is not None:
                self._min_bytes = min_bytes
            if sightings is not None:
                self._sightings = sightings
            if enabled is not None:
                self._enabled = enabled
            options = RegistrationOptions(
                enabled=self._enabled, min_bytes=self._min_bytes, sightings=self._sightings
            )
        if enabled is False:
            self.clear()
        return options

    def stats(self) -> dict[str, int]:
        """registered_bytes and registered_arrays now, and the counters since import:
        registrations, registered_hits (transfers that used an earlier registration),
        sightings (qualifying transfers that found none), evictions (dropped while their
        array lived: to make room, a lower budget, registration turned off, moved
        memory), releases (dropped when their array was freed), register_failures (the
        driver refused) and budget_refusals (no room that could be made)."""
        if _held_here(self._lock):  # (read by a finalizer inside the cache: as it stands)
            return self._snapshot(sum(entry.nbytes for entry in list(self._freed)))
        with self._lock:
            self._drop_freed_locked()
            return self._snapshot(0)

    def _snapshot(self, freed: int) -> dict[str, int]:
        return {
            "registered_bytes": self._registered - freed,
            "registered_arrays": len(self._live),
            **self._counts,
        }

    def covers(self, address: int, nbytes: int) -> bool:
        """Whether [address, address + nbytes) meets memory the cache registered: memory
        whose owner does not know it is page-locked (a tensor over a reused array, say),
        which no lease holds, so a DMA must not read it (it may be unregistered under
        the DMA) nor outlive the call. Without the lock (a snapshot of the live
        registrations: the GIL keeps it whole; one in the middle of being registered or
        dropped is missed)."""
        end = address + nbytes
        live = list(self._live.values())
        return any(e.address < end and address < e.address + e.nbytes for e in live)

    def covers_tensor(self, t: torch.Tensor) -> bool:
        """:meth:`covers` for a CPU tensor's elements (False for other tensors)."""
        if not self._live or t.device.type != "cpu" or t.layout != torch.strided:
            return False
        lo, hi = byte_span(t)
        return hi > lo and self.covers(lo, hi - lo)

    # ------------------------------------------------------------------ transfers

    def lease(self, a: np.ndarray, device: int = -1) -> _Lease:
        """``with cache.lease(a, device) as registered:`` (see the class); ``device``: the
        GPU index of the transfer, whose context registers ``a`` (-1: one the engine uses)."""
        lease = _Lease(self, None)
        # (turned off, it still looks while registrations in use at the time remain, to
        # drop one whose lease a Ctrl-C cut short; a finalizer's transfer inside the
        # cache is staged)
        if (self._enabled or self._owners) and not _held_here(self._lock):
            try:
                self._acquire(a, device, lease)
            except BaseException:  # (a KeyboardInterrupt, say: what the lease holds goes back)
                lease.__exit__()
                raise
        return lease

    def _acquire(self, a: np.ndarray, device: int, lease: _Lease) -> None:
        """Gives ``lease`` the registration of ``a`` to use, if there is (or now is) one."""
        found = trackable(a, self._min_bytes)
        if found is None:
            return
        owner, address, nbytes, owner_address, owner_nbytes = found
        stale: _Entry | None = None
        pending: _Entry | None = None
        doomed: _Entry | None = None
        with self._lock:
            if self._closed:
                return
            off = not self._enabled  # (then only a doomed registration is looked for)
            if not off:
                self._drop_freed_locked()
                self._clock += 1
            entry = self._owners.get(id(owner))
            if entry is not None and entry.ref() is not owner:
                del self._owners[id(owner)]  # a freed owner's (its callback unregisters it)
                entry = None
            if entry is not None and entry.doomed and entry.token in self._live:
                if entry.in_use():
                    return  # dropped when its last lease ends: staged this time
                doomed = entry  # (its lease was cut short, by a Ctrl-C: dropped here)
            elif off:
                return
            elif entry is not None:
                if entry.token not in self._live:
                    return  # being registered or dropped elsewhere: staged this time
                if entry.address == owner_address and entry.nbytes == owner_nbytes:
                    entry.hold(lease)  # (at once: the lease gives it back, come what may)
                    entry.last_used = self._clock
                    self._owners.move_to_end(entry.oid)
                    self._counts["registered_hits"] += 1
                    return
                if entry.in_use():
                    return
                # The owner's memory moved: the registration covers memory it no longer has.
                stale = entry
            else:
                pending = self._sighted_locked(
                    owner, address, nbytes, owner_address, owner_nbytes, lease
                )
        if doomed is not None:
            self._drop_doomed(doomed)  # (and this transfer is staged)
            return
        if stale is not None:  # (`a` keeps the owner alive meanwhile)
            with _interrupts_held():  # (claimed and dropped with a Ctrl-C held)
                with self._lock:
                    if stale.in_use() or stale.token not in self._live:
                        return  # (claimed, or in use, meanwhile: staged this time)
                    self._claim_locked(stale)
                    self._counts["evictions"] += 1
                self._drop(stale)
            with self._lock:
                if not self._enabled or self._closed or id(owner) in self._owners:
                    return
                pending = self._sighted_locked(
                    owner, address, nbytes, owner_address, owner_nbytes, lease
                )
        if (
            pending is not None
            and self._register(pending, owner, (id(owner), address, nbytes), device) is None
        ):
            lease._entry = None  # (not registered: staged; the pending entry is gone)

    def _remember_locked(self, key: tuple[int, int, int], seen: _Sighting) -> None:
        self._seen[key] = seen
        while len(self._seen) > self._max_sighted:
            self._seen.popitem(last=False)

    def _sighted_locked(
        self,
        owner: np.ndarray,
        address: int,
        nbytes: int,
        owner_address: int,
        owner_nbytes: int,
        lease: _Lease,
    ) -> _Entry | None:
        """Counts a sighting; a new pending registration when this is the one to register,
        held by ``lease`` (which gives it back should the registration never run)."""
        key = (id(owner), address, nbytes)
        self._counts["sightings"] += 1
        seen = self._seen.pop(key, None)
        if seen is not None and seen.ref() is not owner:
            seen = None  # another array at a freed one's address
        if seen is None:
            seen = _Sighting(weakref.ref(owner), 0, self._clock)
        seen.count += 1
        if seen.refused or seen.count < self._sightings:
            seen.seen_at = self._clock
            self._remember_locked(key, seen)
            return None
        token = next(self._tokens)
        ref = weakref.ref(owner, self._callback(token))
        # (last_used: the previous sighting, so that making room evicts only colder arrays)
        entry = _Entry(token, id(owner), owner_address, owner_nbytes, seen.seen_at, ref)
        entry.hold(lease)
        self._owners[entry.oid] = entry
        return entry

    def _register(
        self, entry: _Entry, owner: np.ndarray, key: tuple[int, int, int], device: int
    ) -> _Entry | None:
        """Makes room for a pending registration and registers it (no lock held), a Ctrl-C
        held until it is done. Whatever ends it early (an exception from the driver's
        call, a KeyboardInterrupt included) gives back what it took."""
        with _interrupts_held():  # (a Ctrl-C raised as it ends: the lease gives it back)
            return self._register_held(entry, owner, key, device)

    def _register_held(
        self, entry: _Entry, owner: np.ndarray, key: tuple[int, int, int], device: int
    ) -> _Entry | None:
        committed = reserved = False
        locked: bool | None = False  # None: interrupted in the driver's call, not knowing
        try:
            why = self._make_room(entry)  # None: its bytes are reserved (share and pool)
            if why is None:
                reserved, locked = True, None
                try:
                    locked = bool(self._ops.register(owner, device))
                except Exception:
                    locked = False  # (an optimization: the transfer is staged instead)
                why = "register_failures"
                if locked:
                    with self._lock:
                        why = "off" if entry.doomed or self._closed else "budget_refusals"
                        # (the budget lowered while it registered: a trim() may have run
                        # before it counts, so it must fit the budget as it is now, read
                        # under the lock a trim takes)
                        if why != "off" and self._registered + entry.nbytes <= self._ops.limit():
                            self._live[entry.token] = entry
                            self._registered += entry.nbytes
                            self._counts["registrations"] += 1
                            entry.last_used = self._clock
                            committed = True
                            return entry
            if why != "off":
                with self._lock:
                    self._counts[why] += 1
                    # Remembered as a sighting: the next one asks again after a budget
                    # refusal, none does after the driver's.
                    seen = _Sighting(weakref.ref(owner), self._sightings - 1, self._clock)
                    seen.refused = why == "register_failures"
                    self._remember_locked(key, seen)
            return None
        finally:
            if not committed:
                try:
                    if reserved:
                        self._give_back(entry, locked)
                finally:
                    with self._lock:
                        if self._owners.get(entry.oid) is entry:
                            del self._owners[entry.oid]

    def _give_back(self, entry: _Entry, locked: bool | None) -> None:
        """Undoes a registration that did not count: unregisters it (``locked``: it was
        registered; None: the driver's call was interrupted, so it may have been), then
        gives its reservation back."""
        if locked:
            self._ops.unregister(entry.address, entry.nbytes)  # (raises: it stays reserved)
        elif locked is None:
            try:
                self._ops.unregister(entry.address, entry.nbytes)
            except Exception:
                pass  # (it had not been registered)
        self._ops.unreserve(entry.nbytes)
        with self._lock:
            self._reserved -= entry.nbytes

    def _make_room(self, entry: _Entry) -> str | None:
        """Reserves entry.nbytes within the share and from the pool, evicting registrations
        last used before the new array's previous sighting: None, or why not (having
        given back what it took, as when an eviction raises)."""
        limit = self._ops.limit()
        in_share = reserved = False
        try:
            while True:
                with self._lock:
                    if entry.doomed or self._closed:
                        return "off"
                    if not in_share and self._reserved + entry.nbytes <= limit:
                        self._reserved += entry.nbytes
                        in_share = True
                    victim, owner = (None, None) if in_share else self._victim_locked(entry)
                    if not in_share and victim is None:
                        return "budget_refusals"
                if in_share:  # now the pool's budget
                    if self._ops.reserve(entry.nbytes):
                        reserved = True  # (both now the caller's to give back)
                        return None
                    with self._lock:
                        victim, owner = self._victim_locked(entry)
                        if victim is None:
                            return "budget_refusals"
                if victim is not None:
                    self._drop(victim)
                del owner  # (it may go now: it is unregistered)
        finally:
            if in_share and not reserved:
                with self._lock:
                    self._reserved -= entry.nbytes

    def _victim_locked(
        self, newcomer: _Entry | None, older_than: float | None = None
    ) -> tuple[_Entry | None, np.ndarray | None]:
        """Claims the least recently used registration that nothing uses, if it was last
        used before older_than (default: the newcomer's previous sighting): (it, its
        owner), the owner to be held alive until the registration is dropped; (None,
        None) when there is none."""
        if older_than is None:
            older_than = newcomer.last_used if newcomer is not None else _FOREVER
        for entry in self._owners.values():
            if entry is newcomer or entry.token not in self._live or entry.in_use():
                continue
            if entry.last_used >= older_than:
                break  # (the rest were used more recently)
            owner = entry.ref()
            if owner is None:
                continue  # being freed: its callback unregisters it
            self._claim_locked(entry)
            self._counts["evictions"] += 1
            return entry, owner
        return None, None

    def _claim_locked(self, entry: _Entry) -> None:
        """Takes a live registration (its owner held alive) out of the tables; the caller
        then drops it."""
        self._live.pop(entry.token, None)
        if self._owners.get(entry.oid) is entry:
            del self._owners[entry.oid]
        self._registered -= entry.nbytes

    def _drop(self, entry: _Entry) -> None:
        """Unregisters a claimed registration (no lock held; its owner is alive), a Ctrl-C
        held until it is done."""
        with _interrupts_held():
            try:
                self._ops.unregister(entry.address, entry.nbytes)
            except BaseException:
                with self._lock:  # still registered: back in the table its callback reads
                    self._live[entry.token] = entry
                    self._registered += entry.nbytes
                raise
            self._ops.unreserve(entry.nbytes)
            with self._lock:
                self._reserved -= entry.nbytes

    def _release(self, entry: _Entry, lease: _Lease) -> None:
        with self._lock:
            entry.let_go(lease)
            if entry.token not in self._live:
                if not entry.in_use() and self._owners.get(entry.oid) is entry:
                    del self._owners[entry.oid]  # pending, its registration never run
                return
            if not (entry.doomed and not entry.in_use()):
                return
        self._drop_doomed(entry)

    def _drop_doomed(self, entry: _Entry) -> None:
        """Drops a registration to be dropped once nothing uses it, if nothing does now."""
        # Claimed and dropped with a Ctrl-C held, so that it cannot fall between the two
        # (until then the entry stays live: a trim, its next sighting, or its array's
        # death drops it).
        with _interrupts_held():
            with self._lock:
                if not (entry.doomed and not entry.in_use() and entry.token in self._live):
                    return
                owner = entry.ref()
                if owner is None:
                    return  # being freed: its callback unregisters it
                self._claim_locked(entry)
                self._counts["evictions"] += 1
            self._drop(entry)
            del owner

    def _callback(self, token: int) -> Callable[[object], object]:
        """The weakref callback of registration ``token``'s owner. Through the compiled
        core (``_C.call_through_interrupts``), which runs no Python code before it, so
        that a Ctrl-C pending as the array dies cannot end it on its first instruction,
        before it has claimed anything: it is called again, and the Ctrl-C raised in the
        main thread after it. Without the core, Python's own call, as for any finalizer."""
        through = getattr(_backend._LOADED, "call_through_interrupts", None)
        if through is None:
            return functools.partial(self._owner_freed_unretried, token)
        return functools.partial(through, functools.partial(self._owner_freed, token))

    def _owner_freed(self, token: int, _ref: object = None) -> None:
        """An owner's weakref callback: NumPy has not freed its memory yet. Takes no lock.

        A Ctrl-C is held from the claim to the books (it would part them: the memory left
        registered, or its reservation never given back) and raised as the callback ends;
        one that lands before the hold is taken ends the callback before the claim, and
        the core's wrapper (:meth:`_callback`) calls it again, then raises the Ctrl-C."""
        with _interrupts_held():
            self._settle_freed(token)

    def _owner_freed_unretried(self, token: int, _ref: object = None) -> None:
        """:meth:`_owner_freed` where nothing calls it again (no compiled core, hence no
        GPU registrations but those of tests): a Ctrl-C as the hold is set up ends it
        before the claim, so the registration is settled on the way out, unheld. What it
        raises Python prints as the callback's error, and one on its very first
        instruction ends it before anything."""
        try:
            self._owner_freed(token)
        finally:
            if token in self._live:  # (interrupted before the claim)
                self._settle_freed(token)

    def _settle_freed(self, token: int) -> None:
        entry = self._live.pop(token, None)
        if entry is None:
            return  # claimed by someone else, or forgotten (a forked child, exit)
        try:
            self._ops.unregister(entry.address, entry.nbytes)
        finally:
            # (even when the driver raised: the array is going, and its share of the
            # budget must not go with it; the error is printed as the callback's)
            try:
                self._ops.unreserve(entry.nbytes)
            finally:
                self._freed.append(entry)

    def _drop_freed_locked(self) -> None:
        if not self._freed:
            return
        with _interrupts_held():  # (a Ctrl-C between a pop and its books would part them)
            while self._freed:
                entry = self._freed.popleft()
                if self._owners.get(entry.oid) is entry:
                    del self._owners[entry.oid]
                self._registered -= entry.nbytes
                self._reserved -= entry.nbytes
                self._counts["releases"] += 1

    # ------------------------------------------------------------------ dropping

    def trim(self, limit: float | None = None) -> None:
        """Evicts registrations, least recently used first, until they hold at most limit
        bytes (default: the ops' limit, half the pinned budget); those in use go when
        their transfer ends."""
        if limit is None:
            limit = self._ops.limit()
        self.refuse_in_finalizer()
        self._trim(limit)

    def _trim(self, limit: float) -> None:
        with _interrupts_held():  # (a Ctrl-C between a claim and its drop would strand it)
            self._trim_held(limit)

    def _trim_held(self, limit: float) -> None:
        while True:
            with self._lock:
                self._drop_freed_locked()
                if self._registered <= limit:
                    return
                victim, owner = self._victim_locked(None)
                if victim is None:
                    over = self._registered - limit
                    for entry in self._owners.values():  # in use: doomed, oldest first
                        if over <= 0:
                            break
                        if entry.token in self._live and not entry.doomed:
                            entry.doomed = True
                            over -= entry.nbytes
                    return
            self._drop(victim)
            del owner

    def clear(self) -> None:
        """Drops every registration (one in use when its transfer ends) and sighting."""
        self.refuse_in_finalizer()
        with self._lock:
            self._seen.clear()
            for entry in self._owners.values():
                entry.doomed = True  # (pending ones give up, leased ones go at release)
        self.trim(0)

    def close(self) -> None:
        """At exit: registers nothing more and leaves the registrations to the process's
        end (no driver call while the interpreter shuts down)."""
        with self._lock:
            self._closed = True
            self._live = {}

    def reset_after_fork(self) -> None:
        """In a forked child: forgets the parent's registrations without unregistering them
        (they belong to the parent's CUDA context); the owners' callbacks find nothing."""
        self._reset()


# --------------------------------------------------------------------------- the process's cache


class _CudaOps:
    """The CUDA engine's calls; always the module that was loaded (not ``ENGINE``, which
    tests swap), so that cleanup reaches the module that registered."""

    def register(self, owner: np.ndarray, device: int) -> bool:
        C = _backend._LOADED
        if C is None or C.is_host_pinned(owner, device):
            return False  # (page-locked by someone else: theirs to manage)
        return bool(C.cuda_host_register(owner, device))

    def unregister(self, address: int, nbytes: int) -> None:
        if _backend._LOADED is not None:
            _backend._LOADED.cuda_host_unregister(address, nbytes)

    def reserve(self, nbytes: int) -> bool:
        C = _backend._LOADED
        return C is not None and bool(C.cuda_reserve_pinned(nbytes))

    def unreserve(self, nbytes: int) -> None:
        if _backend._LOADED is not None:
            _backend._LOADED.cuda_unreserve_pinned(nbytes)

    def limit(self) -> int:
        C = _backend._LOADED
        return share_of(int(C.cuda_pinned_stats()["budget"])) if C is not None else 0


def enabled_from_env() -> bool:
    """``TENSORBRIDGE_REGISTER``: on unless set to 0, off, false or no.

    Raises:
        ValueError: it holds anything else.
    """
    raw = os.environ.get(REGISTER_ENV, "").strip().lower()
    if raw in ("", "1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise ValueError(
        f"{REGISTER_ENV}={os.environ[REGISTER_ENV]!r} is not understood: set it to 0 to turn "
        "the registration of reused arrays off, or 1 (the default)."
    )


#: The registration cache GPU transfers use (read as ``_registry.CACHE``).
CACHE = RegistrationCache(_CudaOps(), enabled=enabled_from_env())
atexit.register(lambda: CACHE.close())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: CACHE.reset_after_fork())


def registration_options(
    enabled: bool | None = None, min_bytes: int | None = None, sightings: int | None = None
) -> RegistrationOptions:
    """Sets (when given) and returns how reused pageable arrays are page-locked in place.

    On a GPU, a pageable array that comes back (the ``out`` of ``to_numpy``, the source of
    ``to_tensor(a, "cuda")``) is registered (``cudaHostRegister``) on its ``sightings``-th
    transfer (2) when it is at least ``min_bytes`` (4 MiB), C-contiguous, in native byte
    order and NumPy's own memory; its transfers are then one direct DMA. The registration
    lasts until the array is freed or evicted, within half of the pinned budget
    (:func:`set_pinned_budget`). ``enabled=False`` (or ``TENSORBRIDGE_REGISTER=0`` at
    import) turns it off and drops every registration. Nothing else changes: a call that
    returns with its source free to reuse still does.

    While an array is tracked (seen by a transfer, until the cache forgets it), NumPy
    refuses ``a.resize()`` on it, as for any array something else references; use
    ``np.resize`` or turn registration off first.

    Example:
        >>> import tensorbridge as tb
        >>> tb.registration_options()["min_bytes"]
        4194304
    """
    if enabled is not None:
        enabled = _backend.bool_arg(enabled, "registration_options: enabled")
    if min_bytes is not None:
        min_bytes = _backend.int_arg(min_bytes, "registration_options: min_bytes", 1, 2**62)
    if sightings is not None:
        sightings = _backend.int_arg(sightings, "registration_options: sightings", 1, 1000)
    return CACHE.configure(enabled, min_bytes=min_bytes, sightings=sightings)
