"""GPU transfers (skipped without CUDA): the engine against torch's own copies.

Run on a GPU machine with ``python -m pytest -m gpu`` for these alone;
benchmarks/run_gpu.sh runs the whole suite, these included.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _cuda

from conftest import (
    ALL_DTYPES,
    LAYOUTS,
    NATIVE_DTYPES,
    POISON,
    TESTING,
    assert_holes_poisoned,
    assert_same,
    dtype_param,
    layout_params,
    needs_ml,
    poisoned,
    random_tensor,
    reference_numpy,
    run_in_threads,
    strided_out,
)

pytestmark = pytest.mark.gpu
CHUNK = 4 << 20


@pytest.fixture(autouse=True)
def _engine_options():
    saved = tb.transfer_options()
    yield
    tb.transfer_options(**saved)


@pytest.fixture
def no_registration():
    """Tests of the staged pipeline itself: the arrays they reuse would be registered."""
    saved = tb.registration_options()
    tb.registration_options(enabled=False)
    yield
    tb.registration_options(**saved)


def test_engine_is_live():
    info = tb.info()
    assert info["cuda"], info["cuda_reason"]
    assert info["extension"] and info["cuda_compiled"]
    assert tb.pinned_stats()["available"]


# ------------------------------------------------------------------------- device -> host


@pytest.mark.parametrize("layout", layout_params())
@pytest.mark.parametrize("dtype", [dtype_param(d) for d in ALL_DTYPES])
def test_to_numpy_every_dtype_and_layout(gen, dtype, layout):
    x = LAYOUTS[layout](dtype, gen).cuda()
    expected = reference_numpy(x)
    assert_same(tb.to_numpy(x), expected)
    out = poisoned(tuple(x.shape), expected.dtype, "F")
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, expected)
    view, big = strided_out(tuple(x.shape), expected.dtype)
    tb.to_numpy(x, out=view)
    assert_same(view, expected)
    assert_holes_poisoned(view, big)


@pytest.mark.parametrize(
    "numel", [0, 1, 7, CHUNK // 4 - 1, CHUNK // 4, CHUNK // 4 + 1, 3 * CHUNK // 4 + 5]
)
@pytest.mark.parametrize("kind", ["pageable", "pinned", "strided"])
def test_to_numpy_sizes_around_chunks(gen, numel, kind):
    x = random_tensor((numel,), torch.float32, gen).cuda()
    expected = x.cpu().numpy()
    if kind == "pinned":
        out = tb.empty_pinned((numel,), np.float32)
        out.view(np.uint8)[:] = 0xAB
        assert numel == 0 or tb.is_pinned(out)
    elif kind == "strided":
        out, big = strided_out((numel,), np.float32)
    else:
        out = poisoned((numel,), np.float32)
    tb.to_numpy(x, out=out)
    assert_same(out, expected)
    if kind == "strided":
        assert_holes_poisoned(out, big)


@pytest.mark.slow
def test_one_gib_both_ways(gen):
    n = (1 << 30) // 4
    x = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=None)
    out = np.empty(n, np.int32)
    tb.to_numpy(x, out=out)
    assert np.array_equal(out, x.cpu().numpy())
    back = tb.to_tensor(out, "cuda")
    assert torch.equal(back, x)


def test_non_blocking_then_wait_keeps_source_alive(gen):
    x = random_tensor((2048, 1024), torch.float32, gen).cuda()
    expected = x.cpu().numpy()
    out = poisoned(expected.shape, np.float32)
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    del x
    gc.collect()
    torch.cuda.empty_cache()
    assert handle.wait() is out
    assert_same(out, expected)
    assert handle.done() and handle.wait() is out


def test_non_blocking_into_pinned(gen):
    x = random_tensor((4096, 257), torch.float64, gen).cuda()
    out = tb.empty_pinned(tuple(x.shape), np.float64)
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    assert handle.wait() is out
    assert_same(out, x.cpu().numpy())


# Above the routing's torch sizes, a page-locked host side is one DMA with no Python steps.
DIRECT = (3 << 20) + 8


@pytest.fixture
def direct(monkeypatch):
    """What each _cuda.copy_pinned call answered: True where the fast path moved the data."""
    answers: list[bool] = []
    real = _cuda.copy_pinned

    def spy(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(_cuda, "copy_pinned", spy)
    return answers


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in NATIVE_DTYPES])
@pytest.mark.parametrize("memory", ["torch-pinned", "empty_pinned"])
def test_blocking_copy_into_a_pinned_out(dtype, memory, gen, direct):
    n = DIRECT // torch.empty(0, dtype=dtype).element_size()
    x = random_tensor((n,), dtype, gen).cuda()
    expected = x.cpu().numpy()
    if memory == "torch-pinned":
        out = torch.empty(n, dtype=dtype, pin_memory=True).numpy()
    else:
        out = tb.empty_pinned((n,), expected.dtype)
    out.view(np.uint8).fill(POISON)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, expected)
    assert direct == [True]


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in NATIVE_DTYPES])
def test_blocking_copy_from_a_pinned_array(dtype, gen, direct):
    n = DIRECT // torch.empty(0, dtype=dtype).element_size()
    expected = random_tensor((n,), dtype, gen)
    a = tb.empty_pinned((n,), expected.numpy().dtype)
    a[:] = expected.numpy()
    t = tb.to_tensor(a, "cuda")
    a.view(np.uint8).fill(POISON)  # free to reuse once to_tensor returns
    torch.cuda.synchronize()
    assert t.device.type == "cuda" and t.dtype == dtype and t.shape == (n,)
    assert_same(t.cpu().numpy(), expected.numpy())
    assert direct == [True]


def test_pageable_memory_is_not_taken_for_pinned(gen, direct, no_registration):
    x = random_tensor((DIRECT // 4,), torch.float32, gen).cuda()
    out = poisoned((DIRECT // 4,), np.float32)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, x.cpu().numpy())
    t = tb.to_tensor(out, "cuda")
    assert torch.equal(t, x)
    assert direct == [False, False]  # (staged by the full path instead)


def test_direct_pinned_copies_follow_the_current_stream(direct):
    """Blocking copies to and from page-locked memory wait for the work queued before
    them on the current stream, a side stream included, and are complete on return."""
    side = torch.cuda.Stream()
    out = tb.empty_pinned((DIRECT // 4,), np.float32)
    with torch.cuda.stream(side):
        x = torch.ones(DIRECT // 4, device="cuda")
        torch.cuda._sleep(50_000_000)  # keep the stream busy
        x.mul_(3)  # queued before the copy: must be visible
        assert tb.to_numpy(x, out=out) is out
        assert (out == 3).all()
        out[:] = 7
        torch.cuda._sleep(50_000_000)  # busy again: the upload must wait for it, then finish
        t = tb.to_tensor(out, "cuda")
        assert side.query()  # nothing left on the stream: the upload is complete
        out[:] = -1  # free to reuse
    side.synchronize()
    assert (t.cpu() == 7).all()
    assert direct == [True, True]


def test_a_view_of_a_registered_array_goes_through_the_registration_cache(gen, direct):
    """Memory the registration cache page-locked, seen through a view at an offset into
    it, is not taken for someone else's pinned memory: its transfers still count as the
    cache's hits (its eviction order), both ways."""
    owner = np.empty(N8 + 64, np.float32)
    out = owner[64:]  # (the cache registers the owner's whole buffer)
    x = random_tensor((N8,), torch.float32, gen).cuda()
    tb.to_numpy(x, out=out)
    tb.to_numpy(x, out=out)  # registered here
    before = tb.pinned_stats()["registered_hits"]
    out.fill(0)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, x.cpu().numpy())
    assert torch.equal(tb.to_tensor(out, "cuda"), x)
    assert tb.pinned_stats()["registered_hits"] == before + 2
    assert not any(direct)


