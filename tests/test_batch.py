"""Batches: nested structures, packed transfers, to_numpy_batch, collate, Prefetcher, images."""

from __future__ import annotations

import collections
import dataclasses
import zlib

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _batch

from conftest import TESTING, assert_same, needs_testing_module, poisoned

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is a test requirement
    ml_dtypes = None

Pair = collections.namedtuple("Pair", "image label")


@dataclasses.dataclass
class Sample:
    pixels: np.ndarray
    boxes: torch.Tensor
    name: str = "s"


def make_batch(rng) -> dict:
    return {
        "tokens": rng.integers(0, 30000, (4, 17)).astype(np.int64),
        "mask": rng.random((4, 17)) > 0.5,
        "pair": Pair(rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)[:, ::-1], 7),
        "list": [torch.randn(3, 2), np.float16(1.5), "text", None, rng.standard_normal(5)],
        "tuple": (rng.standard_normal((2, 3)).astype(">f4"), 3.25),
        "sample": Sample(rng.random((2, 2)).astype(np.float32), torch.arange(4.0)),
        "nested": {"deep": [{"x": rng.integers(0, 9, 6).astype(np.int16)}]},
    }


def assert_same_structure(moved, original, device_type="cpu"):
    if isinstance(original, dict):
        assert type(moved) is type(original) and moved.keys() == original.keys()
        for k in original:
            assert_same_structure(moved[k], original[k], device_type)
    elif isinstance(original, tuple) and hasattr(original, "_fields"):
        assert type(moved) is type(original)
        for a, b in zip(moved, original, strict=True):
            assert_same_structure(a, b, device_type)
    elif isinstance(original, (list, tuple)):
        assert type(moved) is type(original) and len(moved) == len(original)
        for a, b in zip(moved, original, strict=True):
            assert_same_structure(a, b, device_type)
    elif dataclasses.is_dataclass(original):
        assert type(moved) is type(original)
        for f in dataclasses.fields(original):
            assert_same_structure(getattr(moved, f.name), getattr(original, f.name), device_type)
    elif isinstance(original, (np.ndarray, torch.Tensor)):
        assert isinstance(moved, torch.Tensor) and moved.device.type == device_type
        expected = (
            original
            if isinstance(original, torch.Tensor)
            else torch.from_numpy(
                np.array(original, dtype=original.dtype.newbyteorder("="), order="C")
            )
        )
        assert moved.dtype == expected.dtype and torch.equal(moved.cpu(), expected)
    else:
        assert moved is original  # plain values are untouched (the same object)


def test_to_device_keeps_every_structure(backend):
    batch = make_batch(np.random.default_rng(0))
    moved = tb.to_device(batch, "cpu")
    assert_same_structure(moved, batch)
    assert moved["tokens"].data_ptr() == batch["tokens"].ctypes.data  # CPU: no copy


def test_to_device_dtype_by_key_and_by_source_dtype(backend):
    batch = make_batch(np.random.default_rng(1))
    moved = tb.to_device(batch, "cpu", dtype={"image": torch.float32, np.int16: "int64"})
    assert moved["pair"].image.dtype == torch.float32
    assert torch.equal(moved["pair"].image, torch.from_numpy(batch["pair"].image.copy()).float())
    assert moved["nested"]["deep"][0]["x"].dtype == torch.int64
    assert moved["tokens"].dtype == torch.int64 and moved["mask"].dtype == torch.bool
    everything = tb.to_device({"a": np.ones(2, np.uint8)}, "cpu", dtype=torch.float16)
    assert everything["a"].dtype == torch.float16


@pytest.mark.parametrize("empty", [{}, [], (), {"a": []}, [None, "x", 3]])
def test_empty_and_valueless_batches(backend, empty):
    assert tb.to_device(empty, "cpu") == empty
    assert tb.to_numpy_batch(empty) == empty


def test_to_numpy_batch_round_trip_into_outs(backend):
    rng = np.random.default_rng(2)
    batch = {"a": torch.randn(3, 4).t(), "b": [torch.arange(5), "keep"], "c": 1}
    outs = {"a": poisoned((4, 3), np.float32, "F"), "b": [None, None], "c": None}
    result = tb.to_numpy_batch(batch, out=outs)
    assert result["a"] is outs["a"]
    assert_same(result["a"], batch["a"].numpy())
    assert_same(result["b"][0], batch["b"][0].numpy())
    assert result["b"][1] == "keep" and result["c"] == 1
    handle = tb.to_numpy_batch(batch, non_blocking=True)
    assert isinstance(handle, tb.Transfer)
    assert_same(handle.wait()["a"], batch["a"].numpy())
    del rng


