"""PackedBatch: a batch's arrays in one host buffer, plus the structure around them.

A packed batch crosses to a device in one copy of one buffer, and it speaks the protocol
that loaders and trainers already use for tensors: the DataLoader's pin-memory thread
calls ``.pin_memory()``, accelerate's ``send_to_device`` calls ``.to(device,
non_blocking=...)`` and Lightning's ``move_data_to_device`` ``.to(device)`` (it passes
``non_blocking`` to tensors only) on anything that has a ``.to``, and ``.to()`` hands back
the batch in its own structure, on the device, with no glue code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from . import _backend, _dtypes, _interop, _pack
from ._batch import (
    DTypeRule,
    DTypeSpec,
    _source_dtype,
    _target_dtype,
    check_names,
    dtype_rule,
    leaf_refusal,
)
from ._convert import Device, _check_tensor, to_numpy
from ._copy import copy_into
from ._tree import Spec, flatten, hollow, leaf_path, unflatten


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def new_host_buffer(nbytes: int, pin: bool | None = None) -> torch.Tensor:
    """An uninitialized uint8 host buffer for a batch: in shared memory in a DataLoader
    worker (so sending it to the main process moves a handle, not the bytes), page-locked
    in the main process of a GPU machine (``pin=None``), else ordinary memory."""
    if _in_worker():
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(-1)[:nbytes]
    if pin is None:
        pin = _backend.ENGINE.pinned_memory
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=bool(pin))


class PackedBatch:
    """A nested batch whose arrays share one host buffer, ready to cross in one copy.

    Make one with :meth:`pack` or ``tb.collate(samples, packed=True)``. The arrays and
    tensors of the batch (dicts, lists, tuples, namedtuples and dataclasses of them, as
    :func:`tensorbridge.to_device` takes) are copied into one uint8 buffer, grouped by
    dtype and shape, each at a 16-byte boundary at least (three or more small arrays of
    one dtype and of every length share a group, one after the other; larger ones are
    each on 256 bytes); numbers, strings and other values stay in the structure as they
    are.

    - ``.to(device=None, dtype=None, non_blocking=False, copy=False)`` returns the batch in its own
      structure with every array a tensor on ``device``: the whole buffer crosses in one
      copy (asynchronous from pinned memory with ``non_blocking=True``), and the tensors
      are views of it (a view and a split or ``unbind`` per group of arrays). On the host
      they are views of this batch's own buffer, unless ``copy=True``. ``dtype`` is
      :func:`tensorbridge.to_device`'s. Lightning, accelerate and anything else that
      calls ``.to()`` on a batch move it this way.
    - ``.pin_memory()`` returns a packed batch in page-locked memory (itself when it
      already is, or when no GPU is usable): the DataLoader's pin-memory thread calls it.
    - ``.unpack()`` returns the batch with tensors over the host buffer (no copy).
    - Pickling keeps the buffer one tensor: across DataLoader worker processes it travels
      as a shared-memory handle (packed in a worker, the buffer is made in shared memory),
      so the bytes are copied once, into the buffer.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> p = tb.PackedBatch.pack({"x": np.ones((2, 3), np.float32), "y": np.arange(2), "id": 7})
        >>> p
        PackedBatch(2 arrays in 2 groups, 512 bytes, unpinned)
        >>> b = p.to("cpu")
        >>> b["x"].shape, b["y"].tolist(), b["id"]
        (torch.Size([2, 3]), [0, 1], 7)
    """

    __slots__ = ("_buffer", "_groups", "_keys", "_leaves", "_positions", "_spec")
    _buffer: torch.Tensor
    _groups: list[_pack.Group]
    _positions: list[int]  # the leaf position of each packed array
    _leaves: list[Any]  # every leaf, None where an array was packed
    _keys: list[Any]  # each leaf's key (for dtype= mappings)
    _spec: Spec

    def __init__(self) -> None:
        raise TypeError(
            "PackedBatch is not made directly: use tb.PackedBatch.pack(batch) or "
            "tb.collate(samples, packed=True)."
        )

    @classmethod
    def _make(
        cls,
        buffer: torch.Tensor,
        groups: list[_pack.Group],
        positions: list[int],
        leaves: list[Any],
        keys: list[Any],
        spec: Spec,
    ) -> PackedBatch:
        self = object.__new__(cls)
        self._buffer = buffer
        self._groups = groups
        self._positions = positions
        self._leaves = leaves
        self._keys = keys
        self._spec = spec
        return self

    # ------------------------------------------------------------------ making one

    @classmethod
    def pack(cls, batch: Any, *, pin: bool | None = None) -> PackedBatch:
        """Packs the arrays and host tensors of ``batch`` into one buffer.

        ``pin``: page-lock the buffer (None: in the main process of a GPU machine; in a
        DataLoader worker the buffer is in shared memory instead, and the pin-memory
        thread pins it). Refused, before anything is copied: a tensor on a device
        (``.cpu()`` it, or move the batch with :func:`tensorbridge.to_device`), a tensor
        that requires grad (``.detach()`` it), arrays of dtypes torch has no dtype for, a
        PackedBatch inside the batch (``.unpack()`` it). Zero-stride (broadcast) arrays
        are packed in full, like any other.
        """
        if pin is not None:
            pin = _backend.bool_arg(
                pin,
                "PackedBatch.pack: pin",
                "pass True, False or None (None: pinned where a GPU is).",
            )
        if pin and not _backend.ENGINE.pinned_memory:
            raise ValueError(
                "PackedBatch.pack: pin=True needs a usable GPU (page-locking is the CUDA "
                "driver's): pass pin=None to pin only where one is."
            )
        originals, keys, spec = flatten(batch, "PackedBatch.pack")
        leaves: list[Any] = list(originals)
        positions: list[int] = []
        arrays: list[np.ndarray] = []
        for i, leaf in enumerate(originals):
            try:
                a = _host_array(leaf)
            except (TypeError, ValueError) as exc:
                raise leaf_refusal(exc, "PackedBatch.pack", leaf_path(spec, i)) from None
            if a is not None:
                positions.append(i)
                arrays.append(a)
                leaves[i] = None
        # (refuses before anything is copied)
        plan = _pack.layout(arrays, "PackedBatch.pack", lambda j: leaf_path(spec, positions[j]))
        buffer = new_host_buffer(plan.nbytes, pin)
        _pack.pack_into(plan, buffer.numpy())
        return cls._make(buffer, plan.groups, positions, leaves, keys, hollow(spec))

    # ------------------------------------------------------------------ the protocol

    def to(
        self,
        device: Device | None = None,
        dtype: DTypeSpec = None,
        non_blocking: bool = False,
        copy: bool = False,
    ) -> Any:
        """The batch in its own structure, its arrays as tensors on ``device`` (None: the
        host): on another device after one copy of the whole buffer; on the host, views of
        the buffer itself (writes to them show in this batch), unless ``copy=True``.
        ``dtype`` casts as in :func:`tensorbridge.to_device`; like ``Tensor.to``, a dtype
        may come first (``.to(torch.float16)``)."""
        if isinstance(device, torch.Tensor):
            raise TypeError(
                "PackedBatch.to: a tensor as the target is ambiguous for a whole batch: pass "
                "its device (and dtype=, if wanted), e.g. .to(t.device)."
            )
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        rule = dtype_rule(dtype, "PackedBatch.to")
        dev = None if device is None else _backend.resolve_device(device, "PackedBatch.to")
        non_blocking = _backend.bool_arg(non_blocking, "PackedBatch.to: non_blocking")
        return self._to(dev, rule, non_blocking, _backend.bool_arg(copy, "PackedBatch.to: copy"))

    def pin_memory(self, device: Any = None) -> PackedBatch:
        """This batch with its buffer page-locked (itself when it already is, or when no
        GPU is usable: page-locking needs one). ``device`` is accepted for the
        DataLoader's pin-memory thread and not used: page-locked memory serves every GPU."""
        if not _backend.ENGINE.pinned_memory or self._buffer.is_pinned():
            return self
        # torch's caching host allocator (reused blocks), filled by the copy threads
        pinned = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        copy_into(pinned.numpy(), self._buffer.numpy())
        return self._make(
            pinned,
            self._groups,
            self._positions,
            self._leaves,
            self._keys,
            self._spec,
        )

    def keys(self) -> set[Any]:
        """The keys of the packed arrays (what a ``dtype=`` mapping may name)."""
        return {self._keys[i] for i in self._positions}

    def _to(
        self,
        dev: torch.device | None,
        rule: DTypeRule | None,
        non_blocking: bool,
        copy: bool,
        checked: bool = False,
    ) -> Any:
        """``to`` with its arguments resolved; ``checked``: the rule's names were checked
        by the caller (a batch this one is part of)."""
        if rule is not None and rule.by_key and not checked:
            check_names(rule, self.keys(), "PackedBatch.to")
        if dev is None:
            dev = torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        buffer = self._buffer
        if dev != buffer.device or copy:
            buffer = buffer.to(dev, non_blocking=non_blocking, copy=copy)
        return self._rebuild(buffer, rule)

    def unpack(self) -> Any:
        """The batch in its own structure, its arrays as tensors over the host buffer."""
        return self._rebuild(self._buffer, None)

    def is_pinned(self) -> bool:
        """Whether the buffer is page-locked (so ``.to(..., non_blocking=True)`` is async)."""
        return bool(self._buffer.is_pinned())

    @property
    def buffer(self) -> torch.Tensor:
        """The packed bytes: a 1-D uint8 host tensor."""
        return self._buffer

    @property
    def nbytes(self) -> int:
        """The size of the buffer in bytes."""
        return int(self._buffer.numel())

    def __len__(self) -> int:
        """How many arrays were packed."""
        return len(self._positions)

    def __bool__(self) -> bool:
        return True  # (a batch, even one of numbers only: `if batch:` must not skip it)

    def __repr__(self) -> str:
        state = "pinned" if self.is_pinned() else "unpinned"
        if self._buffer.is_shared():
            state = "shared"
        arrays, groups = len(self), len(self._groups)
        return (
            f"PackedBatch({arrays} array{'s' * (arrays != 1)} in {groups} "
            f"group{'s' * (groups != 1)}, {self.nbytes} bytes, {state})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_packed,
            (self._buffer, self._groups, self._positions, self._leaves, self._keys, self._spec),
        )

    # ------------------------------------------------------------------ internals

    def _rebuild(self, buffer: torch.Tensor, rule: DTypeRule | None) -> Any:
        out = list(self._leaves)
        plan = _pack.Layout(buffer.numel(), self._groups, len(self._positions), None, ())
        private = buffer is not self._buffer  # (a copy: on another device, or copy=True)
        _pack.views_into(buffer, plan, out, self._positions, private)
        if rule is not None:
            for i in self._positions:
                target = _target_dtype(rule, self._keys[i], _source_dtype(out[i]))
                if target is not None and target != out[i].dtype:
                    out[i] = out[i].to(target)
        return unflatten(self._spec, out)


