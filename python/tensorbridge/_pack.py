"""Many host arrays in one buffer: the layout, the host-side packing and the views back.

Arrays of one dtype and shape sit next to each other, each padded to 256 bytes, so a
group's tensors come from one strided view and one ``unbind`` (not a slice and two views
per array): with thousands of small arrays, per-array work and not the copy is what a
batch costs. Small arrays (under 64 KiB) form ragged groups instead, so that arrays of
every length (token ids, boxes) share one too: those of one dtype and one shape after
the first dimension sit back to back, each on a 16-byte boundary (enough to view it as
any dtype), and one ``split_with_sizes`` makes their tensors. What is left, groups of
one or two arrays, takes one ``as_strided`` per array.

With the compiled core, the layout is computed in one call that checks every array once
(``_C.PackedArrays``) and the copies run on the copy threads with the GIL released;
without it, the same layout is computed here and filled with NumPy.

Used by :func:`tensorbridge.to_device` (the packed host-to-device path) and by
:class:`tensorbridge.PackedBatch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _backend, _dtypes

ALIGN = 256  # where groups start, and the arrays of uniform groups

# A ragged group's split: the rows of each piece (each member's, and gaps of a few rows
# that align the next member), and which pieces are the members (None: all of them).
Split = tuple[list[int], list[int] | None]

# Per group: (torch dtype, shape, first byte, bytes per array, member indices, None); for a
# ragged group (arrays back to back whose shapes differ in the first dimension only):
# (torch dtype, shape after the first dimension, first byte, bytes per row, member
# indices, its split).
Group = tuple[torch.dtype, tuple[int, ...], int, int, list[int], Split | None]

# Arrays of at least one dimension and 1 to RAGGED_BYTES - 1 bytes go to the ragged group
# of their dtype and shape after the first dimension, when at least RAGGED such arrays
# share it and the array with the gap that realigns what follows it (to MEMBER_ALIGN)
# takes no more bytes than it would padded to ALIGN (core/pack.h's kRagged, kRaggedBytes
# and kMemberAlign).
RAGGED, RAGGED_BYTES, MEMBER_ALIGN = 3, 64 << 10, 16


class Layout(NamedTuple):
    """Where each array goes in the packed buffer."""

    nbytes: int  # the buffer's size: a multiple of ALIGN, at least ALIGN
    groups: list[Group]  # in buffer order; members index the packed arrays
    narrays: int  # how many arrays
    native: Any  # the compiled layout (_C.PackedArrays; holds the arrays), or None
    arrays: Sequence[np.ndarray]  # the arrays (for the NumPy packing)


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    """The torch dtype a packed array becomes (that of its native-order twin: the copy
    swaps); refuses, naming ``np_dtype`` itself, a dtype torch lacks."""
    t = _TORCH_DTYPES.get(np_dtype)
    if t is None:
        t = _TORCH_DTYPES[np_dtype] = _dtypes.torch_dtype(np_dtype)  # (either byte order)
    return t


def layout(
    arrays: Sequence[np.ndarray],
    fn: str = "to_device",
    where: Callable[[int], str | None] | None = None,
) -> Layout:
    """Checks every array and lays them out; refuses (TypeError) a dtype torch cannot hold
    or an array of Python objects, before anything is copied. ``fn`` names the public
    function in refusals, ``where(i)`` where array ``i`` sits in its batch
    (``batch["a"][1]``, or None) the array refused."""
    try:
        C = _backend.ENGINE.C
        if C is not None:
            native = C.PackedArrays(arrays if isinstance(arrays, list) else list(arrays), ALIGN)
            groups: list[Group] = [
                (_torch_dtype(dt), shape, first, stride, members, split)
                for dt, shape, first, stride, members, split in native.groups
            ]
            return Layout(native.nbytes, groups, len(arrays), native, arrays)
        return _python_layout(arrays)
    except (TypeError, ValueError) as exc:
        # The core refuses elements of zero bytes (dtype 'V0') and Python objects as a
        # transfer does; every other entry point refuses those dtypes as ones torch lacks,
        # naming the fix.
        refusal: TypeError | ValueError = exc
        at = ""
        for i, a in enumerate(arrays):
            found = _refusal(a)
            if found is not None:
                refusal = found
                path = None if where is None else where(i)
                at = "" if path is None else f" {path}:"
                break
        message = str(refusal)
        for prefix in ("transfer: ", "pack: "):
            message = message.removeprefix(prefix)
        raise type(refusal)(f"{fn}:{at} {message}") from None


def _refusal(a: Any) -> TypeError | None:
    """Why the layout refuses array ``a`` (its dtype), or None."""
    if not isinstance(a, np.ndarray):
        return None
    if a.dtype.itemsize == 0 or a.dtype.hasobject:
        return _dtypes.unsupported_numpy(a.dtype)
    try:
        _dtypes.torch_dtype(a.dtype)
    except TypeError as exc:
        return exc
    return None


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _gap_after(nbytes: int, row: int) -> int:
    """The rows of ``row`` bytes that realign what follows a ragged member of ``nbytes``
    (core/pack.cpp's gap_after)."""
    gap = 0
    while (nbytes + gap * row) % MEMBER_ALIGN:
        gap += 1
    return gap


def _python_layout(arrays: Sequence[np.ndarray]) -> Layout:
    """The compiled layout's twin (core/pack.cpp's plan_pack), byte for byte."""
    rest: list[tuple[np.dtype, tuple[int, ...]] | None] = []  # (a ragged group's key)
    count: dict[tuple[np.dtype, tuple[int, ...]], int] = {}
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"pack: item {i} is not a numpy.ndarray")
        if a.dtype.hasobject:
            raise TypeError(
                "transfer: arrays holding Python references cannot be moved as bytes; convert "
                "them to a numeric dtype first"
            )
        n = a.nbytes
        row = n // a.shape[0] if a.ndim and a.shape[0] else 0  # (0: no bytes)
        if row and n < RAGGED_BYTES and n + _gap_after(n, row) * row <= _round_up(n):
            key = (a.dtype, a.shape[1:])
            rest.append(key)
            count[key] = count.get(key, 0) + 1
        else:
            rest.append(None)
    # (ragged, dtype, shape or shape after the first dimension) -> members
    by_key: dict[tuple[bool, np.dtype, tuple[int, ...]], list[int]] = {}
    for i, (a, ragged_key) in enumerate(zip(arrays, rest, strict=True)):
        if ragged_key is not None and count[ragged_key] >= RAGGED:
            by_key.setdefault((True, *ragged_key), []).append(i)
        else:
            by_key.setdefault((False, a.dtype, a.shape), []).append(i)
    groups: list[Group] = []
    end = 0
    for (ragged, np_dtype, shape), members in by_key.items():
        size = np_dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if not ragged:
            groups.append((_torch_dtype(np_dtype), shape, end, _round_up(size), members, None))
            end += _round_up(size) * len(members)
            continue
        first, pieces, take = end, [], []
        for m in members:
            gap = _gap_after(end - first, size)  # (after the member before)
            if gap:
                pieces.append(gap)
                end += gap * size
            take.append(len(pieces))
            pieces.append(arrays[m].shape[0])
            end += arrays[m].nbytes
        split = (pieces, take if len(take) < len(pieces) else None)
        groups.append((_torch_dtype(np_dtype), shape, first, size, members, split))
        end = _round_up(end)
    return Layout(max(end, ALIGN), groups, len(arrays), None, arrays)