@pytest.fixture
def small_direct(monkeypatch):
    """ROUTING.small_direct on: small copies take one compiled call, not torch's copy_."""
    monkeypatch.setattr(_cuda.ROUTING, "small_direct", True)
    calls: list[bool] = []
    real = _cuda.copy_small

    def spy(index, host, device_ptr, to_host):
        calls.append(to_host)
        return real(index, host, device_ptr, to_host)

    monkeypatch.setattr(_cuda, "copy_small", spy)
    return calls


@pytest.mark.parametrize("dtype", [dtype_param(d) for d in NATIVE_DTYPES])
@pytest.mark.parametrize("nbytes", [0, 8, 4096 + 8, 300 << 10])
def test_small_direct_copies_both_ways(dtype, nbytes, gen, small_direct):
    n = nbytes // torch.empty(0, dtype=dtype).element_size()
    x = random_tensor((n,), dtype, gen).cuda()
    expected = x.cpu().numpy()
    out = poisoned((n,), expected.dtype)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, expected)
    assert_same(tb.to_numpy(x), expected)
    a = expected.copy()
    t = tb.to_tensor(a, "cuda")
    a.view(np.uint8).fill(POISON)  # free to reuse once to_tensor returns
    torch.cuda.synchronize()
    assert t.dtype == dtype and t.device.type == "cuda" and torch.equal(t.cpu(), x.cpu())
    assert small_direct == [True, True, False]


