"""Ray Data batches to torch in one copy: ``tensorbridge.ray.Collate`` for
``iter_torch_batches``.

Importing this module imports Ray (``pip install "tensorbridge[ray]"``); ``import
tensorbridge`` does not, so ``import tensorbridge.ray`` is what makes ``tb.ray`` reachable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

try:
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError as exc:  # (ray missing, or one older than the collate classes)
    raise ImportError(
        "tensorbridge.ray needs Ray Data and Ray Train (Ray 2.60 or newer): "
        f'pip install "tensorbridge[ray]" ({exc})'
    ) from exc

from . import _backend, _dtypes
from ._batch import DTypeSpec, check_names, dtype_rule
from ._convert import Device, _check_tensor, to_numpy
from ._loader import lost_ints
from ._packed import PackedBatch

__all__ = ["Collate"]

_FN = "tb.ray.Collate"


class Collate(NumpyBatchCollateFn):
    """A ``collate_fn`` for Ray Data's ``iter_torch_batches`` that moves each batch in
    one copy: ``ds.iter_torch_batches(collate_fn=tb.ray.Collate())``.

    Ray hands it each batch as a dict of NumPy column arrays (it is a
    ``NumpyBatchCollateFn``). The columns are packed into one host buffer (page-locked
    when the target is a GPU) and cross with :meth:`PackedBatch.to` in one copy,
    finished on Ray's collate thread before the batch is handed over, instead of one
    copy per column; the result is a dict of tensors on ``device``, in the batch's
    column order. On the CPU the tensors are views of that buffer: writable memory of
    their own, where Ray's default path gives tensors over its read-only buffers.

    Args:
        device: where the batches go. ``"auto"`` (the default) is what
            ``iter_torch_batches(device="auto")`` means: Ray Train's device for this
            worker (``ray.train.torch.get_device()``) inside a Train worker, else the
            CPU; it is decided at the first batch, in the process that iterates. Pass
            the same ``device`` to ``iter_torch_batches`` when you pass one here: Ray
            moves a batch of tensors to its own ``device`` after the collate function,
            tensor by tensor. ``"cuda"`` without an index is the constructing thread's
            current device (Ray collates on a background thread). Made where CUDA is not
            usable (a CPU-only driver building it for GPU workers), a CUDA device is
            checked at the first batch instead, in the process that iterates, and
            ``"cuda"`` is then Ray Train's device for that worker (else the current one).
        dtype: casts on the device, after the copy, as :func:`tensorbridge.to_device`'s
            ``dtype=``: a single floating dtype casts the floating-point columns only
            (integer labels keep theirs); a mapping casts the columns it names, by column
            name (``{"image": torch.float32}``) or by source dtype
            (``{torch.int64: torch.int32}``), and refuses a name no numeric column has.

    The tensors of one batch are views of one buffer: a column kept after its batch (labels
    or predictions gathered for metrics) keeps the whole batch's buffer alive, and pickling
    or ``torch.save`` of it writes the whole buffer: keep ``batch["label"].clone()``.

    Ray moves a batch to ``iter_torch_batches``' ``device`` (and pins it for
    ``pin_memory=True``) only when every column is a tensor: a batch with a string column
    is left where this collate put it, so give the device here.

    ``dtype`` is not Ray's ``dtypes=``: a single dtype there casts every column, here the
    floating-point ones only (Ray's ``dtypes=torch.float32`` is
    ``dtype={torch.uint8: torch.float32, torch.int64: torch.float32}`` here, naming the
    source dtypes of the batch), and a mapping here may name some columns only.

    Columns Ray gives as Python objects: equal-shaped arrays (a list or fixed-shape
    tensor column) are stacked, as Ray's default path does; strings and bytes (None for
    a missing one), and lists of them, stay in the batch as the NumPy array Ray gave
    (Ray's default path refuses them); ragged arrays and other objects are refused with a
    TypeError naming the column and the fix (pad them to one shape, or drop the column).
    Do not pass ``pin_memory=True`` to ``iter_torch_batches``: the buffer is page-locked
    already where that helps.

    Example:
        >>> import numpy as np, torch, tensorbridge.ray
        >>> collate = tensorbridge.ray.Collate(device="cpu", dtype=torch.float16)
        >>> b = collate({"x": np.ones((2, 3), np.float32), "y": np.arange(2),
        ...              "id": np.array(["a", "b"], dtype=object)})
        >>> b["x"].dtype, b["y"].tolist(), b["id"].tolist()
        (torch.float16, [0, 1], ['a', 'b'])
    """

    def __init__(self, device: Device | Literal["auto"] = "auto", dtype: DTypeSpec = None) -> None:
        super().__init__()
        self._dtype = dtype
        self._rule = dtype_rule(dtype, _FN)  # a bad dtype is refused here, not per batch
        self._device: torch.device | None = None  # None: decided at the first batch
        self._auto = isinstance(device, str) and device == "auto"
        # A CUDA device asked for where CUDA is not usable (a CPU-only head node building
        # the collate for GPU workers): checked where the batches are, at the first one.
        self._later: Device | None = None
        if not self._auto:
            if _cuda_elsewhere(device):
                self._later = device
            else:
                self._device = _fixed(_backend.resolve_device(device, _FN))

    @property
    def device(self) -> torch.device | None:
        """The target device; None while it is decided at the first batch (``"auto"``, or
        a CUDA device given where CUDA is not usable) and no batch has come yet."""
        return self._device

    # (Ray types the result as a free type variable, which no concrete return type
    # matches; without Ray installed there is nothing to override: hence unused-ignore)
    def __call__(  # type: ignore[override, unused-ignore]
        self, batch: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """The batch as a dict of tensors on the device (string columns as NumPy arrays)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{_FN} takes Ray Data's NumPy batches (a dict of column arrays), got "
                f"{type(batch).__name__}: pass it as iter_torch_batches(collate_fn=...), which "
                "gives it those."
            )
        dev = self._device
        if dev is None:
            if self._later is None:
                dev = _auto_device()
            else:
                dev = _fixed(_backend.resolve_device(self._later, _FN), train=True)
            self._device = dev
        arrays: dict[str, Any] = {}
        kept: dict[str, Any] = {}
        for name, column in batch.items():
            a = _column(name, column)
            if a is None:
                kept[name] = column
            else:
                arrays[name] = a
        if self._rule is not None and self._rule.by_key:
            check_names(self._rule, set(arrays), _FN)
        if arrays:
            try:
                packed = PackedBatch.pack(arrays, pin=None if dev.type == "cuda" else False)
            except (TypeError, ValueError) as exc:
                raise _as_collates(exc) from None
            arrays = packed._to(dev, self._rule, True, False)  # (dtype= checked once, above)
            if dev.type == "cuda":
                # The copy and the casts land before the batch is handed over: Ray collates
                # on its own thread, and a training loop on another stream would not wait
                # for work queued on this thread's stream.
                torch.cuda.current_stream(dev).synchronize()
        if not kept:
            return arrays
        return {name: arrays[name] if name in arrays else kept[name] for name in batch}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["_auto"] or state["_later"] is not None:
            state["_device"] = None  # (decided again where it is unpickled)
        return state

    def __repr__(self) -> str:
        device = "auto" if self._auto else str(self._device or self._later)
        return f"Collate(device={device!r}, dtype={self._dtype!r})"


