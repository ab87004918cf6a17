"""Nested batches in one call: to_device (packed host->device transfers) and to_numpy_batch."""

from __future__ import annotations

import ctypes
import functools
import heapq
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar, overload

import numpy as np
import torch

from . import _backend, _cuda, _dtypes, _interop, _pack, _registry
from ._convert import (
    Device,
    _check_out_array,
    _check_storage,
    _check_tensor,
    from_numpy,
    to_numpy,
    to_tensor,
)
from ._copy import byte_span, shares_memory
from ._handle import Transfer
from ._tree import Spec, flatten, flatten_as, key_repr, leaf_path, tree_map, unflatten

if TYPE_CHECKING:
    from ._packed import PackedBatch

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
        target = _named(_dtypes.as_torch_dtype, spec, fn)
        if not target.is_floating_point:
            raise TypeError(
                f"{fn}: a single dtype= casts the floating-point leaves only (integer labels "
                f"and bool masks keep theirs), so it must be a floating dtype, got {target}: "
                "to cast other leaves pass a mapping by key or by source dtype, e.g. "
                "dtype={'labels': torch.int32} or dtype={torch.int64: torch.int32}."
            )
        return DTypeRule(target, {}, {})
    by_key = {k: _named(_dtypes.as_torch_dtype, v, fn) for k, v in spec.items()}
    by_source = {  # (other keys, an int say, are key names only)
        _named(_cast_source, k, fn): v
        for k, v in by_key.items()
        if isinstance(k, (torch.dtype, np.dtype, type))
    }
    return DTypeRule(None, by_key, by_source)


def _cast_source(key: Any) -> torch.dtype:
    """A dtype= mapping's dtype key: a source dtype that torch can cast from."""
    if isinstance(key, torch.dtype):
        try:
            return _dtypes.as_torch_dtype(key)
        except TypeError:
            raise TypeError(
                f"dtype= has the key {key}, a source dtype torch cannot cast from "
                "(quantized, bit-packed and sub-byte dtypes): leave it out of the mapping; "
                "such leaves move as they are."
            ) from None
    return _dtypes.as_torch_dtype(key)


def _named(check: Any, value: Any, fn: str) -> torch.dtype:
    """check(value), its refusal prefixed with the public function's name."""
    try:
        return check(value)
    except TypeError as exc:
        raise TypeError(f"{fn}: {exc}") from None


def check_names(rule: DTypeRule, present: set[Any], fn: str) -> None:
    """Refuses a mapping that names a key no array of the batch has (a typo would
    otherwise cast nothing, silently); dtype keys are rules for any batch and pass."""
    missing = [
        k
        for k in rule.by_key
        if not isinstance(k, (torch.dtype, np.dtype, type)) and k not in present
    ]
    if missing:
        have = sorted((key_repr(k) for k in present if k is not None), key=str)
        dtypes = [k for k in missing if isinstance(k, str) and _dtype_name(k)]
        also = (
            f"; to name a source dtype use a dtype object, not a string: "
            f"{{{_dtype_name(dtypes[0])}: ...}}"
            if dtypes
            else ""
        )
        raise ValueError(
            f"{fn}: dtype= names {', '.join(map(key_repr, missing))}, which no array or tensor of "
            f"the batch has (their keys: {', '.join(have) or 'none'}): fix the name, or "
            f"drop it from the mapping{also}."
        )


def _dtype_name(text: str) -> str | None:
    """``"torch.int64"`` for a string that is a dtype's own name (``"int64"``), else None
    (a one-letter code such as ``"f"`` is more likely a key)."""
    try:
        with warnings.catch_warnings():  # (NumPy warns of some codes, e.g. "a")
            warnings.simplefilter("ignore")
            dtype = _dtypes.as_torch_dtype(text)
    except (TypeError, ValueError):
        return None
    name = str(dtype)
    return name if name.removeprefix("torch.") == text else None


def _target_dtype(rule: DTypeRule, key: Any, source: torch.dtype) -> torch.dtype | None:
    if rule.floating is not None:
        return rule.floating if source.is_floating_point else None
    if key in rule.by_key:
        return rule.by_key[key]
    return rule.by_source.get(source)


def _source_dtype(leaf: Any) -> torch.dtype:
    return leaf.dtype if isinstance(leaf, torch.Tensor) else _dtypes.torch_dtype(leaf.dtype)


