"""PackedBatch and collate(packed=True): the same tensors as the unpacked paths, one buffer."""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
import zlib
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as loader_pin_memory

import tensorbridge as tb
from tensorbridge import _pack, _packed

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

Point = collections.namedtuple("Point", "xy weight")


@dataclasses.dataclass
class Sample:
    image: np.ndarray
    label: int


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def arenas(monkeypatch) -> list:
    """Every Arena collate(packed=True) makes, in order (to see whether it spilled)."""
    made: list = []
    real = _packed.Arena

    class Watched(real):
        def __init__(self, nbytes):
            super().__init__(nbytes)
            made.append(self)

    monkeypatch.setattr(_packed, "Arena", Watched)
    return made


def _random_batch(rng):
    """Nested containers; dtypes (big-endian, bfloat16, bool, complex), layouts and values."""
    kinds = ["u1", "<i2", "<f4", ">f8", "<c8", "?", ">u4"]
    if ml_dtypes is not None:
        kinds.append(ml_dtypes.bfloat16)
    arrays = []
    for i in range(60):
        a = rng.integers(0, 100, (i % 3 + 1, i % 4 + 2)).astype(kinds[i % len(kinds)])
        arrays.append(a[::-1] if i % 3 == 0 else a.T if i % 3 == 1 else a)
    return {
        "arrays": arrays,
        "tensor": torch.from_numpy(rng.standard_normal((4, 6))).T,  # strided CPU tensor
        "empty": np.zeros((0, 3), np.int64),
        "scalar": np.array(rng.standard_normal()),
        "point": Point(rng.standard_normal(2), 0.5),
        "sample": Sample(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), 3),
        "values": (7, "name", None, 2.5),
        "big": rng.standard_normal(40000),  # 320 KB: several packs' worth on its own
    }


def _expected(leaf):
    return leaf.contiguous() if isinstance(leaf, torch.Tensor) else tb.from_numpy(leaf)


def _assert_same(got, batch):
    """got: batch's structure with every array a tensor equal (bits, dtype, shape) to it."""
    got_leaves, got_keys, _ = tb._tree.flatten(got)
    leaves, keys, _ = tb._tree.flatten(batch)
    assert got_keys == keys
    for g, leaf in zip(got_leaves, leaves, strict=True):
        if isinstance(leaf, (np.ndarray, torch.Tensor)):
            e = _expected(leaf)
            assert isinstance(g, torch.Tensor)
            assert (g.dtype, g.shape) == (e.dtype, e.shape)
            assert g.is_contiguous()
            assert torch.equal(g.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8))
        else:
            assert g is leaf or g == leaf
    assert type(got) is type(batch)
    assert type(got["point"]) is Point and type(got["sample"]) is Sample


def test_pack_then_to_host_gives_the_same_tensors_as_to_device(rng):
    batch = _random_batch(rng)
    packed = tb.PackedBatch.pack(batch)
    n_arrays = sum(isinstance(x, (np.ndarray, torch.Tensor)) for x in tb._tree.flatten(batch)[0])
    assert len(packed) == n_arrays
    assert packed.nbytes % 256 == 0
    for got in (packed.to("cpu"), packed.unpack(), packed.to(), tb.to_device(packed, "cpu")):
        _assert_same(got, batch)
        for t in tb._tree.flatten(got)[0]:  # views of the one buffer: no copies on the host
            if isinstance(t, torch.Tensor) and t.numel():
                assert t.untyped_storage().data_ptr() == packed.buffer.data_ptr()


def test_the_repr_counts_arrays_and_groups():
    one = tb.PackedBatch.pack({"x": np.ones(3, np.float32)}, pin=False)
    assert repr(one) == f"PackedBatch(1 array in 1 group, {one.nbytes} bytes, unpinned)"
    two = tb.PackedBatch.pack([np.ones(3, np.float32), np.ones(2, np.int64)], pin=False)
    assert repr(two).startswith("PackedBatch(2 arrays in 2 groups, ")