def _member_starts(first: int, stride: int, count: int, split: Split | None) -> list[int]:
    """The first byte of each member of a group."""
    if split is None:
        return [first + k * stride for k in range(count)]
    pieces, take = split
    starts, at = [], first
    for rows in pieces:
        starts.append(at)
        at += rows * stride
    return starts if take is None else [starts[j] for j in take]


def pack_into(plan: Layout, out: np.ndarray) -> None:
    """Copies every array to its place in ``out`` (uint8, C-contiguous, at least
    ``plan.nbytes``) and zeroes the rest of ``out[:plan.nbytes]`` (the padding after each
    array): a packed buffer is pickled and saved whole, and carries nothing else."""
    if plan.native is not None:
        plan.native.pack_into(out)
        return
    if out.itemsize != 1 or not out.flags.c_contiguous:
        raise ValueError("pack_into: out must be a C-contiguous array of bytes (uint8)")
    if not out.flags.writeable:
        raise ValueError("pack_into: out is read-only")
    if out.nbytes < plan.nbytes:
        raise ValueError("pack_into: out is smaller than the layout's nbytes")
    if any(np.may_share_memory(out, a) for a in plan.arrays):
        raise ValueError("pack: the destination overlaps one of the packed arrays")
    end = 0  # (groups, and the arrays in each, come in buffer order)
    for _, _, first, stride, members, split in plan.groups:
        for m, at in zip(members, _member_starts(first, stride, len(members), split), strict=True):
            a = plan.arrays[m]
            if not a.size:
                continue
            out[end:at] = 0
            dst = out[at : at + a.nbytes].view(a.dtype.newbyteorder("=")).reshape(a.shape)
            np.copyto(dst, a, casting="equiv")
            end = at + a.nbytes
    out[end : plan.nbytes] = 0


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(strides[::-1])