def _cuda_elsewhere(device: Any) -> bool:
    """Whether ``device`` names a CUDA device (a type or an index), on a machine where
    CUDA is not usable; a device no machine has is refused where it is given."""
    if torch.cuda.is_available() or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, ValueError, TypeError):
        return False


def _fixed(dev: torch.device, train: bool = False) -> torch.device:
    """``dev`` with its index: "cuda" is thread-relative and Ray collates on another
    thread, so it is fixed as iter_torch_batches fixes its own device: when made, to the
    current device; when decided at the first batch (``train``), to Ray Train's device
    for this worker inside a Train worker."""
    if dev.type != "cuda" or dev.index is not None:
        return dev
    if train:
        auto = _auto_device()
        if auto.type == "cuda":
            return auto
    return torch.device("cuda", torch.cuda.current_device())


def _auto_device() -> torch.device:
    """What ``iter_torch_batches(device="auto")`` picks, asked the way Ray asks it: Ray
    Train's device for this worker inside a Train worker, else the CPU."""
    try:
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker
    except ImportError as exc:
        raise ImportError(
            f'{_FN}(device="auto") needs Ray Train to find the device: pip install '
            f'"tensorbridge[ray]", or pass device= ({exc})'
        ) from exc
    return get_device() if _in_ray_train_worker() else torch.device("cpu")


def _as_collates(exc: TypeError | ValueError) -> TypeError | ValueError:
    """PackedBatch.pack's refusal of a column in Collate's name, the column named as
    Collate's other refusals name it (``column 'b'``, not ``batch["b"]``)."""
    message = str(exc).removeprefix("PackedBatch.pack")
    found = re.match(r'^: batch\["([^"\\]*)"\]', message)
    if found is not None:
        message = f": column {found.group(1)!r}{message[found.end() :]}"
    return type(exc)(_FN + message)