def _rebuild_packed(buffer: torch.Tensor, groups: list[Any], *parts: Any) -> PackedBatch:
    # (a batch pickled before ragged groups came has five fields per group)
    groups = [g if len(g) == 6 else (*g, None) for g in groups]
    return PackedBatch._make(buffer, groups, *parts)


def _host_array(leaf: Any) -> np.ndarray | None:
    """The host array a leaf packs as; None for values that stay in the structure. Its
    refusals name PackedBatch.pack; the caller adds where the leaf sits."""
    if type(leaf) is np.ndarray:
        return leaf
    if isinstance(leaf, PackedBatch):
        raise TypeError(
            "PackedBatch.pack: the batch holds a PackedBatch; pack the batch it holds: "
            "pass packed.unpack() in its place."
        )
    if _interop.is_foreign_array(leaf):
        leaf = _interop.import_array(leaf, "PackedBatch.pack", numpy_first=True)
    if isinstance(leaf, np.ndarray):
        return np.asarray(leaf)
    if not isinstance(leaf, torch.Tensor):
        return None
    _check_tensor(leaf, "PackedBatch.pack")  # (sparse, meta, quantized, nested)
    if leaf.device.type != "cpu":
        raise ValueError(
            f"PackedBatch.pack: a tensor is on {leaf.device}; a packed batch holds host "
            "arrays: pass it with .cpu(), or move the whole batch with tb.to_device()."
        )
    if leaf.requires_grad:
        raise ValueError(
            "PackedBatch.pack: a tensor requires grad, which packing would drop: "
            "pass it with .detach()."
        )
    if _dtypes.numpy_dtype_or_none(leaf.dtype) is None:
        raise TypeError(
            f"PackedBatch.pack: a tensor is {leaf.dtype}, which has no NumPy dtype to "
            "pack as: convert it first, e.g. .to(torch.complex64) for complex32."
        )
    return to_numpy(leaf)