def test_the_packed_bytes_come_from_the_arrays_not_from_the_buffer(rng, monkeypatch):
    """The buffer is poisoned before packing: every array byte must be overwritten."""
    made = []

    def poisoned(nbytes, pin=None):
        made.append(torch.full((nbytes,), 0xAB, dtype=torch.uint8))
        return made[-1]

    monkeypatch.setattr(_packed, "new_host_buffer", poisoned)
    batch = {"a": rng.standard_normal((3, 5)), "b": rng.integers(0, 9, 7).astype(">i4")[::2]}
    _assert_same_values(tb.PackedBatch.pack(batch).unpack(), batch)
    assert len(made) == 1


def _padding(packed):
    """The bytes of a packed batch's buffer that hold no array, and those of its storage
    past the buffer (pickled with it)."""
    storage = packed.buffer.untyped_storage()
    buf = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
    buf = buf[packed.buffer.storage_offset() :]
    free = np.ones(buf.size, bool)
    for dtype, shape, first, stride, members, split in packed._groups:
        n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if split is not None:  # (ragged: pieces of rows of n bytes, some of them gaps)
            pieces, take = split
            starts = np.cumsum([0, *pieces]) * n + first
            for j in range(len(pieces)) if take is None else take:
                free[starts[j] : starts[j + 1]] = False
            continue
        for k in range(len(members)):
            free[first + k * stride : first + k * stride + n] = False
    return buf[free]


@pytest.mark.parametrize("how", ["pack", "collate", "collate-spilled"])
def test_the_padding_is_zeroed_not_left_from_the_allocation(backend, rng, how, monkeypatch):
    """A packed buffer is pickled and saved whole: the bytes between its arrays must
    not carry what the allocation held before (poisoned here)."""
    real = _packed.new_host_buffer
    monkeypatch.setattr(_packed, "new_host_buffer", lambda n, pin=None: real(n, pin).fill_(0xAB))
    if how == "collate-spilled":
        monkeypatch.setattr(tb._loader, "estimate_nbytes", lambda *args: 0)
    if how == "pack":
        batch = {"a": rng.integers(0, 9, 3).astype(np.uint8), "b": [rng.standard_normal(5)[::-1]]}
        batch["c"] = [rng.integers(0, 9, (2, 3)).astype(">i2").T, np.zeros((0, 2))]
        batch["d"] = [rng.standard_normal(n).astype(np.float32) for n in (3, 5, 7)]  # ragged
        packed = tb.PackedBatch.pack(batch)
        assert any(split and split[1] for *_, split in packed._groups)  # (gaps too)
        _assert_same_values(packed.unpack(), {"a": batch["a"]})
    else:
        packed = tb.collate(_samples(rng), packed=True, pad={"tokens": -1})
    pad = _padding(packed)
    assert pad.size and (pad == 0).all()


def test_collate_sizes_its_buffer_without_the_fields_kept_as_lists(rng, monkeypatch):
    """The packed buffer of ``collate(packed=True)`` is sized before collating: a field
    kept as a list (``fields=``) takes none of it (its arrays stay outside), and a size
    that cannot be had (a ragged sample 0 of many bytes) falls back to collating first,
    so collate's own refusal is what the user meets, as without ``packed=True``."""
    samples = [{"raw": rng.standard_normal(1 << 16), "y": i} for i in range(8)]
    assert _packed.estimate_nbytes(samples, None, {"raw": list}) < 4096  # (not 4 MiB of raw)
    packed = tb.collate(samples, packed=True, fields={"raw": list})
    assert packed.buffer.untyped_storage().nbytes() < 4096  # (8 labels)
    assert all(r is s["raw"] for r, s in zip(packed.unpack()["raw"], samples, strict=True))
    real = _packed.new_host_buffer

    def limited(nbytes, pin=None):
        if nbytes > 1 << 20:
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: {nbytes} bytes")
        return real(nbytes, pin)

    monkeypatch.setattr(_packed, "new_host_buffer", limited)
    ragged = [{"x": np.zeros(1 << 20)}, {"x": np.zeros(3)}]
    with pytest.raises(ValueError, match=r'^collate: batch\["x"\]: sample 1 has shape \(3,\)'):
        tb.collate(ragged, packed=True)
    fits = [{"x": np.full(4, float(i))} for i in range(2)]
    monkeypatch.setattr(_packed, "new_host_buffer", real)  # (the estimate, allocated)
    monkeypatch.setattr(tb._loader, "estimate_nbytes", lambda *args: 64 << 20)  # (far over)
    got = tb.collate(fits, packed=True)
    assert torch.equal(got.unpack()["x"], tb.collate(fits)["x"])
    assert got.buffer.untyped_storage().nbytes() < 4096  # (repacked to its own size)


