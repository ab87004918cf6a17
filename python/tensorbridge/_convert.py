"""to_numpy, from_numpy and to_tensor: validation and dispatch.

Every check runs before anything is written. The common cases take the shortest
path torch offers (``x.numpy()``, ``torch.from_numpy(a)``); the rest are rewritten
into cases the core can copy: bfloat16/float8 reinterpret their storage as
ml_dtypes, negative strides and foreign byte orders are copied once.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, overload

import numpy as np
import torch

from . import _backend, _cuda, _dtypes, _interop, _registry
from ._copy import (
    byte_span,
    check_no_overlap,
    check_out_not_self_overlapping,
    copy_into,
    shares_memory,
)
from ._dtypes import DTypeLike
from ._handle import Transfer

Device = str | int | torch.device

# torch dtype -> (NumPy dtype, same-size torch dtype to view ml_dtypes storage through)
_FAST_GET = _dtypes.FAST_PATH.get
_NATIVE_NUMPY = frozenset(_dtypes.NATIVE.values())  # NumPy dtypes torch.from_numpy takes


# --------------------------------------------------------------------------- helpers


def _check_tensor(x: Any, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise _interop.no_protocol_error(x, fn)
    if x.is_nested:  # (a nested tensor may report the strided layout)
        raise TypeError(
            f"{fn} needs a dense tensor, got a nested tensor: use x.unbind() to convert "
            "its components one by one."
        )
    if x.layout != torch.strided:
        raise TypeError(
            f"{fn} needs a dense (strided) tensor, got layout {x.layout}: use x.to_dense()."
        )
    if x.is_quantized:
        raise TypeError(
            f"{fn} cannot convert a quantized tensor ({x.dtype}): use x.dequantize() "
            "or x.int_repr()."
        )
    if x.is_meta:
        raise TypeError(
            f"{fn} cannot convert a meta tensor: it has no data. Materialize it "
            "first, e.g. torch.empty_like(x, device='cpu')."
        )
    _check_storage(x, fn)
    return x


def _check_storage(x: torch.Tensor, fn: str) -> None:
    """Refuses a tensor whose elements lie outside its storage's memory: a storage freed
    or shrunk in place (``untyped_storage().resize_(0)``, as FSDP does to sharded
    parameters), which a copy would read from address 0 or past its end."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter):
        return  # (a subclass, DTensor's wrappers say, may hold no memory of its own: torch's)
    try:
        if x.is_meta or not x.numel():
            return  # (a meta tensor has no memory to read: refused as one where it matters)
        storage = x.untyped_storage()
        address, have = x.data_ptr(), storage.nbytes()
        if x.is_contiguous():  # (most: no walk over the strides)
            need = (x.storage_offset() + x.numel()) * x.element_size()
        else:  # (torch's strides are never negative: the span ends where the elements do)
            need = byte_span(x)[1] - storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return  # (no storage or strides of its own, e.g. a nested tensor: refused elsewhere)
    if address == 0 or need > have:
        raise ValueError(
            f"{fn}: the tensor's storage holds {have} bytes but its elements reach byte "
            f"{need}: the storage was freed or shrunk in place (untyped_storage().resize_(), "
            "as FSDP does to sharded parameters), so there is nothing to read. Convert it "
            "while its storage is allocated (e.g. inside FSDP's summon_full_params())."
        )