def test_small_direct_copies_follow_the_current_stream(small_direct):
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.ones(1024, device="cuda")
        torch.cuda._sleep(50_000_000)  # keep the stream busy
        x.mul_(3)  # queued before the copy: must be visible
        assert (tb.to_numpy(x) == 3).all()
        a = np.full(1024, 7, np.float32)
        torch.cuda._sleep(50_000_000)
        t = tb.to_tensor(a, "cuda")
        assert side.query()  # the upload waited for the stream and is complete
        a[:] = -1
    side.synchronize()
    assert (t.cpu() == 7).all()
    assert small_direct == [True, False]


def test_non_blocking_sees_only_work_queued_before_it(gen):
    x = torch.ones(1 << 22, device="cuda")
    torch.cuda._sleep(50_000_000)  # keep the stream busy
    x.mul_(3)  # queued before the call: must be visible
    handle = tb.to_numpy(x, non_blocking=True)
    x.mul_(5)  # queued after: must not be visible
    result = handle.wait()
    assert (result == 3).all()


def test_after_pending_kernels_on_a_side_stream(gen):
    s = torch.cuda.Stream()
    x = random_tensor((1024, 1024), torch.float32, gen).cuda()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        y = x * 2 + 1
        got = tb.to_numpy(y)  # on s, after the kernels
        out = poisoned((1024, 1024), np.float32)
        tb.to_numpy(y.t(), out=out)
    torch.cuda.synchronize()
    assert_same(got, (x * 2 + 1).cpu().numpy())
    assert_same(out, (x * 2 + 1).t().cpu().numpy())