def test_collate_sizes_numbers_by_the_dtype_they_stack_as(rng):
    """Numbers take the bytes their stacked dtype does (bool 1, np.float32 4, an int 8),
    so samples of many number fields are not sized at 16 bytes each and repacked (a
    second copy of the batch): the buffer is the batch's own size, first time."""
    samples = [
        {**{f"b{k}": bool(k % 2) for k in range(50)}, "f": np.float32(i), "n": i, "s": "x"}
        for i in range(64)
    ]
    estimate = _packed.estimate_nbytes(samples)
    alignment = 2 * _pack.ALIGN * (53 + 1)  # (room to align each of the 53 leaves, twice)
    assert estimate - alignment == 64 * (50 * 1 + 4 + 8)  # (bools, float32, int64; "s": 0)
    packed = tb.collate(samples, packed=True)
    assert packed.nbytes <= estimate
    assert packed.buffer.untyped_storage().nbytes() == estimate  # (the arena's: no repack)
    assert packed.unpack()["f"].dtype == torch.float32 and packed.unpack()["s"] == ["x"] * 64


def _assert_same_values(got, batch):
    for k in batch:
        assert torch.equal(got[k], tb.from_numpy(batch[k])), k


def test_to_copies_for_the_host_only_when_asked(rng):
    packed = tb.PackedBatch.pack({"x": rng.standard_normal(4)})
    shared = packed.to("cpu")["x"]
    copied = packed.to("cpu", copy=True)["x"]
    assert shared.data_ptr() == packed.buffer.data_ptr()
    assert copied.data_ptr() != packed.buffer.data_ptr()
    assert torch.equal(shared, copied)


def test_to_casts_like_to_device(rng):
    batch = {"img": rng.standard_normal((2, 3)).astype(np.float32), "label": np.arange(2)}
    packed = tb.PackedBatch.pack(batch)
    out = packed.to("cpu", dtype=torch.float16)
    assert out["img"].dtype == torch.float16 and out["label"].dtype == torch.int64
    assert torch.equal(out["img"], torch.from_numpy(batch["img"]).half())
    out = packed.to("cpu", dtype={"label": torch.int32})
    assert out["img"].dtype == torch.float32 and out["label"].dtype == torch.int32
    out = tb.to_device(packed, "cpu", dtype={"label": "int16"})
    assert out["label"].dtype == torch.int16
    with pytest.raises(TypeError, match="floating dtype"):
        packed.to("cpu", dtype=torch.int32)


def test_pickle_round_trips_and_keeps_one_buffer(rng):
    batch = _random_batch(rng)
    packed = tb.PackedBatch.pack(batch)
    back = pickle.loads(pickle.dumps(packed))
    assert isinstance(back, tb.PackedBatch) and back.nbytes == packed.nbytes
    _assert_same(back.unpack(), batch)
    # the DataLoader's pickler moves the buffer to shared memory once, as one tensor
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(packed)
    shared = pickle.loads(buf.getvalue())
    _assert_same(shared.unpack(), batch)
    assert shared.buffer.is_shared()


