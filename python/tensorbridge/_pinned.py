"""Page-locked host memory: arrays the GPU can read and write by DMA directly."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from . import _backend
from ._dtypes import DTypeLike, as_numpy_dtype

ShapeLike = int | tuple[int, ...] | list[int]


def _normalize_shape(shape: ShapeLike) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"shape must hold ints, got {shape!r}")
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
    np_dtype = as_numpy_dtype(dtype)
    if np_dtype.hasobject:
        raise TypeError(
            f"empty_pinned cannot hold dtype {np_dtype}: its elements are Python references, "
            "which the GPU cannot copy; pass a numeric dtype, e.g. numpy.float32."
        )
    cuda, _, _ = _backend.cuda_status()
    if not cuda:
        return np.empty(dims, np_dtype)
    nbytes = math.prod(dims) * np_dtype.itemsize
    C = _backend.C
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
    cuda, _, _ = _backend.cuda_status()
    if not cuda:
        return False
    C = _backend.C
    if C is not None:
        return bool(C.is_host_pinned(array))
    probe = (ctypes.c_uint8 * 1).from_address(array.ctypes.data)
    return bool(torch.frombuffer(probe, dtype=torch.uint8).is_pinned())