def _check_out_array(
    out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str = "out", converts: bool = True
) -> np.ndarray:
    """``out`` checked for a result of ``shape`` and ``dtype`` (``name``: what messages call
    it; ``converts``: whether the caller takes a ``dtype=`` to suggest)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray, got {type(out).__name__}: allocate one "
            f"with numpy.empty({shape}, dtype={dtype})."
        )
    if out.shape != shape:
        raise ValueError(
            f"{name} has shape {out.shape} but the result has shape {shape}: "
            f"allocate numpy.empty({shape}, dtype={dtype})."
        )
    if out.dtype != dtype and out.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        # (a byte order other than the result's is fine: the copy swaps)
        fix = f"pass dtype={out.dtype} to convert, or " if converts else "pass "
        raise TypeError(
            f"{name} has dtype {out.dtype} but the result has dtype {dtype}: {fix}an {name} "
            f"of dtype {dtype}."
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only: pass a writeable array ({name}.flags.writeable).")
    if not (out.flags.c_contiguous or out.flags.f_contiguous):
        check_out_not_self_overlapping(out.shape, out.strides, out.itemsize)
    return out


def _cpu_view(x: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor with no conj/neg bit; ml_dtypes for bf16/float8."""
    np_dtype = _dtypes.numpy_dtype(x.dtype)
    if _dtypes.is_ml_dtype(np_dtype):
        storage_t, _ = _dtypes.storage_dtypes(np_dtype.itemsize)
        return x.view(storage_t).numpy().view(np_dtype)
    return x.numpy()


# --------------------------------------------------------------------------- to_numpy


@overload
def to_numpy(
    x: Any,
    *,
    out: np.ndarray | None = ...,
    dtype: DTypeLike | None = ...,
    copy: bool = ...,
    non_blocking: Literal[False] = False,
) -> np.ndarray: ...
@overload
def to_numpy(
    x: Any,
    *,
    out: np.ndarray | None = ...,
    dtype: DTypeLike | None = ...,
    copy: bool = ...,
    non_blocking: Literal[True],
) -> Transfer[np.ndarray]: ...
@overload
def to_numpy(
    x: Any,
    *,
    out: np.ndarray | None = ...,
    dtype: DTypeLike | None = ...,
    copy: bool = ...,
    non_blocking: bool,
) -> np.ndarray | Transfer[np.ndarray]: ...