def test_a_batch_pickled_with_five_fields_per_group_still_loads(rng):
    """Groups gained a sixth field (a ragged group's split); a uniform batch pickled by an
    earlier tensorbridge, with five, unpickles the same."""
    batch = {"x": [rng.standard_normal(9000) for _ in range(3)], "y": rng.integers(0, 9, (2, 2))}
    packed = tb.PackedBatch.pack(batch)
    rebuild, (buffer, groups, *rest) = packed.__reduce__()
    assert all(g[5] is None for g in groups)
    old = [g[:5] for g in groups]
    back = rebuild(buffer, old, *rest).unpack()
    assert torch.equal(back["y"], tb.from_numpy(batch["y"]))
    assert all(torch.equal(g, tb.from_numpy(a)) for g, a in zip(back["x"], batch["x"], strict=True))


def test_pin_memory_is_what_the_loader_thread_calls(rng):
    packed = tb.PackedBatch.pack({"x": rng.standard_normal(3)})
    pinned = loader_pin_memory(packed)
    assert isinstance(pinned, tb.PackedBatch)
    if not tb.info()["cuda"]:
        assert pinned is packed and not pinned.is_pinned()  # nothing to pin with
    _assert_same_values(pinned.unpack(), {"x": packed.unpack()["x"].numpy()})


@pytest.fixture
def fake_pinning(monkeypatch):
    """Page-locked memory can be had (as on a GPU machine, the pure-Python path's too):
    each host tensor made with ``pin_memory=True`` is recorded (and made pageable: this
    machine may have no GPU)."""
    pinned: list[int] = []
    empty = torch.empty

    def recording_empty(*args, pin_memory=False, **kwargs):
        t = empty(*args, **kwargs)
        if pin_memory:
            pinned.append(t.data_ptr())
        return t

    monkeypatch.setattr(type(tb._backend.ENGINE), "pinned_memory", property(lambda self: True))
    monkeypatch.setattr(torch, "empty", recording_empty)
    return pinned


def test_a_child_forked_after_cuda_started_pins_nothing(monkeypatch):
    """A process forked after its parent started CUDA (a fork-based multiprocessing pool
    after collate pinned a batch) cannot use CUDA: torch marks it a bad fork, where
    torch.cuda.is_initialized() reads False, and collate there must not ask torch for
    page-locked memory (which would fail to start CUDA)."""
    engine = tb._backend.Engine(tb._backend.ENGINE.C, None)
    monkeypatch.setattr(engine, "cuda_status", lambda: (True, 1, None))
    assert engine.pinned_memory  # (a GPU machine, before the fork)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    engine.after_fork_in_child()
    assert not engine.pinned_memory and not engine.cuda_engine


def test_array_functions_given_a_packed_batch_name_the_batch_calls(rng):
    """to_numpy, to_tensor and images_to_tensor refuse a PackedBatch (a whole batch)
    naming the calls that take one, and those calls work; a dtype's name where ``.to()``
    takes a device says to pass it as ``dtype=``."""
    images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    packed = tb.PackedBatch.pack({"image": images, "label": np.arange(2)})
    with pytest.raises(TypeError, match=r"got PackedBatch: to_numpy_batch\(packed\) gives"):
        tb.to_numpy(packed)
    assert np.array_equal(tb.to_numpy_batch(packed)["image"], images)
    with pytest.raises(TypeError, match=r"got PackedBatch: packed\.to\(device\) or to_device"):
        tb.to_tensor(packed)
    assert torch.equal(packed.to("cpu")["image"], tb.from_numpy(images))
    with pytest.raises(TypeError, match=r"images_to_tensor\(packed\.unpack\(\)\['image'\]"):
        tb.images_to_tensor(packed)
    assert tb.images_to_tensor(packed.unpack()["image"]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"device='float16' is not a device but a dtype's name"):
        packed.to("float16")
    with pytest.raises(ValueError, match=r"device='float' is .* pass it as dtype=torch\.float32"):
        packed.to("float")  # (torch's reading: 'float' is float32 to torch)
    with pytest.raises(TypeError, match=r"\(torch\.float16 is a dtype: pass it as dtype="):
        tb.to_device({"x": images}, torch.float16)
    assert packed.to(dtype="float16")["image"].dtype == torch.uint8  # (floating leaves only)


