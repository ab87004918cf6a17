"""Ray Data: batches moved to the device in one packed copy, as a ``collate_fn``.

``ds.iter_torch_batches(collate_fn=tb.ray.Collate())`` replaces Ray's default path (one
``torch.as_tensor`` per column, then one ``.to(device)`` per column) with
:func:`tensorbridge.to_device`: the numeric columns of a batch are packed into pinned
staging by the copy threads and cross in a few large copies, then become views of one
device buffer.

Requires Ray (``pip install "tensorbridge[ray]"``); importing ``tensorbridge`` does not
import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _backend, _dtypes
from ._batch import DTypeSpec, dtype_rule, to_device
from ._convert import Device
from ._packed import PackedBatch

try:
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError as exc:  # pragma: no cover - exercised without ray installed
    raise ImportError(
        "tensorbridge.ray needs Ray Data: pip install 'tensorbridge[ray]' (or "
        "pip install 'ray[data,train]')."
    ) from exc

__all__ = ["Collate"]


class Collate(NumpyBatchCollateFn):
    """A Ray Data ``collate_fn`` that moves each batch to ``device`` in one packed copy.

    Use it as ``ds.iter_torch_batches(collate_fn=tb.ray.Collate(), ...)``; Ray hands it
    each batch as a dict of NumPy arrays (one per column). Numeric columns become tensors
    on ``device`` through :func:`tensorbridge.to_device`; columns torch has no dtype for
    (strings, Python objects, ragged tensor columns, which Ray gives as arrays of arrays)
    stay NumPy arrays.

    ``device="auto"`` (the default) is Ray's own rule: the worker's device inside a Ray
    Train worker (``ray.train.torch.get_device()``), else the CPU. Ray moves tensor
    batches to the ``device`` of ``iter_torch_batches`` after the collate, so give both
    the same device: ``iter_torch_batches(collate_fn=Collate(device="cuda"),
    device="cuda")``, or leave both ``"auto"``.

    ``dtype`` is :func:`tensorbridge.to_device`'s: a single floating dtype casts the
    floating-point columns only (labels keep theirs), a mapping casts the columns it
    names (``{"label": torch.int32}``) or the dtypes it names. (``iter_torch_batches``
    takes no ``dtypes=`` together with a ``collate_fn``: this is where casts go.)
    ``non_blocking=True`` (the default) queues the copy on the current stream without
    waiting, as Ray's default path does.

    Example:
        >>> import ray, tensorbridge as tb
        >>> ds = ray.data.from_items([{"x": [1.0, 2.0], "y": 0}])  # doctest: +SKIP
        >>> next(iter(ds.iter_torch_batches(collate_fn=tb.ray.Collate())))  # doctest: +SKIP
        {'x': tensor([[1., 2.]], dtype=torch.float64), 'y': tensor([0])}
    """

    def __init__(
        self, device: Device | str = "auto", dtype: DTypeSpec = None, non_blocking: bool = True
    ) -> None:
        dtype_rule(dtype, "tb.ray.Collate")  # refused here, not in the first batch
        if device != "auto":
            _backend.resolve_device(device, "tb.ray.Collate")
        self.device = device
        self.dtype = dtype
        self.non_blocking = bool(non_blocking)

    def target(self) -> torch.device:
        """The device batches go to (``"auto"`` resolved where the collate runs)."""
        if self.device != "auto":
            return _backend.resolve_device(self.device, "tb.ray.Collate")
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker

        device = get_device() if _in_ray_train_worker() else torch.device("cpu")
        return device if isinstance(device, torch.device) else torch.device(device)

    # (Ray types the result as a TypeVar bound to nothing the call takes: any batch goes)
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:  # type: ignore[override, unused-ignore]
        if not isinstance(batch, dict):
            raise TypeError(
                f"tb.ray.Collate takes Ray's NumPy batches (a dict of arrays), got "
                f"{type(batch).__name__}: use it as iter_torch_batches(collate_fn=...)."
            )
        numeric = {k: v for k, v in batch.items() if not _kept_as_numpy(v)}
        device = self.target()
        if device.type == "cpu":
            # Ray's arrays are often read-only views of its object store: one copy into
            # one buffer gives tensors of their own (Ray's pin_memory=True pins them)
            moved = PackedBatch.pack(numeric, pin=False).to(dtype=self.dtype)
        else:
            moved = to_device(numeric, device, non_blocking=self.non_blocking, dtype=self.dtype)
        return {k: moved[k] if k in moved else v for k, v in batch.items()}

    def __repr__(self) -> str:
        return (
            f"tb.ray.Collate(device={self.device!r}, dtype={self.dtype!r}, "
            f"non_blocking={self.non_blocking})"
        )


def _kept_as_numpy(column: Any) -> bool:
    """Strings, bytes, Python objects (and ragged tensor columns, which Ray gives as
    arrays of arrays) have no torch dtype: the column stays NumPy."""
    if not isinstance(column, np.ndarray):
        return False
    dtype = column.dtype if column.dtype.isnative else column.dtype.newbyteorder("=")
    return _dtypes.maybe_torch_dtype(dtype) is None