def test_many_threads_at_once(gen):
    xs = [random_tensor((300 + i, 1000), torch.float32, gen).cuda() for i in range(16)]
    expected = [x.cpu().numpy() for x in xs]

    def work(i):
        for j in range(5):
            out = poisoned(expected[i].shape, np.float32, "F" if j % 2 else "C")
            tb.to_numpy(xs[i], out=out)
            assert_same(out, expected[i])
            back = tb.to_tensor(out, "cuda")
            assert torch.equal(back, xs[i])

    run_in_threads(work, 16)
    stats = tb.pinned_stats()
    assert stats["bytes_held"] <= stats["budget"] and stats["bytes_in_use"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(gen):
    before = torch.cuda.current_device()
    x = random_tensor((999, 77), torch.float32, gen).to("cuda:1")
    assert_same(tb.to_numpy(x), x.cpu().numpy())
    t = tb.to_tensor(x.cpu().numpy(), "cuda:1")
    assert t.device == torch.device("cuda:1") and torch.equal(t, x)
    assert torch.cuda.current_device() == before  # the engine restores the current device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_process_using_only_the_second_gpu_makes_no_context_on_the_first():
    """Registration and its check name the transfer's GPU, and tb.pin a GPU the engine
    uses: each context holds GPU memory, and one per rank on GPU 0 adds up. (A thread
    that never used CUDA, such as a garbage collector's, still makes one on its current
    device when it unregisters an array: the engine's device guard restores that device.)"""
    import subprocess
    import sys

    code = (
        "import ctypes, gc, numpy as np, torch, tensorbridge as tb\n"
        "cu = ctypes.CDLL('libcuda.so.1')\n"
        "def active(d):\n"
        "    flags, on = ctypes.c_uint(), ctypes.c_int()\n"
        "    assert cu.cuDevicePrimaryCtxGetState(d, ctypes.byref(flags), ctypes.byref(on)) == 0\n"
        "    return on.value\n"
        "a = np.ones(32 << 20, np.uint8)\n"
        "for _ in range(3):\n"
        "    t = tb.to_tensor(a, 'cuda:1')\n"
        "    tb.to_numpy(t, out=a)\n"
        "assert tb.pinned_stats()['registrations'] >= 1\n"
        "with tb.pinned(np.ones(1 << 20)) as p:\n"
        "    assert tb.is_pinned(p)\n"
        "del a; gc.collect(); torch.cuda.synchronize(1)\n"
        "print('contexts', active(0), active(1))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "contexts 0 1" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------- host -> device


@pytest.mark.parametrize(
    "view",
    ["contiguous", "fortran", "reversed", "holes", "big-endian", "scalar", "empty"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint8, np.complex64, np.float16])
def test_to_tensor_any_layout(view, dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((63, 129)) * 50).astype(dtype)
    a = {
        "contiguous": a,
        "fortran": np.asfortranarray(a),
        "reversed": a[::-1, ::-1],
        "holes": a[::2, 1::3],
        "big-endian": a.astype(np.dtype(dtype).newbyteorder(">")) if a.itemsize > 1 else a,
        "scalar": a[3, 4, ...],
        "empty": a[:0],
    }[view]
    t = tb.to_tensor(a, "cuda")
    expected = torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), order="C"))
    assert t.device.type == "cuda" and t.dtype == expected.dtype
    assert torch.equal(t.cpu(), expected)


@needs_ml
def test_to_tensor_bfloat16_and_cast_on_device(gen):
    x = random_tensor((33, 65), torch.bfloat16, gen)
    a = tb.to_numpy(x)
    assert torch.equal(tb.to_tensor(a, "cuda").cpu().view(torch.int16), x.view(torch.int16))
    img = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    t = tb.to_tensor(img, "cuda", dtype=torch.float32)
    assert t.dtype == torch.float32 and torch.equal(t.cpu(), torch.from_numpy(img).float())


def test_to_tensor_non_blocking_source_reusable_at_once():
    a = np.arange(1 << 22, dtype=np.float32)
    t = tb.to_tensor(a, "cuda", non_blocking=True)
    a[:] = -1  # the staged path no longer reads `a`
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(1 << 22, dtype=torch.float32))