def to_numpy(
    x: Any,
    *,
    out: np.ndarray | None = None,
    dtype: DTypeLike | None = None,
    copy: bool = False,
    non_blocking: bool = False,
) -> np.ndarray | Transfer[np.ndarray]:
    """Converts a tensor to a NumPy array: a drop-in for ``x.detach().cpu().numpy()``.

    Same shape, dtype mapping and bits as the idiom. A CPU tensor converted without
    ``out`` or ``copy`` shares memory exactly where ``x.numpy()`` would. Unlike the
    idiom it also accepts tensors that require grad, conjugate and negative views
    (resolved), and bfloat16/float8 (as ml_dtypes arrays, bit-exact, zero-copy on the
    CPU). A NumPy array passes through unchanged.

    Arrays of other frameworks (JAX, TensorFlow, CuPy, Numba...: anything exposing
    ``__dlpack__``, ``__cuda_array_interface__`` or ``__array__``) are accepted too: host
    data comes back as a view where the producer allows it (read-only for immutable JAX
    and TensorFlow arrays), device data through the same transfer engine as CUDA tensors.

    Args:
        x: a dense torch.Tensor (any device, dtype and strides), a numpy.ndarray, or
            another framework's array.
        out: a writeable array of the result's shape and dtype, any strides; the values
            land there and ``out`` is returned.
        dtype: convert to this NumPy (or torch) dtype, e.g. ``numpy.float32`` for bf16.
        copy: never share memory with ``x``.
        non_blocking: return a :class:`Transfer`; ``wait()`` gives the array.

    Raises:
        TypeError: ``x`` is not a dense tensor or array of any kind understood, its
            dtype has no NumPy equivalent, or ``out`` has the wrong type or dtype.
        ValueError: ``out`` has the wrong shape, is read-only or overlaps ``x``; or
            another framework's array whose producer refused to export it.

    Example:
        >>> import torch, tensorbridge as tb
        >>> tb.to_numpy(torch.ones(2, requires_grad=True))
        array([1., 1.], dtype=float32)
    """
    if type(x) is torch.Tensor and dtype is None and copy is False and non_blocking is False:
        # The common cases, in as few Python-level steps as possible. Anything unusual
        # (or wrong) falls through to the full path, which also explains refusals.
        entry = _FAST_GET(x.dtype)
        if entry is not None and x.is_cpu:
            np_dtype, storage = entry
            if out is None:
                if storage is None:
                    try:
                        # On the CPU, force=True is detach() + resolve_conj() + resolve_neg()
                        # done in C++: it shares memory unless a conj/neg bit must be resolved.
                        # (Address 0: no elements, or a freed storage, for which torch would
                        # give a new, unwritten array: the full path refuses it.)
                        if x.data_ptr():
                            return x.numpy(force=True)
                    except (RuntimeError, TypeError):
                        pass  # e.g. a sparse layout: the full path explains the refusal
                elif not x.is_neg() and x.layout is torch.strided and x.data_ptr():
                    return x.detach().view(storage).numpy().view(np_dtype)
            else:
                C = _backend.ENGINE.C
                if type(out) is np.ndarray and out.nbytes >= _cuda.ROUTING.host_torch_bytes:
                    _check_storage(x, "to_numpy")  # (large: a storage shrunk in place refused)
                    if storage is None and _large_host_copy(x, out, np_dtype):
                        return out
                if C is not None and not x.is_neg() and (np_dtype.kind != "c" or not x.is_conj()):
                    try:  # (a sparse tensor has no strides: the full path refuses it)
                        if (
                            C.copy_from_address(out, np_dtype, x.data_ptr(), x.shape, x.stride())
                            == 0
                        ):
                            return out
                    except RuntimeError:
                        pass
        elif (
            entry is not None
            and entry[1] is None
            and x.is_cuda
            and x.layout is torch.strided  # (sparse and nested tensors: the full path's
            and not x.is_nested  # refusal, not an error from their sizes or strides)
        ):
            np_dtype = entry[0]
            plain_out = (
                out
                if type(out) is np.ndarray
                and out.dtype == np_dtype
                and out.shape == x.shape
                and out.flags.c_contiguous
                and out.flags.writeable
                else None
            )
            if _cuda.ROUTING.torch_d2h(x.numel() * x.element_size()):
                # Small GPU tensors: torch's own synchronous copy, with no Python steps
                # between (the staging pipeline only pays off from about 1 MiB), or one
                # compiled call where the routing says so.
                if (
                    _cuda.ROUTING.small_direct
                    and (out is None or plain_out is not None)
                    and x.is_contiguous()
                    and not x.is_conj()
                    and not x.is_neg()
                    and _backend.ENGINE.cuda_engine
                ):
                    host = np.empty(tuple(x.shape), np_dtype) if plain_out is None else plain_out
                    _cuda.copy_small(x.get_device(), host, x.data_ptr(), True)
                    return host
                if out is None:
                    return x.numpy(force=True)  # detach, cpu, resolve conj/neg: one C++ call
                if plain_out is not None:
                    dst = _cuda.torch_view(plain_out)
                    if dst is not None:  # (else the full path copes)
                        # copy_ resolves conj/neg bits itself
                        dst.copy_(x.detach() if x.requires_grad else x)
                        return out
            elif (
                plain_out is not None
                and x.is_contiguous()
                and not x.is_conj()
                and not x.is_neg()
                and _backend.ENGINE.cuda_engine
            ):
                if _cuda.copy_pinned(x.get_device(), plain_out, x.data_ptr(), True):
                    return plain_out  # a page-locked out (torch's pinned memory): one DMA
                # Pageable (registered by the cache when it comes back, else staged): the
                # engine's path, without the full path's checks, all made above.
                return _cuda.to_host(
                    x.detach() if x.requires_grad else x, plain_out, np_dtype, False
                )
    copy = _backend.bool_arg(copy, "to_numpy: copy")
    if not _backend.bool_arg(non_blocking, "to_numpy: non_blocking"):
        return _to_numpy(x, out, dtype, copy)
    try:
        result = _to_numpy(x, out, dtype, copy, non_blocking=True)
        return result if isinstance(result, Transfer) else Transfer.completed(result)
    except (TypeError, ValueError):
        raise  # bad arguments are refused at the call, before anything is written
    except Exception as exc:
        return Transfer.failed(exc)


