"""Data-loader helpers: collate into pinned memory, a device prefetcher, image batches."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast, overload

import numpy as np
import torch

from . import _backend, _dtypes
from ._batch import _K, _T, _V, DTypeSpec, _ArrayT, _ListT, _TupleT, to_device
from ._convert import Device, to_numpy, to_tensor
from ._tree import flatten, is_namedtuple, rebuild_dataclass

# --------------------------------------------------------------------------- collate


def _in_worker() -> bool:
    info = torch.utils.data.get_worker_info()
    return info is not None


def collate(samples: Sequence[Any]) -> Any:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that stacks straight into
    page-locked memory: one copy per field instead of default collate's copy plus the
    pin-memory thread's second one. Use it with ``pin_memory=False``.

    In the main process with a usable GPU the stacked tensors are pinned (torch's
    caching host allocator reuses the memory); in worker processes (CUDA must not be
    touched in a forked child) and without a GPU they are ordinary tensors. Structures,
    numbers and strings are collated like ``default_collate``.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> b = tb.collate([{"x": np.ones(3), "y": 1}, {"x": np.zeros(3), "y": 0}])
        >>> b["x"].shape, b["y"]
        (torch.Size([2, 3]), tensor([1, 0]))
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    first = samples[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        return _stack(samples)
    if isinstance(first, Mapping):
        fields = {k: collate([sample[k] for sample in samples]) for k in first}
        try:
            return cast(Any, type(first))(fields)
        except TypeError:  # e.g. a defaultdict: a plain dict, like default_collate
            return fields
    if is_namedtuple(first):
        return type(first)(*(collate(list(field)) for field in zip(*samples, strict=True)))
    if isinstance(first, (list, tuple)):
        return [collate(list(field)) for field in zip(*samples, strict=True)]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return rebuild_dataclass(
            first,
            {
                f.name: collate([getattr(s, f.name) for s in samples])
                for f in dataclasses.fields(first)
                if hasattr(first, f.name)
            },
        )
    if isinstance(first, (bool, int, float, complex, np.number, np.bool_)):
        return torch.as_tensor(np.asarray(samples))
    return list(samples)  # strings and anything else: as a list, like default_collate


def _stack(samples: Sequence[Any]) -> torch.Tensor:
    arrays = [to_numpy(s) if isinstance(s, torch.Tensor) else s for s in samples]
    shape = (len(arrays), *arrays[0].shape)
    dtype = np.result_type(*arrays) if len({a.dtype for a in arrays}) > 1 else arrays[0].dtype
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    t_dtype = _dtypes.torch_dtype(dtype)
    for i, a in enumerate(arrays):
        if a.shape != shape[1:]:
            raise ValueError(
                f"collate: sample {i} has shape {a.shape}, sample 0 has {shape[1:]}; samples "
                "must have equal shapes (pad them, or write a collate_fn for ragged data)."
            )
    pin = not _in_worker() and _backend.ENGINE.cuda_engine
    out_t = torch.empty(shape, dtype=t_dtype, pin_memory=pin)
    out = to_numpy(out_t)  # a view: the stack lands in the tensor's memory, in one copy
    np.stack(arrays, out=out, casting="same_kind" if out.dtype.kind != "V" else "no")
    return out_t


# --------------------------------------------------------------------------- prefetcher


_B = TypeVar("_B")  # what a Prefetcher yields: a batch after to_device


class Prefetcher(Generic[_B]):
    """Yields the batches of ``iterable`` already on ``device``, moving batch i+1 on a
    side stream while the caller computes on batch i.

    On a GPU each batch goes through :func:`to_device` on a dedicated stream; before a
    batch is handed out the current stream waits for its copy (``wait_stream``) and its
    tensors are marked as used there (``record_stream``), so the caching allocator never
    reuses their memory too early. On the CPU it is a thin pass-through, so one training
    loop runs everywhere. Errors from the underlying iterator are raised in order, when
    the loop reaches them; breaking out of the loop early releases everything.

    Typed as :func:`to_device` types one batch: batches of arrays or tensors come out as
    tensors, of dicts as dicts with the same keys, of lists as lists, of tuples as tuples;
    anything else, a DataLoader's batches among them (torch types them Any), as Any.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> batches = [{"x": np.full(2, i)} for i in range(3)]
        >>> [b["x"].tolist() for b in tb.Prefetcher(batches, "cpu")]
        [[0, 0], [1, 1], [2, 2]]
    """

    @overload
    def __init__(
        self: Prefetcher[torch.Tensor],
        iterable: Iterable[_ArrayT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[dict[_K, Any]],
        iterable: Iterable[dict[_K, _V]],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[list[Any]],
        iterable: Iterable[_ListT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[tuple[Any, ...]],
        iterable: Iterable[_TupleT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[Any],
        iterable: Iterable[_T],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    def __init__(
        self,
        iterable: Iterable[Any],
        device: Device,
        *,
        depth: int = 2,
        dtype: DTypeSpec = None,
        non_blocking: bool = True,
    ) -> None:
        # (each batch in flight holds its device memory: an unbounded depth would load the
        # whole iterable onto the device)
        depth = _backend.int_arg(
            depth,
            "Prefetcher: depth",
            1,
            64,
            "2 or 3 hide the copy time of a batch behind the compute of the one before.",
        )
        self.iterable = iterable
        self.device = _backend.resolve_device(device, "Prefetcher")
        self.depth = depth
        self.dtype = dtype
        self.non_blocking = non_blocking

    def __len__(self) -> int:
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"the wrapped {type(self.iterable).__name__} has no len(); iterate instead"
            ) from None

    def __iter__(self) -> Iterator[_B]:
        if self.device.type != "cuda":
            it = iter(self.iterable)
            try:
                for batch in it:
                    yield to_device(
                        batch, self.device, non_blocking=self.non_blocking, dtype=self.dtype
                    )
            finally:  # an early break closes the source now, not when it is collected
                _close(it)
            return
        yield from self._cuda()

    def _cuda(self) -> Iterator[Any]:
        stream = torch.cuda.Stream(self.device)
        it = iter(self.iterable)
        queue: collections.deque[tuple[str, Any]] = collections.deque()
        exhausted = False

        def preload() -> None:
            nonlocal exhausted
            try:
                batch = next(it)
            except StopIteration:
                exhausted = True
                return
            except Exception as exc:  # raised when the loop gets there, not earlier
                queue.append(("error", exc))
                exhausted = True
                return
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                moved = to_device(batch, self.device, non_blocking=True, dtype=self.dtype)
            queue.append(("batch", moved))

        try:
            while len(queue) < self.depth and not exhausted:
                preload()
            while queue:
                kind, item = queue.popleft()
                if kind == "error":
                    raise item
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for leaf in flatten(item)[0]:
                    if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
                        leaf.record_stream(current)
                if not exhausted:
                    preload()
                yield item
        finally:
            queue.clear()
            _close(it)


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if callable(close):
        close()


# --------------------------------------------------------------------------- images


def images_to_tensor(
    images: Any,
    device: Device | None = None,
    *,
    dtype: _dtypes.DTypeLike = torch.float32,
    scale: float = 1 / 255,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    channels_first: bool = True,
    non_blocking: bool = False,
) -> torch.Tensor:
    """uint8 images (..., H, W, C) to normalized floats on ``device``: ship narrow, cast there.

    The images cross the link as uint8 (a quarter of float32's bytes); on the device one
    kernel computes ``(x * scale - mean) / std`` and writes it directly in channels-first
    layout (..., C, H, W) when ``channels_first`` (torchvision's ``ToTensor`` + ``Normalize``).

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> x = np.full((2, 4, 4, 3), 255, np.uint8)
        >>> tb.images_to_tensor(x, mean=[0.5] * 3, std=[0.5] * 3).shape
        torch.Size([2, 3, 4, 4])
    """
    dtype = _dtypes.as_torch_dtype(dtype)  # torch, NumPy or string dtypes alike
    if not dtype.is_floating_point:
        raise TypeError(
            f"images_to_tensor produces floats: pass e.g. dtype=torch.float32, not {dtype}"
        )
    if device is not None:
        device = _backend.resolve_device(device, "images_to_tensor")
    x = (
        images
        if isinstance(images, torch.Tensor)
        else to_tensor(images, device, non_blocking=non_blocking)
    )
    if isinstance(images, torch.Tensor) and device is not None:
        x = x.to(device, non_blocking=non_blocking)
    if x.ndim < 3:
        raise ValueError(
            f"images_to_tensor expects (..., H, W, C) images, got shape {tuple(x.shape)}"
        )
    channels = x.shape[-1]

    def per_channel(value: Sequence[float] | float | None, default: float, name: str):
        t = torch.as_tensor(default if value is None else value, dtype=torch.float64)
        if t.ndim > 1 or (t.ndim == 1 and t.numel() not in (1, channels)):
            raise ValueError(
                f"{name} must be a number or {channels} numbers (one per channel), got {value!r}"
            )
        return t.expand(channels) if t.numel() == 1 else t

    m = per_channel(mean, 0.0, "mean")
    s = per_channel(std, 1.0, "std")
    if (s == 0).any():
        raise ValueError("std must not contain zeros")
    weight = (scale / s).to(dtype=dtype, device=x.device)
    bias = (-m / s).to(dtype=dtype, device=x.device)
    if channels_first:
        shape = (*x.shape[:-3], channels, *x.shape[-3:-1])
        out = torch.empty(shape, dtype=dtype, device=x.device).movedim(-3, -1)
    else:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.addcmul(bias, x, weight, out=out)  # one kernel: cast, scale, shift, re-layout
    return out.movedim(-1, -3) if channels_first else out
