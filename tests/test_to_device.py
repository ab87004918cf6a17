"""to_device: nested batches of every container kind keep their structure; dtypes by key or
by source dtype; many small arrays packed into few copies (checked on the host engine)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _batch, _cuda, _pack

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


class _Encoding(collections.UserDict):
    """Shaped like transformers' BatchEncoding: a UserDict with state besides its items."""

    def __init__(self, data=None, encodings=None):
        super().__init__(data)
        self._encodings = encodings


class _Tagged(dict):
    pass


class _Pair(collections.namedtuple("_Pair", "a b")):
    def __new__(cls, a):  # (one argument: b is a copy of a)
        return super().__new__(cls, a, a)


class _AttrDict(dict):
    """The common recipe: its items are its attributes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self


class _Merging(dict):
    """An update that merges nested dicts (addict's, mmengine's ConfigDict's)."""

    def update(self, other=(), **kw):
        for k, v in dict(other, **kw).items():
            if isinstance(self.get(k), dict) and isinstance(v, dict):
                self[k].update(v)
            else:
                self[k] = v


class _MirroringUserDict(collections.UserDict):
    """A UserDict that keeps its items as attributes too."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        setattr(self, key, value)


@dataclasses.dataclass
class _Record(dict):
    """A dict made a dataclass for its metadata: its constructor reads a dict as a field."""

    name: str = ""


class _KeyAttrs(dict):
    __getattr__ = dict.__getitem__  # (KeyError, not AttributeError, for a missing name)


_REBUILDS = [
    ("to_device", lambda b: tb.to_device(b, "cpu", dtype=torch.float64)),
    ("to_numpy_batch", lambda b: tb.to_numpy_batch(tb.to_device(b, "cpu"))),
    ("PackedBatch", lambda b: tb.PackedBatch.pack(b, pin=False).to("cpu", dtype=torch.float64)),
    ("Prefetcher", lambda b: next(iter(tb.Prefetcher([b], "cpu", dtype=torch.float64)))),
]


@pytest.mark.parametrize(("name", "move"), _REBUILDS, ids=[r[0] for r in _REBUILDS])
def test_mappings_keep_their_state_and_namedtuples_their_own_new(backend, name, move):
    """A BatchEncoding came back with its encodings None (its word_ids() then failed), a
    dict subclass without its attributes: rebuilt as type(m)(items). They are copies with
    the new items now, as torch's default_convert makes, and the originals are unchanged.
    A namedtuple with a __new__ of its own is rebuilt by _make, not refused."""
    rng = np.random.default_rng(7)
    enc = _Encoding({"input_ids": rng.random(4)}, encodings=["word ids"])
    tagged = _Tagged(x=rng.random(3))
    tagged.meta = "kept"
    ordered = collections.OrderedDict([("b", rng.random(2)), ("a", rng.random(2))])
    counts = collections.defaultdict(list, {"n": rng.random(2)})
    pair = _Pair(rng.random(2))
    batch = {"enc": enc, "tagged": tagged, "ordered": ordered, "counts": counts, "pair": pair}
    originals = {k: dict(v) for k, v in batch.items() if k != "pair"}
    moved = move(batch)
    assert type(moved["enc"]) is _Encoding and moved["enc"]._encodings == ["word ids"]
    assert type(moved["tagged"]) is _Tagged and moved["tagged"].meta == "kept"
    assert list(moved["ordered"]) == ["b", "a"] and moved["counts"].default_factory is list
    assert type(moved["pair"]) is _Pair
    for key, items in originals.items():  # (the caller's mappings: not written)
        assert batch[key] is not moved[key] and dict(batch[key]) == items
        for k, v in items.items():
            got = moved[key][k]
            assert batch[key][k] is v and got.tolist() == v.tolist()
            assert isinstance(got, np.ndarray if name == "to_numpy_batch" else torch.Tensor)
    assert moved["pair"].a.tolist() == pair.a.tolist() == moved["pair"].b.tolist()


@pytest.mark.parametrize(("name", "move"), _REBUILDS, ids=[r[0] for r in _REBUILDS])
def test_mappings_with_their_own_update_or_init_are_rebuilt_from_their_items(backend, name, move):
    """A copy plus the subclass's own update doubled a Counter's counts, left an AttrDict's
    attributes the caller's arrays, and merged into the caller's nested dicts: those
    mappings are rebuilt from their items, as before, and nothing of the caller's changes."""
    rng = np.random.default_rng(8)
    inner = {"img": rng.random(2)}
    keyattrs = _KeyAttrs(x=rng.random(2))
    keyattrs.__dict__["tag"] = 1
    batch = {
        "counts": collections.Counter(cat=3, dog=1),
        "attrs": _AttrDict(image=rng.random(2)),
        "merging": _Merging(inputs=inner),
        "keyattrs": keyattrs,
        "mirroring": _MirroringUserDict(x=rng.random(2)),
        "record": _Record(name="img-7"),
    }
    batch["record"]["r"] = rng.random(2)
    image, img = batch["attrs"]["image"], inner["img"]
    moved = move(batch)
    assert moved["counts"] == collections.Counter(cat=3, dog=1) == batch["counts"]
    assert moved["attrs"].image is moved["attrs"]["image"]
    assert moved["merging"]["inputs"] is not inner and inner == {"img": img}
    assert batch["attrs"]["image"] is image and batch["attrs"].image is image
    assert type(moved["keyattrs"]) is _KeyAttrs
    assert moved["mirroring"].x is moved["mirroring"]["x"]  # (not the caller's array)
    kind = np.ndarray if name == "to_numpy_batch" else torch.Tensor
    assert isinstance(moved["record"]["r"], kind)  # (a plain dict of its items, not a
    # record whose field is that dict)
    assert isinstance(moved["attrs"]["image"], kind) and isinstance(moved["keyattrs"]["x"], kind)


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
    for i in range(60):  # ragged: boxes and token ids of every length, some empty
        kind = ["<f4", ">i8", "u1", "<f2"][i % 4]
        boxes = rng.integers(0, 100, (int(rng.integers(0, 9)), 4)).astype(kind)
        tokens = rng.integers(0, 100, int(rng.integers(1, 600))).astype(kind)
        arrays += [boxes, tokens[::2] if i % 5 == 0 else tokens]
    # either side of the largest ragged size (64 KiB), and a lone array of its shape
    arrays += [np.ones(16383, np.float32), np.ones(16384, np.float32), np.ones((2, 7), ">f8")]
    # rows of 17 bytes align within 255 bytes of gap (ragged), rows of 33 do not (uniform)
    for n in (1, 2, 3, 5, 8):
        arrays += [np.full((n, 17), n, np.uint8), np.full((n, 33), n, np.uint8)]
    # many dimensions: the core holds up to six in place and more on the heap
    for shape in [(2, 1, 3, 1, 2, 2), (1, 2, 1, 3, 1, 2, 2), (2,) * 12, (1,) * 31 + (5,)]:
        for k in range(3):  # (three alike: a group of their own)
            a = rng.integers(0, 100, shape).astype(">i2" if len(shape) == 12 else "<f4")
            arrays.append(a[::-1] if k == 2 else a)
    return arrays


def _host_arrays(arrays):
    return [a if isinstance(a, np.ndarray) else tb.to_numpy(a) for a in arrays]


@pytest.fixture(params=["extension", "python"])
def path(request, monkeypatch) -> str:
    """The packing layer with the compiled layout, and with its NumPy twin."""
    if request.param == "extension" and tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    if request.param == "python":
        monkeypatch.setattr(_backend.ENGINE, "C", None, raising=False)
    return request.param


def test_pack_layout_is_aligned_grouped_and_ordered(rng, path):
    arrays = _host_arrays(_mixed_host_arrays(rng))
    plan = _pack.layout(arrays)
    assert (plan.native is None) == (path == "python")
    assert plan.nbytes % 256 == 0 and plan.nbytes >= max(a.nbytes for a in arrays)

    def dtype_of(a):
        return tb.from_numpy(a).dtype

    def ragged_key(a):
        """What may share a ragged group: 1 byte to 64 KiB, a dimension or more, and no
        larger with the rows that realign what follows it to 16 bytes than padded to 256."""
        if not (a.ndim and 0 < a.nbytes < 64 << 10):
            return None
        row = a.nbytes // a.shape[0]
        gap = next(g for g in range(16) if (a.nbytes + g * row) % 16 == 0)
        return (a.dtype, a.shape[1:]) if a.nbytes + gap * row <= -(-a.nbytes // 256) * 256 else None

    may_be_ragged = collections.Counter(ragged_key(a) for a in arrays)
    spans, seen = [], set()
    for t_dtype, shape, first, stride, members, split in plan.groups:
        assert first % 256 == 0
        if split is None:  # uniform: one shape, each array padded to 256 bytes
            assert stride % 256 == 0
            for k, m in enumerate(members):
                a = arrays[m]
                assert (dtype_of(a), tuple(a.shape)) == (t_dtype, shape) and stride >= a.nbytes
                key = ragged_key(a)
                assert key is None or may_be_ragged[key] < 3  # (else it would be ragged)
                seen.add((False, a.dtype, a.shape))
                spans.append((first + k * stride, first + k * stride + a.nbytes))
            continue
        # ragged: rows of one shape, back to back but for the fewest rows that start each
        # member on 16 bytes
        assert len(members) >= 3
        pieces, take = split
        take = range(len(pieces)) if take is None else take
        assert len(take) == len(members)
        at, pos = first, 0
        for m, j in zip(members, take, strict=True):
            a = arrays[m]
            assert dtype_of(a) == t_dtype and ragged_key(a) == (a.dtype, shape)
            gap = sum(pieces[pos:j])  # (the pieces between two members: one gap at most)
            assert j - pos <= 1 and (j == pos) == (at % 16 == 0)
            at += gap * stride
            assert at % 16 == 0 and (gap == 0 or (at - stride) % 16 != 0)
            assert (pieces[j], stride * pieces[j]) == (a.shape[0], a.nbytes)
            seen.add((True, a.dtype, shape))
            spans.append((at, at + a.nbytes))
            at, pos = at + a.nbytes, j + 1
        assert pos == len(pieces)
    assert len(seen) == len(plan.groups)  # one group per key
    assert any(g[5] is None for g in plan.groups) and any(g[5] for g in plan.groups)
    spans.sort()
    assert all(hi <= lo2 for (_, hi), (lo2, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= plan.nbytes
    assert sorted(m for g in plan.groups for m in g[4]) == list(range(len(arrays)))
    # never larger than every array padded to 256 bytes on its own
    assert plan.nbytes <= max(256, sum(-(-a.nbytes // 256) * 256 for a in arrays))


def test_ragged_groups_never_take_more_bytes_than_padding_each_array(path):
    """Single rows of 248 bytes would need a gap of one row after each: padded to 256
    bytes each, they take half the room."""
    for shape, dtype in [((1, 62), np.float32), ((1, 58), np.float32), ((1, 17), np.uint8)]:
        array = np.zeros(shape, dtype)
        plan = _pack.layout([array] * 100)
        assert plan.nbytes <= 100 * -(-array.nbytes // 256) * 256, shape
    tokens = [np.zeros(n, np.float32) for n in range(1, 200)]  # (1-D: always ragged)
    assert [g[5] is not None for g in _pack.layout(tokens).groups] == [True]


def test_the_compiled_layout_and_its_numpy_twin_agree(rng, monkeypatch):
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    for _ in range(20):
        arrays = _host_arrays(_mixed_host_arrays(rng, n=int(rng.integers(0, 60))))
        arrays = [arrays[i] for i in rng.permutation(len(arrays))[: int(rng.integers(1, 300))]]
        native = _pack.layout(arrays)
        with monkeypatch.context() as m:
            m.setattr(_backend.ENGINE, "C", None, raising=False)
            python = _pack.layout(arrays)
        assert native.native is not None and python.native is None
        assert (native.nbytes, native.groups) == (python.nbytes, python.groups)


def test_pack_into_writes_each_array_at_its_place(rng, path):
    arrays = _mixed_host_arrays(rng)
    plan = _pack.layout(_host_arrays(arrays))
    buffer = np.full(plan.nbytes + 512, 0xAB, np.uint8)  # poisoned, and longer than needed
    _pack.pack_into(plan, buffer)
    views = _pack.views(torch.from_numpy(buffer), plan)
    written = np.zeros(buffer.size, bool)
    for a, got in zip(arrays, views, strict=True):
        expected = (a if isinstance(a, torch.Tensor) else tb.from_numpy(a)).contiguous()
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert _tensor_bytes(got) == _tensor_bytes(expected)
        start = got.data_ptr() - buffer.ctypes.data
        written[start : start + got.numel() * got.element_size()] = True
    # the padding is zeroed (the buffer is pickled whole), past nbytes nothing is written
    assert (buffer[: plan.nbytes][~written[: plan.nbytes]] == 0).all()
    assert (buffer[plan.nbytes :] == 0xAB).all()


def test_pack_refuses_objects_and_non_arrays_before_writing():
    for bad, err in [
        ([np.ones(3), np.array([object()], dtype=object)], TypeError),
        ([np.ones(3), [1.0, 2.0]], TypeError),
        ([np.ones(3), np.zeros(2, dtype="U3")], TypeError),
    ]:
        with pytest.raises(err):
            _pack.layout(bad)
    plan = _pack.layout([np.ones(4), np.arange(3)])
    with pytest.raises(ValueError, match=r"C-contiguous|smaller"):
        _pack.pack_into(plan, np.zeros(plan.nbytes // 2, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(plan.nbytes, np.uint8)
        ro.flags.writeable = False
        _pack.pack_into(plan, ro)
    src = np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match="overlaps"):
        _pack.pack_into(_pack.layout([src[:8], np.ones(2)]), src)


def _poisoned_sender(chunk):
    """A sender over a fast simulated link whose device buffers start as 0xAB bytes (so
    unwritten bytes show), and the list of the buffers it made."""
    sender = _batch.LinkSender(tb._C.LinkSimulator(1000.0), chunk_bytes=chunk, buffers=4)
    poison = []

    def empty(nbytes):
        poison.append(torch.full((nbytes,), 0xAB, dtype=torch.uint8))
        return poison[-1]

    sender.empty = empty
    return sender, poison


def test_ragged_arrays_come_back_back_to_back_from_one_group(rng):
    """Token ids of every length (and boxes): one ragged group each, their tensors back to
    back in the buffer but each on 16 bytes, equal to torch.from_numpy, through the whole
    packed path."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    for arrays in (
        [rng.integers(0, 1000, int(n)).astype(">i4") for n in rng.integers(1, 900, 300)],
        [rng.standard_normal((int(n), 4)).astype(np.float32) for n in rng.integers(0, 30, 50)],
    ):
        plan = _pack.layout(arrays)
        (group,) = [g for g in plan.groups if g[5] is not None]
        assert len(group[4]) == sum(a.nbytes > 0 for a in arrays)
        sender, poison = _poisoned_sender(1 << 16)
        out = _batch.send_batch(arrays, torch.device("cpu"), sender, None, False)
        starts = []
        for a, got in zip(arrays, out, strict=True):
            expected = tb.from_numpy(a)
            assert (got.dtype, got.shape, got.is_contiguous()) == (
                expected.dtype,
                expected.shape,
                True,
            )
            assert _tensor_bytes(got) == _tensor_bytes(expected)
            if a.nbytes:
                starts.append((got.data_ptr() - poison[0].data_ptr(), a.nbytes))
        assert starts[0][0] == group[2]
        assert all(s % 16 == 0 for s, _ in starts)  # (a view as any dtype works, as on its own)
        assert all(s + n <= s2 < s + n + 16 for (s, n), (s2, _) in itertools.pairwise(starts))


def test_packed_tensors_view_as_any_dtype_where_the_idiom_does(rng):
    """Each packed tensor starts on 16 bytes, as a tensor of its own starts on more: a view
    as a wider dtype works wherever it works on torch.from_numpy's."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    arrays = [rng.integers(0, 255, int(n), dtype=np.uint8) for n in rng.integers(1, 99, 200)]
    arrays += [np.arange(n, dtype=np.uint8) for n in (5, 8, 16, 24, 48)]
    sender, _ = _poisoned_sender(1 << 16)
    out = _batch.send_batch(arrays, torch.device("cpu"), sender, None, False)
    viewed = 0
    for a, got in zip(arrays, out, strict=True):
        for wide in (torch.int16, torch.int32, torch.int64, torch.complex128):
            if a.nbytes % wide.itemsize:
                continue
            # (compared as int64 where wider: NaN bits would not compare equal as floats)
            back = torch.int64 if wide == torch.complex128 else wide
            idiom = torch.from_numpy(a).view(wide).view(back)
            assert torch.equal(got.view(wide).view(back), idiom)
            viewed += 1
    assert viewed > 100


def test_int64_and_longlong_share_a_group_in_both_layouts(path):
    """NumPy has two type numbers for int64 on LP64 systems ('l', 'q'), but one dtype."""
    arrays = [np.zeros(3, np.int64), np.zeros(4, "q"), np.zeros(5, np.int64), np.ones(6, "Q")]
    arrays += [np.ones(7, np.uint64), np.ones(8, "Q")]
    plan = _pack.layout(arrays)
    assert [g[4] for g in plan.groups] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("chunk", [4096, 1 << 16])
def test_many_small_arrays_sent_packed_in_few_copies(rng, chunk):
    """The whole to_device batch path (flatten, one native layout, staging by the copy
    threads, one view per group) over the simulated link; equal to torch.from_numpy."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    arrays = _mixed_host_arrays(rng)
    batch = {"arrays": arrays, "id": 7, "name": "x"}
    sender, poison = _poisoned_sender(chunk)
    out = _batch.send_batch(batch, torch.device("cpu"), sender, None, False)
    assert (out["id"], out["name"]) == (7, "x")
    for a, got in zip(arrays, out["arrays"], strict=True):
        expected = (a if isinstance(a, torch.Tensor) else tb.from_numpy(a)).contiguous()
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert got.is_contiguous()
        assert _tensor_bytes(got) == _tensor_bytes(expected)
        assert got.untyped_storage().data_ptr() == poison[0].data_ptr()  # views of one buffer
    report = sender.last_report
    plan = _pack.layout(_host_arrays(arrays))
    big = max(_host_arrays(arrays), key=lambda a: a.nbytes)
    big_chunks = -(-big.nbytes // chunk)
    packed_extent = plan.nbytes - big.nbytes
    # one copy per filled block (a block may close early when the next array does not fit)
    assert report["chunks"] - big_chunks <= 2 * -(-packed_extent // chunk) + 2
    assert report["chunks"] - big_chunks < len(arrays) // 4  # far fewer copies than arrays
    assert sender.link.stats()["bytes_in_use"] == 0


def _same_shape_arrays(rng, n=60):
    """One group: equal dtype and shape, reached through contiguous, transposed and
    reversed views."""
    out = []
    for i in range(n):
        a = rng.standard_normal((4, 3)).astype(np.float32)
        out.append(a if i % 3 == 0 else np.ascontiguousarray(a.T).T if i % 3 == 1 else a[::-1])
    return out


@pytest.mark.parametrize(
    "kind", ["one group", "groups", "ragged", "dict", "nested", "with a tensor"]
)
def test_batches_of_host_arrays_sent_packed_as_torch_makes_them(rng, kind):
    """Batches of host arrays only (most batches: the packed path takes them without
    sorting leaf by leaf), and one with a tensor among them: every leaf a view of the one
    poisoned buffer, with the dtype, shape and bytes of torch.from_numpy's tensor."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    same = _same_shape_arrays(rng)
    mixed = _host_arrays(_mixed_host_arrays(rng, n=60))[:-1]  # (no array of its own block)
    batch = {
        "one group": same,
        "groups": mixed,
        "ragged": [  # a group each: token ids and boxes of every length, some reversed
            (rng.integers(0, 9, (n,)) if n % 2 else rng.standard_normal((n, 4)))[::-1].astype(
                ["<i4", ">f8", "u1", "<f2"][n % 4]
            )
            for n in range(40)
        ],
        "dict": {f"k{i}": a for i, a in enumerate(mixed)},
        "nested": {"a": same[:20], "b": (mixed[0], [mixed[1], {"c": mixed[2]}]), "d": mixed[3]},
        "with a tensor": [*same[:5], torch.arange(6.0).reshape(2, 3).T, *mixed[:5]],
    }[kind]
    sender, poison = _poisoned_sender(1 << 16)
    out = _batch.send_batch(batch, torch.device("cpu"), sender, None, False)
    got, got_keys, got_spec = tb._tree.flatten(out)
    leaves, keys, spec = tb._tree.flatten(batch)
    assert (got_spec, got_keys) == (spec, keys) and len(got) == len(leaves)
    assert len(poison) == 1
    for a, t in zip(leaves, got, strict=True):
        expected = (a if isinstance(a, torch.Tensor) else tb.from_numpy(a)).contiguous()
        assert (t.dtype, t.shape) == (expected.dtype, expected.shape)
        assert _tensor_bytes(t) == _tensor_bytes(expected)
        assert t.untyped_storage().data_ptr() == poison[0].data_ptr()  # views of one buffer
    assert sender.link.stats()["bytes_in_use"] == 0


def test_large_page_locked_tensors_cross_on_their_own_not_packed(rng, monkeypatch):
    """A page-locked CPU tensor of ``Routing.batch_pinned_direct`` bytes or more, and
    contiguous (tb.collate's in the main process, the pin-memory thread's), crosses on
    its own in one DMA: copying it into the batch's staging buffer first would be a
    second host copy. Smaller ones, pageable ones, views that are not contiguous and
    NumPy arrays are packed as before; every leaf has the idiom's values."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    monkeypatch.setattr(_cuda.ROUTING, "batch_pinned_direct", 4096)  # (1 MiB by default)
    page_locked: set[int] = set()  # (storages standing for pinned memory)

    def pinned(n, dtype=torch.float32):
        t = torch.from_numpy(rng.standard_normal(n)).to(dtype)
        page_locked.add(t.untyped_storage().data_ptr())
        return t

    batch = {
        "image": pinned(1024),  # 4096 bytes: alone
        "image16": pinned(2048, torch.float16),  # 4096 bytes: alone
        "label": pinned(1023),  # 4092 bytes: packed
        "mask": torch.from_numpy(rng.standard_normal(4096)),  # pageable: packed
        "transposed": pinned(4096).reshape(64, 64).T,  # not contiguous: packed
        "ids": rng.integers(0, 9, 2000),  # NumPy: packed
    }
    sender, poison = _poisoned_sender(1 << 16)
    sender.pinned = lambda t: t.untyped_storage().data_ptr() in page_locked
    out = _batch.send_batch(batch, torch.device("cpu"), sender, None, False)
    assert len(poison) == 1  # (one buffer for the packed leaves)
    for key, leaf in batch.items():
        expected = leaf if isinstance(leaf, torch.Tensor) else tb.from_numpy(leaf)
        assert out[key].dtype == expected.dtype and torch.equal(out[key], expected), key
        inside = out[key].untyped_storage().data_ptr() == poison[0].data_ptr()
        assert inside == (key not in ("image", "image16")), key
    sender.pinned = None  # (the default: nothing is page-locked on a CPU build)
    out = _batch.send_batch(batch, torch.device("cpu"), sender, None, False)
    assert all(t.untyped_storage().data_ptr() == poison[-1].data_ptr() for t in out.values())
    # layouts the packing refuses are refused as before, naming the leaf, not asked
    # their size (a sparse tensor has no nbytes) or whether they are page-locked
    sender.pinned = lambda t: True
    for bad in (torch.ones(4096).to_sparse(), torch.eye(64).to_sparse_csr()):
        with pytest.raises(TypeError, match=r'^to_device: batch\["s"\] needs a dense \(strided\)'):
            _batch.send_batch({"s": bad, "x": np.ones(3)}, torch.device("cpu"), sender, None, False)


def test_packed_tensors_are_tensors_of_their_own_to_autograd(rng):
    """Each packed tensor behaves as the per-array idiom's does: in-place ops with an
    operand that requires grad, and requires_grad_() with a backward, work (outputs of one
    unbind would refuse the first), and the gradient is the idiom's."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    arrays = [rng.standard_normal(3).astype(np.float32) for _ in range(4)]
    sender = _batch.LinkSender(tb._C.LinkSimulator(1000.0))
    moved = _batch.send_batch(arrays, torch.device("cpu"), sender, None, False)
    idiom = [torch.from_numpy(a).to("cpu", copy=True) for a in arrays]
    w = torch.ones(3, requires_grad=True)
    for got, want in zip(moved, idiom, strict=True):
        assert not got.requires_grad
        got.mul_(w)
        want.mul_(w)
        assert torch.equal(got, want) and got.requires_grad
    (torch.stack(moved) * 2).sum().backward()
    grad = w.grad.clone()
    w.grad = None
    (torch.stack(idiom) * 2).sum().backward()
    assert torch.equal(grad, w.grad)
    packed = tb.PackedBatch.pack([a.copy() for a in arrays])
    for t in packed.unpack():
        t.requires_grad_()
        (t * 3).sum().backward()
        assert torch.equal(t.grad, torch.full((3,), 3.0))
    for t in packed.to("cpu", copy=True):  # (a buffer of their own: as the idiom's)
        t.mul_(w)


@pytest.mark.parametrize("write", ["buffer", "another unpack", "to cpu"])
def test_a_write_through_a_packed_batchs_buffer_is_seen_by_autograd(write):
    """unpack() gives views of the PackedBatch's buffer, which its owner can reach: a
    tensor saved for backward and then changed through the buffer (or another view of
    it) makes the backward refuse, as with views of any tensor, not give a wrong grad."""
    p = tb.PackedBatch.pack({"x": np.arange(4, dtype=np.float32), "y": np.ones(2)})
    x = p.unpack()["x"]
    w = torch.ones(4, requires_grad=True)
    loss = (w * x).sum()
    if write == "buffer":
        p.buffer.zero_()
    elif write == "another unpack":
        p.unpack()["x"].zero_()
    else:
        p.to("cpu")["x"].zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_flatten_and_unflatten_keep_order_and_count_the_leaves():
    batch = {"a": [1, 2.5, "x"], "b": ({"c": None, "d": 3}, [[4, 5], 6]), "e": {"f": 7, "g": [8]}}
    leaves, keys, spec = tb._tree.flatten(batch)
    assert leaves == [1, 2.5, "x", None, 3, 4, 5, 6, 7, 8]
    assert keys == ["a", "a", "a", "c", "d", "b", "b", "b", "f", "g"]
    assert tb._tree.unflatten(spec, leaves) == batch
    swapped = tb._tree.unflatten(spec, list(range(10)))
    assert swapped == {
        "a": [0, 1, 2],
        "b": ({"c": 3, "d": 4}, [[5, 6], 7]),
        "e": {"f": 8, "g": [9]},
    }
    with pytest.raises(ValueError, match="fewer leaves"):
        tb._tree.unflatten(spec, leaves[:-1])
    with pytest.raises(ValueError, match="fewer leaves"):
        tb._tree.unflatten(spec, leaves[:2])  # (short inside a list of leaves)
    with pytest.raises(ValueError, match="more leaves"):
        tb._tree.unflatten(spec, [*leaves, 0])


def test_leaf_path_names_the_place_of_every_leaf():
    """Each leaf's path, read as Python with the batch bound to ``batch``, is that leaf:
    dict and mapping keys (strings, ints, tuples), list and tuple indices, namedtuple and
    dataclass fields."""

    @dataclasses.dataclass
    class Sample:
        image: Any
        labels: Any

    Two = collections.namedtuple("Two", "left right")
    batch = {
        "a": [np.ones(1), np.ones(2)],
        7: ({"x": np.ones(3)}, [[np.ones(4), 5], 6]),
        (1, "t"): collections.OrderedDict(k=np.ones(1)),
        'say "hi"': Two(np.ones(1), Sample(np.ones(2), [np.ones(3), 4])),
        "u": collections.UserDict({"v": np.ones(1)}),
    }
    leaves, _, spec = tb._tree.flatten(batch)
    assert len(leaves) == 12
    for i, leaf in enumerate(leaves):
        path = tb._tree.leaf_path(spec, i)
        assert path is not None and path.startswith("batch")
        assert eval(path, {"batch": batch}) is leaf, path
    assert tb._tree.leaf_path(tb._tree.flatten(np.ones(1))[2], 0) is None  # (the batch)
    with pytest.raises(IndexError):
        tb._tree.leaf_path(spec, len(leaves))
    deep: Any = np.ones(1)
    for _ in range(20):
        deep = [deep]
    assert tb._tree.leaf_path(tb._tree.flatten(deep)[2], 0) == (
        "batch[0][0][0][0][0][0]...(11 more)...[0][0][0]"
    )


def test_a_str_subclass_key_is_named_as_the_string_it_is():
    """A str Enum's member formats as 'Color.RED', which is no key of the batch (its repr
    then); a str subclass whose __str__ raises must not turn the refusal into its error;
    a numpy.str_ is a string like any other."""
    import enum

    class Color(str, enum.Enum):
        RED = "red"

    class Odd(str):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    cases = (
        (Color.RED, "batch[<Color.RED: 'red'>]"),
        (Odd("x"), 'batch["x"]'),  # (its string, read as str's own)
        (np.str_("tokens"), 'batch["tokens"]'),  # (names read from an array)
    )
    for key, shown in cases:
        with pytest.raises(TypeError, match=rf"^to_device: {re.escape(shown)}: numpy dtype <U1"):
            tb.to_device({key: np.array(["s"]), "ok": np.ones(1)}, "cpu")


@pytest.mark.parametrize(
    "call",
    [
        lambda b: tb.to_device(b, "cpu"),
        lambda b: tb.to_device(b, "cpu", dtype=torch.float16),
        lambda b: tb.PackedBatch.pack(b),
        lambda b: tb.to_numpy_batch(b),
    ],
    ids=["to_device", "to_device-dtype", "pack", "to_numpy_batch"],
)
def test_a_refused_leaf_in_a_list_is_named_by_its_index_too(backend, call):
    """A refused leaf deep in lists and tuples is named by its whole place in the batch,
    not only by the nearest dict key (which several leaves share)."""
    bad = torch.ones(2, device="meta")
    batch = {"ok": np.ones(2), "x": [np.ones(2), (np.ones(2), [np.ones(1), bad])]}
    with pytest.raises((TypeError, ValueError), match=r': batch\["x"\]\[1\]\[1\]\[1\]'):
        call(batch)


@needs_testing_module
def test_a_packed_send_that_fails_leaves_no_block_in_use(rng):
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    arrays = _host_arrays(_mixed_host_arrays(rng))
    plan = _pack.layout(arrays)
    t = TESTING.HostTransferTester(delay_us=20, fail_copy_after=3)
    device = np.zeros(plan.nbytes, np.uint8)
    with pytest.raises(RuntimeError):
        t.to_device_packed(plan.native, device, chunk_bytes=4096, buffers=4, threads=2)
    t.drain()
    assert t.stats()["bytes_in_use"] == 0


def _expected_device(plan, poison=0xAB):
    """The device buffer a packed send should leave: ``plan``'s arrays at their offsets."""
    out = np.full(plan.nbytes, poison, np.uint8)
    _pack.pack_into(plan, out)
    return out


def _assert_packed_as(device, expected, plan):
    """Every array's bytes in ``device`` as in ``expected`` (padding aside)."""
    got = _pack.views(torch.from_numpy(device), plan)
    want = _pack.views(torch.from_numpy(expected), plan)
    for g, w in zip(got, want, strict=True):
        assert _tensor_bytes(g) == _tensor_bytes(w)


@needs_testing_module
def test_a_packed_send_without_staging_sends_small_arrays_in_one_copy(rng):
    """No staging block (a budget of 0): small arrays are packed on the host and cross in
    one pageable copy, not one blocking copy each; the bytes are those of the staged path."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    arrays = _host_arrays(_mixed_host_arrays(rng))
    plan = _pack.layout(arrays)
    t = TESTING.HostTransferTester(delay_us=20, budget=0)
    device = np.full(plan.nbytes, 0xAB, np.uint8)
    report = t.to_device_packed(plan.native, device, chunk_bytes=4096, buffers=4, threads=2)
    t.drain()
    assert not report["staged"] and report["chunks"] == 1
    assert t.stats()["fallbacks"] >= 1 and t.stats()["bytes_in_use"] == 0
    _assert_packed_as(device, _expected_device(plan), plan)


@needs_testing_module
def test_a_packed_send_without_staging_sends_large_arrays_as_they_are(rng):
    """Large arrays are not packed first (a pass over their bytes): each goes as it is,
    in chunks of its own."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    big = [rng.standard_normal((512, 1024)).astype(k) for k in ("<f4", ">f4", "<f8")]
    arrays = [big[0], big[1][::-1], big[2].T]
    plan = _pack.layout(arrays)
    t = TESTING.HostTransferTester(budget=0)
    device = np.full(plan.nbytes, 0xAB, np.uint8)
    report = t.to_device_packed(plan.native, device, chunk_bytes=1 << 20, buffers=4, threads=2)
    t.drain()
    assert not report["staged"]
    assert report["chunks"] == sum(-(-a.nbytes // (1 << 20)) for a in arrays)
    _assert_packed_as(device, _expected_device(plan), plan)


@needs_testing_module
@pytest.mark.parametrize("budget", [6 * 4096, 1 << 20])
def test_back_to_back_packed_sends_that_do_not_wait(rng, budget):
    """Non-blocking packed sends one after another over a slow link, their sources
    overwritten as each returns: a block still being read by the last call's copies is
    filled again only once they are done, so every batch arrives whole."""
    if tb.info()["extension"] is False:
        pytest.skip("needs the compiled extension")
    t = TESTING.HostTransferTester(delay_us=300, budget=budget)
    sent = []
    for _ in range(5):
        arrays = _host_arrays(_mixed_host_arrays(rng, n=60))
        plan = _pack.layout(arrays)
        expected = _expected_device(plan)
        device = np.full(plan.nbytes, 0xAB, np.uint8)
        report = t.to_device_packed(
            plan.native, device, chunk_bytes=4096, buffers=4, threads=2, wait=False
        )
        assert report["staged"]
        for a in arrays:  # free to reuse once the call returns
            a[...] = np.zeros((), a.dtype)
        sent.append((device, expected, plan))
    t.drain()
    for device, expected, plan in sent:
        _assert_packed_as(device, expected, plan)
    assert t.stats()["bytes_in_use"] == 0


@pytest.mark.parametrize("spec", [{"img": None}, {"lab": None}, {np.float32: None}])
def test_a_dtype_mapping_to_none_is_refused_before_anything_moves(spec):
    batch = {"img": np.ones(2, np.float32), "lab": np.arange(2)}
    with pytest.raises(TypeError, match="dtype=None is not a dtype here"):
        tb.to_device(batch, "cpu", dtype=spec)
    with pytest.raises(TypeError, match="dtype=None is not a dtype here"):
        tb.Prefetcher([batch], "cpu", dtype=spec)


def test_a_dtype_mapping_that_names_no_leaf_is_refused():
    """A typo in a key name would cast nothing: refused, naming the keys there are."""
    batch = {"image": np.ones(2, np.float32), "labels": np.arange(2), "id": 3}
    with pytest.raises(ValueError, match=r"names 'lables'.*'image', 'labels'"):
        tb.to_device(batch, "cpu", dtype={"lables": torch.int32})
    with pytest.raises(ValueError, match=r"PackedBatch.to: dtype= names 'id'"):
        tb.PackedBatch.pack(batch).to("cpu", dtype={"id": torch.int32})  # not an array
    packed = tb.PackedBatch.pack(batch)  # (given to a function: named after it)
    with pytest.raises(ValueError, match=r"^to_device: dtype= names 'id'"):
        tb.to_device(packed, "cpu", dtype={"id": torch.int32})
    with pytest.raises(ValueError, match=r"^Prefetcher: dtype= names 'id'"):
        list(tb.Prefetcher([packed], "cpu", dtype={"id": torch.int32}))
    # dtype keys are rules for any batch: one that matches nothing is no error
    out = tb.to_device(batch, "cpu", dtype={torch.int16: torch.int8, "labels": torch.int32})
    assert out["labels"].dtype == torch.int32 and out["image"].dtype == torch.float32
    # a string in a mapping is a key name; one that names a dtype gets the dtype's spelling
    with pytest.raises(ValueError, match=r"names 'int64'.*use a dtype object.*\{torch\.int64: "):
        tb.to_device(batch, "cpu", dtype={"int64": torch.int32})
    # (a one-letter type code is more likely a key: no dtype hint, and no NumPy warning)
    for key in ("f", "a", "float", "half"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=rf"names '{key}'") as info:
                tb.to_device(batch, "cpu", dtype={key: torch.int32})
        assert "dtype object" not in str(info.value)


# (leaf, what the refusal says after the key)
_BAD_LEAVES = {
    "object": (lambda: np.array([1, "x"], object), r"object has no torch equivalent"),
    "strings": (lambda: np.array(["x"]), r"<U1 has no torch equivalent"),
    "meta": (lambda: torch.empty(2, device="meta"), r"cannot convert a meta tensor"),
    "sparse": (lambda: torch.ones(2).to_sparse(), r"dense \(strided\) tensor"),
}


def _link_send(batch):
    sender = _batch.LinkSender(tb._C.LinkSimulator(1000.0))
    return _batch.send_batch(batch, torch.device("cpu"), sender, None, False)


@pytest.mark.parametrize("bad", list(_BAD_LEAVES))
@pytest.mark.parametrize(
    "route",
    ["cpu", "cpu with dtype", "prefetcher", "packed"],
)
def test_a_leaf_refused_in_a_batch_is_named_by_its_place(backend, bad, route):
    """On every route a refusal names the function (to_device, or the Prefetcher) and
    where the leaf sits in the batch, and is a TypeError or ValueError (torch's
    NotImplementedError for a meta tensor is not)."""
    if route == "packed" and tb._C is None:
        pytest.skip("needs the compiled extension")
    make, says = _BAD_LEAVES[bad]
    batch = {"image": np.ones((2, 3), np.float32), "meta": {"tokens": [np.arange(3), make()]}}
    if bad == "sparse" and route in ("cpu", "prefetcher"):
        assert tb.to_device(batch, "cpu")["meta"]["tokens"][1].is_sparse  # (moves as it is)
        return
    move = {
        "cpu": lambda: tb.to_device(batch, "cpu"),
        "cpu with dtype": lambda: tb.to_device(batch, "cpu", dtype=torch.float16),
        "prefetcher": lambda: list(tb.Prefetcher([batch], "cpu")),
        "packed": lambda: _link_send(batch),
    }[route]
    fn = "Prefetcher" if route == "prefetcher" else "to_device"
    message = rf'^{fn}: batch\["meta"\]\["tokens"\]\[1\](?!.*to_device).*{says}'
    with pytest.raises((TypeError, ValueError), match=message):
        move()