# Set in forked children: the core's own thread pool is rebuilt after fork, torch's is not.
_IN_FORKED_CHILD = [False]


def _after_fork_in_child() -> None:
    _IN_FORKED_CHILD[0] = True
    # torch's OpenMP pool does not survive fork(): a child forked after the parent ran a
    # parallel op hangs in its first one (casts in to_tensor, to_device, images_to_tensor
    # included). One intra-op thread avoids the pool, as DataLoader's workers do.
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _large_host_copy(x: torch.Tensor, out: Any, np_dtype: np.dtype) -> bool:
    """Large contiguous-to-contiguous copies: on torch's intra-op threads or on this
    thread alone, as ``_cuda.Routing.torch_host`` says (and why), timed for it.

    A plain memcpy is the one layout where the core has no edge, and torch's intra-op
    threads are the same ones the caller's own tensor ops use: copying on them avoids
    oversubscribing the cores, unless busy cores stall them. Returns False, having
    written nothing, when it does not apply; every check comes before the routing is
    asked, so a copy it routes runs on the route it was given.
    """
    routing = _cuda.ROUTING
    if type(out) is not np.ndarray or out.nbytes < routing.host_torch_bytes:
        return False  # (first: most copies are small, and this is the cheapest test)
    if _IN_FORKED_CHILD[0]:
        return False  # torch's OpenMP pool hangs in a child forked after the parent used it
    flags = out.flags
    if not (
        x.layout is torch.strided  # (sparse and nested tensors have no strides or sizes:
        and not x.is_nested  # the full path refuses them with a fix)
        and flags.c_contiguous
        and x.is_contiguous()
        and x.dtype is not torch.bool  # (torch's copy makes every non-zero byte 1: the
        and out.dtype == np_dtype  # full path keeps the bytes, as x.numpy() does)
        and flags.writeable
        and out.shape == x.shape
    ):
        return False
    try:
        dst = torch.from_numpy(out)  # (refuses e.g. a negative stride on a size-1 dim)
    except (TypeError, ValueError):
        return False
    nbytes = out.nbytes
    lo, src = dst.data_ptr(), x.data_ptr()  # (faster than out.ctypes)
    if lo % out.itemsize or src % out.itemsize:
        return False  # torch's kernels may assume aligned elements; the core does not
    if lo < src + nbytes and src < lo + nbytes:
        return False  # overlapping: the full path refuses it with a clear message
    C = _backend.ENGINE.C
    if C is None or x.is_neg() or x.is_conj():
        dst.copy_(x)  # (resolves conj/neg bits itself; the pure-Python path's one copy)
        return True
    on_torch = routing.torch_host(nbytes)
    start = time.perf_counter()
    if on_torch or C.copy_from_address(out, np_dtype, src, x.shape, x.stride(), serial=True):
        dst.copy_(x)  # (the core refuses nothing the checks above let through)
    routing.host_copy_took(nbytes, time.perf_counter() - start, on_torch)
    return True