def leaf_refusal(exc: TypeError | ValueError, fn: str, path: str | None) -> TypeError | ValueError:
    """A leaf's refusal in the name of the batch function ``fn``, with where the leaf sits
    in the batch (:func:`~tensorbridge._tree.leaf_path`; None for a batch that is the
    leaf): ``to_tensor cannot convert a meta tensor...`` becomes ``to_device: batch["a"][1]
    cannot convert a meta tensor...``. Other exception types are returned as they are."""
    if type(exc) not in (TypeError, ValueError):
        return exc
    where = fn if path is None else f"{fn}: {path}"
    message = str(exc)
    for name in (fn, "to_tensor", "to_numpy", "from_numpy"):
        if message.startswith((f"{name} ", f"{name}:")):
            return type(exc)(where + message[len(name) :])
    return type(exc)(f"{where}: {message}")


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
    of one device buffer. A contiguous CPU tensor of 1 MiB or more that is page-locked
    already (from :func:`collate` in the main process, or the DataLoader's pin-memory
    thread) crosses on its own in one DMA instead, with no host copy; as with
    ``Tensor.to(non_blocking=True)``, do not write into it before the current stream has
    read it. (Memory the registration cache page-locked is packed as before: its owner
    thinks it pageable.) A :class:`PackedBatch` (the batch itself, or one inside it)
    moves with its ``.to()``: one copy of its buffer.

    ``dtype`` casts on the device, after the transfer. A single dtype (torch, NumPy or a
    string such as ``"float16"``) must be a floating one and casts the floating-point
    leaves only: integer labels, bool masks and complex leaves keep their dtype, as with
    ``t.to(dtype) if t.is_floating_point() else t`` per leaf. A mapping casts exactly the
    leaves it names, of any dtype: by key name (the nearest dict key or dataclass field,
    ``{"labels": torch.int32}``) or by source dtype (``{torch.int64: torch.int32}``); the
    key name wins where both match. A dtype that cannot be a target, or a key name that
    no array of the batch has (a typo would cast nothing), is refused before anything
    moves.

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
    return moved(batch, device, non_blocking, dtype, "to_device")


def moved(batch: Any, device: Device, non_blocking: bool, dtype: DTypeSpec, fn: str) -> Any:
    """:func:`to_device`, its refusals naming ``fn``, the public function the batch was
    given to (``Prefetcher`` moves its batches here)."""
    dev = _backend.resolve_device(device, fn)
    rule = dtype_rule(dtype, fn)
    non_blocking = _backend.bool_arg(non_blocking, f"{fn}: non_blocking")
    if isinstance(batch, _packed_batch()):
        if rule is not None and rule.by_key:
            check_names(rule, batch.keys(), fn)  # (in the name of the call the user made)
        return batch._to(dev, rule, non_blocking, False, checked=True)
    if dev.type == "cpu" and rule is None:
        # Nothing to pack or cast: each array becomes a tensor sharing its memory.
        try:
            return tree_map(functools.partial(_to_cpu_leaf, fn=fn), batch, fn)
        except _Refused as refused:
            raise refused.named(batch, fn) from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda" and _backend.ENGINE.cuda_engine
    sender = _CudaSender(dev, non_blocking) if cuda else None
    return send_batch(batch, dev, sender, rule, non_blocking, fn)


class Sender(Protocol):
    """Where a packed batch goes: the CUDA engine, or (in tests and benchmarks) the host
    engine standing in for it on a machine without a GPU."""

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialized uint8 buffer of ``nbytes`` where the batch goes."""
        ...

    def send(self, plan: _pack.Layout, buffer: torch.Tensor) -> None:
        """Copies the packed arrays of ``plan`` into ``buffer``."""
        ...

    def direct(self, leaf: torch.Tensor) -> bool:
        """The CPU tensor crosses on its own, in one DMA from its page-locked memory,
        instead of being copied into the batch's buffer (``Routing.batch_leaf_direct``)."""
        ...


class _CudaSender:
    def __init__(self, dev: torch.device, non_blocking: bool) -> None:
        self.dev = dev
        self.wait = not non_blocking

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.dev)

    def send(self, plan: _pack.Layout, buffer: torch.Tensor) -> None:
        _backend.ENGINE.core.cuda_copy_packed(
            self.dev.index,
            torch.cuda.current_stream(self.dev).cuda_stream,
            plan.native,
            buffer.data_ptr(),
            _cuda._chunk_bytes(plan.nbytes),
            _cuda.transfer_options()["buffers"],
            self.wait,
        )

    def direct(self, leaf: torch.Tensor) -> bool:
        return _cuda.ROUTING.batch_leaf_direct(leaf, _pinned_by_its_owner)


