"""Host copies between NumPy arrays of any layout: the compiled core, or NumPy."""

from __future__ import annotations

import numpy as np

from . import _backend
from ._dtypes import swap_unit

_TooHardError = getattr(np, "exceptions", np).TooHardError


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copies src into dst (same shape; same dtype up to byte order). Caller validates.

    The compiled core releases the GIL, collapses contiguous dimensions, tiles
    transposes, swaps bytes in the same pass and splits large copies across threads.
    """
    C = _backend.C
    if C is not None:
        swap = swap_unit(src.dtype) if src.dtype.isnative != dst.dtype.isnative else 0
        C.copy(dst, src, swap)
    else:
        np.copyto(dst, src, casting="equiv")


def check_no_overlap(dst: np.ndarray, src: np.ndarray, what: str = "out") -> None:
    """ValueError when dst and src share memory (a copy would read what it wrote)."""
    if not np.may_share_memory(dst, src):
        return
    try:
        overlap = np.shares_memory(dst, src, max_work=10_000)
    except _TooHardError:  # too costly to decide exactly: refuse, to be safe
        overlap = True
    if overlap:
        raise ValueError(
            f"{what} shares memory with the source; pass a separate array (or drop "
            f"{what}= to get a view)."
        )
