"""How the public API is used, checked by ``mypy --strict`` in CI (.ci/lint): the types a
user's code sees must hold, e.g. ``to_numpy(x, non_blocking=True)`` is a Transfer.

Not collected by pytest (no test_ prefix); test_install.py runs it, so it also stays true.
"""

from __future__ import annotations

import numpy as np
import torch

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
    texts = [{"tokens": [1, 2], "meta": "a"}, {"tokens": [3], "meta": "b"}]
    padded = tb.collate(texts, pad={"tokens": 0}, fields={"meta": list})
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    images: torch.Tensor = tb.images_to_tensor(pixels, mean=[0.5] * 3, std=0.25, dtype="float16")
    wide: torch.Tensor = tb.images_to_tensor(pixels.astype(np.uint16), scale=1 / 65535)
    stats: dict[str, object] = dict(tb.pinned_stats())
    info: dict[str, object] = dict(tb.info())
    tb.set_num_threads(tb.get_num_threads())
    pinned: np.ndarray = tb.empty_pinned((4,), np.float32)
    assert same is out and waited.shape == (2, 3) and done and t.shape == u.shape
    assert back["y"][1] == 1 and stats and info and pinned.shape == (4,)
    assert padded["tokens_lengths"].tolist() == [2, 1] and padded["meta"] == ["a", "b"]
    assert images.shape == wide.shape == (2, 3, 4, 4)


if __name__ == "__main__":
    main()
