"""The compiled core below the public API: the strided copy, the transfer pipeline and the
pinned pool.

The strided copy (``_C.copy``) is checked against np.copyto: random layouts, itemsizes,
byte swaps, more threads than cores. The pipeline and pool are driven through the
host-only engine (``_C_testing``), which runs each "DMA" on a worker thread, optionally
after a delay, so a staging block rewritten before its copy finished shows up as wrong
data here. These are the same C++ pipeline and pool the CUDA engine uses; only the
copy/event calls differ.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbridge import _backend

from conftest import HAS_EXTENSION, TESTING, needs_testing_module, random_array, run_in_threads

needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
C = TESTING  # the host engine's testers, the chunk planner and the pool's size classes
POISON = 0xAB


def make_tester(**kw):
    return C.HostTransferTester(**kw)


def layout(a: np.ndarray, kind: str) -> np.ndarray:
    """A poisoned array of a's shape and dtype in the given layout (a view into a buffer)."""
    if kind == "C":
        out = np.empty(a.shape, a.dtype)
    elif kind == "F":
        out = np.empty(a.shape, a.dtype, order="F")
    elif kind == "holes":
        big = np.empty(tuple(2 * n for n in a.shape), a.dtype)
        big.ravel(order="K").view(np.uint8).fill(POISON)
        return big[(*(slice(None, None, 2) for _ in a.shape), Ellipsis)]
    elif kind == "reversed":
        out = np.empty(a.shape, a.dtype)[(*(slice(None, None, -1) for _ in a.shape), Ellipsis)]
    else:
        raise ValueError(kind)
    out.ravel(order="K").view(np.uint8).fill(POISON)
    return out


def dense_bytes(a: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8).copy()


# ------------------------------------------------------------------------- strided copy

ITEM_DTYPES = ["u1", "<u2", "<u4", "<u8", "<c16", "V3", "V6"]


@st.composite
def strided_views(draw, max_dims=4):
    """A random view of a random array: slices with steps (negative too) and a transpose."""
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    steps = st.sampled_from([1, 1, 2, 3, -1, -2])
    slices = tuple(slice(draw(st.integers(0, n - 1)), None, draw(steps)) for n in shape)
    perm = tuple(draw(st.permutations(range(ndim))))
    return shape, slices, perm