def test_to_tensor_from_pinned_non_blocking():
    a = tb.empty_pinned((1 << 20,), np.float64)
    a[:] = np.arange(1 << 20)
    t = tb.to_tensor(a, "cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.from_numpy(a))


def test_to_tensor_out(gen):
    a = np.random.default_rng(2).standard_normal((100, 200)).astype(np.float32)
    out = torch.full((100, 200), float("nan"), device="cuda")
    assert tb.to_tensor(a, out=out) is out
    assert torch.equal(out.cpu(), torch.from_numpy(a))
    out16 = torch.zeros((100, 200), dtype=torch.float16, device="cuda")
    tb.to_tensor(a, out=out16, dtype=torch.float16)
    assert torch.equal(out16.cpu(), torch.from_numpy(a).half())


# ------------------------------------------------------------------------- pool, pinning


def test_pin_unpin_and_context_manager():
    a = np.zeros((1024, 1024), np.float32)
    assert not tb.is_pinned(a)
    with tb.pinned(a):
        assert tb.is_pinned(a)
        tb.pin(a)  # twice: reference counted
        tb.unpin(a)
        assert tb.is_pinned(a)
    assert not tb.is_pinned(a)


def test_pool_reuses_blocks_and_keeps_its_budget(gen, no_registration):
    x = random_tensor((4096, 1024), torch.float32, gen).cuda()
    out = np.empty((4096, 1024), np.float32)
    tb.to_numpy(x, out=out)
    before = tb.pinned_stats()
    for _ in range(3):
        tb.to_numpy(x, out=out)
    after = tb.pinned_stats()
    assert after["hits"] > before["hits"] and after["misses"] == before["misses"]
    assert after["bytes_held"] <= after["budget"]


def test_tiny_budget_falls_back_and_stays_correct(gen):
    old = tb.pinned_stats()["budget"]
    try:
        tb.set_pinned_budget(0)
        x = random_tensor((1000, 999), torch.float32, gen).cuda()
        out = poisoned((1000, 999), np.float32, "F")
        tb.to_numpy(x, out=out)
        assert_same(out, x.cpu().numpy())
        assert torch.equal(tb.to_tensor(out, "cuda"), x)
        assert tb.pinned_stats()["bytes_held"] == 0
    finally:
        tb.set_pinned_budget(old)


@pytest.mark.parametrize("chunk", [4096, 1 << 16, 1 << 22])
@pytest.mark.parametrize("buffers", [2, 4])
def test_transfer_options(gen, chunk, buffers):
    tb.transfer_options(chunk_bytes=chunk, buffers=buffers)
    x = random_tensor((777, 333), torch.float64, gen).cuda()
    out = poisoned((333, 777), np.float64)
    tb.to_numpy(x.t(), out=out)
    assert_same(out, x.t().cpu().numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.int16])
def test_to_numpy_into_big_endian_out(dtype):
    x = torch.from_numpy((np.random.default_rng(4).standard_normal((129, 65)) * 99).astype(dtype))
    out = np.empty((65, 129), np.dtype(dtype).newbyteorder(">"))
    tb.to_numpy(x.cuda().t(), out=out)
    assert np.array_equal(out, x.t().numpy())


def test_to_numpy_into_fortran_pinned_out(gen):
    x = random_tensor((300, 200), torch.float32, gen).cuda()
    base = tb.empty_pinned((200, 300), np.float32)
    out = base.T  # F-order view of pinned memory: the device side is permuted to match
    tb.to_numpy(x, out=out)
    assert_same(out, x.cpu().numpy())


def test_unpin_waits_for_copies_in_flight():
    a = np.arange(1 << 22, dtype=np.float32)
    with tb.pinned(a):
        torch.cuda._sleep(50_000_000)
        t = tb.to_tensor(a, "cuda", non_blocking=True)  # direct DMA from the pinned array
    a[:] = -1  # unpinned: the copy must have read `a` before this
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(1 << 22, dtype=torch.float32))