def test_batches_are_pinned_wherever_page_locked_memory_can_be_had(rng, fake_pinning):
    """collate, PackedBatch.pack and .pin_memory() ask for page-locked memory in the main
    process wherever it can be had: the pure-Python path on a GPU machine as well, where
    the DataLoader's pin-memory thread would otherwise hand a packed batch on unpinned."""
    samples = [{"x": rng.standard_normal(5), "y": i} for i in range(3)]
    batch = tb.collate(samples)
    assert batch["x"].data_ptr() in fake_pinning
    packed = tb.collate(samples, packed=True)
    assert packed.buffer.data_ptr() in fake_pinning
    explicit = tb.PackedBatch.pack({"x": rng.standard_normal(4)}, pin=True)  # (not refused)
    assert explicit.buffer.data_ptr() in fake_pinning
    unpinned = tb.PackedBatch.pack({"x": rng.standard_normal(4)}, pin=False)
    assert unpinned.buffer.data_ptr() not in fake_pinning
    repinned = unpinned.pin_memory()  # (torch's is_pinned is False for the fake: a copy)
    assert repinned.buffer.data_ptr() in fake_pinning
    _assert_same_values(repinned.unpack(), {"x": unpinned.unpack()["x"].numpy()})


@pytest.mark.parametrize(
    "leaf, error, match",
    [
        (torch.ones(2, requires_grad=True), ValueError, r"requires grad.*\.detach\(\)"),
        (torch.ones(2, device="meta"), TypeError, r'batch\["bad"\] cannot convert a meta tensor'),
        (torch.ones(2).to_sparse(), TypeError, r'^PackedBatch\.pack: batch\["bad"\] needs a'),
        (np.array([object()]), TypeError, r"dtype object has no torch equivalent: convert it"),
        (np.array(["a", "b"]), TypeError, "no torch equivalent: encode or tokenize"),
        # (named as the user has it, not as its native-order twin)
        (np.zeros(2, ">U2"), TypeError, r"numpy dtype >U2 has no torch equivalent"),
        # (zero-byte elements: refused as a dtype torch lacks, as everywhere else)
        (np.zeros(3, "V0"), TypeError, r"numpy dtype \|V0 has no torch equivalent"),
    ],
)
def test_pack_refuses_what_it_cannot_hold_before_copying(leaf, error, match, monkeypatch):
    made = []
    monkeypatch.setattr(_packed, "new_host_buffer", lambda n, pin=None: made.append(n))
    with pytest.raises(error, match=match):
        tb.PackedBatch.pack({"ok": np.ones(3), "bad": leaf})
    assert made == []  # refused before a buffer was made


def test_a_packed_batch_is_not_made_directly():
    with pytest.raises(TypeError, match=r"PackedBatch\.pack"):
        tb.PackedBatch()


# ------------------------------------------------------------------ collate(packed=True)