@needs_extension
@settings(max_examples=200, deadline=None)
@given(
    src=strided_views(),
    dst_perm=st.data(),
    dst_reverse=st.booleans(),
    dtype=st.sampled_from(ITEM_DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_copy_matches_numpy(src, dst_perm, dst_reverse, dtype, seed):
    rng = np.random.default_rng(seed)
    s_shape, s_slices, s_perm = src
    a = random_array(s_shape, dtype, rng)[(*s_slices, Ellipsis)].transpose(s_perm)
    # The destination: every other element of a poisoned buffer, in another axis order.
    perm = tuple(dst_perm.draw(st.permutations(range(a.ndim))))
    big = random_array(tuple(2 * a.shape[p] + 1 for p in perm), dtype, rng)
    holes = (*(slice(1, 2 * a.shape[p], 2) for p in perm), Ellipsis)
    out = big[holes].transpose(np.argsort(perm))
    if dst_reverse and out.ndim:
        out = out[::-1]
    before = big.copy()
    _backend.ENGINE.C.copy(out, a, 0)
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(a).tobytes()
    mask = np.ones(big.shape, bool)
    mask[holes] = False
    assert big[mask].tobytes() == before[mask].tobytes()  # nothing written outside out


def _at_page_offset(nbytes: int, offset: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """(view, whole): nbytes of a filled buffer starting `offset` bytes past a 4 KiB
    boundary, with at least 64 bytes of the buffer on either side."""
    whole = np.full(nbytes + 3 * 4096, fill, np.uint8)
    start = -whole.ctypes.data % 4096 + 4096 + offset
    return whole[start : start + nbytes], whole


@needs_extension
@pytest.mark.parametrize(
    "nbytes", [2047, 2049, 3001, 8197, 65539, 300_001, 524_287, 524_288, 524_417]
)
@pytest.mark.parametrize("gap", [0, 1, 15, 16, 31, 32, 63, 64, 100, 4032, 4095])
@pytest.mark.parametrize("min_parallel_bytes", [1, 1 << 40])
def test_contiguous_copies_at_every_distance_modulo_a_page(nbytes, gap, min_parallel_bytes):
    """Contiguous copies take memcpy or the core's own loop by size and by how far the
    destination lies past the source modulo 4 KiB: every branch, split over the pool or
    not, writes every byte of out and nothing around it."""
    rng = np.random.default_rng(nbytes * 4096 + gap)
    src, _ = _at_page_offset(nbytes, 48, 0)
    src[:] = rng.integers(0, 256, nbytes, np.uint8)
    out, whole = _at_page_offset(nbytes, (48 + gap) % 4096, POISON)
    _backend.ENGINE.C.copy(out, src, 0, min_parallel_bytes)
    assert (out.ctypes.data - src.ctypes.data) % 4096 == gap
    assert out.tobytes() == src.tobytes()
    start = out.ctypes.data - whole.ctypes.data
    assert not np.any(whole[:start] != POISON) and not np.any(whole[start + nbytes :] != POISON)


@needs_extension
@pytest.mark.parametrize("dtype", ["<u2", "<i4", "<f8", "<c8", "<c16"])
@pytest.mark.parametrize("layout", ["contiguous", "reversed", "transposed"])
def test_byte_swap_matches_numpy(dtype, layout):
    rng = np.random.default_rng(1)
    a = random_array((37, 41), dtype, rng).astype(np.dtype(dtype).newbyteorder(">"))
    a = {"contiguous": a, "reversed": a[::-1, ::-1], "transposed": a.T}[layout]
    out = np.empty(a.shape, np.dtype(dtype))
    unit = a.dtype.itemsize // 2 if a.dtype.kind == "c" else a.dtype.itemsize
    _backend.ENGINE.C.copy(out, a, unit)
    assert out.tobytes() == a.astype(np.dtype(dtype)).tobytes()


@needs_extension
def test_many_threads_copy_at_once():
    """More Python threads than cores, each splitting its copies over the shared pool."""
    rng = np.random.default_rng(7)
    sources = [random_array((257, 131 + i), "<f8", rng) for i in range(12)]

    def work(i):
        src = sources[i].T if i % 2 else sources[i][::-1]
        for _ in range(20):
            out = np.full(src.shape, np.nan)
            _backend.ENGINE.C.copy(out, src, 0, 4096)
            np.testing.assert_array_equal(out, src)

    run_in_threads(work, len(sources))


@needs_extension
def test_invalid_arguments_raise():
    C = _backend.ENGINE.C
    with pytest.raises(ValueError, match="same shape"):
        C.copy(np.zeros(3), np.zeros(4), 0)
    with pytest.raises(ValueError, match="itemsize"):
        C.copy(np.zeros(3), np.zeros(3, np.float32), 0)
    with pytest.raises(ValueError, match="swap unit"):
        C.copy(np.zeros(3, "V3"), np.zeros(3, "V3"), 2)
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        C.copy(ro, np.ones(3), 0)
    assert (ro == 0).all()


# ------------------------------------------------------------------------- chunk plan


@needs_testing_module
@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    itemsize=st.sampled_from([1, 2, 4, 8, 16]),
    chunk=st.integers(1, 600),
)
def test_chunks_tile_the_buffer_in_order(shape, itemsize, chunk):
    chunks = C.plan_chunks(shape, itemsize, chunk)
    total = int(np.prod(shape)) * itemsize
    assert sum(c[1] for c in chunks) == total
    offset = 0
    for off, nbytes, depth, prefix, begin, end in chunks:
        assert off == offset and nbytes > 0
        assert nbytes <= max(chunk, itemsize)
        assert len(prefix) == depth and begin < end
        inner = int(np.prod(shape[depth + 1 :])) * itemsize if shape else itemsize
        assert nbytes == (end - begin) * inner
        offset += nbytes


@needs_testing_module
def test_size_classes_are_not_powers_of_two():
    sizes = [1, 4095, 4096, 4097, 65536, 65537, 3 << 20, (4 << 20) + 1, 100 << 20, 1 << 30]
    for n in sizes:
        c = C.pool_size_class(n)
        assert c >= n and c % 4096 == 0
        assert c - n <= max(4095, n // 8)  # at most 12.5% over (one page for small sizes)
    assert C.pool_size_class(3 << 20) == 3 << 20
    assert C.pool_size_class(5 << 20) == 5 << 20  # not rounded up to 8 MiB


# ------------------------------------------------------------------------- device -> host


# (the core holds up to six dimensions in place, more on the heap)
SHAPES = [(), (0,), (1,), (7,), (13, 17), (5, 1, 9), (3, 4, 5, 6), (257, 129), (3, 2, 1, 2, 3, 2)]
SHAPES += [(2, 3, 1, 2, 2, 1, 3), (2,) * 10]
CHUNKS = [1, 64, 1000, 4096, 1 << 20]
# (buffers, threads): one copy thread with two blocks; four copy threads with two blocks
# each (more threads than this machine may have cores: they then take turns).
WORKERS = [(2, 1), (8, 4)]


@needs_testing_module
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", ["C", "F", "holes", "reversed"])
@pytest.mark.parametrize(("buffers", "threads"), WORKERS, ids=["1-thread", "4-threads"])
def test_to_host_any_layout(shape, chunk, kind, buffers, threads):
    rng = np.random.default_rng(zlib.crc32(repr((shape, chunk, kind)).encode()))
    a = random_array(shape, "<f4", rng)
    t = make_tester(delay_us=20)
    out = layout(a, kind)
    report = t.to_host(dense_bytes(a), out, chunk_bytes=chunk, buffers=buffers, threads=threads)
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(a).tobytes()
    chunks = len(C.plan_chunks(list(shape), 4, chunk))
    assert report["staged"] and report["chunks"] == chunks
    assert report["threads"] == max(1, min(threads, buffers // 2, chunks))
    assert t.stats()["bytes_in_use"] == 0


@needs_testing_module
@pytest.mark.parametrize("dtype", ["u1", "<u2", "<f4", "<c8", "<c16", "V3"])
@pytest.mark.parametrize("buffers", [2, 3, 5])
def test_to_host_dtypes_and_buffer_counts(dtype, buffers):
    rng = np.random.default_rng(buffers)
    a = random_array((31, 45), dtype, rng)
    t = make_tester(delay_us=50)
    out = layout(a, "F")
    t.to_host(dense_bytes(a), out, chunk_bytes=777, buffers=buffers)
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(a).tobytes()


@needs_testing_module
@pytest.mark.parametrize("dtype", ["<u2", "<f4", "<f8", "<c8", "<c16"])
def test_to_host_swaps_bytes(dtype):
    rng = np.random.default_rng(3)
    a = random_array((19, 23), dtype, rng)
    big = np.empty(a.shape, np.dtype(dtype).newbyteorder(">"))
    unit = a.itemsize // 2 if a.dtype.kind == "c" else a.itemsize
    make_tester(delay_us=10).to_host(dense_bytes(a), big, chunk_bytes=300, swap_unit=unit)
    assert big.astype(a.dtype).tobytes() == a.tobytes()


# ------------------------------------------------------------------------- host -> device


@needs_testing_module
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", ["C", "F", "holes", "reversed"])
@pytest.mark.parametrize(("buffers", "threads"), WORKERS, ids=["1-thread", "4-threads"])
def test_to_device_any_layout(shape, chunk, kind, buffers, threads):
    rng = np.random.default_rng(zlib.crc32(repr((shape, chunk, kind, 1)).encode()))
    a = random_array(shape, "<f8", rng)
    src = layout(a, kind)
    src[...] = a
    device = np.full(max(a.nbytes, 1), POISON, np.uint8)
    t = make_tester(delay_us=20)
    t.to_device(src, device, chunk_bytes=chunk, buffers=buffers, threads=threads)
    t.drain()
    assert device[: a.nbytes].tobytes() == np.ascontiguousarray(a).tobytes()
    assert t.stats()["bytes_in_use"] == 0


@needs_testing_module
def test_to_device_does_not_read_the_source_after_returning():
    """The contract that lets non_blocking uploads drop the source at once."""
    rng = np.random.default_rng(5)
    a = random_array((64, 1000), "<f4", rng)
    src = a.copy()
    device = np.zeros(a.nbytes, np.uint8)
    t = make_tester(delay_us=300)  # the "DMAs" are still queued when to_device returns
    t.to_device(src, device, chunk_bytes=8192, buffers=3)
    src[...] = 0  # the caller reuses its array immediately
    t.drain()
    assert device.tobytes() == a.tobytes()


@needs_testing_module
def test_to_device_swaps_bytes():
    rng = np.random.default_rng(6)
    a = random_array((40, 41), "<i4", rng)
    src = a.astype(">i4")[::-1]
    device = np.zeros(a.nbytes, np.uint8)
    t = make_tester(delay_us=5)
    t.to_device(src, device, chunk_bytes=512, swap_unit=4)
    t.drain()
    assert device.tobytes() == np.ascontiguousarray(a[::-1]).tobytes()


# ------------------------------------------------------------------------- pool


@needs_testing_module
def test_blocks_are_reused_across_transfers():
    rng = np.random.default_rng(7)
    a = random_array((100, 100), "<f4", rng)
    t = make_tester()
    for _ in range(5):
        out = layout(a, "C")
        t.to_host(dense_bytes(a), out, chunk_bytes=4096, buffers=2)
        assert out.tobytes() == a.tobytes()
    s = t.stats()
    assert s["misses"] == 2 and s["hits"] == 8
    assert t.pinned_allocations == 2 and s["bytes_held"] == 2 * 4096 and s["bytes_in_use"] == 0


@needs_testing_module
def test_budget_too_small_takes_the_pageable_path():
    rng = np.random.default_rng(8)
    a = random_array((50, 70), "<f8", rng)
    t = make_tester(budget=4096)  # room for one 4 KiB block; the pipeline wants two
    for kind in ("C", "F"):
        out = layout(a, kind)
        report = t.to_host(dense_bytes(a), out, chunk_bytes=4096)
        assert not report["staged"]
        assert np.ascontiguousarray(out).tobytes() == a.tobytes()
    device = np.zeros(a.nbytes, np.uint8)
    assert not t.to_device(a.T.copy().T, device, chunk_bytes=4096)["staged"]
    t.drain()
    assert device.tobytes() == a.tobytes()
    s = t.stats()
    assert s["bytes_held"] <= s["budget"] and s["bytes_in_use"] == 0 and s["fallbacks"] >= 3


@needs_testing_module
def test_pinning_failure_takes_the_pageable_path():
    rng = np.random.default_rng(9)
    a = random_array((33, 33), "<f4", rng)
    t = make_tester(fail_pinning_after=0)
    out = layout(a, "holes")
    assert not t.to_host(dense_bytes(a), out, chunk_bytes=1024)["staged"]
    assert np.ascontiguousarray(out).tobytes() == a.tobytes()
    s = t.stats()
    assert s["pin_failures"] >= 1 and s["bytes_held"] == 0 and s["bytes_in_use"] == 0


@needs_testing_module
def test_shrinking_the_budget_frees_idle_blocks():
    rng = np.random.default_rng(10)
    a = random_array((64, 64), "<f4", rng)
    t = make_tester(delay_us=10)
    t.to_host(dense_bytes(a), layout(a, "C"), chunk_bytes=4096, buffers=4)
    assert t.stats()["bytes_held"] == 4 * 4096
    t.set_budget(4096)
    assert t.stats()["bytes_held"] <= 4096
    assert t.live_pinned <= 1


@needs_testing_module
def test_many_threads_share_one_pool_within_budget():
    """More threads than cores and than blocks the budget allows: all correct, budget kept."""
    t = make_tester(delay_us=30, budget=6 * 8192)
    peak = []

    def work(i: int) -> None:
        rng = np.random.default_rng(i)
        for j in range(6):
            a = random_array((17 + i, 50 + j), "<f8", rng)
            out = layout(a, "F" if (i + j) % 2 else "holes")
            t.to_host(dense_bytes(a), out, chunk_bytes=8192, buffers=2 + j % 2)
            assert np.ascontiguousarray(out).tobytes() == a.tobytes()
            device = np.zeros(a.nbytes, np.uint8)
            t.to_device(layout_copy(a), device, chunk_bytes=8192)
            peak.append(t.stats()["bytes_held"])
            t.drain()
            assert device.tobytes() == a.tobytes()

    run_in_threads(work, 12)
    s = t.stats()
    assert max(peak) <= s["budget"] and s["bytes_held"] <= s["budget"]
    assert s["bytes_in_use"] == 0


def layout_copy(a: np.ndarray) -> np.ndarray:
    out = layout(a, "reversed")
    out[...] = a
    return out


@needs_testing_module
def test_pool_budget_holds_under_contention():
    """Twelve threads, a budget for three blocks: callers wait or go pageable, never over."""
    t = TESTING.HostTransferTester(delay_us=40, budget=3 * 16384)
    peaks = []

    def work(i):
        rng = np.random.default_rng(i)
        for _ in range(5):
            a = rng.standard_normal((40, 60 + i))
            out = np.empty_like(a)
            t.to_host(np.frombuffer(a.tobytes(), np.uint8).copy(), out, chunk_bytes=16384)
            assert out.tobytes() == a.tobytes()
            peaks.append(t.stats()["bytes_held"])

    run_in_threads(work, 12, timeout=120)
    assert max(peaks) <= 3 * 16384
    s = t.stats()
    assert s["bytes_in_use"] == 0 and s["bytes_held"] <= s["budget"]


KIB, MIB = 1 << 10, 1 << 20


@needs_testing_module
def test_the_pool_and_its_reservations_never_exceed_the_budget():
    """Part of the budget reserved for arrays registered in place (the registration
    cache): blocks and reservations together stay within it."""
    budget = 8 * MIB
    t = make_tester(budget=budget)
    src = np.random.default_rng(0).integers(0, 256, 8 * MIB, dtype=np.uint8)
    device = np.zeros_like(src)
    t.to_device(src, device, chunk_bytes=1 * MIB, buffers=4)
    t.drain()
    held = t.stats()["bytes_held"]
    assert held == 4 * MIB  # idle blocks cached by the pool
    assert t.reserve(6 * MIB)  # makes room by freeing idle blocks...
    s = t.stats()
    assert s["bytes_held"] <= 2 * MIB and s["frees"] >= 2 and t.reserved == 6 * MIB
    assert not t.reserve(3 * MIB) and t.reserved == 6 * MIB  # ...never past the budget
    # With 2 MiB left for blocks the pipeline still moves the data (waits or pageable).
    device[:] = 0
    t.to_device(src, device, chunk_bytes=1 * MIB, buffers=4)
    t.drain()
    assert np.array_equal(device, src)
    assert t.stats()["bytes_held"] + t.reserved <= budget
    t.unreserve(6 * MIB)
    t.unreserve(1 * MIB)  # (more than reserved: clamped, never below zero)
    assert t.reserved == 0 and t.reserve(budget)


@needs_testing_module
def test_reservations_and_transfers_from_threads_stay_within_the_budget():
    budget = 6 * 256 * KIB
    t = make_tester(delay_us=20, budget=budget)
    over: list[int] = []

    def work(i: int) -> None:
        rng = np.random.default_rng(i)
        for _ in range(30):
            if i == 0:  # the only thread that reserves: its reservation is known
                n = int(rng.integers(1, 5)) * 256 * KIB
                if t.reserve(n):
                    for _ in range(5):  # while the others' transfers come and go
                        held = t.stats()["bytes_held"]
                        if held + n > budget:
                            over.append(held + n)
                        time.sleep(0.002)
                    t.unreserve(n)
            else:
                src = rng.integers(0, 256, 1 * MIB, dtype=np.uint8)
                out = np.zeros_like(src)
                t.to_host(src, out, chunk_bytes=256 * KIB, buffers=2)
                assert np.array_equal(out, src)

    run_in_threads(work, 6, timeout=120)
    assert over == [] and t.reserved == 0
    s = t.stats()
    assert s["bytes_held"] <= budget and s["bytes_in_use"] == 0


@needs_testing_module
def test_bad_arguments_raise_before_copying():
    t = make_tester()
    out = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="too small"):
        t.to_host(np.zeros(10, np.uint8), out)
    ro = np.zeros((4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        t.to_host(np.zeros(64, np.uint8), ro)
    with pytest.raises(ValueError, match="byte-swap"):
        t.to_host(np.zeros(64, np.uint8), out, swap_unit=3)
    assert t.stats()["bytes_in_use"] == 0


@needs_testing_module
@pytest.mark.parametrize("direction", ["to_host", "to_device"])
@pytest.mark.parametrize("fail_at", [0, 1, 5])
@pytest.mark.parametrize(("buffers", "threads"), [(3, 1), (6, 3)], ids=["1-thread", "3-threads"])
def test_failed_copy_raises_and_leaves_the_pool_usable(direction, fail_at, buffers, threads):
    rng = np.random.default_rng(fail_at)
    a = random_array((40, 100), "<f8", rng)  # 32000 bytes: eight 4 KiB chunks
    t = make_tester(delay_us=20, fail_copy_after=fail_at)
    device = dense_bytes(a)
    kw = {"chunk_bytes": 4096, "buffers": buffers, "threads": threads}
    with pytest.raises(RuntimeError, match="injected copy failure"):
        if direction == "to_host":
            t.to_host(device, layout(a, "C"), **kw)
        else:
            t.to_device(a, np.zeros(a.nbytes, np.uint8), **kw)
    t.drain()
    s = t.stats()
    assert s["bytes_in_use"] == 0  # every block went back (or was discarded)
    # later transfers on the same pool still work and still reuse its blocks
    out = layout(a, "F")
    assert t.to_host(device, out, chunk_bytes=4096, buffers=3)["staged"]
    assert np.ascontiguousarray(out).tobytes() == a.tobytes()
    assert t.stats()["bytes_in_use"] == 0


# ------------------------------------------------------------------------- review findings


@needs_testing_module
def test_drain_waits_only_for_copies_queued_before_it():
    """Another thread's later copies are not waited for (nor their buffers let go)."""
    a1, a2 = (np.full(4096, k, np.uint8) for k in (1, 2))
    dev1, dev2 = (np.full(4096, POISON, np.uint8) for _ in range(2))
    t = make_tester(delay_us=300_000)  # each copy lands 0.3 s after it starts
    t.to_device(a1, dev1, chunk_bytes=4096, buffers=2)
    seen: dict[str, bytes] = {}

    def drain() -> None:
        t.drain()
        seen["dev1"], seen["dev2"] = dev1.tobytes(), dev2.tobytes()

    th = threading.Thread(target=drain)
    th.start()
    time.sleep(0.05)
    t.to_device(a2, dev2, chunk_bytes=4096, buffers=2)  # queued while drain() waits
    th.join()
    assert seen["dev1"] == a1.tobytes()
    assert seen["dev2"] == bytes([POISON]) * 4096, "drain() waited for a later copy"
    t.drain()
    assert dev2.tobytes() == a2.tobytes()


@needs_testing_module
def test_a_non_contiguous_device_buffer_is_refused():
    t = make_tester()
    device = np.zeros(2 * 4096, np.uint8)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        t.to_device(np.ones(4096, np.uint8), device)
    with pytest.raises(ValueError, match="C-contiguous"):
        t.to_host(device, np.ones(4096, np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        t.to_device_many([np.ones(16, np.uint8)], [0], device)


@needs_testing_module
def test_many_to_device_with_elements_larger_than_a_block():
    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, 3 * 8192, np.uint8).view("V8192") for _ in range(3)]
    offsets = [0, 3 * 8192, 6 * 8192]
    device = np.full(9 * 8192, POISON, np.uint8)
    t = make_tester(delay_us=20)
    t.to_device_many(arrays, offsets, device, chunk_bytes=4096, buffers=2)
    t.drain()
    assert device.tobytes() == b"".join(a.tobytes() for a in arrays)


@needs_testing_module
@pytest.mark.parametrize("direction", ["to_host", "to_device"])
def test_a_budget_short_of_the_plan_shrinks_it_instead_of_going_pageable(direction):
    rng = np.random.default_rng(12)
    a = random_array((64, 1024), "<f4", rng)  # 256 KiB: sixteen 16 KiB chunks
    t = make_tester(delay_us=20, budget=3 * 16384)  # three blocks, not the sixteen asked
    kw = {"chunk_bytes": 16384, "buffers": 16, "threads": 8}
    if direction == "to_host":
        out = layout(a, "F")
        report = t.to_host(dense_bytes(a), out, **kw)
        assert np.ascontiguousarray(out).tobytes() == a.tobytes()
    else:
        device = np.full(a.nbytes, POISON, np.uint8)
        report = t.to_device(a, device, **kw)
        t.drain()
        assert device.tobytes() == a.tobytes()
    assert report["staged"] and report["threads"] == 1  # two or three blocks: one thread
    s = t.stats()
    assert s["bytes_held"] <= 3 * 16384 and s["bytes_in_use"] == 0


@needs_testing_module
def test_tester_refuses_hostile_sources_offsets_and_objects():
    t = make_tester()
    device = np.zeros(64, np.uint8)
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):  # a temporary would be read freed
        t.to_device_many([[1.0, 2.0]], [0], device)
    big = np.zeros(32, np.uint8)
    with pytest.raises(ValueError, match="out of range"):  # the offset wraps around
        t.to_device_many([np.full(8, 0x41, np.uint8)], [2**64 - 8], big[8:16])
    assert not big.any()
    objects = np.array([object(), object()])
    with pytest.raises(TypeError, match="Python references"):
        t.copy_async(np.zeros(objects.nbytes, np.uint8), objects, True)
    with pytest.raises(TypeError, match="Python references"):
        t.to_device(np.ones(16, np.uint8), objects)
    with pytest.raises(ValueError, match="zero bytes"):
        t.to_device(np.empty(10, []), device)


@needs_testing_module
def test_a_chunk_beyond_int64_plans_as_one_chunk():
    assert C.plan_chunks([100, 1000], 1, 2**63) == C.plan_chunks([100, 1000], 1, 2**62)
    assert len(C.plan_chunks([100, 1000], 1, 2**64 - 1)) == 1