def test_blocking_upload_is_complete_for_other_streams():
    a = np.random.default_rng(5).standard_normal(1 << 22).astype(np.float32)
    t = tb.to_tensor(a, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = t.sum()  # another stream, no wait_stream: the data must be there already
    side.synchronize()
    assert torch.allclose(got.cpu(), torch.from_numpy(a).sum(), rtol=1e-4)


# ------------------------------------------------------------------------- registered arrays

N8 = 2 << 20  # float32 elements: 8 MiB, over the registration's 4 MiB minimum


def test_a_reused_out_is_registered_then_dmad_directly(gen):
    out = np.empty(N8, np.float32)
    before = tb.pinned_stats()
    for _ in range(3):
        x = random_tensor((N8,), torch.float32, gen).cuda()
        assert tb.to_numpy(x, out=out) is out
        assert_same(out, x.cpu().numpy())
    after = tb.pinned_stats()
    assert after["registrations"] - before["registrations"] == 1
    assert after["registered_hits"] - before["registered_hits"] == 1
    assert tb.is_pinned(out)  # page-locked in place
    del out  # unregistered before NumPy frees it
    freed = tb.pinned_stats()
    assert freed["releases"] - before["releases"] == 1
    assert freed["registered_bytes"] == before["registered_bytes"]


def test_a_registered_out_non_blocking_is_finished_by_wait(gen):
    x = random_tensor((N8,), torch.float32, gen).cuda()
    out = np.empty(N8, np.float32)
    tb.to_numpy(x, out=out)
    tb.to_numpy(x, out=out)  # registered
    expected = (x * 2).cpu().numpy()
    torch.cuda._sleep(50_000_000)  # keep the stream busy
    x.mul_(2)  # queued before the call: visible
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    x.mul_(5)  # queued after: not visible
    assert isinstance(handle, tb.Transfer)
    assert handle.wait() is out
    assert_same(out, expected)


@pytest.mark.parametrize("non_blocking", [False, True])
def test_a_registered_source_is_free_to_reuse_when_to_tensor_returns(non_blocking):
    a = np.arange(4 * N8, dtype=np.float32)
    expected = torch.from_numpy(a.copy())
    tb.to_tensor(a, "cuda")
    before = tb.pinned_stats()["registrations"]
    torch.cuda._sleep(50_000_000)  # a DMA not waited for would still be queued...
    t = tb.to_tensor(a, "cuda", non_blocking=non_blocking)  # registered: one direct DMA
    a[:] = -1  # ...and would read this
    torch.cuda.synchronize()
    assert tb.pinned_stats()["registrations"] == before + 1
    assert torch.equal(t.cpu(), expected)


@pytest.mark.parametrize("how", ["to_tensor", "to_device", "to_tensor requiring grad"])
def test_a_tensor_over_a_registered_array_is_free_to_reuse_when_the_call_returns(how):
    """A tensor over an array the cache registered is page-locked memory its owner thinks
    pageable: a non-blocking send from it (alone, in a batch, or through torch's copy)
    must have read it by the time the call returns, as from the array itself."""
    a = np.arange(4 * N8, dtype=np.float32)
    expected = torch.from_numpy(a.copy())
    before = tb.pinned_stats()["registrations"]
    tb.to_tensor(a, "cuda")
    tb.to_tensor(a, "cuda")  # (the second sighting: registered)
    assert tb.pinned_stats()["registrations"] == before + 1
    t = torch.from_numpy(a)
    torch.cuda._sleep(50_000_000)  # a DMA not waited for would still be queued...
    if how == "to_tensor":
        got = tb.to_tensor(t, "cuda", non_blocking=True)
    elif how == "to_device":
        got = tb.to_device({"x": t, "y": np.ones(3)}, "cuda", non_blocking=True)["x"]
    else:
        got = tb.to_tensor(t.requires_grad_(), "cuda", non_blocking=True)  # (torch's copy)
    a[:] = -1  # ...and would read this
    torch.cuda.synchronize()
    assert torch.equal(got.detach().cpu(), expected)


def test_registered_arrays_stay_within_half_the_pinned_budget():
    old = tb.pinned_stats()
    try:
        tb.set_pinned_budget(64 << 20)
        arrays = [np.full(2 * N8, i, np.float32) for i in range(4)]  # 16 MiB each
        for a in arrays * 3:
            assert torch.equal(tb.to_tensor(a, "cuda").cpu(), torch.from_numpy(a))
            stats = tb.pinned_stats()
            assert stats["registered_bytes"] <= 32 << 20
            assert stats["registered_bytes"] + stats["bytes_held"] <= 64 << 20
        assert stats["registrations"] > old["registrations"]
    finally:
        tb.set_pinned_budget(old["budget"])


def test_turning_registration_off_unregisters_every_array():
    saved = tb.registration_options()
    a = np.ones(N8, np.float32)
    try:
        tb.to_tensor(a, "cuda")
        tb.to_tensor(a, "cuda")
        assert tb.is_pinned(a)
        tb.registration_options(enabled=False)
        assert not tb.is_pinned(a) and tb.pinned_stats()["registered_bytes"] == 0
        assert torch.equal(tb.to_tensor(a, "cuda").cpu(), torch.from_numpy(a))
    finally:
        tb.registration_options(**saved)


# ------------------------------------------------------------------------- batches


def test_to_device_packs_a_batch_into_aligned_views():
    rng = np.random.default_rng(6)
    batch = {
        "ids": rng.integers(0, 1000, (64,)).astype(np.int64),
        "mask": rng.random((64, 9)) > 0.5,
        "img": rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)[:, ::-1],
        "boxes": [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(20)],
        "be": rng.standard_normal(7).astype(">f8"),
        "name": "x",
    }
    moved = tb.to_device(batch, "cuda", dtype={"img": torch.float32})
    assert moved["name"] == "x"
    leaves = [moved["ids"], moved["mask"], moved["img"], *moved["boxes"], moved["be"]]
    for t in leaves:
        assert t.device.type == "cuda" and t.data_ptr() % 16 == 0
    assert torch.equal(moved["ids"].cpu(), torch.from_numpy(batch["ids"]))
    assert torch.equal(moved["mask"].cpu(), torch.from_numpy(batch["mask"]))
    assert torch.equal(moved["img"].cpu(), torch.from_numpy(batch["img"].copy()).float())
    for t, a in zip(moved["boxes"], batch["boxes"], strict=True):
        assert torch.equal(t.cpu(), torch.from_numpy(a))
    assert torch.equal(moved["be"].cpu(), torch.from_numpy(batch["be"].astype("<f8")))


