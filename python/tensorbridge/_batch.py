"""Nested batches in one call: to_device (packed host->device transfers) and to_numpy_batch."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar, overload

import numpy as np
import torch

from . import _backend, _cuda, _dtypes, _interop
from ._convert import (
    Device,
    _check_out_array,
    _check_tensor,
    from_numpy,
    to_numpy,
    to_tensor,
)
from ._copy import byte_span, shares_memory
from ._handle import Transfer
from ._tree import flatten, flatten_as, tree_map, unflatten

_ALIGN = 256  # device offsets of packed arrays: enough for any dtype and for vector loads

DTypeSpec = Any  # a floating dtype for the floating leaves, or a mapping (key or source dtype)


class DTypeRule(NamedTuple):
    """A checked ``dtype=`` argument of to_device / Prefetcher."""

    floating: torch.dtype | None  # a single dtype: the target of the floating-point leaves
    by_key: dict[Any, torch.dtype]  # a mapping: key name (or source dtype) -> target
    by_source: dict[torch.dtype, torch.dtype]  # its dtype keys, read as source dtypes


def dtype_rule(spec: DTypeSpec, fn: str) -> DTypeRule | None:
    """``spec`` checked once, before anything moves (a bad dtype refuses the whole call)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        target = _dtypes.as_torch_dtype(spec)
        if not target.is_floating_point:
            raise TypeError(
                f"{fn}: a single dtype= casts the floating-point leaves only (integer labels "
                f"and bool masks keep theirs), so it must be a floating dtype, got {target}: "
                "to cast other leaves pass a mapping by key or by source dtype, e.g. "
                "dtype={'labels': torch.int32} or dtype={torch.int64: torch.int32}."
            )
        return DTypeRule(target, {}, {})
    by_key = {k: _dtypes.as_torch_dtype(v) for k, v in spec.items()}
    by_source = {  # (other keys, an int say, are key names only)
        _dtypes.as_torch_dtype(k): v
        for k, v in by_key.items()
        if isinstance(k, (torch.dtype, np.dtype, type))
    }
    return DTypeRule(None, by_key, by_source)


def _target_dtype(rule: DTypeRule, key: Any, source: torch.dtype) -> torch.dtype | None:
    if rule.floating is not None:
        return rule.floating if source.is_floating_point else None
    if key in rule.by_key:
        return rule.by_key[key]
    return rule.by_source.get(source)


def _source_dtype(leaf: Any) -> torch.dtype:
    return leaf.dtype if isinstance(leaf, torch.Tensor) else _dtypes.torch_dtype(leaf.dtype)


# --------------------------------------------------------------------------- to_device


# The types say what the container becomes, not what it holds: an array or tensor becomes
# a tensor, a dict a dict with the same keys, a list a list, a tuple (namedtuples too) a
# tuple. The items' types change leaf by leaf (an array becomes a tensor, an int stays),
# which no static type can follow, so they are Any; a dataclass or any other batch is
# returned as Any too (a dataclass comes back as its own class, but with fields that no
# longer hold the types it declares).
#
# Each overload takes the batch as a type variable, not a plain type: for an argument that
# contains Any (every np.ndarray does: its shape is tuple[Any, ...]) mypy answers Any when
# the overloads it matches declare different parameter types. With type variables every
# matching overload infers the argument's own type, and the first match decides.
_ArrayT = TypeVar("_ArrayT", bound=torch.Tensor | np.ndarray)
_ListT = TypeVar("_ListT", bound=list[Any])
_TupleT = TypeVar("_TupleT", bound=tuple[Any, ...])
_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")