def test_to_numpy_batch_refuses_mismatched_out(backend):
    with pytest.raises(ValueError, match="same shape"):
        tb.to_numpy_batch({"a": torch.ones(2), "b": torch.ones(2)}, out={"a": None})


def test_to_numpy_points_to_the_batch_functions(backend):
    with pytest.raises(TypeError, match="to_numpy_batch"):
        tb.to_numpy({"a": torch.ones(2)})
    with pytest.raises(TypeError, match="to_numpy_batch"):
        tb.to_numpy([torch.ones(2)])


# ------------------------------------------------------------------------- packing


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _mixed_host_arrays(rng, n=200):
    """Mixed dtypes (big-endian and bfloat16 too), odd shapes and layouts, repeats of shapes."""
    kinds = ["u1", "<i2", "<f4", ">f8", "<c16", "?", "bfloat16"]
    arrays = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "bfloat16":
            if ml_dtypes is None:
                kind = "<f2"
            else:
                kind = ml_dtypes.bfloat16
        a = rng.integers(0, 100, (i % 4 + 1, i % 3 + 1)).astype(kind)
        arrays.append(a[::-1] if i % 3 == 0 else a.T if i % 3 == 1 else a)
    arrays.append(torch.from_numpy(rng.standard_normal((3, 5))).T)  # a strided CPU tensor
    arrays.append(np.zeros((0, 4), np.float32))  # empty
    arrays.append(rng.standard_normal(50000))  # larger than a block: its own pipeline
    return arrays


def test_pack_plan_is_aligned_grouped_and_ordered(rng):
    arrays = _mixed_host_arrays(rng)
    plan = _batch.pack_plan(list(enumerate(arrays)))
    assert plan.nbytes % 256 == 0 and plan.nbytes >= max(a.nbytes for a in plan.arrays)
    assert all(o % 256 == 0 for o in plan.offsets)
    assert all(
        plan.offsets[i] + plan.arrays[i].nbytes <= plan.offsets[i + 1]
        for i in range(len(plan.arrays) - 1)
    )
    assert sorted(i for run in plan.runs for i in run[4]) == list(range(len(arrays)))
    # one run per (dtype, shape): arrays that share both share one as_strided/unbind
    kinds = {
        (tb.from_numpy(a).dtype if isinstance(a, np.ndarray) else a.dtype, tuple(a.shape))
        for a in arrays
    }
    assert len(plan.runs) == len(kinds) < len(arrays) // 2


@needs_testing_module
@pytest.mark.parametrize("chunk", [4096, 1 << 16])
def test_many_small_arrays_packed_in_few_copies(rng, chunk):
    """Packed the way to_device packs them on a GPU; the views equal torch.from_numpy's."""
    arrays = _mixed_host_arrays(rng)
    plan = _batch.pack_plan(list(enumerate(arrays)))
    device = np.full(plan.nbytes, 0xAB, np.uint8)
    t = TESTING.HostTransferTester(delay_us=20)
    report = t.to_device_many(plan.arrays, plan.offsets, device, chunk_bytes=chunk, buffers=2)
    t.drain()
    views = _batch.packed_views(torch.from_numpy(device), plan)
    for i, a in enumerate(arrays):
        expected = (a if isinstance(a, torch.Tensor) else tb.from_numpy(a)).contiguous()
        got = views[i]
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert got.is_contiguous()
        assert _tensor_bytes(got) == _tensor_bytes(expected)
    big = next(k for k, a in enumerate(plan.arrays) if a.nbytes > chunk)
    packed_extent = plan.nbytes - plan.arrays[big].nbytes
    big_chunks = -(-plan.arrays[big].nbytes // chunk)
    # one copy per filled block (a block may close early when the next array does not fit)
    assert report["chunks"] - big_chunks <= 2 * -(-packed_extent // chunk) + 2
    assert report["chunks"] - big_chunks < len(arrays) // 4  # far fewer copies than arrays
    assert t.stats()["bytes_in_use"] == 0


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