def test_prefetcher_sees_work_queued_before_and_overwrites_nothing_in_use():
    batches = [{"x": np.full((1 << 20,), i, np.float32)} for i in range(6)]
    seen = []
    for b in tb.Prefetcher(batches, "cuda", depth=3):
        torch.cuda._sleep(20_000_000)  # a slow "model step" on the current stream
        seen.append(float(b["x"].mean()))  # reads after the prefetches of later batches
    assert seen == [float(i) for i in range(6)]


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_raises_a_refused_batch_after_the_batches_before_it(depth):
    batches = [{"x": np.full(4, 0.0)}, {"x": np.full(4, 1.0)}, {"x": np.array(["s"])}, {"x": 3}]
    seen = []
    with pytest.raises(TypeError, match=r'^Prefetcher: batch\["x"\]: '):
        for b in tb.Prefetcher(batches, "cuda", depth=depth):
            seen.append(float(b["x"][0]))
    assert seen == [0.0, 1.0]


@needs_ml
def test_to_numpy_batch_brings_gpu_tensors_back_in_one_pass(gen):
    batch = {
        "a": random_tensor((33, 7), torch.float32, gen).cuda(),
        "b": [
            random_tensor((5,), torch.bfloat16, gen).cuda(),
            random_tensor((2, 3), torch.int64, gen).cuda().t(),
        ],
        "n": 1,
    }
    out = tb.to_numpy_batch(batch)
    assert_same(out["a"], reference_numpy(batch["a"]))
    assert_same(out["b"][0], reference_numpy(batch["b"][0]))
    assert_same(out["b"][1], reference_numpy(batch["b"][1]))
    assert out["n"] == 1


def test_collate_pins_in_the_main_process():
    batch = tb.collate([{"x": np.ones((3, 3), np.float32)} for _ in range(4)])
    assert batch["x"].is_pinned()