def _pinned_by_its_owner(t: torch.Tensor) -> bool:
    """Page-locked memory its owner allocated or pinned as such (torch's pinned tensors,
    ``tb.pin``): not memory the registration cache page-locked behind a pageable array's
    back, which must be free to reuse once the call returns (it is packed instead)."""
    return t.is_pinned() and not _registry.CACHE.covers_tensor(t)


class LinkSender:
    """Sends packed batches over a simulated link (``_C.LinkSimulator``): the CUDA batch
    path with host memory standing in for the device, for tests and benchmarks on a
    machine without a GPU. The buffer is a CPU tensor; every send waits. ``pinned`` says
    which CPU tensors stand for page-locked ones (none by default: a CPU build of torch
    has none)."""

    def __init__(
        self,
        link: Any,
        chunk_bytes: int = 0,
        buffers: int = 0,
        pinned: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        self.link = link
        self.chunk_bytes = chunk_bytes
        self.buffers = buffers
        self.pinned = pinned
        self.last_report: dict[str, Any] = {}

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def send(self, plan: _pack.Layout, buffer: torch.Tensor) -> None:
        chunk = self.chunk_bytes or _cuda._chunk_bytes(plan.nbytes)
        buffers = self.buffers or _cuda.transfer_options()["buffers"]
        self.last_report = self.link.to_device_packed(plan.native, buffer.numpy(), chunk, buffers)

    def direct(self, leaf: torch.Tensor) -> bool:
        return self.pinned is not None and _cuda.ROUTING.batch_leaf_direct(leaf, self.pinned)


# Leaves that are surely not another framework's array (checked by exact type first).
_PLAIN = frozenset({np.ndarray, torch.Tensor, int, float, str, bool, type(None)})


def send_batch(
    batch: Any,
    dev: torch.device,
    sender: Sender | None,
    rule: DTypeRule | None,
    non_blocking: bool,
    fn: str = "to_device",
) -> Any:
    """to_device after the arguments are checked: with a ``sender`` (and the compiled
    core), the host arrays of the batch cross packed in one buffer; other leaves move
    one by one. Refusals name ``fn``."""
    originals, keys, spec = flatten(batch, fn)
    types = set(map(type, originals))  # (per-leaf work in C: a batch has thousands)
    if _PLAIN.issuperset(types):
        leaves = originals
    else:
        leaves = [leaf if type(leaf) in _PLAIN else _foreign_as_tensor(leaf) for leaf in originals]
    out: list[Any] = list(leaves)
    packed: list[int] = []  # leaf positions of the arrays that cross packed
    arrays: list[np.ndarray] = []
    alone: list[int] = []  # positions of the arrays and tensors that move on their own
    nested: list[int] = []  # positions of PackedBatches inside the batch (one copy each)
    pack = sender is not None and _backend.ENGINE.C is not None
    packed_batch = _packed_batch()
    all_packed = pack and len(leaves) > 1 and types == {np.ndarray}  # (most batches)
    for i, leaf in enumerate(() if all_packed else leaves):  # (one exact type test each)
        if type(leaf) is np.ndarray and pack:
            packed.append(i)
            arrays.append(leaf)
        elif isinstance(leaf, (np.ndarray, torch.Tensor)):
            if pack and sender is not None and type(leaf) is torch.Tensor and sender.direct(leaf):
                alone.append(i)  # (page-locked already: one DMA from where it is)
                continue
            try:
                a = _packable(leaf, fn) if pack else None
            except (TypeError, ValueError) as exc:  # (a freed or shrunk storage)
                raise leaf_refusal(exc, fn, leaf_path(spec, i)) from None
            if a is None:
                alone.append(i)
            else:
                packed.append(i)
                arrays.append(a)
        elif isinstance(leaf, packed_batch):
            nested.append(i)
    if len(arrays) == 1:
        alone.append(packed.pop())
    positions: Sequence[int] = packed
    if all_packed:
        positions, arrays = range(len(leaves)), leaves
    if rule is not None and rule.by_key:  # (before anything moves)
        present = {keys[i] for i in (*positions, *alone)}
        present.update(*(leaves[i].keys() for i in nested))
        check_names(rule, present, fn)
    for i in nested:
        out[i] = leaves[i]._to(dev, rule, non_blocking, False, checked=True)
    if positions:
        assert sender is not None
        try:
            plan = _pack.layout(arrays, fn)  # every array checked before anything moves
        except (TypeError, ValueError) as exc:
            raise _packed_refusal(exc, arrays, positions, spec, fn) from None
        buffer = sender.empty(plan.nbytes)
        sender.send(plan, buffer)
        _pack.views_into(buffer, plan, out, positions, private=True)
    for i in alone:
        try:
            out[i] = to_tensor(leaves[i], dev, non_blocking=non_blocking)
        except (TypeError, ValueError) as exc:
            raise leaf_refusal(exc, fn, leaf_path(spec, i)) from None
    if rule is not None:
        for i in (*positions, *alone):
            target = _target_dtype(rule, keys[i], _source_dtype(leaves[i]))
            if target is not None and target != out[i].dtype:
                out[i] = out[i].to(target)
    return unflatten(spec, out)


def _packed_refusal(
    exc: TypeError | ValueError,
    arrays: Sequence[np.ndarray],
    positions: Sequence[int],
    spec: Spec,
    fn: str,
) -> TypeError | ValueError:
    """The layout's refusal of a batch's arrays (``positions``: their leaf indices), naming
    the first array refused alone (the refusal as it is where none is)."""
    for a, i in zip(arrays, positions, strict=True):
        try:
            _pack.layout([a], fn)
        except (TypeError, ValueError) as alone:
            return leaf_refusal(alone, fn, leaf_path(spec, i))
    return exc


def _packable(leaf: np.ndarray | torch.Tensor, fn: str) -> np.ndarray | None:
    """The host array a leaf packs as, or None where it moves on its own (a device tensor,
    a tensor that autograd tracks or that NumPy cannot view, an ndarray subclass)."""
    if type(leaf) is np.ndarray:
        return leaf
    if (
        type(leaf) is torch.Tensor
        and leaf.device.type == "cpu"
        and leaf.layout == torch.strided
        and not leaf.requires_grad
        and not leaf.is_quantized
        and not leaf.is_nested
        and _dtypes.numpy_dtype_or_none(leaf.dtype) is not None
    ):
        _check_storage(leaf, fn)  # (the packer copies the view: it must be whole)
        return to_numpy(leaf)
    return None


_PACKED_BATCH: list[type[PackedBatch]] = []


def _packed_batch() -> type[PackedBatch]:
    """The PackedBatch class (imported on first use: its module builds on this one)."""
    if not _PACKED_BATCH:
        from ._packed import PackedBatch

        _PACKED_BATCH.append(PackedBatch)
    return _PACKED_BATCH[0]


def _foreign_as_tensor(leaf: Any) -> Any:
    """Another framework's tensor as a torch tensor over the same memory, where it is;
    one torch cannot hold (a string tensor, a PRNG key) passes through like other values."""
    if not _interop.is_foreign_array(leaf):
        return leaf
    try:
        return to_tensor(leaf)
    except (TypeError, ValueError):
        return leaf


def _to_cpu_leaf(leaf: Any, key: Any, fn: str) -> Any:
    try:
        if type(leaf) is np.ndarray:
            return from_numpy(leaf)
        if isinstance(leaf, _packed_batch()):
            return leaf.to("cpu")
        if _interop.is_foreign_array(leaf):
            t = _foreign_as_tensor(leaf)
            return t.cpu() if isinstance(t, torch.Tensor) else t
        if isinstance(leaf, torch.Tensor):
            if leaf.is_cpu:
                return leaf
            if leaf.is_meta:  # (its .cpu() fails with torch's NotImplementedError)
                _check_tensor(leaf, fn)
            return leaf.cpu()
        if isinstance(leaf, np.ndarray):
            return from_numpy(leaf)
        return leaf
    except (TypeError, ValueError) as exc:
        raise _Refused(exc, leaf) from None


class _Refused(Exception):
    """A leaf's refusal inside a :func:`tree_map` (which knows the leaf's key, not its
    place), carried out to where the batch is known, to name the place."""

    def __init__(self, exc: TypeError | ValueError, leaf: Any) -> None:
        super().__init__(exc)
        self.exc, self.leaf = exc, leaf

    def named(self, batch: Any, fn: str) -> TypeError | ValueError:
        """The refusal in ``fn``'s name, saying where in ``batch`` the leaf sits."""
        leaves, _, spec = flatten(batch, fn)
        i = next((j for j, leaf in enumerate(leaves) if leaf is self.leaf), None)
        return leaf_refusal(self.exc, fn, None if i is None else leaf_path(spec, i))


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
    non_blocking = _backend.bool_arg(non_blocking, "to_numpy_batch: non_blocking")
    if out is None and not non_blocking:
        try:
            return tree_map(_host_leaf, batch, "to_numpy_batch")
        except _NotOnHost:
            pass
        except _Refused as refused:
            raise refused.named(batch, "to_numpy_batch") from None
    originals, _, spec = flatten(batch, "to_numpy_batch")
    nested = _packed_batch()
    if any(isinstance(leaf, nested) for leaf in originals):  # their tensors, over the buffer
        batch = unflatten(spec, [x.unpack() if isinstance(x, nested) else x for x in originals])
        originals, _, spec = flatten(batch, "to_numpy_batch")
    paths: list[str] = []  # (each out's, for messages)
    outs = [None] * len(originals)
    if out is not None:
        try:
            outs = flatten_as(out, spec, paths=paths)
        except ValueError as exc:
            raise ValueError(f"to_numpy_batch: {exc}") from None
    # Every leaf is imported and every `out` checked before anything is written, so a
    # refusal leaves the caller's arrays as they were.
    leaves = [
        leaf
        if type(leaf) in _PLAIN or not _interop.is_foreign_array(leaf)
        else _imported(leaf, spec, i)
        for i, leaf in enumerate(originals)
    ]
    for i, leaf in enumerate(leaves):  # every refusal before any out is written
        if isinstance(leaf, torch.Tensor):
            try:
                _check_dtype(_check_tensor(leaf, "to_numpy_batch"))
            except (TypeError, ValueError) as exc:
                raise leaf_refusal(exc, "to_numpy_batch", leaf_path(spec, i)) from None
    if any(o is not None for o in outs):
        for leaf, o, where in zip(leaves, outs, paths, strict=True):
            if o is None:
                continue
            if not isinstance(leaf, (torch.Tensor, np.ndarray)):
                raise TypeError(
                    f"to_numpy_batch: {where} must be None: the batch holds "
                    f"{type(leaf).__name__} there, which is returned as it is (only tensors "
                    "and arrays take an out)."
                )
            np_dtype = (
                leaf.dtype if isinstance(leaf, np.ndarray) else _dtypes.numpy_dtype(leaf.dtype)
            )
            try:
                _check_out_array(o, tuple(leaf.shape), np_dtype, where, converts=False)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"to_numpy_batch: {exc}") from None
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


