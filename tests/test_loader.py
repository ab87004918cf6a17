"""The data-loader helpers: collate (against default_collate, in a DataLoader with workers),
Prefetcher, images_to_tensor, and the example training script that uses all three."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import Pair

# ------------------------------------------------------------------------- collate


def _collate_dataset():
    rng = np.random.default_rng(3)
    return [
        {
            "image": rng.integers(0, 256, (6, 5, 3)).astype(np.uint8),
            "label": i % 4,
            "score": float(i) / 3,
            "name": f"s{i}",
            "box": torch.tensor([i, i + 1.0]),
        }
        for i in range(24)
    ]


def test_collate_matches_default_collate(backend):
    data = _collate_dataset()
    ours = tb.collate(data[:8])
    ref = torch.utils.data.default_collate(data[:8])
    assert ours.keys() == ref.keys()
    for k in ("image", "label", "box"):
        assert torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype
    assert torch.allclose(ours["score"], ref["score"].to(ours["score"].dtype))
    assert ours["name"] == ref["name"]
    pairs = tb.collate([Pair(np.ones(2), 1), Pair(np.zeros(2), 2)])
    assert isinstance(pairs, Pair) and pairs.image.shape == (2, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_in_a_dataloader(workers):
    data = _collate_dataset()
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=8,
        num_workers=workers,
        collate_fn=tb.collate,
        pin_memory=False,
        timeout=120 if workers else 0,  # a stuck worker fails the test instead of hanging it
    )
    batches = list(loader)
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        expected = torch.utils.data.default_collate(data[8 * j : 8 * j + 8])
        assert torch.equal(batch["image"], expected["image"])
        assert torch.equal(batch["label"], expected["label"])


def test_collate_refuses_ragged_samples():
    with pytest.raises(ValueError, match="equal shapes"):
        tb.collate([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="at least one"):
        tb.collate([])


# ------------------------------------------------------------------------- prefetcher


def test_prefetcher_cpu_pass_through_and_len(backend):
    batches = [{"x": np.full((2, 2), i), "i": i} for i in range(5)]
    pf = tb.Prefetcher(batches, "cpu", dtype={"x": torch.float64})
    assert len(pf) == 5
    got = list(pf)
    assert [b["i"] for b in got] == list(range(5))
    assert all(b["x"].dtype == torch.float64 and float(b["x"][0, 0]) == b["i"] for b in got)
    assert len(list(pf)) == 5  # iterating again works on a re-iterable input


def test_prefetcher_raises_errors_in_order():
    def gen():
        yield {"x": np.zeros(1)}
        yield {"x": np.ones(1)}
        raise RuntimeError("loader failed")

    seen = []
    with pytest.raises(RuntimeError, match="loader failed"):
        for b in tb.Prefetcher(gen(), "cpu"):
            seen.append(float(b["x"][0]))
    assert seen == [0.0, 1.0]


def test_prefetcher_early_break_closes_the_source():
    closed = []

    def gen():
        try:
            for i in range(100):
                yield {"x": np.full(1, i)}
        finally:
            closed.append(True)

    it = iter(tb.Prefetcher(gen(), "cpu"))
    next(it)
    it.close()
    assert closed == [True]


def test_prefetcher_validates_arguments():
    with pytest.raises(ValueError, match="depth"):
        tb.Prefetcher([], "cpu", depth=0)
    with pytest.raises(TypeError, match="no len"):
        len(tb.Prefetcher(iter([]), "cpu"))


# ------------------------------------------------------------------------- images


@pytest.mark.parametrize("channels_first", [True, False])
def test_images_to_tensor_matches_torchvision_style(channels_first):
    x = np.random.default_rng(4).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    got = tb.images_to_tensor(x, mean=mean, std=std, channels_first=channels_first)
    ref = (torch.from_numpy(x).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / (
        torch.tensor(std, dtype=torch.float64)
    )
    ref = ref.permute(0, 3, 1, 2) if channels_first else ref
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_images_to_tensor_refusals():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="one per channel"):
        tb.images_to_tensor(x, mean=[0.5, 0.5])
    with pytest.raises(TypeError, match="floats"):
        tb.images_to_tensor(x, dtype=torch.int32)
    with pytest.raises(ValueError, match="H, W, C"):
        tb.images_to_tensor(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="zeros"):
        tb.images_to_tensor(x, std=0)


# ------------------------------------------------------------------------- the example


def test_example_trains_and_the_loss_falls():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_synthetic.py"
    spec = importlib.util.spec_from_file_location("train_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.train("cpu", steps=12, batch_size=16, workers=2, size=16, log=lambda s: None)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns the brightest channel
