"""Data-loader helpers: collate into pinned memory, a device prefetcher, image batches."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from . import _backend, _dtypes
from ._batch import DTypeSpec, to_device
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

    Samples that do not fit together are refused with a ValueError or TypeError naming
    the field as a path into the batch (``batch["a"][0]["b"]``) and the sample that
    differs from sample 0: arrays of different shapes, dicts with other keys, sequences
    of other lengths, another kind of value (an array in one sample, an int in another),
    or samples nested more than 100 levels deep (or holding themselves).

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> b = tb.collate([{"x": np.ones(3), "y": 1}, {"x": np.zeros(3), "y": 0}])
        >>> b["x"].shape, b["y"]
        (torch.Size([2, 3]), tensor([1, 0]))
    """
    if isinstance(samples, Mapping) or not isinstance(
        samples, (Sequence, np.ndarray, torch.Tensor)
    ):
        raise TypeError(
            f"collate takes a list of samples, got {_kind(samples)}: pass a list (a "
            "DataLoader passes one), e.g. collate([sample0, sample1])."
        )
    if not len(samples):
        raise ValueError(
            "collate needs at least one sample, got none: pass a non-empty list (a DataLoader "
            "with batch_size >= 1 always does)."
        )
    return _collate(samples, (), 0)


# Samples deeper than this are refused (a cycle would otherwise end in a RecursionError).
_MAX_DEPTH = 100

_NUMBERS = (bool, int, float, complex, np.number, np.bool_)

# A path into the batch, built as the walk descends and formatted only for a message:
# ("[", key or index) or (".", attribute name) per level.
Path = tuple[tuple[str, Any], ...]