def _to_numpy(
    x: Any, out: np.ndarray | None, dtype: DTypeLike | None, copy: bool, non_blocking: bool = False
) -> np.ndarray | Transfer[np.ndarray]:
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        # JAX, TensorFlow, CuPy...: host data as a NumPy view (keeping a read-only flag),
        # device data as a CUDA tensor for the transfer engine.
        x = _interop.import_array(x, "to_numpy", numpy_first=True)
    if isinstance(x, np.ndarray):
        return _numpy_to_numpy(x, out, dtype, copy)
    x = _check_tensor(x, "to_numpy")
    own = _dtypes.numpy_dtype_or_none(x.dtype)
    if dtype is not None:
        target = _dtypes.as_numpy_dtype(dtype)
    else:
        target = own if own is not None else _dtypes.numpy_dtype(x.dtype)  # raises
    if out is not None:
        _check_out_array(out, tuple(x.shape), target)

    if x.requires_grad:
        x = x.detach()
    fresh = False  # True once x no longer shares memory with the caller's tensor
    if target != own:
        cast_to = _dtypes.maybe_torch_dtype(target)
        if cast_to is None:  # e.g. longdouble: NumPy converts it
            arr = np.asarray(_to_numpy(x, None, None, False)).astype(target)
            if out is not None:
                copy_into(out, arr)
                return out
            return arr
        x = x.to(cast_to)
        fresh = True
    if x.is_conj():
        x = x.resolve_conj()  # on the tensor's device
        fresh = True
    if x.is_neg():
        x = x.resolve_neg()
        fresh = True
    if not x.is_cpu:
        if x.is_cuda and _backend.ENGINE.cuda_engine:
            return _cuda.to_host(x, out, target, non_blocking)
        x = x.cpu()  # torch's own path: no engine (no CUDA build, or another device type)
        fresh = True

    view = _cpu_view(x)
    if out is not None:
        if not fresh:
            check_no_overlap(out, view)
        copy_into(out, view)
        return out
    if copy and not fresh:
        result = np.empty(view.shape, view.dtype)
        copy_into(result, view)
        return result
    return view


def _numpy_to_numpy(
    a: np.ndarray, out: np.ndarray | None, dtype: DTypeLike | None, copy: bool
) -> np.ndarray:
    target = _dtypes.as_numpy_dtype(dtype) if dtype is not None else a.dtype
    if out is not None:
        _check_out_array(out, a.shape, target)
    src = a
    if target != a.dtype:
        src = a.astype(target)
    elif copy and out is None:
        src = np.empty(a.shape, a.dtype)
        copy_into(src, a)
    if out is not None:
        if src is a:
            check_no_overlap(out, a)
        copy_into(out, src)
        return out
    return src


# --------------------------------------------------------------------------- from_numpy


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """Converts a NumPy array to a CPU tensor: a drop-in for ``torch.from_numpy``.

    Shares memory wherever torch does. It also converts what torch refuses but can
    represent: negative strides and non-native byte order (copied once) and ml_dtypes
    bfloat16/float8 arrays (zero-copy). An array whose elements are not aligned to their
    size (a view at an odd byte offset) is copied once too: torch would share it, but
    its kernels may assume alignment and crash on it. Those are the only copies it makes.

    Raises:
        TypeError: not an ndarray, or a dtype torch has no equivalent for (str, bytes,
            object, datetime, longdouble, structured).
        ValueError: strides that are not a multiple of the itemsize.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> tb.from_numpy(np.arange(4)[::-1])
        tensor([3, 2, 1, 0])
    """
    # (not for a read-only array: torch warns that it would share one before it refuses it,
    # negative strides say, and the copy made below then shares nothing)
    if type(a) is np.ndarray:
        flags = a.flags
        if flags.writeable and flags.aligned:
            try:  # the common case: exactly torch.from_numpy
                t = torch.from_numpy(a)
            except (TypeError, ValueError, RuntimeError):
                pass
            else:
                # (NumPy aligns complex numbers to their parts, torch to their whole size)
                if a.dtype.kind != "c" or not t.data_ptr() % t.element_size():
                    return t
    elif not isinstance(a, np.ndarray):
        raise TypeError(
            f"from_numpy expects a numpy.ndarray, got {type(a).__name__}: use "
            "numpy.asarray(a) first (or to_tensor for tensors)."
        )
    return _from_numpy(a)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    t_dtype = _dtypes.torch_dtype(a.dtype)  # TypeError for unsupported dtypes
    itemsize = a.dtype.itemsize
    for n, s in zip(a.shape, a.strides, strict=False):
        if n > 1 and s % itemsize:
            raise ValueError(
                f"array strides {a.strides} are not a multiple of the itemsize {itemsize} "
                "(a field of a structured array?): make a compact copy with "
                "numpy.ascontiguousarray(a) first."
            )
    # torch refuses any negative or odd stride, even on dimensions of size 0 or 1
    # where the stride means nothing: a compact copy covers those too, and misaligned
    # elements (torch's kernels may assume alignment).
    odd = any(s < 0 or s % itemsize for s in a.strides) or _misaligned(a)
    if odd or not a.dtype.isnative:
        native = a.dtype.newbyteorder("=")
        # Broadcast dimensions (stride 0) are copied once and expanded again, so a
        # broadcast view never becomes a copy as large as its shape.
        broadcast = [n > 1 and s == 0 for n, s in zip(a.shape, a.strides, strict=True)]
        # (the Ellipsis keeps a 0-d array an array: a[()] would be a scalar)
        index = (*(slice(0, 1) if b else slice(None) for b in broadcast), Ellipsis)
        core = a[index]
        compact = np.empty(core.shape, native)
        copy_into(compact, core)
        if any(broadcast):  # (as_strided keeps it writeable: no read-only warning)
            strides = [0 if b else s for b, s in zip(broadcast, compact.strides, strict=True)]
            compact = np.lib.stride_tricks.as_strided(compact, a.shape, strides)
        a = compact
    canonical = _dtypes.canonical_numpy_dtype(a.dtype)
    if canonical is not a.dtype:  # e.g. numpy.ulonglong: the same type, another name
        a = a.view(canonical)
    if _dtypes.is_ml_dtype(a.dtype):
        _, storage_np = _dtypes.storage_dtypes(itemsize)
        return torch.from_numpy(a.view(storage_np)).view(t_dtype)
    return torch.from_numpy(a)


