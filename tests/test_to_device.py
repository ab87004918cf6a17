"""to_device: nested batches of every container kind keep their structure; dtypes by key or
by source dtype; many small arrays packed into few copies (checked on the host engine)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _batch

from conftest import TESTING, Pair, needs_testing_module

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is a test requirement
    ml_dtypes = None


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


def assert_same_structure(moved, original, device_type="cpu", expect=lambda t: t):
    """moved has original's structure; each array leaf equals expect(torch's own tensor)."""
    if isinstance(original, dict):
        assert type(moved) is type(original) and moved.keys() == original.keys()
        for k in original:
            assert_same_structure(moved[k], original[k], device_type, expect)
    elif isinstance(original, tuple) and hasattr(original, "_fields"):
        assert type(moved) is type(original)
        for a, b in zip(moved, original, strict=True):
            assert_same_structure(a, b, device_type, expect)
    elif isinstance(original, (list, tuple)):
        assert type(moved) is type(original) and len(moved) == len(original)
        for a, b in zip(moved, original, strict=True):
            assert_same_structure(a, b, device_type, expect)
    elif dataclasses.is_dataclass(original):
        assert type(moved) is type(original)
        for f in dataclasses.fields(original):
            assert_same_structure(
                getattr(moved, f.name), getattr(original, f.name), device_type, expect
            )
    elif isinstance(original, (np.ndarray, torch.Tensor)):
        assert isinstance(moved, torch.Tensor) and moved.device.type == device_type
        expected = expect(
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
    # a mapping casts what it names, integer and bool leaves too; the key name wins
    named = tb.to_device(
        {"labels": np.arange(3, dtype=np.int64), "mask": np.ones(2, bool), "x": np.ones(2)},
        "cpu",
        dtype={"labels": torch.int32, np.bool_: torch.uint8, "x": "float16", np.float64: "int8"},
    )
    assert named["labels"].dtype == torch.int32 and named["mask"].dtype == torch.uint8
    assert named["x"].dtype == torch.float16
    assert torch.equal(named["labels"], torch.arange(3, dtype=torch.int32))


def _batch_of_every_dtype(rng) -> dict:
    batch = make_batch(rng)
    batch["more"] = [
        rng.standard_normal(3).astype(np.float16),
        torch.randn(2, dtype=torch.bfloat16),
        rng.standard_normal(2).astype(np.complex64),
        torch.tensor([1.5, 2.5, 3.5, 4.5], dtype=torch.float64)[::2],
        np.arange(4, dtype=np.uint8),
        torch.tensor([True, False]),
    ]
    return batch


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        (torch.float16, torch.float16),
        (np.float16, torch.float16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("float64", torch.float64),
    ],
)
def test_to_device_single_dtype_casts_floating_leaves_only(backend, spec, target):
    """Every leaf as torch's idiom has it: t.to(dtype) if t.is_floating_point() else t."""
    batch = _batch_of_every_dtype(np.random.default_rng(2))
    moved = tb.to_device(batch, "cpu", dtype=spec)
    assert_same_structure(
        moved, batch, expect=lambda t: t.to(target) if t.is_floating_point() else t
    )
    assert moved["tokens"].dtype == torch.int64 and moved["mask"].dtype == torch.bool
    assert moved["more"][2].dtype == torch.complex64  # complex is not floating: kept
    pf = next(iter(tb.Prefetcher([batch], "cpu", dtype=spec)))
    assert_same_structure(pf, batch, expect=lambda t: t.to(target) if t.is_floating_point() else t)
    if ml_dtypes is not None:  # an ml_dtypes bfloat16 array is a floating leaf too
        a = np.random.default_rng(3).standard_normal(4).astype(ml_dtypes.bfloat16)
        got = tb.to_device({"b": a}, "cpu", dtype=spec)["b"]
        assert torch.equal(got, torch.from_numpy(a.astype(np.float32)).to(target))


@pytest.mark.parametrize("spec", [torch.int64, "int32", np.bool_, torch.complex64, torch.uint8])
def test_a_single_dtype_that_is_not_floating_is_refused(backend, monkeypatch, spec):
    def moved_too_early(*args, **kwargs):
        raise AssertionError("a leaf moved before the refusal")

    monkeypatch.setattr(_batch, "to_tensor", moved_too_early)
    batch = {"x": np.ones(2, np.float32), "y": np.arange(2)}
    with pytest.raises(TypeError, match=r"floating dtype.*pass a mapping by key or by source"):
        tb.to_device(batch, "cpu", dtype=spec)
    with pytest.raises(TypeError, match=r"^Prefetcher: .*floating dtype"):
        tb.Prefetcher([batch], "cpu", dtype=spec)
    with pytest.raises(TypeError, match="not a NumPy or torch dtype"):  # a mapping's target too
        tb.to_device(batch, "cpu", dtype={"x": "float17"})


@pytest.mark.parametrize("empty", [{}, [], (), {"a": []}, [None, "x", 3]])
def test_empty_and_valueless_batches(backend, empty):
    assert tb.to_device(empty, "cpu") == empty
    assert tb.to_numpy_batch(empty) == empty


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


@pytest.mark.parametrize("spec", [{"img": None}, {"lab": None}, {np.float32: None}])
def test_a_dtype_mapping_to_none_is_refused_before_anything_moves(spec):
    batch = {"img": np.ones(2, np.float32), "lab": np.arange(2)}
    with pytest.raises(TypeError, match="dtype=None is not a dtype here"):
        tb.to_device(batch, "cpu", dtype=spec)
    with pytest.raises(TypeError, match="dtype=None is not a dtype here"):
        tb.Prefetcher([batch], "cpu", dtype=spec)