def _collate(samples: Sequence[Any], path: Path, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(
            f"collate: {_where(path)}: the samples are nested more than {_MAX_DEPTH} levels "
            "deep, or contain themselves (a list holding itself, say): pass samples of at "
            f"most {_MAX_DEPTH} levels, without cycles."
        )
    first = samples[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        _check_kind(samples, (np.ndarray, torch.Tensor), path)
        return _stack(samples, path)
    if isinstance(first, Mapping):
        return _collate_dict(samples, path, depth)
    if is_namedtuple(first):
        _check_kind(samples, type(first), path)
        return type(first)(
            *(
                _collate(list(field), (*path, (".", name)), depth + 1)
                for name, field in zip(first._fields, zip(*samples, strict=True), strict=True)
            )
        )
    if isinstance(first, (list, tuple)):
        _check_kind(samples, (list, tuple), path)
        for i, s in enumerate(samples):
            if len(s) != len(first):
                raise ValueError(
                    f"collate: {_where(path)}: sample {i} has {_items(len(s))}, sample 0 has "
                    f"{_items(len(first))}; sequences are collated item by item and need equal "
                    f"lengths: {_ragged_fix(path)}."
                )
        return [
            _collate(list(field), (*path, ("[", j)), depth + 1)
            for j, field in enumerate(zip(*samples, strict=True))
        ]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        _check_kind(samples, type(first), path)
        return rebuild_dataclass(
            first,
            {
                f.name: _collate(
                    [getattr(s, f.name) for s in samples], (*path, (".", f.name)), depth + 1
                )
                for f in dataclasses.fields(first)
                if hasattr(first, f.name)
            },
        )
    if isinstance(first, _NUMBERS):
        _check_kind(samples, _NUMBERS, path)
        return torch.as_tensor(np.asarray(samples))
    return list(samples)  # strings and anything else: as a list, like default_collate


def _collate_dict(samples: Sequence[Any], path: Path, depth: int) -> Any:
    first = samples[0]
    _check_kind(samples, Mapping, path)
    keys = first.keys()
    for i, s in enumerate(samples):
        if s.keys() != keys:
            missing = [k for k in keys if k not in s]
            extra = [k for k in s if k not in keys]
            problem = " and ".join(
                p
                for p in (
                    f"lacks {_keys_text(missing)}" if missing else "",
                    f"has the extra {_keys_text(extra)}" if extra else "",
                )
                if p
            )
            raise ValueError(
                f"collate: {_where(path)}: sample {i} {problem} (compared with sample 0); "
                "every sample must have the same keys: return the same keys from the "
                "dataset for every sample (None or an empty array for a missing value)."
            )
    fields = {k: _collate([s[k] for s in samples], (*path, ("[", k)), depth + 1) for k in keys}
    try:
        return cast(Any, type(first))(fields)
    except TypeError:  # e.g. a defaultdict: a plain dict, like default_collate
        return fields


def _check_kind(samples: Sequence[Any], kind: Any, path: Path) -> None:
    """Every sample holds the kind of value sample 0 does at ``path``."""
    for i, s in enumerate(samples):
        if not isinstance(s, kind):
            raise TypeError(
                f"collate: {_where(path)}: sample {i} is {_kind(s)}, sample 0 is "
                f"{_kind(samples[0])}; every sample must hold the same kind of value here: "
                f"convert it in the dataset (numpy.asarray for numbers meant to stack with "
                f"arrays){_list_fix(path)}."
            )


def _kind(x: Any) -> str:
    cls = type(x)
    module = cls.__module__.split(".")[0]
    return cls.__name__ if module == "builtins" else f"{module}.{cls.__name__}"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def _key_text(key: Any) -> str:
    if isinstance(key, str) and '"' not in key and "\\" not in key:
        return f'"{key}"'
    return repr(key)


def _keys_text(keys: list[Any]) -> str:
    word = "key" if len(keys) == 1 else "keys"
    return f"{word} {', '.join(_key_text(k) for k in keys)}"


def _where(path: Path) -> str:
    """``batch["a"][0].b``: where a field sits in the batch, for messages."""
    steps = [f"[{_key_text(v)}]" if kind == "[" else f".{v}" for kind, v in path]
    if len(steps) > 12:  # a cycle or a deep nest: the start and the end say enough
        steps = [*steps[:6], f"...({len(steps) - 9} more)...", *steps[-3:]]
    return "batch" + "".join(steps)


def _top_key(path: Path) -> Any:
    """The sample dict's key when ``path`` names one of its fields, else None."""
    if len(path) == 1 and path[0][0] == "[" and isinstance(path[0][1], str):
        return path[0][1]
    return None


def _list_fix(path: Path) -> str:
    return ""


def _ragged_fix(path: Path) -> str:
    return f"pad or crop them to one size in the dataset{_list_fix(path)}"


def _stack(samples: Sequence[Any], path: Path) -> torch.Tensor:
    arrays = [to_numpy(s) if isinstance(s, torch.Tensor) else s for s in samples]
    shape = (len(arrays), *arrays[0].shape)
    for i, a in enumerate(arrays):
        if a.shape != shape[1:]:
            raise ValueError(
                f"collate: {_where(path)}: sample {i} has shape {a.shape}, sample 0 has "
                f"{shape[1:]}; samples must have equal shapes: {_ragged_fix(path)}."
            )
    try:
        dtype = np.result_type(*arrays) if len({a.dtype for a in arrays}) > 1 else arrays[0].dtype
        if not dtype.isnative:
            dtype = dtype.newbyteorder("=")
        t_dtype = _dtypes.torch_dtype(dtype)
    except TypeError as exc:  # no torch dtype (strings, objects), or none common to all
        raise TypeError(f"collate: {_where(path)}: {exc}") from None
    out_t = _empty(shape, t_dtype)
    out = to_numpy(out_t)  # a view: the stack lands in the tensor's memory, in one copy
    np.stack(arrays, out=out, casting="same_kind" if out.dtype.kind != "V" else "no")
    return out_t


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new batch tensor: pinned in the main process of a GPU machine."""
    pin = not _in_worker() and _backend.ENGINE.cuda_engine
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


# --------------------------------------------------------------------------- prefetcher


class Prefetcher:
    """Yields the batches of ``iterable`` already on ``device``, moving batch i+1 on a
    side stream while the caller computes on batch i.

    On a GPU each batch goes through :func:`to_device` on a dedicated stream; before a
    batch is handed out the current stream waits for its copy (``wait_stream``) and its
    tensors are marked as used there (``record_stream``), so the caching allocator never
    reuses their memory too early. On the CPU it is a thin pass-through, so one training
    loop runs everywhere. Errors from the underlying iterator are raised in order, when
    the loop reaches them; breaking out of the loop early releases everything.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> batches = [{"x": np.full(2, i)} for i in range(3)]
        >>> [b["x"].tolist() for b in tb.Prefetcher(batches, "cpu")]
        [[0, 0], [1, 1], [2, 2]]
    """

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

    def __iter__(self) -> Iterator[Any]:
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