def views(buffer: torch.Tensor, plan: Layout) -> list[torch.Tensor]:
    """The packed arrays as tensors over ``buffer`` (uint8, ``plan.nbytes``, any device),
    in the order of the arrays given to :func:`layout`: one strided view and ``unbind``
    per group of three or more, one view and ``split_with_sizes`` per ragged group, one
    ``as_strided`` per array of smaller groups."""
    out: list[Any] = [None] * plan.narrays
    views_into(buffer, plan, out, range(plan.narrays))
    return out


# Makes views as tensors of their own to autograd (no view tracking): what the per-array
# idiom gives (one tensor per array, not outputs of one unbind, which autograd forbids to
# modify in place with an operand that requires grad), at 0.1 us less per array.
_UNTRACKED_VIEWS = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", contextlib.nullcontext)


def views_into(
    buffer: torch.Tensor,
    plan: Layout,
    out: list[Any],
    positions: Sequence[int],
    private: bool = False,
) -> None:
    """As :func:`views`, writing array ``i``'s tensor to ``out[positions[i]]``.

    ``private``: no one else holds ``buffer`` (it was made for these tensors), so each
    tensor is made a tensor of its own to autograd rather than a view of it, as the
    per-array idiom's are. A buffer the caller can reach (a PackedBatch's) keeps real
    views: autograd then sees a write through the buffer or another view of it, and
    refuses a backward through a tensor it changed.
    """
    if private:
        with _UNTRACKED_VIEWS():
            _views_into(buffer, plan, out, positions)
    else:
        _views_into(buffer, plan, out, positions)


def _views_into(
    buffer: torch.Tensor, plan: Layout, out: list[Any], positions: Sequence[int]
) -> None:
    as_strided = torch.as_strided
    whole = isinstance(positions, range) and positions == range(len(out))
    typed: dict[torch.dtype, tuple[torch.Tensor, int, int]] = {}
    for t_dtype, shape, first, stride, members, split in plan.groups:
        entry = typed.get(t_dtype)
        if entry is None:
            flat = buffer.view(t_dtype)
            # (as_strided counts from the storage, not from the view)
            entry = typed[t_dtype] = (flat, flat.element_size(), int(flat.storage_offset()))
        flat, item, base = entry
        strides = (1,) if len(shape) == 1 else _contiguous_strides(shape)
        start = base + first // item
        if split is not None:  # a ragged group: back to back, one view split by rows
            pieces, take = split
            view = as_strided(flat, (sum(pieces), *shape), (stride // item, *strides), start)
            parts = view.split_with_sizes(pieces)
            if take is not None:  # (without the gaps that align the members)
                parts = tuple([parts[j] for j in take])
        elif len(members) <= 2:  # (a view each: cheaper than a group view and its unbind)
            step = stride // item
            for k, m in enumerate(members):
                out[positions[m]] = as_strided(flat, shape, strides, start + k * step)
            continue
        else:
            view = as_strided(flat, (len(members), *shape), (stride // item, *strides), start)
            parts = view.unbind(0)
        if whole and len(members) == len(out):  # one group, all arrays in order
            out[:] = parts
            continue
        for m, v in zip(members, parts, strict=True):
            out[positions[m]] = v