# ----------------------------------------------------------------- collate(packed=True)


class Arena:
    """Bump allocation of a collated batch's tensors from one host buffer, so that
    ``collate(samples, packed=True)`` stacks each field straight into the packed buffer
    (one copy). A field that does not fit (the size is estimated before collating) gets
    its own tensor, and those tensors are packed into a new buffer afterwards. Only what
    collate made is packed: the values of a ``fields={...: list}`` field stay as they are."""

    def __init__(self, nbytes: int) -> None:
        try:
            self.buffer = new_host_buffer(max(nbytes, _pack.ALIGN))
        except RuntimeError:
            # (more than can be had: samples collate refuses, a ragged sample 0 say, or a
            # batch that spills; its own tensors then fail with their own sizes)
            self.buffer = new_host_buffer(_pack.ALIGN)
        self.bytes = self.buffer.numpy()  # (to zero the padding: the buffer is pickled whole)
        self.used = 0
        self.spilled = False
        # id(tensor) -> (the tensor, first byte or -1 when spilled, bytes it takes)
        self.made: dict[int, tuple[torch.Tensor, int, int]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize
        for d in shape:
            n *= d
        first = -(-self.used // _pack.ALIGN) * _pack.ALIGN
        if first + n > self.buffer.numel():
            self.spilled = True
            t = torch.empty(shape, dtype=dtype)
            self.made[id(t)] = (t, -1, 0)
            return t
        self.bytes[self.used : first] = 0
        self.used = first + n
        t = self.buffer[first : first + n].view(dtype).view(shape)
        self.made[id(t)] = (t, first, -(-n // _pack.ALIGN) * _pack.ALIGN)
        return t

    def packed(self, batch: Any) -> PackedBatch:
        """The collated batch as a PackedBatch: over this arena's buffer, or, when a
        field spilled, over a new one its tensors are packed into."""
        originals, keys, spec = flatten(batch)
        leaves: list[Any] = list(originals)
        groups: list[_pack.Group] = []
        positions: list[int] = []
        for i, leaf in enumerate(originals):
            slot = self.made.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if slot is None or slot[0] is not leaf:
                continue  # (a value, or what a fields= list holds: kept as it is)
            groups.append((leaf.dtype, tuple(leaf.shape), slot[1], slot[2], [len(positions)], None))
            positions.append(i)
            leaves[i] = None
        # The buffer's whole storage is pickled, not only the slice the batch uses: the
        # bytes past it are zeroed (they held whatever the allocator had there), or, where
        # the estimate was far over, the batch is packed into a buffer of its own size.
        slack = self.buffer.numel() - self.used
        if self.spilled or slack > max(self.used, 1 << 20):
            plan = _pack.layout([to_numpy(originals[i]) for i in positions], "collate")
            buffer = new_host_buffer(plan.nbytes)
            _pack.pack_into(plan, buffer.numpy())
            groups = plan.groups
        else:
            end = max(-(-self.used // _pack.ALIGN) * _pack.ALIGN, _pack.ALIGN)
            self.bytes[self.used :] = 0
            buffer = self.buffer[:end]
        return PackedBatch._make(buffer, groups, positions, leaves, keys, hollow(spec))


ARENA: contextvars.ContextVar[Arena | None] = contextvars.ContextVar("arena", default=None)


def estimate_nbytes(samples: Any, pad: Any = None, fields: Any = None) -> int:
    """The packed size of a collated batch, from sample 0 times the number of samples
    (collate refuses samples whose structure or shapes differ from sample 0's, so each
    takes as many bytes); a padded field (``pad=``) by its longest sample; a field kept
    as a list (``fields=``) takes nothing; a number as sample 0's stacks (bool 1 byte,
    a NumPy scalar its itemsize, an int or float 8). Short for a field whose dtype widens
    in a later sample (an array, or a bool then an int: that field spills, and the batch
    is packed again, a second copy). Samples collate will refuse are sized 0: the refusal
    is collate's to make."""
    try:
        first = samples[0]
        n = len(samples)
        named = (pad or fields) and isinstance(first, Mapping)
        padded = dict(first) if named else {}
        for key in fields or ():
            padded.pop(key, None)  # (its values stay as they are, outside the buffer)
        for key in pad or ():
            if key in padded:
                padded[key] = None  # (sized below, not as sample 0)
        total, leaves = 0, 0
        for leaf in flatten(padded if named else first)[0]:
            leaves += 1
            total += _leaf_nbytes(leaf) * n
        for key in pad or ():
            if key in padded:
                longest = max(_leaf_nbytes(np.asarray(s[key])) for s in samples)
                total += longest * n + 8 * n + 2 * _pack.ALIGN  # (and its lengths)
        return total + 2 * _pack.ALIGN * (leaves + 1)
    except Exception:  # (a sample collate will refuse, with its own message: sized 0)
        return 0


def _leaf_nbytes(leaf: Any) -> int:
    if isinstance(leaf, np.ndarray):
        return leaf.nbytes
    if isinstance(leaf, torch.Tensor):
        return leaf.numel() * leaf.element_size()
    if isinstance(leaf, np.generic):
        return leaf.itemsize  # (np.float32 numbers stack as float32)
    if isinstance(leaf, bool):
        return 1
    if isinstance(leaf, (int, float)):
        return 8  # (int64, float64)
    if isinstance(leaf, complex):
        return 16
    return 0  # a value that stays a list (a string, None): nothing in the buffer


@contextlib.contextmanager
def arena(nbytes: int) -> Iterator[Arena]:
    a = Arena(nbytes)
    token = ARENA.set(a)
    try:
        yield a
    finally:
        ARENA.reset(token)
