"""Page-locked host memory: new pinned arrays, pinning existing ones, the staging pool.

Arrays the GPU can read and write by DMA directly. The staging pool itself lives in the
compiled engine (csrc/core/pinned_pool.cpp); this module sets its budget and reports it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import math
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from . import _backend, _ranks, _registry
from ._dtypes import DTypeLike, as_numpy_dtype

ShapeLike = int | tuple[int, ...] | list[int]


def _normalize_shape(shape: ShapeLike) -> tuple[int, ...]:
    refused = TypeError(
        f"shape must be an int or a tuple of ints, got {type(shape).__name__}: {shape!r}: "
        "pass e.g. (2, 3)."
    )
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        dims: tuple[Any, ...] = (shape,)
    elif isinstance(shape, (str, bytes, bool)):
        raise refused
    else:
        try:
            dims = tuple(shape)
        except TypeError:  # (a float, None...)
            raise refused from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"shape must hold ints, got {shape!r}: pass e.g. (2, 3).")
        if d < 0:
            raise ValueError(f"shape must not be negative, got {shape!r}")
    return tuple(int(d) for d in dims)


def empty_pinned(shape: ShapeLike, dtype: DTypeLike = np.float32) -> np.ndarray:
    """An uninitialized C-contiguous, writeable array in page-locked memory.

    Page-locked (pinned) memory is what the GPU copies to and from at full speed.
    Where CUDA is not usable this returns a plain array and :func:`is_pinned` says
    False for it, so code using it runs everywhere.

    Example:
        >>> import tensorbridge as tb
        >>> a = tb.empty_pinned((2, 3))
        >>> a.shape, a.dtype, a.flags.c_contiguous
        ((2, 3), dtype('float32'), True)
    """
    dims = _normalize_shape(shape)
    if dtype is None:  # (NumPy's np.dtype(None) is float64: not this function's default)
        raise TypeError("empty_pinned: dtype=None: pass a dtype, e.g. numpy.float32 (the default).")
    np_dtype = as_numpy_dtype(dtype)
    if np_dtype.hasobject:
        raise TypeError(
            f"empty_pinned cannot hold dtype {np_dtype}: its elements are Python references, "
            "which the GPU cannot copy; pass a numeric dtype, e.g. numpy.float32."
        )
    if not _backend.ENGINE.pinned_memory:
        return np.empty(dims, np_dtype)
    nbytes = math.prod(dims) * np_dtype.itemsize
    C = _backend.ENGINE.C
    if C is not None:
        raw = C.empty_pinned_bytes(nbytes)
    else:
        raw = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True).numpy()
    return raw[:nbytes].view(np_dtype).reshape(dims)


def is_pinned(array: np.ndarray) -> bool:
    """True when ``array``'s memory is page-locked (so GPU copies can use it directly).

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> tb.is_pinned(np.zeros(3))
        False
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"is_pinned expects a numpy.ndarray, got {type(array).__name__}")
    if array.size == 0:
        return False
    if not _backend.ENGINE.pinned_memory:
        return False
    C = _backend.ENGINE.C
    if C is not None:
        return bool(C.is_host_pinned(array))
    probe = (ctypes.c_uint8 * 1).from_address(array.ctypes.data)
    return bool(torch.frombuffer(probe, dtype=torch.uint8).is_pinned())


def pin(array: np.ndarray) -> np.ndarray:
    """Page-locks an existing array in place (``cudaHostRegister``) and returns it.

    Reference counted: pinning twice needs two :func:`unpin` calls. The registration is
    dropped automatically when the array is garbage-collected. Without a usable GPU this
    does nothing. Prefer :func:`pinned` as a context manager.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> a = tb.pin(np.zeros(1024))
        >>> tb.unpin(a)
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"pin expects a numpy.ndarray, got {type(array).__name__}")
    if array.size == 0 or not _backend.ENGINE.cuda_engine:
        return array
    C = _backend.ENGINE.core
    if C.cuda_host_register(array):
        address, nbytes = C.array_span(array)
        token = next(_PIN_TOKENS)
        callback: Any = functools.partial(_pinned_array_died, token)
        through = getattr(C, "call_through_interrupts", None)
        if through is not None:  # (see _registry: a Ctrl-C cannot end it before it claims)
            callback = functools.partial(through, callback)
        _PINS[token] = (address, nbytes, weakref.ref(array, callback))
    return array


#: tb.pin's registrations by token: (address, bytes, the array's weak reference, whose
#: callback unpins it as the array dies; dropped with the entry by unpin).
_PINS: dict[int, tuple[int, int, weakref.ref[np.ndarray]]] = {}
_PIN_TOKENS = itertools.count()


def _pinned_array_died(token: int, _ref: object = None) -> None:
    """A pinned array's weakref callback: its memory is still there (NumPy clears weak
    references before it frees the data). The claim and the unregistration hold a Ctrl-C
    between them; one that lands before is handled by the core's wrapper, which calls
    this again (then it finds the pin claimed or not, never twice)."""
    with _registry._interrupts_held():
        entry = _PINS.pop(token, None)
        if entry is not None and _backend._LOADED is not None:
            _backend._LOADED.cuda_host_unregister(entry[0], entry[1])


def _unpin_all() -> None:
    """At exit, the pins of arrays still alive, as their callbacks would."""
    for token in list(_PINS):
        _pinned_array_died(token)


atexit.register(_unpin_all)
if hasattr(os, "register_at_fork"):  # (a child's pins are its parent's registrations)
    os.register_at_fork(after_in_child=_PINS.clear)


def unpin(array: np.ndarray) -> None:
    """Drops one :func:`pin` of ``array``; unpinning what was not pinned does nothing."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"unpin expects a numpy.ndarray, got {type(array).__name__}")
    if array.size == 0 or not _backend.ENGINE.cuda_engine:
        return
    C = _backend.ENGINE.core
    address, nbytes = C.array_span(array)
    # One pin's entry goes with it, so that its array's death does not unpin it again
    # (that would drop a pin made later of the same memory): this array's own, else one
    # of a view of the same memory.
    token = _pin_of(array, address, nbytes)
    if C.cuda_host_unregister(address, nbytes) and token is not None:
        _PINS.pop(token, None)