def _samples(rng, n=6):
    return [
        {
            "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "label": int(rng.integers(0, 10)),
            "weight": float(rng.standard_normal()),
            "tokens": rng.integers(0, 100, int(rng.integers(1, 6))),
            "meta": {"id": f"s{i}", "box": rng.standard_normal(4).astype(np.float32)},
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("spill", [False, True])
def test_collate_packed_equals_collate(rng, spill, monkeypatch):
    if spill:  # the size estimate falls short: the batch is packed after collating
        monkeypatch.setattr(_packed, "estimate_nbytes", lambda *args: 0)
        monkeypatch.setattr(tb._loader, "estimate_nbytes", lambda *args: 0)
    samples = _samples(rng)
    kwargs = {"pad": {"tokens": -1}}
    packed = tb.collate(samples, packed=True, **kwargs)
    assert isinstance(packed, tb.PackedBatch)
    expected = tb.collate(samples, **kwargs)
    got = packed.to("cpu")
    assert got.keys() == expected.keys()
    for key in ("image", "label", "weight", "tokens", "tokens_lengths"):
        assert got[key].dtype == expected[key].dtype
        assert torch.equal(got[key], expected[key]), key
    assert got["meta"]["id"] == expected["meta"]["id"]
    assert torch.equal(got["meta"]["box"], expected["meta"]["box"])
    if not spill:  # stacked straight into the one buffer
        for t in (got["image"], got["tokens"], got["meta"]["box"]):
            assert t.untyped_storage().data_ptr() == packed.buffer.data_ptr()


def test_collate_packed_stacks_straight_into_the_buffer_unless_a_dtype_widens(rng, arenas):
    """Without pad= the buffer is sized from sample 0: equal samples fit it (no spill); an
    array that widens in a later sample spills, and the batch is still right."""

    samples = [
        {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "x": np.ones(1000, np.int16)}
        for _ in range(16)
    ]
    packed = tb.collate(samples, packed=True)
    assert not arenas[-1].spilled  # stacked straight into the buffer
    for t in packed.unpack().values():
        assert t.untyped_storage().data_ptr() == packed.buffer.data_ptr()
    samples[5]["x"] = np.full(1000, 2**40)  # int64: the stack is int64, 4x sample 0's bytes
    got = tb.collate(samples, packed=True).to("cpu")
    assert arenas[-1].spilled  # packed into a new buffer after collating
    expected = tb.collate(samples)
    assert got["x"].dtype == torch.int64 and torch.equal(got["x"], expected["x"])
    assert torch.equal(got["image"], expected["image"])


def test_collate_packed_keeps_fields_lists_and_refuses_as_collate_does(rng):
    samples = _samples(rng)
    packed = tb.collate(samples, packed=True, pad={"tokens": 0}, fields={"meta": list})
    meta = packed.unpack()["meta"]  # the samples' values, as plain collate keeps them
    assert all(
        m["id"] == s["meta"]["id"] and m["box"] is s["meta"]["box"]
        for m, s in zip(meta, samples, strict=True)
    )
    samples[2]["image"] = samples[2]["image"][:4]
    with pytest.raises(ValueError, match=r'batch\["image"\]: sample 2 has shape'):
        tb.collate(samples, packed=True)
    with pytest.raises(TypeError, match="packed must be True or False"):
        tb.collate(samples, packed="yes")


class _Dataset(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {
            "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "label": i,
            "x": rng.standard_normal(5).astype(np.float32),
        }


@pytest.mark.slow
def test_a_dataloader_with_workers_sends_one_shared_buffer_per_batch():
    loader = torch.utils.data.DataLoader(
        _Dataset(),
        batch_size=5,
        num_workers=2,
        collate_fn=functools.partial(tb.collate, packed=True),
    )
    reference = torch.utils.data.DataLoader(_Dataset(), batch_size=5)
    batches = 0
    for packed, expected in zip(loader, reference, strict=True):
        assert isinstance(packed, tb.PackedBatch)
        assert packed.buffer.is_shared()  # made in shared memory by the worker
        got = packed.to("cpu")
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        batches += 1
    assert batches == 5


def test_a_prefetcher_moves_packed_batches(rng):
    samples = [_samples(rng, 4) for _ in range(3)]
    packed = [tb.collate(s, packed=True, pad={"tokens": 0}) for s in samples]
    for got, s in zip(tb.Prefetcher(packed, "cpu"), samples, strict=True):
        expected = tb.collate(s, pad={"tokens": 0})
        assert torch.equal(got["image"], expected["image"])
        assert torch.equal(got["tokens"], expected["tokens"])


@pytest.mark.gpu
def test_a_pinned_packed_batch_crosses_to_the_gpu_in_one_copy(rng):
    batch = _random_batch(rng)
    packed = tb.PackedBatch.pack(batch)
    assert packed.is_pinned()  # page-locked when made in the main process of a GPU machine
    moved = packed.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    cpu = tb._tree.tree_map(lambda x, k: x.cpu() if isinstance(x, torch.Tensor) else x, moved)
    _assert_same(cpu, batch)
    unpinned = tb.PackedBatch.pack(batch, pin=False)
    assert not unpinned.is_pinned()
    repinned = unpinned.pin_memory()  # (the copy threads fill a block of torch's allocator)
    assert repinned.is_pinned() and repinned.buffer.data_ptr() != unpinned.buffer.data_ptr()
    _assert_same(repinned.unpack(), batch)


# ------------------------------------------------------------------ edges


def test_a_packed_batch_holds_no_original_array(rng):
    """Dataclasses and other mappings are kept as hollow copies: the originals are freed,
    and pickling sends the buffer alone."""
    import weakref

    image = rng.standard_normal((64, 64)).astype(np.float32)
    alive = weakref.ref(image)
    batches = [Sample(image, 3), collections.OrderedDict(image=image, label=np.arange(3))]
    packed = [tb.PackedBatch.pack(b) for b in batches]
    del batches, image
    assert alive() is None
    for p in packed:
        assert len(pickle.dumps(p)) < 1.2 * p.nbytes + 4096  # the buffer, once
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(p)
        assert len(buf.getvalue()) < 4096  # a shared-memory handle
    sample = packed[0].unpack()
    assert type(sample) is Sample and sample.label == 3 and sample.image.shape == (64, 64)
    assert type(packed[1].unpack()) is collections.OrderedDict


def test_a_packed_batch_inside_a_batch_moves_with_it(rng):
    inner = {"x": rng.standard_normal(3)}
    packed = tb.PackedBatch.pack(inner)
    out = tb.to_device([packed, np.ones(2)], "cpu", dtype=torch.float16)
    assert torch.equal(out[0]["x"], torch.from_numpy(inner["x"]).half())
    assert out[1].dtype == torch.float16
    # a mapping may name keys of a nested packed batch; a typo is refused before anything moves
    out = tb.to_device({"p": packed, "y": np.arange(2)}, "cpu", dtype={"x": torch.float16})
    assert out["p"]["x"].dtype == torch.float16 and out["y"].dtype == torch.int64
    with pytest.raises(ValueError, match=r"names 'z'.*'x', 'y'"):
        tb.to_device({"p": packed, "y": np.arange(2)}, "cpu", dtype={"z": torch.int32})
    back = tb.to_numpy_batch({"p": packed})
    assert isinstance(back["p"]["x"], np.ndarray) and np.array_equal(back["p"]["x"], inner["x"])
    with pytest.raises(TypeError, match=r"PackedBatch\.pack: .*packed\.unpack\(\)"):
        tb.PackedBatch.pack([packed])


def test_to_takes_a_dtype_first_as_tensor_to_does(rng):
    packed = tb.PackedBatch.pack({"x": rng.standard_normal(3), "n": np.arange(3)})
    out = packed.to(torch.float16)
    assert out["x"].dtype == torch.float16 and out["n"].dtype == torch.int64
    with pytest.raises(TypeError, match=r"\.to\(t\.device\)"):
        packed.to(torch.ones(1))


def test_pack_names_itself_and_the_fix_in_refusals():
    with pytest.raises(
        TypeError, match=r'^PackedBatch\.pack: batch\["a"\]: numpy dtype object has no torch'
    ):
        tb.PackedBatch.pack({"a": np.array([object()])})
    x = torch.zeros(3, dtype=torch.complex64).to(torch.complex32)
    with pytest.raises(TypeError, match=r"^PackedBatch\.pack: .*complex32.*\.to\("):
        tb.PackedBatch.pack({"x": x})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match=r"^PackedBatch\.pack: the batch is nested too deeply"):
        tb.PackedBatch.pack(cyclic)
    if not tb.info()["cuda"]:
        with pytest.raises(ValueError, match=r"pin=True needs a usable GPU.*pin=None"):
            tb.PackedBatch.pack({"x": np.ones(2)}, pin=True)
    for pin in ("yes", 2, 0.0, [True]):
        with pytest.raises(
            TypeError,
            match=r"pin must be True or False, got .*: pass True, False or None \(None: pinned",
        ):
            tb.PackedBatch.pack({"x": np.ones(2)}, pin=pin)
    for pin in (np.False_, 0, False, None) if not tb.info()["cuda"] else (np.False_, 0):
        assert tb.PackedBatch.pack({"x": np.ones(2)}, pin=pin).unpack()["x"].sum() == 2


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: np.ones(2, np.longdouble), id="longdouble"),
        pytest.param(lambda: np.array(["a", 1], dtype=object).astype(str), id="strings"),
        pytest.param(lambda: np.array([{}, 1], dtype=object), id="objects"),
    ],
)
def test_pack_names_the_key_of_an_array_it_cannot_pack(backend, bad):
    """The refusal named neither the key nor the column (Ray's Collate packs columns)."""
    if bad().dtype == np.longdouble and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match=r'^PackedBatch\.pack: batch\["bad"\]: numpy dtype'):
        tb.PackedBatch.pack({"ok": np.ones(2), "bad": bad()})