@overload
def to_device(
    batch: _ArrayT, device: Device, *, non_blocking: bool = ..., dtype: DTypeSpec = ...
) -> torch.Tensor: ...
@overload
def to_device(
    batch: dict[_K, _V], device: Device, *, non_blocking: bool = ..., dtype: DTypeSpec = ...
) -> dict[_K, Any]: ...
@overload
def to_device(
    batch: _ListT, device: Device, *, non_blocking: bool = ..., dtype: DTypeSpec = ...
) -> list[Any]: ...
@overload
def to_device(
    batch: _TupleT, device: Device, *, non_blocking: bool = ..., dtype: DTypeSpec = ...
) -> tuple[Any, ...]: ...
@overload
def to_device(
    batch: _T, device: Device, *, non_blocking: bool = ..., dtype: DTypeSpec = ...
) -> Any: ...
def to_device(
    batch: Any,
    device: Device,
    *,
    non_blocking: bool = True,
    dtype: DTypeSpec = None,
) -> Any:
    """Moves every array and tensor in a nested batch to ``device``; plain values stay.

    Dicts, lists, tuples, namedtuples and dataclasses come back as the same types. On a
    GPU with the compiled engine, all host arrays of the batch are packed into pinned
    staging blocks and cross in a few large copies (not one per array), then become views
    of one device buffer.

    ``dtype`` casts on the device, after the transfer. A single dtype (torch, NumPy or a
    string such as ``"float16"``) must be a floating one and casts the floating-point
    leaves only: integer labels, bool masks and complex leaves keep their dtype, as with
    ``t.to(dtype) if t.is_floating_point() else t`` per leaf. A mapping casts exactly the
    leaves it names, of any dtype: by key name (the nearest dict key or dataclass field,
    ``{"labels": torch.int32}``) or by source dtype (``{torch.int64: torch.int32}``); the
    key name wins where both match. A dtype that cannot be a target is refused before
    anything moves.

    Static types: an array or tensor gives a ``Tensor``, a dict a dict with the same key
    type, a list a list, a tuple a tuple; their items are ``Any`` (each leaf's type
    changes on its own), and so is any other batch: a dataclass comes back as its own
    class, but its fields no longer hold the types the class declares.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> b = tb.to_device({"x": np.zeros((2, 3), np.uint8), "id": 7}, "cpu",
        ...                  dtype={"x": "float32"})
        >>> b["x"].dtype, b["id"]
        (torch.float32, 7)
    """
    dev = _backend.resolve_device(device, "to_device")
    rule = dtype_rule(dtype, "to_device")
    if dev.type == "cpu" and rule is None:
        # Nothing to pack or cast: each array becomes a tensor sharing its memory.
        return tree_map(_to_cpu_leaf, batch)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    originals, keys, spec = flatten(batch)
    leaves = [_foreign_as_tensor(leaf) for leaf in originals]
    moved: dict[int, torch.Tensor] = {}
    host = [
        (i, leaf, keys[i])
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, np.ndarray)
        or (isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu")
    ]
    if dev.type == "cuda" and _backend.ENGINE.cuda_engine and len(host) > 1:
        moved.update(_pack_to_cuda(host, dev, non_blocking))

    def move(i: int, leaf: Any) -> Any:
        if not isinstance(leaf, (np.ndarray, torch.Tensor)):
            return leaf
        t = moved.get(i)
        if t is None:
            t = to_tensor(leaf, dev, non_blocking=non_blocking)
        if rule is None:
            return t
        target = _target_dtype(rule, keys[i], _source_dtype(leaf))
        return t if target is None or target == t.dtype else t.to(target)

    return unflatten(spec, [move(i, leaf) for i, leaf in enumerate(leaves)])


def _foreign_as_tensor(leaf: Any) -> Any:
    """Another framework's tensor as a torch tensor over the same memory, where it is;
    one torch cannot hold (a string tensor, a PRNG key) passes through like other values."""
    if not _interop.is_foreign_array(leaf):
        return leaf
    try:
        return to_tensor(leaf)
    except (TypeError, ValueError):
        return leaf


def _to_cpu_leaf(leaf: Any, key: Any) -> Any:
    if type(leaf) is np.ndarray:
        return from_numpy(leaf)
    if _interop.is_foreign_array(leaf):
        t = _foreign_as_tensor(leaf)
        return t.cpu() if isinstance(t, torch.Tensor) else t
    if isinstance(leaf, torch.Tensor):
        return leaf if leaf.is_cpu else leaf.cpu()
    if isinstance(leaf, np.ndarray):
        return from_numpy(leaf)
    return leaf