class _Alias:
    """An array interface, and the array whose memory it describes (kept alive)."""

    def __init__(self, interface: dict[str, Any], owner: np.ndarray) -> None:
        self.__array_interface__ = interface
        self.owner = owner


def readable(a: np.ndarray) -> np.ndarray:
    """``a``, or where it is read-only a writeable alias of its memory, which keeps ``a``
    alive: for a tensor tensorbridge only reads and never hands out. torch.from_numpy warns
    that a tensor sharing a read-only array could be written through (Arrow's buffers,
    ``np.frombuffer`` of bytes, broadcasts); a result that is a copy shares nothing, and
    the warning would only be noise (or an error under ``-W error``)."""
    if a.flags.writeable:
        return a
    interface = dict(a.__array_interface__)
    interface["data"] = (interface["data"][0], False)  # (pointer, read-only)
    alias = np.asarray(_Alias(interface, a))
    return alias if alias.dtype == a.dtype else alias.view(a.dtype)  # (ml_dtypes: void)


def _misaligned(a: np.ndarray) -> bool:
    """True when a's elements do not start at a multiple of their size."""
    return a.size > 0 and bool(a.__array_interface__["data"][0] % a.dtype.itemsize)


# --------------------------------------------------------------------------- to_tensor


def to_tensor(
    a: Any,
    device: Device | None = None,
    *,
    dtype: DTypeLike | None = None,
    non_blocking: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Converts an array to a tensor on ``device`` (default: where the data already is).

    Takes a NumPy array, a tensor, or an array of another framework (JAX, TensorFlow,
    CuPy, Numba...: anything exposing ``__dlpack__``, ``__cuda_array_interface__`` or
    ``__array__``). Without a device change or a dtype change the tensor shares memory
    with the source, like ``torch.as_tensor(a)`` / ``torch.from_dlpack(a)`` (and converts
    what torch refuses, see :func:`from_numpy`), except another framework's data that
    NumPy's protocol hands out read-only (pandas' copy-on-write columns), which is
    copied; a GPU array of another framework stays on its GPU, with the producer's
    pending work ordered before the current stream's.
    ``dtype=`` casts; on a GPU the cast runs there, after the transfer, so the narrow type
    crosses the link.

    Args:
        a: a numpy.ndarray, a torch.Tensor or another framework's array.
        device: target device, e.g. ``"cuda"``; default ``out``'s device, else the
            device the data is on (the CPU for NumPy arrays).
        dtype: the result's dtype (torch or NumPy dtype).
        non_blocking: order the copy on the current stream without waiting for it,
            like ``Tensor.to(non_blocking=True)``.
        out: a preallocated tensor of the result's shape, dtype and device.

    Raises:
        TypeError: ``a`` is not an array of any kind understood, or its dtype has no
            torch equivalent; ``out`` has the wrong type or dtype.
        ValueError: another framework's array whose producer refused to export it;
            ``out`` has the wrong shape or device, or overlaps ``a``.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> tb.to_tensor(np.arange(3, dtype=np.uint8), dtype="float32")
        tensor([0., 1., 2.])
    """
    if device is not None:
        device = _backend.resolve_device(device, "to_tensor")
    if (
        type(a) is np.ndarray
        and device is not None
        and dtype is None
        and out is None
        and non_blocking is False
        and a.dtype.isnative
        and a.flags.c_contiguous
        and a.dtype in _NATIVE_NUMPY
    ):
        if _cuda.ROUTING.torch_h2d(a.nbytes):
            # Small arrays: torch's own copy with no Python steps between (the staging
            # pipeline pays off from about 1 MiB), or one compiled call where the routing
            # says so; on the CPU, a tensor sharing the array.
            if _cuda.ROUTING.small_direct and device.type == "cuda" and _backend.ENGINE.cuda_engine:
                index = _cuda._device_index(device)
                dst = torch.empty(
                    a.shape, dtype=_dtypes.torch_dtype(a.dtype), device=f"cuda:{index}"
                )
                _cuda.copy_small(index, a, dst.data_ptr(), False)
                return dst
            src = _cuda.torch_view(a) if a.flags.writeable else None  # (from_numpy warns
            if src is not None:  # on read-only arrays: those take the full path below)
                return src.to(device)
        elif device.type == "cuda" and _backend.ENGINE.cuda_engine:
            # A page-locked source (torch's pinned memory, empty_pinned): one DMA with no
            # Python steps between; any other is staged into the same new tensor.
            index = _cuda._device_index(device)
            dst = torch.empty(a.shape, dtype=_dtypes.torch_dtype(a.dtype), device=f"cuda:{index}")
            if not _cuda.copy_pinned(index, a, dst.data_ptr(), False):
                _cuda.to_device(a, device, None, False, dst)
            return dst
    non_blocking = _backend.bool_arg(non_blocking, "to_tensor: non_blocking")
    # Another framework's host data that NumPy's protocol hands over read-only (pandas'
    # copy-on-write columns, say) is copied, as torch.as_tensor copies a Series: a tensor
    # cannot be read-only, and one writing into it would change data its owner shares.
    guarded = False
    if not isinstance(a, (np.ndarray, torch.Tensor)):
        a = _interop.import_array(a, "to_tensor", numpy_first=False)
        guarded = isinstance(a, np.ndarray) and not a.flags.writeable
    if isinstance(a, np.ndarray):
        shape, source_dtype = a.shape, _dtypes.torch_dtype(a.dtype)  # refuses bad dtypes
    else:
        a = _check_tensor(a, "to_tensor")
        shape, source_dtype = tuple(a.shape), a.dtype
    target = _dtypes.as_torch_dtype(dtype) if dtype is not None else None
    dev = device
    if out is not None:
        _check_out_tensor(out, shape, source_dtype, target, dev)
        dev = out.device

    if dev is not None and dev.type == "cuda" and _backend.ENGINE.cuda_engine:
        host = a if isinstance(a, np.ndarray) else _host_view_for_engine(a)
        if host is not None:
            # Pinned staging, chunked and pipelined; any layout and byte order; cast on
            # the GPU.
            return _cuda.to_device(host, dev, target, non_blocking, out)

    if isinstance(a, np.ndarray):
        # The result shares the array only when it is src itself, on the host; a cast,
        # another device or out= copy it, so a read-only array is only read.
        copied = (
            out is not None
            or (dev is not None and dev.type != "cpu")
            or (target is not None and target != source_dtype)
        )
        src = from_numpy(readable(a) if copied or guarded else a)
        if guarded and not copied and src.data_ptr() == a.__array_interface__["data"][0]:
            src = src.clone()  # (a view: from_numpy copied none of negative strides etc.)
    else:
        src = a
    if non_blocking and _registry.CACHE.covers_tensor(src):
        # (torch's copy from memory the registration cache page-locked would not wait:
        # its owner thinks it pageable, free to reuse once this returns)
        non_blocking = False
    if out is not None:
        if out.device.type == "cpu" and src.device.type == "cpu" and _tensors_overlap(out, src):
            raise ValueError("out shares memory with the source: pass a separate tensor.")
        out.copy_(src, non_blocking=non_blocking)
        return out

    if dev is None:
        return src if target is None or target == src.dtype else src.to(target)
    if dev.type == "cpu":
        src = src.to(device="cpu") if src.device.type != "cpu" else src
        return src if target is None or target == src.dtype else src.to(target)
    # Another device: move the narrow type, then cast there.
    moved = src.to(dev, non_blocking=non_blocking)
    return moved if target is None or target == moved.dtype else moved.to(target)


def _host_view_for_engine(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU tensor for the transfer engine, or None where torch's own
    ``.to()`` must do it (autograd history to keep, conj/neg bits, no NumPy dtype)."""
    if not t.is_cpu or t.requires_grad or t.is_conj() or t.is_neg():
        return None
    if _dtypes.numpy_dtype_or_none(t.dtype) is None:
        return None
    return _cpu_view(t)