def _imported(leaf: Any, spec: Spec, i: int) -> torch.Tensor | np.ndarray:
    """Another framework's array, leaf ``i`` of a to_numpy_batch batch; a refusal names
    where it sits."""
    try:
        return _interop.import_array(leaf, "to_numpy_batch", numpy_first=True)
    except (TypeError, ValueError) as exc:
        raise leaf_refusal(exc, "to_numpy_batch", leaf_path(spec, i)) from None


def _check_dtype(leaf: torch.Tensor) -> None:
    """A tensor no NumPy dtype holds, refused with a fix to_numpy_batch takes (it has no
    ``dtype=`` to convert with: the tensor is converted first)."""
    try:
        _dtypes.numpy_dtype(leaf.dtype)
    except TypeError as exc:
        fix = re.sub(
            r"pass dtype=numpy\.(\w+) to convert",
            r"convert the tensor first, e.g. x.to(torch.\1)",
            str(exc),
        )
        raise TypeError(f"to_numpy_batch: {fix}") from None


class _NotOnHost(Exception):
    """A leaf that needs to_numpy_batch's whole path (see _host_leaf)."""


def _host_leaf(leaf: Any, key: Any) -> Any:
    """A leaf of a batch whose tensors are all on the CPU, converted on its own (without
    ``out`` there is nothing to gather or check for overlaps, and a refusal leaves
    nothing of the caller's written); _NotOnHost for a GPU tensor, another framework's
    array or a PackedBatch."""
    cls = type(leaf)
    if cls is torch.Tensor:
        if not leaf.is_cpu:
            raise _NotOnHost
        if leaf.dtype in _dtypes.NATIVE:  # (what to_numpy's fast path does, one call less)
            try:
                if leaf.data_ptr():  # (0: no elements, or a freed storage: to_numpy's)
                    return leaf.numpy(force=True)
            except (RuntimeError, TypeError):
                pass  # e.g. a sparse layout: to_numpy explains the refusal
        try:
            return to_numpy(leaf)
        except (TypeError, ValueError) as exc:  # (the refusal, in this function's name)
            refusal: TypeError | ValueError = exc
            try:
                _check_dtype(_check_tensor(leaf, "to_numpy_batch"))
            except (TypeError, ValueError) as named:
                refusal = named
            raise _Refused(refusal, leaf) from None
    if cls is np.ndarray:
        return to_numpy(leaf)
    if cls in _PLAIN:  # (numbers, strings, None)
        return leaf
    if isinstance(leaf, (np.ndarray, torch.Tensor, _packed_batch())):
        raise _NotOnHost  # (subclasses)
    if _interop.is_foreign_array(leaf):
        raise _NotOnHost
    return leaf


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
    checks only where two byte ranges meet (a sweep: each span is checked against the
    open spans it meets, so a batch of separate arrays costs n log n)."""
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
    # The spans begun so far that have not ended, by where they end: outs, other leaves.
    open_outs: list[tuple[int, int]] = []  # (hi, index into spans)
    open_leaves: list[tuple[int, int]] = []
    for n, (lo, hi, is_out, j, obj) in enumerate(spans):
        for heap in (open_outs, open_leaves):
            while heap and heap[0][0] <= lo:
                heapq.heappop(heap)
        met = open_outs + open_leaves if is_out else open_outs  # (two leaves may overlap)
        for _, m in met:
            _, _, is_out2, i, obj2 = spans[m]
            if not shares_memory(_host_view(obj2), _host_view(obj)):
                continue
            first_out, second_out = is_out2, is_out
            if not first_out:  # name the out first
                first_out, second_out, i, j = second_out, first_out, j, i
            if second_out:
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
        heapq.heappush(open_outs if is_out else open_leaves, (hi, n))


def _cuda_in_one_pass(leaves: list[Any], outs: list[Any]) -> dict[int, np.ndarray]:
    """GPU tensors of one device: gathered on the device, one transfer back."""
    idx = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_cuda]
    if len(idx) < 2 or len({leaves[i].device for i in idx}) != 1:
        return {}
    if not _backend.ENGINE.cuda_engine:
        return {}
    return in_one_pass(leaves, outs, idx, to_numpy)


def in_one_pass(
    leaves: list[Any],
    outs: list[Any],
    idx: list[int],
    to_host: Any,
) -> dict[int, np.ndarray]:
    """The tensors ``leaves[i]`` for i in ``idx`` (one device) as NumPy arrays, by index,
    through one transfer: grouped by dtype and shape, each group stacked into one tensor
    (one kernel), the groups' bytes concatenated, ``to_host(flat)`` (a uint8 tensor ->
    ndarray) once, and each group's arrays taken from one view of the host bytes. Where
    ``outs[i]`` is given, the array is copied there."""
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[int]] = {}
    for i in idx:
        t = leaves[i]
        groups.setdefault((t.dtype, tuple(t.shape)), []).append(i)
    np_dtypes = {dt: _dtypes.numpy_dtype(dt) for dt, _ in groups}  # refuses what it must
    # Widest elements first: every itemsize is a power of two and every group's bytes a
    # multiple of its own, so each group then starts aligned for its dtype (a bool group
    # of 3 bytes ahead of an int64 one would hand out int64 arrays at an odd address).
    groups = dict(sorted(groups.items(), key=lambda g: -g[0][0].itemsize))
    with torch.no_grad():
        stacked = []
        for members in groups.values():
            g = torch.stack([leaves[i] for i in members])
            stacked.append(g.resolve_conj().resolve_neg().reshape(-1).view(torch.uint8))
        host = to_host(torch.cat(stacked) if len(stacked) > 1 else stacked[0])
    result: dict[int, np.ndarray] = {}
    offset = 0
    for ((t_dtype, shape), members), flat in zip(groups.items(), stacked, strict=True):
        n = flat.numel()
        arrays = host[offset : offset + n].view(np_dtypes[t_dtype]).reshape(len(members), *shape)
        offset += n
        for i, a in zip(members, arrays, strict=True):
            result[i] = a if outs[i] is None else to_numpy(a, out=outs[i])
    return result