def test_a_batch_of_values_only_is_still_true():
    packed = tb.PackedBatch.pack({"n": 3, "s": "x"})
    assert len(packed) == 0 and bool(packed) and packed.unpack() == {"n": 3, "s": "x"}


def test_collate_packed_leaves_list_fields_as_collate_does(rng):
    samples = [
        {"box": rng.standard_normal((k, 4)), "names": np.array(["a"] * k), "x": np.ones(2)}
        for k in (2, 5, 3)
    ]
    plain = tb.collate(samples, fields={"box": list, "names": list})
    got = tb.collate(samples, packed=True, fields={"box": list, "names": list}).unpack()
    for key in ("box", "names"):
        assert all(type(a) is np.ndarray for a in got[key])  # not packed: kept as given
        assert all(np.array_equal(a, b) for a, b in zip(got[key], plain[key], strict=True))
    assert torch.equal(got["x"], plain["x"])


def test_collate_packed_sizes_ragged_padded_fields_without_spilling(rng, arenas):

    samples = [{"tokens": np.arange(rng.integers(1, 512)), "label": 1} for _ in range(64)]
    packed = tb.collate(samples, packed=True, pad={"tokens": 0})
    assert len(arenas) == 1 and not arenas[0].spilled
    got, expected = packed.unpack(), tb.collate(samples, pad={"tokens": 0})
    assert torch.equal(got["tokens"], expected["tokens"])
    assert torch.equal(got["tokens_lengths"], expected["tokens_lengths"])
    assert got["tokens"].untyped_storage().data_ptr() == packed.buffer.data_ptr()


def test_collate_packed_refuses_as_collate_does_even_for_cycles():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError) as plain:
        tb.collate([cyclic, cyclic])
    with pytest.raises(ValueError) as packed:
        tb.collate([cyclic, cyclic], packed=True)
    assert str(packed.value) == str(plain.value)


def test_the_batch_path_moves_tensors_numpy_cannot_view_on_their_own():
    from tensorbridge import _batch

    x = torch.zeros(3, dtype=torch.complex64).to(torch.complex32)
    sender = _batch.LinkSender(tb._C.LinkSimulator(100.0)) if tb.info()["extension"] else None
    out = _batch.send_batch(
        {"x": x, "y": np.ones(2), "z": np.zeros(3)}, torch.device("cpu"), sender, None, False
    )
    assert out["x"].dtype == torch.complex32 and torch.equal(
        out["y"], torch.ones(2, dtype=torch.float64)
    )