def _check_out_tensor(
    out: Any,
    shape: tuple[int, ...],
    source_dtype: torch.dtype,
    target: torch.dtype | None,
    dev: torch.device | None,
) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"out must be a torch.Tensor, got {type(out).__name__}: allocate one "
            f"with torch.empty({tuple(shape)})."
        )
    if out.layout != torch.strided:
        raise TypeError("out must be a dense (strided) tensor.")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(
            f"out has shape {tuple(out.shape)} but the source has shape "
            f"{tuple(shape)}: allocate torch.empty({tuple(shape)})."
        )
    want = target if target is not None else source_dtype
    if out.dtype != want:
        raise TypeError(
            f"out has dtype {out.dtype} but the result has dtype {want}: pass "
            f"dtype={out.dtype} to cast, or an out of dtype {want}."
        )
    if dev is not None and (
        dev.type != out.device.type or dev.index not in (None, out.device.index)
    ):
        raise ValueError(
            f"out is on {out.device} but device={dev} was asked: drop device= "
            "or pass an out on that device."
        )
    if out.requires_grad:
        raise ValueError(
            "out requires grad, so it cannot be written in place: pass "
            "out.detach() or a tensor without requires_grad."
        )
    if out.device.type == "meta":
        raise TypeError("out is a meta tensor: it has no data to write.")
    if not out.is_contiguous():
        size = out.element_size()
        check_out_not_self_overlapping(
            tuple(out.shape),
            tuple(s * size for s in out.stride()),
            size,
            alloc=f"torch.empty({tuple(shape)}, dtype={out.dtype})",
        )
    if out.numel() and out.data_ptr() % out.element_size():
        raise ValueError(
            f"out starts at a byte offset that is not a multiple of its element size "
            f"({out.element_size()}), which torch's kernels may not handle: pass an "
            f"aligned tensor, e.g. torch.empty({tuple(shape)}, dtype={out.dtype})."
        )


def _tensors_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors share a byte: their spans first, then (where the spans
    meet: interleaved views of one buffer, say) their elements, as NumPy decides it."""
    a0, a1 = byte_span(a)
    b0, b1 = byte_span(b)
    if not (a0 < b1 and b0 < a1 and a0 != a1 and b0 != b1):
        return False
    try:
        return shares_memory(a.detach().numpy(), b.detach().numpy())
    except (RuntimeError, TypeError):  # (no NumPy view: a conj bit, complex32...)
        return True