def _column(name: str, column: Any) -> Any:
    """The array a column packs as, or None for a column kept as it is (strings)."""
    if not isinstance(column, np.ndarray):
        return column  # (not from Ray; packing keeps plain values and refuses what it must)
    kind = column.dtype.kind
    if kind in "US":
        return None
    if kind in "MmV" and not _dtypes.is_ml_dtype(column.dtype):  # (bfloat16 is 'V' too)
        raise TypeError(
            f"{_FN}: column {name!r} is {column.dtype}, which torch has no dtype for: convert "
            f"it before batching (e.g. to int64 in ds.map_batches), or drop it "
            f"(ds.drop_columns([{name!r}]))."
        )
    if kind != "O":
        return column
    values = column.ravel()
    if all(v is None or isinstance(v, (str, bytes)) for v in values):
        return None  # strings (with missing values), kept as Ray gave them
    missing = next((i for i, v in enumerate(values) if v is None), None)
    if missing is not None:
        raise TypeError(
            f"{_FN}: column {name!r} is missing in row {missing} (None), and no tensor can "
            "hold a missing value: fill it before batching (e.g. in ds.map_batches), or drop "
            f"the column (ds.drop_columns([{name!r}]))."
        )
    parts = [_row(name, i, v) for i, v in enumerate(values)]
    if any(p.size for p in parts) and all(map(_strings, values)):
        return None  # (lists of strings, of any lengths: kept as Ray gave them)
    first = parts[0].shape
    if any(p.shape != first for p in parts):
        i, other = next((i, p.shape) for i, p in enumerate(parts) if p.shape != first)
        raise TypeError(
            f"{_FN}: column {name!r} holds arrays of different shapes (row 0 {first}, row {i} "
            f"{other}), which no tensor can hold: pad them to one shape before batching (e.g. "
            f"in ds.map_batches), or drop the column (ds.drop_columns([{name!r}]))."
        )
    stacked = np.stack(parts).reshape(*column.shape, *first)  # (Ray's default path stacks too)
    if stacked.dtype in (np.float64, np.complex128) and lost_ints(stacked, list(values)):
        raise TypeError(
            f"{_FN}: column {name!r} holds an int beyond int64, which made it {stacked.dtype} "
            "(losing digits): convert it before batching (a float, or an int within int64), "
            f"or drop it (ds.drop_columns([{name!r}]))."
        )
    # (strings among numbers stack as strings: objects too, not a column of strings)
    if stacked.dtype.kind in "OMmVUS" and not _dtypes.is_ml_dtype(stacked.dtype):
        kinds = sorted({type(v).__name__ for v in values})
        raise TypeError(
            f"{_FN}: column {name!r} holds Python objects ({', '.join(kinds)}), which no tensor "
            "can hold: convert them to numbers or strings before batching (e.g. in "
            f"ds.map_batches), or drop the column (ds.drop_columns([{name!r}]))."
        )
    return stacked


def _row(name: str, i: int, value: Any) -> np.ndarray:
    """One row of an object column as an array; a tensor row refused as a tensor column
    would be, in Collate's name."""
    if not isinstance(value, torch.Tensor):
        try:
            return np.asarray(value)
        except (ValueError, TypeError, RuntimeError):
            # (ragged nested lists, lists of tensors NumPy cannot read: objects, which the
            # column's checks keep as strings or refuse naming the column)
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            row = np.empty(len(items), object)
            for j, item in enumerate(items):  # (one by one: NumPy would read tensors)
                row[j] = item
            return row
    if value.requires_grad:
        raise ValueError(
            f"{_FN}: column {name!r}: row {i} is a tensor that requires grad, which packing "
            "would drop: .detach() it before batching (e.g. in ds.map_batches)."
        )
    _check_tensor(value, f"{_FN}: column {name!r}: row {i}")  # (sparse, nested, quantized)
    if _dtypes.numpy_dtype_or_none(value.dtype) is None:
        raise TypeError(
            f"{_FN}: column {name!r}: row {i} is a {value.dtype} tensor, which NumPy has no "
            "dtype for: convert it before batching (e.g. in ds.map_batches)."
        )
    try:
        return to_numpy(value)
    except (TypeError, ValueError) as exc:  # (a meta tensor, a freed storage...)
        raise type(exc)(f"{_FN}: column {name!r}: row {i}: {exc}") from None


def _strings(row: Any) -> bool:
    """Whether a row of an object column holds strings only (or nothing): a string, a
    list of them (at any depth), or an array of them (not numbers that NumPy made
    strings of, beside a string)."""
    if row is None or isinstance(row, (str, bytes)):
        return True
    if isinstance(row, (list, tuple)):
        return all(map(_strings, row))
    if isinstance(row, np.ndarray):
        if row.dtype.kind in "US":
            return True
        return row.dtype.kind == "O" and all(map(_strings, row.ravel()))
    return False
