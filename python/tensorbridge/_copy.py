"""Host copies between NumPy arrays of any layout: the compiled core, or NumPy.

The core copies raw bytes. That is right only for plain-data dtypes copied to the same
dtype (or a byte-swapped numeric one); everything else goes to ``numpy.copyto``, which
knows each dtype's semantics: arrays holding Python references (object, StringDType,
records with an object field), records and strings in another byte order, longdouble.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _backend

_TooHardError = getattr(np, "exceptions", np).TooHardError

# Numeric kinds whose byte order the core can swap, with the unit swapped per element.
_SWAPPABLE = {"i": (2, 4, 8), "u": (2, 4, 8), "f": (2, 4, 8), "M": (8,), "m": (8,)}


def swap_unit(src: np.dtype, dst: np.dtype) -> int | None:
    """The core's byte-swap unit to copy ``src`` into ``dst``: 0 for a plain byte copy,
    None when only NumPy can do it (references, records, strings, longdouble...)."""
    if src.hasobject or dst.hasobject:
        return None  # raw bytes would copy pointers without taking references
    if src == dst:
        return 0
    if src.kind == "c" and src.itemsize in (8, 16):
        return src.itemsize // 2  # the real and imaginary halves swap separately
    if src.itemsize in _SWAPPABLE.get(src.kind, ()):
        return src.itemsize
    return None


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copies src into dst (same shape; same dtype up to byte order). Caller validates.

    The compiled core releases the GIL, collapses contiguous dimensions, tiles
    transposes, swaps bytes in the same pass and splits large copies across threads.
    """
    C = _backend.ENGINE.C
    unit = swap_unit(src.dtype, dst.dtype) if C is not None else None
    if C is None or unit is None:
        np.copyto(dst, src, casting="equiv")
    else:
        C.copy(dst, src, unit)


def byte_span(x: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of the bytes a strided array's or tensor's elements touch (lo == hi when
    it has none). The Python side's one span computation (the core's: byte_span.h)."""
    if isinstance(x, np.ndarray):
        lo = hi = x.ctypes.data
        shape, strides, itemsize = x.shape, x.strides, x.itemsize
    else:
        lo = hi = x.data_ptr()
        itemsize = x.element_size()
        shape, strides = x.shape, tuple(s * itemsize for s in x.stride())
    for n, step in zip(shape, strides, strict=True):
        if n == 0:
            return lo, lo
        reach = (n - 1) * step
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + itemsize


def shares_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b share a byte; True as well when that is too costly to decide."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))  # type: ignore[arg-type]  # (stubs: -1/0)
    except _TooHardError:  # too costly to decide exactly: assume they do, to be safe
        return True


def check_no_overlap(dst: np.ndarray, src: np.ndarray, what: str = "out") -> None:
    """ValueError when dst and src share memory (a copy would read what it wrote)."""
    if shares_memory(dst, src):
        raise ValueError(
            f"{what} shares memory with the source: pass a separate array (or drop "
            f"{what}= to get a view)."
        )


# Above this many elements an exact self-overlap check (enumerating every element's
# offset) costs more than it is worth: layouts the quick test cannot clear are refused.
_EXACT_OVERLAP_LIMIT = 1 << 20


def self_overlapping(shape: tuple[int, ...], byte_strides: tuple[int, ...], itemsize: int) -> bool:
    """True when two elements of a strided view share a byte (so writes would collide).

    The quick test sorts the dimensions by stride: if each stride steps over everything
    the smaller ones span, no two elements meet. Layouts it cannot clear (interleaved
    strides) are decided exactly for up to a million elements, and refused beyond.
    """
    dims = [(abs(s), n) for n, s in zip(shape, byte_strides, strict=True) if n > 1]
    if not dims or any(n == 0 for n in shape):
        return False
    dims.sort()
    span = itemsize
    for stride, n in dims:
        if stride < span:
            break
        span += stride * (n - 1)
    else:
        return False
    size = math.prod(n for _, n in dims)
    if size > _EXACT_OVERLAP_LIMIT:
        return True
    offsets = np.zeros(1, np.int64)
    for stride, n in dims:
        offsets = (offsets[:, None] + stride * np.arange(n, dtype=np.int64)).ravel()
    offsets.sort()
    return bool(np.any(np.diff(offsets) < itemsize))


def check_out_not_self_overlapping(
    shape: tuple[int, ...],
    byte_strides: tuple[int, ...],
    itemsize: int,
    alloc: str = "numpy.empty_like(out)",
) -> None:
    """ValueError when several elements of ``out`` share memory (writes would be lost);
    ``alloc`` is the allocation the message suggests instead."""
    if not self_overlapping(shape, byte_strides, itemsize):
        return
    if any(s == 0 and n > 1 for n, s in zip(shape, byte_strides, strict=True)):
        problem = "out has a zero stride, so several elements share memory"
    else:
        problem = (
            f"out has strides {byte_strides} (bytes) that make its {math.prod(shape)} "
            "elements overlap in memory, so some writes would be lost"
        )
    raise ValueError(f"{problem}: pass an array that owns one slot per element, e.g. {alloc}.")