def _pin_of(array: np.ndarray, address: int, nbytes: int) -> int | None:
    """The token of a pin of ``array`` (else of the same memory), or None."""
    for _ in range(8):  # (another thread's pin, or a callback the collector runs, may
        try:  # change the table while it is read: read it again)
            pins = list(_PINS.items())
            break
        except RuntimeError:
            continue
    else:
        return None
    same = [(t, ref) for t, (a, n, ref) in pins if (a, n) == (address, nbytes)]
    for t, ref in same:
        if ref() is array:
            return t
    return same[0][0] if same else None


@contextlib.contextmanager
def pinned(array: np.ndarray) -> Iterator[np.ndarray]:
    """``with tb.pinned(a):`` page-locks ``a`` for the block (GPU copies then DMA it directly)."""
    pin(array)
    try:
        yield array
    finally:
        unpin(array)


def pinned_stats() -> dict[str, Any]:
    """The staging pool and the arrays registered in place, in one dict.

    The pool: ``budget`` (bytes of page-locked memory it may hold per device, registered
    arrays included: ``info()["ranks"]["pinned_budget"]``, also where no GPU is usable and
    ``available`` is False, so nothing is held), ``bytes_held`` and ``bytes_in_use``, and
    the counts of ``hits`` (a cached block reused), ``misses`` (a block pinned), ``waits``
    (for a busy block), ``fallbacks`` (no block: the pageable path), ``pin_failures`` and
    ``frees``; on a
    machine with more than one NUMA node, ``numa_placed`` (blocks pinned on their GPU's
    node) and ``numa_refused`` (blocks pinned without it because the kernel refused the
    memory policy; ``numa_error`` is the last refusal's errno, 1 for EPERM: a container
    without CAP_SYS_NICE).

    The registration cache (pageable arrays that come back, page-locked in place: see
    :func:`registration_options`): ``registered_bytes`` and ``registered_arrays`` now,
    and the counts of ``registrations``, ``registered_hits`` (transfers that used an
    earlier registration), ``sightings`` (qualifying transfers that found none),
    ``evictions`` (registrations dropped while their array lived), ``releases`` (dropped
    when their array was freed), ``register_failures`` and ``budget_refusals``.

    Example:
        >>> import tensorbridge as tb
        >>> sorted(tb.pinned_stats())[:3]
        ['available', 'budget', 'budget_refusals']
    """
    registry = _registry.CACHE.stats()
    if not _backend.ENGINE.cuda_engine:
        return {
            "available": False,
            # (the budget a GPU would run under, as info()["ranks"] says; nothing is held)
            "budget": _ranks.SETTINGS.pinned_budget.value,
            "bytes_held": 0,
            "bytes_in_use": 0,
            "hits": 0,
            "misses": 0,
            "waits": 0,
            "fallbacks": 0,
            "pin_failures": 0,
            "frees": 0,
            "numa_placed": 0,
            "numa_refused": 0,
            "numa_error": 0,
            **registry,
        }
    C = _backend.ENGINE.core
    return {"available": True, **C.cuda_pinned_stats(), **C.cuda_numa_stats(), **registry}


def set_pinned_budget(nbytes: int) -> None:
    """Caps the page-locked bytes tensorbridge may hold per device: the staging pool's
    blocks and the arrays registered in place together (registrations take at most half).
    Idle blocks over it are freed, and registrations evicted, least recently used first.

    It wins over the default, which is divided among the ranks of a node under a
    launcher (``info()["ranks"]``), and over ``TENSORBRIDGE_PINNED_BUDGET``."""
    nbytes = _backend.int_arg(nbytes, "set_pinned_budget: nbytes", 0, 2**62)
    _registry.CACHE.refuse_in_finalizer()  # (before anything changes)
    _ranks.note_pinned_budget(nbytes)
    if _backend.ENGINE.cuda_engine:
        _backend.ENGINE.core.cuda_set_pinned_budget(nbytes)
        _registry.CACHE.trim(_registry.share_of(nbytes))