@pytest.mark.parametrize("non_blocking", [False, True])
def test_a_collated_pinned_batch_crosses_without_a_second_host_copy(non_blocking):
    """tb.collate's pinned fields of 1 MiB or more cross in one DMA each from where they
    are: no staging block is leased (the labels, one small array, go on their own too:
    torch's copy when blocking, one DMA from their pinned memory when not). The idiom's
    values."""
    rng = np.random.default_rng(8)
    samples = [
        {"image": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), "label": i % 10}
        for i in range(64)
    ]
    batch = tb.collate(samples)
    assert batch["image"].is_pinned()
    assert batch["image"].nbytes >= _cuda.ROUTING.batch_pinned_direct
    before = tb.pinned_stats()
    moved = tb.to_device(batch, "cuda", non_blocking=non_blocking)
    torch.cuda.synchronize()
    after = tb.pinned_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    expected = torch.utils.data.default_collate(samples)
    for key in ("image", "label"):
        assert moved[key].device.type == "cuda"
        assert torch.equal(moved[key].cpu(), expected[key]), key


def test_images_to_tensor_on_the_gpu():
    x = np.random.default_rng(7).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = tb.images_to_tensor(x, "cuda", mean=[0.5] * 3, std=[0.25] * 3)
    ref = (torch.from_numpy(x).float() / 255 - 0.5) / 0.25
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), ref.permute(0, 3, 1, 2), atol=1e-5)


# ------------------------------------------------------------------------- faults, lifetimes


@pytest.fixture
def fault():
    if TESTING is None:
        pytest.skip("tensorbridge._C_testing is not built (a -DTB_TESTING=OFF build?)")
    yield TESTING.cuda_inject_copy_fault
    TESTING.cuda_inject_copy_fault(-1)


@pytest.mark.parametrize("after", [0, 1, 3])
def test_injected_copy_fault_surfaces_and_pool_recovers(gen, fault, after, no_registration):
    x = random_tensor((8192, 1024), torch.float32, gen).cuda()  # 32 MiB: eight 4 MiB chunks
    out = poisoned((8192, 1024), np.float32)
    fault(after)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        tb.to_numpy(x, out=out)
    fault(-1)
    assert tb.pinned_stats()["bytes_in_use"] == 0
    tb.to_numpy(x, out=out)  # later transfers work
    assert_same(out, x.cpu().numpy())
    fault(after)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        tb.to_tensor(out, "cuda")
    fault(-1)
    assert torch.equal(tb.to_tensor(out, "cuda"), x)


def test_injected_fault_surfaces_from_wait(gen, fault):
    x = random_tensor((2048, 1024), torch.float32, gen).cuda()
    fault(0)
    handle = tb.to_numpy(x, out=np.empty((2048, 1024), np.float32), non_blocking=True)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        handle.wait()
    fault(-1)
    assert tb.pinned_stats()["bytes_in_use"] == 0


def test_device_out_of_memory_leaves_the_engine_working():
    free, _ = torch.cuda.mem_get_info()
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (free + (1 << 30),), (0,))
    with pytest.raises(torch.OutOfMemoryError):
        tb.to_tensor(huge, "cuda")
    a = np.arange(1 << 20, dtype=np.float32)
    assert torch.equal(tb.to_tensor(a, "cuda").cpu(), torch.from_numpy(a))


def test_exit_with_transfers_in_flight_is_clean():
    import subprocess
    import sys

    code = (
        "import numpy as np, torch, tensorbridge as tb\n"
        "x = torch.rand(64 << 20, device='cuda')\n"
        "handles = [tb.to_numpy(x, out=np.empty(64 << 20, np.float32), non_blocking=True)"
        " for _ in range(3)]\n"
        "t = tb.to_tensor(np.ones(64 << 20, np.float32), 'cuda', non_blocking=True)\n"
        "print('exiting')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout


def test_small_copies_with_a_negative_stride_on_a_dimension_of_size_one(gen):
    """NumPy calls such an array contiguous, torch.from_numpy refuses it: the small-copy
    paths must fall back rather than raise."""
    x = random_tensor((1, 3), torch.float32, gen).cuda()
    out = poisoned((2, 3), np.float32)[::-1][:1]
    assert out.flags.c_contiguous and out.strides[0] < 0
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, x.cpu().numpy())
    assert torch.equal(tb.to_tensor(out, "cuda"), x)