def _pack_dtype(np_dtype: np.dtype) -> tuple[torch.dtype, np.dtype | None, bool]:
    """(torch dtype, integer view for ml_dtypes storage or None, needs a byte swap)."""
    info = _PACK_DTYPES.get(np_dtype)
    if info is None:
        native = np_dtype.newbyteorder("=") if not np_dtype.isnative else np_dtype
        storage = (
            _dtypes.storage_dtypes(native.itemsize)[1] if _dtypes.is_ml_dtype(native) else None
        )
        info = (_dtypes.torch_dtype(native), storage, native is not np_dtype)
        _PACK_DTYPES[np_dtype] = info
    return info


_PACK_DTYPES: dict[np.dtype, tuple[torch.dtype, np.dtype | None, bool]] = {}


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


class _PackPlan(NamedTuple):
    arrays: list[np.ndarray]  # native byte order; ml_dtypes seen as same-size integers
    offsets: list[int]  # byte offset of each array in the buffer, non-decreasing
    nbytes: int  # buffer size, a multiple of 256
    runs: list[tuple[torch.dtype, tuple[int, ...], int, int, list[int]]]
    # (dtype, shape, first byte, padded bytes per array, leaf indices) per group


def pack_plan(host: Sequence[tuple[int, Any]]) -> _PackPlan:
    """Lays out host arrays (index, array or CPU tensor) in one buffer for a packed copy.

    Arrays of one dtype and shape sit next to each other, each padded to 256 bytes, so a
    group's views come from one ``as_strided(...).unbind(0)`` call (``packed_views``)
    instead of a slice and two views per array: with many small arrays, per-array Python
    work and not the copy is what a batch costs.
    """
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[tuple[int, np.ndarray]]] = {}
    for i, leaf in host:
        a = leaf if isinstance(leaf, np.ndarray) else to_numpy(leaf)
        t_dtype, storage, swap = _pack_dtype(a.dtype)
        if swap:
            a = a.astype(a.dtype.newbyteorder("="))
        if storage is not None:
            a = a.view(storage)
        groups.setdefault((t_dtype, a.shape), []).append((i, a))
    arrays: list[np.ndarray] = []
    offsets: list[int] = []
    runs = []
    end = 0
    for (t_dtype, shape), members in groups.items():
        padded = -(-members[0][1].nbytes // _ALIGN) * _ALIGN
        runs.append((t_dtype, shape, end, padded, [i for i, _ in members]))
        for _, a in members:
            arrays.append(a)
            offsets.append(end)
            end += padded
    return _PackPlan(arrays, offsets, max(end, _ALIGN), runs)


def packed_views(buffer: torch.Tensor, plan: _PackPlan) -> dict[int, torch.Tensor]:
    """The tensors of a packed buffer (uint8, ``plan.nbytes``), by leaf index."""
    out: dict[int, torch.Tensor] = {}
    typed: dict[torch.dtype, torch.Tensor] = {}
    for t_dtype, shape, first, padded, indices in plan.runs:
        flat = typed.get(t_dtype)
        if flat is None:
            flat = typed[t_dtype] = buffer.view(t_dtype)
        item = flat.element_size()
        views = torch.as_strided(
            flat,
            (len(indices), *shape),
            (padded // item, *_contiguous_strides(shape)),
            first // item,
        ).unbind(0)
        out.update(zip(indices, views, strict=True))
    return out


def _pack_to_cuda(
    host: list[tuple[int, Any, Any]], dev: torch.device, non_blocking: bool
) -> dict[int, torch.Tensor]:
    """Host arrays -> views of one device buffer, sent in a few packed copies."""
    plan = pack_plan([(i, leaf) for i, leaf, _ in host])
    buffer = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev)
    _backend.ENGINE.core.cuda_copy_many_to_device(
        dev.index,
        stream.cuda_stream,
        plan.arrays,
        plan.offsets,
        buffer.data_ptr(),
        _cuda._chunk_bytes(plan.nbytes),
        _cuda.transfer_options()["buffers"],
        not non_blocking,
    )
    return packed_views(buffer, plan)


# --------------------------------------------------------------------------- to_numpy_batch


# As for to_device: the container's kind is typed, its items are Any; with
# non_blocking=True the same type comes in a Transfer.
@overload
def to_numpy_batch(
    batch: _ArrayT, *, out: Any = ..., non_blocking: Literal[False] = ...
) -> np.ndarray: ...
@overload
def to_numpy_batch(
    batch: dict[_K, _V], *, out: Any = ..., non_blocking: Literal[False] = ...
) -> dict[_K, Any]: ...
@overload
def to_numpy_batch(
    batch: _ListT, *, out: Any = ..., non_blocking: Literal[False] = ...
) -> list[Any]: ...
@overload
def to_numpy_batch(
    batch: _TupleT, *, out: Any = ..., non_blocking: Literal[False] = ...
) -> tuple[Any, ...]: ...
@overload
def to_numpy_batch(batch: _T, *, out: Any = ..., non_blocking: Literal[False] = ...) -> Any: ...
@overload
def to_numpy_batch(
    batch: _ArrayT, *, out: Any = ..., non_blocking: Literal[True]
) -> Transfer[np.ndarray]: ...
@overload
def to_numpy_batch(
    batch: dict[_K, _V], *, out: Any = ..., non_blocking: Literal[True]
) -> Transfer[dict[_K, Any]]: ...
@overload
def to_numpy_batch(
    batch: _ListT, *, out: Any = ..., non_blocking: Literal[True]
) -> Transfer[list[Any]]: ...
@overload
def to_numpy_batch(
    batch: _TupleT, *, out: Any = ..., non_blocking: Literal[True]
) -> Transfer[tuple[Any, ...]]: ...
@overload
def to_numpy_batch(batch: _T, *, out: Any = ..., non_blocking: Literal[True]) -> Transfer[Any]: ...
@overload
def to_numpy_batch(batch: _T, *, out: Any = ..., non_blocking: bool) -> Any: ...
def to_numpy_batch(batch: Any, *, out: Any = None, non_blocking: bool = False) -> Any:
    """The reverse of :func:`to_device`: every tensor in a nested batch to a NumPy array.

    ``out``, when given, is a structure of the same shape holding a preallocated array
    for each tensor (or None where a new array is wanted). Plain values pass through.
    Several GPU tensors come back in one pass (one device-side concatenation, one
    transfer). With ``non_blocking=True`` the result is a :class:`Transfer` whose
    ``wait()`` returns the converted batch.

    Static types as for :func:`to_device`, with ``ndarray`` for a tensor, wrapped in a
    ``Transfer`` for ``non_blocking=True`` (``Any`` for a ``bool`` only known at run time).

    Example:
        >>> import torch, tensorbridge as tb
        >>> tb.to_numpy_batch({"a": torch.ones(2), "n": 3})
        {'a': array([1., 1.], dtype=float32), 'n': 3}
    """
    originals, _, spec = flatten(batch)
    outs = flatten_as(out, spec) if out is not None else [None] * len(originals)
    # Every leaf is imported and every `out` checked before anything is written, so a
    # refusal leaves the caller's arrays as they were.
    leaves = [
        _interop.import_array(leaf, "to_numpy_batch", numpy_first=True)
        if _interop.is_foreign_array(leaf)
        else leaf
        for leaf in originals
    ]
    for leaf in leaves:  # every leaf refused now, before any out is written
        if isinstance(leaf, torch.Tensor):
            _dtypes.numpy_dtype(_check_tensor(leaf, "to_numpy_batch").dtype)
    for leaf, o in zip(leaves, outs, strict=True):
        if o is not None and isinstance(leaf, (torch.Tensor, np.ndarray)):
            np_dtype = (
                leaf.dtype if isinstance(leaf, np.ndarray) else _dtypes.numpy_dtype(leaf.dtype)
            )
            _check_out_array(o, tuple(leaf.shape), np_dtype)
    _check_outs_alias_nothing(leaves, outs)
    done: dict[int, Any] = {}
    if not non_blocking:
        done.update(_cuda_in_one_pass(leaves, outs))

    def convert(i: int, leaf: Any) -> Any:
        if i in done:
            return done[i]
        if not isinstance(leaf, (torch.Tensor, np.ndarray)):
            return leaf
        return to_numpy(leaf, out=outs[i], non_blocking=non_blocking)

    converted = [convert(i, leaf) for i, leaf in enumerate(leaves)]
    if not non_blocking:
        return unflatten(spec, converted)
    handles = [leaf for leaf in converted if isinstance(leaf, Transfer)]

    def unwrap() -> Any:
        return unflatten(spec, [v.wait() if isinstance(v, Transfer) else v for v in converted])

    return Transfer.gather(handles, unwrap)


def _host_span(leaf: Any) -> tuple[int, int] | None:
    """[lo, hi) of the host memory a leaf's elements touch, or None (device data, values)."""
    if isinstance(leaf, np.ndarray):
        if not leaf.size:
            return None
        return byte_span(leaf)
    if isinstance(leaf, torch.Tensor) and leaf.is_cpu and leaf.layout == torch.strided:
        if leaf.is_nested or leaf.is_quantized or not leaf.numel():
            return None
        return byte_span(leaf)
    return None


def _host_view(leaf: Any) -> np.ndarray:
    """A uint8 NumPy view over exactly the bytes of a host leaf (for exact overlap checks)."""
    if isinstance(leaf, np.ndarray):
        return leaf
    n = leaf.element_size()
    base = np.ctypeslib.as_array((ctypes.c_uint8 * 1).from_address(leaf.data_ptr()))
    return np.lib.stride_tricks.as_strided(
        base, (*leaf.shape, n), (*(s * n for s in leaf.stride()), 1)
    )


def _check_outs_alias_nothing(leaves: list[Any], outs: list[Any]) -> None:
    """Every ``out`` must be separate from every host leaf and from every other ``out``:
    otherwise writing one would change what a later conversion reads or writes. Checked
    for the whole batch before anything is written: one sort by address, then exact
    checks only where two byte ranges meet."""
    spans = []  # (lo, hi, is_out, leaf index, object)
    for i, o in enumerate(outs):
        if o is None:
            continue
        span = _host_span(o)
        if span is not None:
            spans.append((*span, True, i, o))
    for j, leaf in enumerate(leaves):
        span = _host_span(leaf)
        if span is not None:
            spans.append((*span, False, j, leaf))
    if not any(is_out for _, _, is_out, _, _ in spans):
        return
    spans.sort(key=lambda s: s[0])
    for n, (_, hi, is_out, i, obj) in enumerate(spans):
        for lo2, _, is_out2, j, obj2 in spans[n + 1 :]:
            if lo2 >= hi:
                break
            if not (is_out or is_out2) or not shares_memory(_host_view(obj), _host_view(obj2)):
                continue
            if not is_out:  # name the out first
                is_out, is_out2, i, j = is_out2, is_out, j, i
            if is_out2:
                problem = f"the outs of leaves {min(i, j)} and {max(i, j)} share memory"
            elif i == j:
                problem = f"the out of leaf {i} shares memory with that leaf"
            else:
                problem = (
                    f"the out of leaf {i} shares memory with leaf {j}, which would be "
                    "overwritten before it is read"
                )
            raise ValueError(
                f"to_numpy_batch: {problem}: pass a separate array for each out (or None "
                "where a new array is wanted). Nothing was written."
            )


def _cuda_in_one_pass(leaves: list[Any], outs: list[Any]) -> dict[int, np.ndarray]:
    """GPU tensors of one device: concatenated as bytes on the device, one transfer back."""
    idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_cuda]
    if len(idx) < 2 or len({leaves[i].device for i in idx}) != 1:
        return {}
    if not _backend.ENGINE.cuda_engine:
        return {}
    tensors = [leaves[i].detach().resolve_conj().resolve_neg() for i in idx]
    np_dtypes = [_dtypes.numpy_dtype(t.dtype) for t in tensors]  # refuses what it must
    flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    host = to_numpy(flat)
    result, offset = {}, 0
    for i, t, np_dtype in zip(idx, tensors, np_dtypes, strict=True):
        n = t.numel() * t.element_size()
        piece = host[offset : offset + n].view(np_dtype).reshape(tuple(t.shape))
        offset += n
        result[i] = piece if outs[i] is None else to_numpy(piece, out=outs[i])
    return result
