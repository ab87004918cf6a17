"""GPU transfers through the compiled engine, and the policy that routes them.

The Python layer picks the layouts and streams; csrc/core/pipeline.cpp does the
chunking and buffer rotation and csrc/cuda/cuda_engine.cu the CUDA calls. Used when
``_backend.ENGINE.cuda_engine`` says so; otherwise the callers fall back to torch's own
path (``.cpu()`` / ``.to(device)``).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import difflib
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any, Literal, Protocol

import numpy as np
import torch

from . import _backend, _dtypes, _registry
from ._copy import swap_unit
from ._handle import Transfer

# The staged pipeline's knobs: the largest chunk and the staging blocks in flight (at
# least two per copy thread, so `buffers` also bounds the copy threads). The old
# one-thread pipeline's H100 sweep (benchmarks/results/*-tune-*-sweep2.*) found 8 MiB
# chunks best from 64 MiB up; the copy threads need two blocks each, hence 16.
_options = {"chunk_bytes": 8 << 20, "buffers": 16}
_MIN_AUTO_CHUNK = 1 << 20
_BYTES_PER_THREAD = 2 << 20


def staging_plan(nbytes: int, threads: int | None = None) -> tuple[int, int]:
    """(chunk_bytes, buffers) for a staged transfer of nbytes: the one place that sizes it.

    As many copy threads as the transfer has 2 MiB shares for (up to the engine's threads
    and ``buffers / 2``), each with at least two chunks so its host copy overlaps its own
    DMAs; chunks between 1 MiB and ``chunk_bytes``. Small transfers get small chunks, so
    the first chunk's host copy and the last one's DMA (the parts nothing overlaps) stay
    short.
    """
    if threads is None:
        threads = _backend.get_num_threads()
    workers = max(1, min(threads, _options["buffers"] // 2, nbytes // _BYTES_PER_THREAD))
    chunk = min(_options["chunk_bytes"], max(_MIN_AUTO_CHUNK, nbytes // (2 * workers)))
    return chunk, _options["buffers"]


def _chunk_bytes(nbytes: int) -> int:
    return staging_plan(nbytes)[0]


@dataclasses.dataclass
class Routing:
    """The one routing policy: which device copies take torch's own copy instead of the
    engine, and which large host copies run on torch's threads instead of the calling
    thread. Every call site asks it; ``python -m tensorbridge bench-tune`` calibrates the
    device copies' part.

    Blocking copies of at most ``small_d2h`` / ``small_h2d`` bytes between a CUDA tensor
    and a plain NumPy array take torch's path (one cudaMemcpy through the driver's
    staging): below that, the pipeline's fixed costs (pool lease, events, host copies on
    the thread pool) outweigh what it saves. The values are the largest sizes at which
    torch's copy won in the newest committed bench-tune sweep with small copies
    (benchmarks/results/*-tune-*; ``tune.recommended_routing``, and a test holds the two
    together): on an H100, 512 KiB device->host and 1 MiB host->device.

    ``to_numpy(x, out=out)`` of a contiguous CPU ``torch.Tensor`` (not a subclass, and
    with no ``dtype``, ``copy`` or ``non_blocking`` given) into a C-contiguous ndarray of
    at least ``host_torch_bytes``, of its dtype, aligned and apart from ``x``, runs either
    on torch's intra-op threads (``copy_``) or on the calling thread alone, whichever has
    been cheaper; smaller copies, and every other layout, run on the core's pool.
    Neither wins everywhere. torch's threads are the ones the caller's own tensor ops
    use, and on a quiet machine they copy faster. But torch gives each thread
    a fixed share and waits for all of them: when other processes (a data loader's
    workers) keep the cores busy, a share whose thread is not scheduled stalls the copy
    for a scheduler slice (beside one busy process, samples of torch's 1 MiB copies had a
    median of 0.15 GB/s, about 7 ms a copy, in
    benchmarks/results/2026-12-07-*-contended-2.txt). A copy on the calling thread alone
    waits for no other thread. Not routed: conjugate and negative views, and every such
    copy on the pure-Python path, run on torch's threads (its copy resolves the bits);
    in a forked child (a DataLoader worker: torch's OpenMP pool can hang after a fork)
    and for bool, bfloat16 and float8 tensors (whose bytes torch's copy would not keep,
    or cannot view) the core copies.

    So each routed copy is timed, and each size class (sizes from 2**k to 2**(k+1) - 1)
    keeps the cost per byte of each route: its recent copies, older ones weighing less,
    so that ``host_window_bytes`` of copies make up most of it. A stall now and then in
    a long run of fast copies moves the mean a little; once the stalls in a window cost
    more than the other route would, the copies move. A class starts on the calling
    thread: its first copy warms up (first touches of ``out``) and is not counted, the
    second counts as a whole window of such copies; then torch's threads get a try.

    A try runs one copy on the other route that is not counted (it may wake torch's
    threads), then up to ``host_try_copies`` that are: it ends early once they cost more
    than ``host_try_copies`` copies on the current route would (one stall ends it), and
    the copies move if it comes out cheaper. Either way the try's copies become all that
    is known of its route, so a stall soon after a try that won moves the copies back.
    The next try comes a wait after the last one ended: ``host_try_s`` at first, doubled
    (up to 32x) by each try that loses after the first and by each route a try chose
    that loses again on its averages within the wait; the wait falls back to
    ``host_try_s`` when the copies move on their averages later than that. On their
    averages the copies move only to a route at least 5% cheaper, so two routes about as
    fast do not trade places copy after copy. Whatever
    else makes a route's copies slow counts against it too (waiting for the GIL). The
    state is shared by every thread and every ``out``, without a lock: a race can cost a
    try or a misplaced copy, never a wrong byte.

    The values were chosen by hand, not swept, on a 2-core VM, from
    ``benchmarks/host_routing.py`` and
    ``python -m tensorbridge bench --sections out contended``; ``bench-tune`` calibrates
    the ``small_*`` fields only. To keep these copies on one route, set
    ``ROUTING.host_route`` to ``"torch"`` or ``"caller"`` (``"fastest"`` measures);
    ``ROUTING.host_torch_bytes = 1 << 62`` sends them to the core's pool like every other
    host copy. Each knob is checked when set (TypeError, ValueError; AttributeError for
    a name that is not one).
    """

    small_d2h: int = 512 << 10
    small_h2d: int = 1 << 20
    host_torch_bytes: int = 1 << 20
    host_route: Literal["fastest", "torch", "caller"] = "fastest"
    host_window_bytes: int = 1 << 30
    host_try_copies: int = 4
    host_try_s: float = 1.0
    #: Small copies between a contiguous CUDA tensor and a C-contiguous native-order array
    #: on ``to_numpy``'s and ``to_tensor``'s fast paths take one compiled call
    #: (``copy_small``: cudaMemcpyAsync and a wait on the stream, as torch's copy does,
    #: without its dispatch) instead of torch's ``copy_``; ``to_host`` and ``to_device``
    #: (the full paths) always use torch's copy below the routing's sizes. Off until a
    #: GPU sweep measures it ahead of torch's copy (bench-tune times both).
    small_direct: bool = False
    #: A page-locked CPU tensor of a batch (``tb.collate``'s in the main process of a GPU
    #: machine, the DataLoader pin-memory thread's) of at least this many bytes, and
    #: contiguous, crosses on its own in one DMA from its own memory (a ``to_tensor``
    #: call) instead of being copied into the batch's staging buffer first. 1 MiB, as
    #: ``small_h2d``: from there the project measured staging to pay for a call's fixed
    #: costs; not swept for this route on a GPU. Memory the registration cache
    #: page-locked is packed whatever its size. ``1 << 62`` packs every tensor.
    batch_pinned_direct: int = 1 << 20

    def __setattr__(self, name: str, value: Any) -> None:
        """Checks every knob when it is set, so a typo or a wrong value fails there and
        then, not at the first copy it routes."""
        knobs = tuple(f.name for f in dataclasses.fields(self) if f.init)
        if not name.startswith("_") and name not in knobs:
            near = difflib.get_close_matches(name, knobs, n=1)
            raise AttributeError(
                f"Routing has no knob {name!r}"
                + (" (it is a method)" if hasattr(type(self), name) else "")
                + (f": did you mean {near[0]!r}?" if near else f"; its knobs: {knobs}")
            )
        if name in ("small_d2h", "small_h2d", "batch_pinned_direct"):
            value = _backend.int_arg(value, name, 0)
        if name == "small_direct":
            value = _backend.bool_arg(value, "small_direct")
        if name == "host_route" and value not in _HOST_ROUTES:
            raise ValueError(f"host_route must be one of {_HOST_ROUTES}, got {value!r}")
        if name in ("host_torch_bytes", "host_window_bytes", "host_try_copies"):
            value = _backend.int_arg(value, name, 0 if name == "host_torch_bytes" else 1)
        if name == "host_try_s":
            if isinstance(value, bool) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"host_try_s must be a number of seconds, got {value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"host_try_s must be finite and above 0, got {value!r}")
            value = float(value)
        super().__setattr__(name, value)

    def torch_d2h(self, nbytes: int) -> bool:
        """A blocking device-to-host copy of nbytes goes through torch's own copy."""
        return nbytes <= self.small_d2h

    def torch_h2d(self, nbytes: int) -> bool:
        """A blocking host-to-device copy of nbytes goes through torch's own copy."""
        return nbytes <= self.small_h2d

    def batch_leaf_direct(
        self, leaf: torch.Tensor, is_pinned: Callable[[torch.Tensor], bool]
    ) -> bool:
        """A CPU tensor of a batch crosses on its own, in one DMA from its page-locked
        memory, not packed (``is_pinned``: the sender's test, asked last: it is a driver
        call)."""
        return (
            leaf.layout == torch.strided  # (first: a sparse tensor has no nbytes)
            and not leaf.is_nested
            and leaf.numel() * leaf.element_size() >= self.batch_pinned_direct
            and leaf.is_cpu
            and leaf.is_contiguous()
            and is_pinned(leaf)
        )

    # What the torch_host copies of each size class (nbytes.bit_length()) have measured.
    _host: dict[int, _HostRoutes] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def torch_host(self, nbytes: int) -> bool:
        """A routed host-to-host copy of nbytes runs on torch's threads, not on the
        calling thread alone (report how long it took with ``host_copy_took``)."""
        if nbytes < self.host_torch_bytes or nbytes <= 0:
            return False
        if self.host_route != "fastest":
            return self.host_route == "torch"
        routes = self._host.get(nbytes.bit_length())
        if routes is None or not routes.nbytes[0]:
            return False  # (a class starts on the calling thread)
        if routes.trying <= 0 and (not routes.nbytes[1] or monotonic() >= routes.try_at):
            routes.trying, routes.warming = self.host_try_copies + 1, True
            routes.tried_s, routes.tried_bytes, routes.tried = 0.0, 0.0, 0
        return routes.on_torch != (routes.trying > 0)

    def host_copy_took(self, nbytes: int, seconds: float, on_torch: bool) -> None:
        """Records a copy that ``torch_host`` routed and that took ``seconds``."""
        if nbytes <= 0:
            return
        size_class = nbytes.bit_length()
        routes = self._host.get(size_class)
        if routes is None:  # (the first copy of a class warms up: not counted)
            self._host[size_class] = _HostRoutes(self.host_try_s)
            return
        route, current = int(on_torch), int(routes.on_torch)
        if routes.trying > 0 and route != current:
            routes.trying -= 1
            if routes.warming:  # (the try's first copy is not counted)
                routes.warming = False
                return
            routes.tried_s += seconds
            routes.tried_bytes += nbytes
            routes.tried += 1
            bar = routes.cost(current)
            per_copy = routes.tried_bytes / routes.tried
            if routes.trying > 0 and routes.tried_s <= self.host_try_copies * bar * per_copy:
                return  # (the try goes on)
            routes.trying = 0  # its copies are all that is known of the route from now on
            first = not routes.nbytes[route]
            if first:
                routes.start(route, routes.tried_s, routes.tried_bytes, self.host_window_bytes)
            else:
                routes.seconds[route], routes.nbytes[route] = routes.tried_s, routes.tried_bytes
            now = monotonic()
            if routes.cost(route) < bar:
                routes.on_torch, routes.won_at = on_torch, now
            elif not first:
                routes.put_off(self.host_try_s)
            routes.try_at = now + routes.wait
            return
        window = self.host_window_bytes
        if not routes.nbytes[route]:
            routes.start(route, seconds, nbytes, window)
        else:
            keep = 1.0 - nbytes / window if window > nbytes else 0.0
            routes.seconds[route] = routes.seconds[route] * keep + seconds
            routes.nbytes[route] = routes.nbytes[route] * keep + nbytes
        if not routes.nbytes[1 - route]:
            return
        cheaper = routes.cost(1) < routes.cost(0)
        if cheaper != routes.on_torch and routes.try_at != math.inf:
            # on the averages, the copies move only to a route cheaper by a margin: two
            # routes about as fast would otherwise trade places copy after copy, and a
            # move may cost a wake-up of torch's threads
            ahead = routes.cost(int(cheaper)) < routes.cost(int(routes.on_torch)) * (1 - _MARGIN)
            cheaper = cheaper if ahead else routes.on_torch
        if cheaper != routes.on_torch or routes.try_at == math.inf:
            now = monotonic()
            if cheaper != routes.on_torch and now - routes.won_at < routes.wait:
                routes.put_off(self.host_try_s)  # (a try misled)
            elif cheaper != routes.on_torch:
                routes.wait = self.host_try_s
            routes.on_torch, routes.trying = cheaper, 0
            routes.try_at = now + routes.wait


_HOST_ROUTES = ("fastest", "torch", "caller")
#: How much cheaper per byte the other route must be for the copies to move to it on
#: their averages (a try's result moves them at any margin).
_MARGIN = 0.05


class _HostRoutes:
    """One size class of ``Routing.torch_host`` copies: per route (0: the calling thread,
    1: torch's threads) the seconds and bytes of its copies, older ones weighing less; the
    route taken; when the other one is tried next, how long the wait is, and when a try
    last moved the copies; and how far a try under way has got."""

    __slots__ = (
        "nbytes",
        "on_torch",
        "seconds",
        "tried",
        "tried_bytes",
        "tried_s",
        "try_at",
        "trying",
        "wait",
        "warming",
        "won_at",
    )

    def __init__(self, wait: float) -> None:
        self.seconds = [0.0, 0.0]
        self.nbytes = [0.0, 0.0]
        self.on_torch = False
        self.try_at = math.inf  # (set once both routes are measured)
        self.wait = wait
        self.won_at = -math.inf
        self.trying = 0  # copies left in the try under way, its first included
        self.warming = False  # the try's first copy (not counted) is still to come
        self.tried_s = 0.0
        self.tried_bytes = 0.0
        self.tried = 0

    def start(self, route: int, seconds: float, nbytes: float, window: int) -> None:
        """A route's first copies stand for a whole window of copies like them: a stall
        right after weighs no more than one later."""
        scale = max(1.0, window / nbytes)
        self.seconds[route], self.nbytes[route] = seconds * scale, nbytes * scale

    def put_off(self, base: float) -> None:
        """The next try waits twice as long, up to 32 x base."""
        self.wait = min(2 * self.wait, 32 * base)

    def cost(self, route: int) -> float:
        """Seconds per byte on route (0 or 1); infinite before its first copy."""
        n = self.nbytes[route]
        return self.seconds[route] / n if n > 0 else math.inf


ROUTING = Routing()
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def torch_view(a: np.ndarray) -> torch.Tensor | None:
    """``torch.from_numpy(a)`` for the small-copy paths, or None where torch refuses it
    although NumPy calls ``a`` contiguous (a negative stride on a dimension of size 1) and
    where its elements are misaligned (torch's kernels may assume alignment): the full
    path copies those through the core."""
    try:
        t = torch.from_numpy(a)
    except ValueError:
        return None
    return None if t.data_ptr() % t.element_size() else t


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker): the parent's threads are not ours."""
    global _executor, _executor_lock
    _executor = None  # its threads were not copied into the child
    _executor_lock = threading.Lock()  # (another thread may have held it at the fork)
    _completions.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def transfer_options(chunk_bytes: int | None = None, buffers: int | None = None) -> dict[str, int]:
    """Sets (when given) and returns the pipeline's chunk size and staging buffer count.

    ``chunk_bytes`` is the largest chunk: smaller transfers are cut into smaller ones (not
    under 1 MiB), two per copy thread at least, so each thread's host copies overlap its
    DMAs. ``buffers`` is the staging blocks one transfer keeps in flight, two per copy
    thread, so it also bounds the copy threads (``set_num_threads`` bounds them too).

    Example:
        >>> import tensorbridge as tb
        >>> tb.transfer_options()["buffers"] >= 2
        True
    """
    new = dict(_options)  # (both checked before either is set)
    if chunk_bytes is not None:
        new["chunk_bytes"] = _backend.int_arg(chunk_bytes, "chunk_bytes", 4096, 1 << 40)
    if buffers is not None:
        new["buffers"] = _backend.int_arg(buffers, "buffers", 2, 64)
    _options.update(new)
    return dict(_options)


def _background() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tensorbridge")
        return _executor


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# torch's own handle of a device's current stream, without a Stream object (where this
# torch has it; torch.cuda.current_stream otherwise).
_raw_stream: Callable[[int], int] | None = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(index: int) -> int:
    """The current stream of GPU ``index``, as the driver's handle (cudaStream_t)."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def copy_small(index: int, host: np.ndarray, device_ptr: int, to_host: bool) -> None:
    """One blocking copy between GPU ``index`` (``device_ptr``, as many bytes as ``host``)
    and ``host`` (C-contiguous, native byte order, any memory) on the current stream:
    ``ROUTING.small_direct``'s path."""
    C = _backend.ENGINE.core
    C.cuda_copy_small(index, stream_handle(index), host, device_ptr, host.nbytes, to_host)


def copy_pinned(index: int, host: np.ndarray, device_ptr: int, to_host: bool) -> bool:
    """One blocking DMA between GPU ``index`` (``device_ptr``, as many bytes as ``host``)
    and ``host`` (C-contiguous, native byte order) on the current stream, when ``host``
    lies in page-locked memory that the registration cache does not manage (torch's
    pinned tensors, ``empty_pinned`` arrays): the direct path with no Python steps
    between. False, with nothing queued, otherwise (the full path takes it from there)."""
    C = _backend.ENGINE.core
    return C.cuda_copy_pinned(index, stream_handle(index), host, device_ptr, host.nbytes, to_host)


def _dense_order(a: np.ndarray) -> tuple[int, ...] | None:
    """A permutation p such that a.transpose(p) is C-contiguous, or None."""
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))  # (the common case, without the sort)
    p = tuple(sorted(range(a.ndim), key=lambda d: -abs(a.strides[d]) if a.shape[d] > 1 else 0))
    return p if a.transpose(p).flags.c_contiguous else None


def _swap_unit(a: np.ndarray) -> int:
    """The byte-swap unit between a (a torch-mappable dtype) and the device's native order."""
    if a.dtype.isnative:
        return 0  # (the common case, without a new dtype)
    return swap_unit(a.dtype, a.dtype.newbyteorder("=")) or 0


# --------------------------------------------------------------------------- device -> host


def to_host(
    x: torch.Tensor, out: np.ndarray | None, np_dtype: np.dtype, non_blocking: bool
) -> np.ndarray | Transfer[np.ndarray]:
    """A CUDA tensor (no conj/neg bits, dtype already final) into `out` or a new array."""
    C = _backend.ENGINE.core
    if out is None:
        out = np.empty(tuple(x.shape), np_dtype)
    dst = out
    src = x
    if _dtypes.is_ml_dtype(np_dtype):  # move ml_dtypes through same-size integers
        storage_t, storage_np = _dtypes.storage_dtypes(np_dtype.itemsize)
        src = src.view(storage_t)
        dst = dst.view(storage_np)
    # Make the device side dense in the order `out` is laid out in (a permutation on the
    # GPU is nearly free); the host side then copies whole runs.
    order = _dense_order(dst)
    if order is not None and order != tuple(range(dst.ndim)):
        src = src.permute(order)
        dst = dst.transpose(order)
    fresh = not src.is_contiguous()
    src = src.contiguous()
    swap = _swap_unit(dst)
    nbytes = dst.size * dst.itemsize
    if ROUTING.torch_d2h(nbytes) and not non_blocking and swap == 0 and dst.flags.c_contiguous:
        view = torch_view(dst)
        if view is not None:
            view.copy_(src)  # small: torch's one synchronous copy is cheaper
            return out
    index = _device_index(x.device)
    stream = stream_handle(index)  # (cheaper than a torch.cuda.Stream object)

    # (an `out` that comes back is registered by the cache and DMA'd directly from then on;
    # the lease keeps it registered until the copy is queued)
    with _registry.CACHE.lease(dst, index) as registered:
        if registered or (
            swap == 0 and dst.flags.c_contiguous and nbytes and C.is_host_pinned(dst, index)
        ):
            # Page-locked destination: one DMA, queued now on the current stream.
            pending = C.cuda_copy_async(
                index,
                stream,
                C.array_span(dst)[0],
                src.data_ptr(),
                nbytes,
                True,
                (src, out),
            )
            if non_blocking:
                return Transfer(out, poll=pending.done, block=pending.wait)
            pending.wait()
            return out

    def run() -> np.ndarray:
        C.cuda_copy_to_host(
            index,
            stream,
            src.data_ptr(),
            dst,
            _chunk_bytes(nbytes),
            _options["buffers"],
            swap,
        )
        return out

    if not non_blocking:
        return run()
    if not fresh:
        # The copies are queued from another thread later on: work the caller queues on
        # this stream meanwhile must not change what we read, so read a private copy.
        src = src.clone()
    # The job holds src and out (through `run`) until it has finished with them.
    future = _background().submit(run)
    return Transfer(out, poll=future.done, block=future.result, keepalive=(src, out))


# --------------------------------------------------------------------------- host -> device


class Pending(Protocol):
    """A copy queued without waiting (``tensorbridge._C.PendingCopy``)."""

    def done(self) -> bool: ...
    def wait(self) -> None: ...


class CompletionWatcher:
    """Waits on a daemon thread for copies queued without waiting, then drops them.

    A non-blocking copy out of page-locked memory holds its event and the memory's owner
    until the DMA has read it (the PendingCopy does). Dropping it only when a later
    transfer comes would keep both forever when none comes; this thread waits for each
    copy in turn and drops it, which frees the event and lets the memory go (kept for good
    when the wait failed). It starts on the first copy and ends after a second idle.
    """

    def __init__(self, idle_s: float = 1.0) -> None:
        self._idle_s = idle_s
        self._queue: collections.deque[Pending] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = 0  # copies taken off the queue and not yet dropped

    def add(self, pending: Pending) -> None:
        with self._cv:
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tensorbridge-completions", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def pending(self) -> int:
        """Copies not yet seen complete (for tests and stats)."""
        with self._cv:
            return len(self._queue) + self._busy

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._cv.wait(self._idle_s)
                if not self._queue:
                    self._thread = None  # a later add() starts a new one
                    return
                pending = self._queue.popleft()
                self._busy += 1
            try:
                pending.wait()
            except Exception:
                pass  # (the copy's memory stays alive for good; nobody is left to tell)
            finally:
                del pending
                with self._cv:
                    self._busy -= 1

    def close(self) -> None:
        """Waits for every queued copy and for the thread to end (at exit: a daemon thread
        still waiting when the interpreter finalizes would be killed mid-wait)."""
        with self._cv:
            while self._thread is not None:
                self._cv.notify()
                self._cv.wait(0.05)

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's thread and copies are not ours (a parent's
        PendingCopy dropped here touches nothing of the parent's)."""
        self._queue = collections.deque()
        self._cv = threading.Condition()
        self._thread = None
        self._busy = 0


_completions = CompletionWatcher()
atexit.register(_completions.close)


def to_device(
    a: np.ndarray,
    device: torch.device,
    target: torch.dtype | None,
    non_blocking: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """A NumPy array (any layout and byte order) to a CUDA tensor; casts on the device."""
    C = _backend.ENGINE.core
    index = _device_index(device)
    device = torch.device("cuda", index)
    t_dtype = _dtypes.torch_dtype(a.dtype)
    src = a
    if _dtypes.is_ml_dtype(a.dtype):
        _, storage_np = _dtypes.storage_dtypes(a.dtype.itemsize)
        src = a.view(storage_np)
    swap = _swap_unit(src)
    nbytes = src.size * src.itemsize
    if (
        ROUTING.torch_h2d(nbytes)
        and not non_blocking
        and swap == 0
        and src.flags.c_contiguous
        and src.flags.writeable  # (torch.from_numpy warns on read-only arrays)
        and (view := torch_view(src)) is not None
    ):
        # small: torch's one synchronous copy is cheaper than staging
        moved = view.to(device)
        if t_dtype != moved.dtype:
            moved = moved.view(t_dtype)
        if out is not None:
            out.copy_(moved)
            return out
        return moved if target is None or target == t_dtype else moved.to(target)
    if out is not None and out.dtype == t_dtype and out.is_contiguous():
        dst = out  # straight into the caller's tensor
    else:
        dst = torch.empty(a.shape, dtype=t_dtype, device=device)
    stream = stream_handle(index)  # (cheaper than a torch.cuda.Stream object)
    with _registry.CACHE.lease(src, index) as registered:  # (a source that comes back: see to_host)
        if registered or (
            swap == 0
            and src.flags.c_contiguous
            and nbytes
            and C.is_host_pinned(src, index)
            # (not a tensor over an array the cache registered: pageable memory to its
            # owner, leased by no one, so it could be unregistered under a DMA: staged)
            and not _registry.CACHE.covers(C.array_span(src)[0], nbytes)
        ):
            # (the handle keeps the source alive until the DMA has read it)
            address = C.array_span(src)[0]
            pending = C.cuda_copy_async(index, stream, dst.data_ptr(), address, nbytes, False, a)
            if non_blocking and not registered:
                _completions.add(pending)  # the caller's own pinned memory: not waited for
            else:
                # Registered by the cache, the source is still the caller's pageable array,
                # free to reuse once this returns (as on the staged path): wait for the DMA.
                pending.wait()
        elif nbytes:
            # Staged: `a` is not read once this returns (non_blocking: the last chunk is
            # queued; blocking: it has arrived, so other streams may use the tensor at once).
            C.cuda_copy_to_device(
                index,
                stream,
                src,
                dst.data_ptr(),
                _chunk_bytes(nbytes),
                _options["buffers"],
                swap,
                not non_blocking,
            )
    if out is not None and dst is not out:
        out.copy_(dst, non_blocking=True)  # cast (or re-layout) on the device
        return out
    if target is not None and target != dst.dtype:
        return dst.to(target)
    return dst
