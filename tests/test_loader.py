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


def _assert_collated_like(ours, ref):
    """ours equals default_collate's result: same containers, same tensors and dtypes."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == ref.dtype
        assert torch.equal(ours, ref)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for k in ref:
            _assert_collated_like(ours[k], ref[k])
    elif isinstance(ref, tuple) and hasattr(ref, "_fields"):
        assert type(ours) is type(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_collated_like(a, b)
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_collated_like(a, b)
    else:
        assert ours == ref


def test_collate_nested_structures_match_default_collate(backend):
    rng = np.random.default_rng(5)

    def sample(i):
        return {
            "a": [{"b": rng.standard_normal(3).astype(np.float32), "c": (i, i * 2)}],
            "pair": Pair(rng.integers(0, 9, (2, 2)), torch.tensor(float(i))),
            "flags": [True, i % 2 == 0],
            "deep": _nest(rng.integers(0, 9, 2), 50),
        }

    data = [sample(i) for i in range(4)]
    _assert_collated_like(tb.collate(data), torch.utils.data.default_collate(data))


def _nest(leaf, depth):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _cyclic_list():
    a = [np.zeros(2)]
    a.append(a)
    return a


def _cyclic_dict():
    d = {"x": np.zeros(2)}
    d["self"] = d
    return d


# (id, samples, exception, what the message must say: the field's path and the samples)
COLLATE_MISFITS = [
    (
        "ragged field",
        [{"tokens": np.zeros(11)}, {"tokens": np.zeros(11)}, {"tokens": np.zeros(3)}],
        ValueError,
        r'^collate: batch\["tokens"\]: sample 2 has shape \(3,\), sample 0 has \(11,\); '
        r"samples must have equal shapes",
    ),
    (
        "ragged deep field",
        [{"a": [{"b": np.zeros(2)}]}, {"a": [{"b": np.zeros((2, 1))}]}],
        ValueError,
        r'batch\["a"\]\[0\]\["b"\]: sample 1 has shape \(2, 1\), sample 0 has \(2,\)',
    ),
    (
        "ragged namedtuple field",
        [{"p": Pair(np.zeros(2), 1)}, {"p": Pair(np.zeros(4), 1)}],
        ValueError,
        r'batch\["p"\]\.image: sample 1 has shape \(4,\)',
    ),
    (
        "ragged top level",
        [np.zeros(3), np.zeros(4)],
        ValueError,
        r"^collate: batch: sample 1 has shape \(4,\), sample 0 has \(3,\)",
    ),
    (
        "missing and extra keys",
        [{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 1, "z": 3}],
        ValueError,
        r'^collate: batch: sample 2 lacks key "y" and has the extra key "z" \(compared '
        r"with sample 0\); every sample must have the same keys",
    ),
    (
        "missing nested key",
        [{"m": {"a": 1, "b": 2}}, {"m": {"a": 1}}],
        ValueError,
        r'batch\["m"\]: sample 1 lacks key "b" \(compared',
    ),
    (
        "extra keys only",
        [{"x": 1}, {"x": 1, 3: 3, "w": 0}],
        ValueError,
        r'sample 1 has the extra keys 3, "w" \(compared',
    ),
    (
        "lists of other lengths",
        [{"boxes": [1, 2, 3]}, {"boxes": [1, 2]}],
        ValueError,
        r'batch\["boxes"\]: sample 1 has 2 items, sample 0 has 3 items; sequences .* equal '
        r"lengths",
    ),
    (
        "array, then an int",
        [{"x": np.zeros(2)}, {"x": np.zeros(2)}, {"x": 5}],
        TypeError,
        r'batch\["x"\]: sample 2 is int, sample 0 is numpy.ndarray; every sample must hold '
        r"the same kind of value",
    ),
    (
        "int, then an array",
        [{"x": 5}, {"x": np.zeros(2)}],
        TypeError,
        r'batch\["x"\]: sample 1 is numpy.ndarray, sample 0 is int',
    ),
    (
        "tensor, then None",
        [[torch.zeros(1)], [None]],
        TypeError,
        r"batch\[0\]: sample 1 is NoneType, sample 0 is torch.Tensor",
    ),
    (
        "dict, then a list",
        [{"x": {"a": 1}}, {"x": [1]}],
        TypeError,
        r'batch\["x"\]: sample 1 is list, sample 0 is dict',
    ),
    (
        "namedtuple, then a tuple",
        [Pair(1, 2), (1, 2)],
        TypeError,
        r"batch: sample 1 is tuple, sample 0 is conftest.Pair",
    ),
    (
        "strings in an array",
        [{"s": np.array(["a"])}, {"s": np.array(["b"])}],
        TypeError,
        r'^collate: batch\["s"\]: numpy dtype <U1 .* encode or tokenize',
    ),
    (
        "cyclic list",
        [_cyclic_list(), _cyclic_list()],
        ValueError,
        r"batch\[1\]\[1\].*: the samples are nested more than 100 levels deep, or contain "
        r"themselves",
    ),
    (
        "cyclic dict",
        [_cyclic_dict(), _cyclic_dict()],
        ValueError,
        r'batch\["self"\]\["self"\].*more than 100 levels deep, or contain themselves',
    ),
    (
        "nested 150 levels",
        [_nest(np.zeros(1), 150), _nest(np.zeros(1), 150)],
        ValueError,
        r"more than 100 levels deep",
    ),
    ("no samples", [], ValueError, r"at least one sample.*pass a non-empty list"),
    ("a dict, not a list", {"x": np.zeros(2)}, TypeError, r"takes a list of samples, got dict"),
]


@pytest.mark.parametrize(
    ("samples", "exc", "pattern"),
    [c[1:] for c in COLLATE_MISFITS],
    ids=[c[0] for c in COLLATE_MISFITS],
)
def test_collate_misfits_name_the_field_and_the_sample(backend, samples, exc, pattern):
    with pytest.raises(exc, match=pattern):  # not a KeyError, zip's error or RecursionError
        tb.collate(samples)


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
