"""How the public API is used, checked by ``mypy --strict`` in CI (.ci/lint): the types a
user's code sees must hold, e.g. ``to_numpy(x, non_blocking=True)`` is a Transfer.

Not collected by pytest (no test_ prefix); test_install.py runs it, so it also stays true.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from typing_extensions import assert_type

import tensorbridge as tb


def main() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    a: np.ndarray = tb.to_numpy(x)
    out = np.empty((2, 3), np.float32)
    same: np.ndarray = tb.to_numpy(x, out=out)
    handle: tb.Transfer[np.ndarray] = tb.to_numpy(x, non_blocking=True)
    waited: np.ndarray = handle.wait()
    done: bool = handle.done()
    t: torch.Tensor = tb.from_numpy(a)
    u: torch.Tensor = tb.to_tensor(a, dtype=torch.float64)
    batch = tb.to_device({"x": a, "y": [a, 1]}, "cpu")
    back = tb.to_numpy_batch(batch)
    batches(x, a)
    texts = [{"tokens": [1, 2], "meta": "a"}, {"tokens": [3], "meta": "b"}]
    padded = tb.collate(texts, pad={"tokens": 0}, fields={"meta": list})
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    images: torch.Tensor = tb.images_to_tensor(pixels, mean=[0.5] * 3, std=0.25, dtype="float16")
    wide: torch.Tensor = tb.images_to_tensor(pixels.astype(np.uint16), scale=1 / 65535)
    tb.images_to_tensor(pixels, mean=np.full(3, 0.5), std=torch.full((3,), 0.25))
    stats: dict[str, object] = dict(tb.pinned_stats())
    info: dict[str, object] = dict(tb.info())
    tb.set_num_threads(tb.get_num_threads())
    device: torch.device = tb.rank_device()
    ranks: dict[str, object] = dict(tb.info()["ranks"])
    pinned: np.ndarray = tb.empty_pinned((4,), np.float32)
    options = tb.registration_options(min_bytes=8 << 20)
    registering: bool = options["enabled"]
    tb.registration_options(**options)
    assert same is out and waited.shape == (2, 3) and done and t.shape == u.shape
    assert back["y"][1] == 1 and stats and info and pinned.shape == (4,)
    assert registering and options["min_bytes"] == 8 << 20
    assert device.type in ("cpu", "cuda") and "local_rank" in ranks
    assert padded["tokens_lengths"].tolist() == [2, 1] and padded["meta"] == ["a", "b"]
    assert images.shape == wide.shape == (2, 3, 4, 4)


def batches(x: torch.Tensor, a: np.ndarray) -> None:
    """A batch keeps its container's kind through to_device, to_numpy_batch and the
    Prefetcher (assert_type: an Any here fails mypy, and the asserts check it at run time)."""
    moved = tb.to_device(a, "cpu")
    assert_type(moved, torch.Tensor)
    assert_type(tb.to_device(x, "cpu", dtype=torch.float64), torch.Tensor)
    named = tb.to_device({"x": a, "n": 1}, "cpu")
    assert_type(named, dict[str, Any])
    assert_type(tb.to_device({"x": a, "y": a}, "cpu"), dict[str, Any])
    assert_type(tb.to_device(a.astype(np.float32), "cpu"), torch.Tensor)
    listed = tb.to_device([a, x], "cpu")
    assert_type(listed, list[Any])
    paired = tb.to_device((a, 1), "cpu")
    assert_type(paired, tuple[Any, ...])
    assert isinstance(moved, torch.Tensor) and isinstance(named["x"], torch.Tensor)
    assert type(listed) is list and type(paired) is tuple and named["n"] == 1

    arr = tb.to_numpy_batch(x)
    assert_type(arr, np.ndarray)
    back = tb.to_numpy_batch({"x": x, "n": 1})
    assert_type(back, dict[str, Any])
    assert_type(tb.to_numpy_batch([x]), list[Any])
    assert_type(tb.to_numpy_batch((x, 1)), tuple[Any, ...])
    pending = tb.to_numpy_batch({"x": x}, non_blocking=True)
    assert_type(pending, tb.Transfer[dict[str, Any]])
    assert_type(tb.to_numpy_batch(x, non_blocking=True), tb.Transfer[np.ndarray])
    assert isinstance(arr, np.ndarray) and isinstance(back["x"], np.ndarray)
    assert isinstance(pending.wait()["x"], np.ndarray)
    flag = bool(a.size)  # a bool known only at run time: either result, so Any
    assert_type(tb.to_numpy_batch(x, non_blocking=flag), Any)
    assert_type(tb.to_device(3, "cpu"), Any)  # plain values and dataclasses: Any

    samples = [{"image": a, "label": 1}]
    for b in tb.Prefetcher(samples, "cpu"):
        assert_type(b, dict[str, Any])
        assert isinstance(b["image"], torch.Tensor)
    for t in tb.Prefetcher([a, a], "cpu"):
        assert_type(t, torch.Tensor)
        assert isinstance(t, torch.Tensor)
    it = iter(tb.Prefetcher([(a, 1)], "cpu"))
    assert_type(it, Iterator[tuple[Any, ...]])
    assert type(next(it)) is tuple

    packed = tb.collate(samples, packed=True)
    assert_type(packed, tb.PackedBatch)
    assert_type(tb.PackedBatch.pack({"image": a}), tb.PackedBatch)
    assert_type(packed.pin_memory(), tb.PackedBatch)
    assert isinstance(packed.to("cpu")["image"], torch.Tensor)


if __name__ == "__main__":
    main()
