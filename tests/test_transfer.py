"""The Transfer handle that non_blocking calls return: done(), wait() (twice too), repr,
failures raised from wait(), and dropping the source or the handle while a copy is in flight.

Below the handle, tensorbridge._C.PendingCopy (the compiled core's queued copy: its event
and the memory it touches) is tested on the host engine: it holds that memory until the
copy completes, waits when dropped early, and keeps the memory for good after a failed
wait. What each non_blocking call returns is tested with the call (test_to_numpy.py,
test_to_numpy_batch.py); GPU copies in flight are in test_gpu.py and test_hostile.py.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _handle

from conftest import TESTING, assert_same, needs_testing_module, poisoned, random_tensor


def test_transfer_failed_raises_from_wait():
    handle = tb.Transfer.failed(RuntimeError("cudaErrorLaunchFailure: boom"))
    assert handle.done()
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        handle.wait()
    with pytest.raises(RuntimeError):
        handle.wait()
    assert "failed" in repr(handle)


def test_transfer_pending_blocks_then_completes():
    state = {"done": False}

    def block():
        state["done"] = True

    handle = tb.Transfer(np.arange(3), poll=lambda: state["done"], block=block)
    assert not handle.done()
    assert "pending" in repr(handle)
    np.testing.assert_array_equal(handle.wait(), np.arange(3))
    assert handle.done()


def _traceback_length(exc: BaseException) -> int:
    n, tb_ = 0, exc.__traceback__
    while tb_ is not None:
        n, tb_ = n + 1, tb_.tb_next
    return n


def test_waiting_again_on_a_failed_transfer_raises_the_same_error_with_its_own_traceback():
    """Each wait() re-raised the stored error as it stood, adding the waiter's frames to
    its traceback: it grew by two frames a wait, and kept every waiter's frames alive."""

    def fails():
        raise RuntimeError("cudaErrorLaunchFailure: boom")

    state = {"calls": 0}

    def block():
        state["calls"] += 1
        fails()

    handle = tb.Transfer(None, poll=lambda: False, block=block)
    lengths, errors = [], []
    for _ in range(5):
        with pytest.raises(RuntimeError, match="boom") as info:
            handle.wait()
        lengths.append(_traceback_length(info.value))
        errors.append(info.value)
    assert state["calls"] == 1 and all(e is errors[0] for e in errors)
    assert len(set(lengths)) == 1, lengths
    failed = tb.Transfer.failed(RuntimeError("given"))
    assert len({_traceback_length(_raised(failed.wait)) for _ in range(5)}) == 1


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # (the test looks at what was raised)
        return exc
    raise AssertionError("nothing was raised")


def test_a_keyboard_interrupt_while_waiting_leaves_the_transfer_pending():
    """A Ctrl-C in wait() was kept as the transfer's error: every later wait() raised
    KeyboardInterrupt for a copy that had completed, and its memory was kept for good."""
    state = {"polls": 0, "done": False}

    def poll():
        state["polls"] += 1
        if state["polls"] == 1:
            raise KeyboardInterrupt
        return state["done"]

    keep = np.ones(3)
    ref = weakref.ref(keep)
    parked = len(_handle._PARKED)
    handle = tb.Transfer(np.arange(3), poll=poll, keepalive=keep)
    del keep
    with pytest.raises(KeyboardInterrupt):
        handle.wait()
    assert "pending" in repr(handle) and ref() is not None  # (still in flight)
    state["done"] = True
    np.testing.assert_array_equal(handle.wait(), np.arange(3))
    gc.collect()
    assert ref() is None and len(_handle._PARKED) == parked  # released, not parked


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(__import__("copy").copy, id="copy"),
        pytest.param(__import__("copy").deepcopy, id="deepcopy"),
        pytest.param(lambda h: __import__("pickle").dumps(h), id="pickle"),
    ],
)
def test_a_transfer_is_neither_copied_nor_pickled(how):
    """A copy of a pending combined handle shared its closure, which wrote the result onto
    the original (the copy's wait() gave None); pickling failed on a lock."""
    pending = tb.Transfer.gather([tb.Transfer(1, poll=lambda: False, block=lambda: None)], dict)
    for handle in (pending, tb.Transfer.completed(np.ones(2))):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*transfer\.wait\(\)"):
            how(handle)


def test_a_combined_transfer_of_a_failed_one_fails_at_wait_not_at_the_call():
    """gather() combined handles that were all done at once, raising a failed one's
    error at the call (to_numpy_batch(non_blocking=True) raised there) instead of
    returning a handle whose wait() raises it, as for any other failure."""
    handles = [tb.Transfer.completed(1), tb.Transfer.failed(RuntimeError("boom"))]
    combined = tb.Transfer.gather(handles, lambda: [h.wait() for h in handles])
    assert combined.done()
    with pytest.raises(RuntimeError, match="boom"):
        combined.wait()


def test_dropping_sources_and_handles_is_safe(backend, gen):
    x = random_tensor((300, 400), torch.float32, gen)
    expected = x.numpy().copy()
    out = poisoned((300, 400), np.float32)
    handle = tb.to_numpy(x, out=out, non_blocking=True)
    del x
    gc.collect()
    assert handle.wait() is out and handle.wait() is out  # waited twice: fine
    assert_same(out, expected)
    for _ in range(5):  # handles dropped without wait()
        tb.to_numpy(random_tensor((50, 50), torch.float64, gen), non_blocking=True)
    gc.collect()


# ------------------------------------------------------------------ PendingCopy


@needs_testing_module
def test_pending_copy_holds_its_memory_until_the_copy_completes():
    # The host engine runs the copy 0.2 s after it is queued: a handle dropped before
    # that must wait for it, and only then let the arrays go.
    tester = TESTING.HostTransferTester(delay_us=200_000)
    device = np.random.default_rng().integers(0, 256, 1 << 16, dtype=np.uint8)
    host = poisoned(device.shape, device.dtype)
    refs = (weakref.ref(device), weakref.ref(host))
    pending = tester.copy_async(device, host, to_host=True)
    assert type(pending).__name__ == "PendingCopy" and not pending.done()
    expected = device.copy()
    del device
    view = host.view()  # (a view keeps the memory, not the array object)
    del host
    gc.collect()
    assert refs[0]() is not None and refs[1]() is not None, "freed under a pending copy"
    del pending  # waits for the copy
    np.testing.assert_array_equal(view, expected)
    gc.collect()
    assert refs[0]() is None, "a completed copy still holds its source"


@needs_testing_module
def test_pending_copy_done_and_wait_release_the_memory():
    tester = TESTING.HostTransferTester(delay_us=20_000)
    host = np.random.default_rng().integers(0, 256, 4096, dtype=np.uint8)
    device = poisoned(host.shape, host.dtype)
    ref = weakref.ref(host)
    pending = tester.copy_async(device, host, to_host=False)
    expected = host.copy()
    del host
    pending.wait()
    pending.wait()  # waiting twice is harmless
    assert pending.done()
    gc.collect()
    assert ref() is None
    np.testing.assert_array_equal(device, expected)


def _failing_copy() -> tuple[object, weakref.ref[np.ndarray], np.ndarray]:
    """A queued copy whose wait will fail (as a device error would), a weak reference to
    the host array it writes, and that array (for the caller to drop)."""
    tester = TESTING.HostTransferTester(delay_us=50_000)
    host = np.empty(4096, np.uint8)
    tester.fail_next_wait()
    return tester.copy_async(np.zeros(4096, np.uint8), host, to_host=True), weakref.ref(host), host


@needs_testing_module
def test_failed_wait_keeps_the_memory_for_good():
    pending, ref, host = _failing_copy()
    del host
    with pytest.raises(RuntimeError, match="injected wait failure"):
        pending.wait()
    with pytest.raises(RuntimeError, match="injected wait failure"):
        pending.wait()  # the same error again, never a success
    assert pending.done()
    del pending
    gc.collect()
    assert ref() is not None, "memory a failed copy may still touch was freed"


@needs_testing_module
def test_failed_wait_in_a_transfer_handle_raises_and_keeps_the_memory():
    pending, ref, host = _failing_copy()
    t = _handle.Transfer(host, poll=pending.done, block=pending.wait)
    del host, pending
    with pytest.raises(RuntimeError, match="injected wait failure"):
        t.wait()
    del t
    gc.collect()
    assert ref() is not None


@needs_testing_module
def test_testing_helpers_refuse_impossible_plans():
    for args in (([10], 0, 64), ([10], 8, 0), ([-1], 8, 64), ([2**62, 4], 8, 2**20)):
        with pytest.raises(ValueError, match="plan_chunks"):
            TESTING.plan_chunks(*args)
    with pytest.raises(ValueError, match="pool_size_class"):
        TESTING.pool_size_class(2**64 - 1)


@needs_testing_module
def test_copy_async_refuses_bad_arrays():
    tester = TESTING.HostTransferTester()
    a = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="same size"):
        tester.copy_async(a, np.zeros(8, np.uint8), to_host=True)
    with pytest.raises(ValueError, match="C-contiguous"):
        tester.copy_async(np.zeros(32, np.uint8)[::2], a, to_host=True)
    ro = np.zeros(16, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        tester.copy_async(a, ro, to_host=True)


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_testing_module
def test_exit_while_a_daemon_thread_waits_is_clean():
    # A daemon thread (the completion watcher, or a user's) is inside wait() with the GIL
    # released when the interpreter finalizes: retaking the GIL ends that thread, which
    # must not take the process down (it used to abort in a noexcept destructor).
    proc = _run_script(
        """
        import threading, numpy as np, tensorbridge._C_testing as T
        from tensorbridge import _cuda
        t = T.HostTransferTester(delay_us=300_000)
        d = [np.arange(1 << 16, dtype=np.uint8) for _ in range(3)]
        h = [np.zeros(1 << 16, np.uint8) for _ in range(3)]
        p1, p2 = t.copy_async(d[0], h[0], True), t.copy_async(d[1], h[1], True)
        threading.Thread(target=p1.wait, daemon=True).start()
        _cuda._completions.add(t.copy_async(d[2], h[2], True))
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "exiting\n"


@needs_testing_module
def test_exit_while_daemon_threads_are_inside_compiled_calls_is_clean():
    # Every compiled call releases the GIL the same way: a daemon thread inside one (here
    # copies over a slow simulated link, each way, and a dropped copy's destructor) when
    # the interpreter finalizes ends there. (torch's own calls, and its from_numpy
    # tensors' deleters, can still abort.)
    proc = _run_script(
        """
        import threading, time, numpy as np
        import tensorbridge._C_testing as T
        t = T.HostTransferTester(delay_us=300_000)
        src, dev = np.arange(1 << 16, dtype=np.uint8), np.zeros(1 << 16, np.uint8)
        back = np.zeros(1 << 16, np.uint8)
        def loop(op):
            while True:
                op()
        t2, dropped = T.HostTransferTester(delay_us=300_000), np.zeros(1 << 16, np.uint8)
        for op in (
            lambda: t.to_device(src, dev),
            lambda: t.to_host(dev, back),
            lambda: t2.copy_async(src, dropped, True),  # dropped unwaited: its destructor waits
        ):
            threading.Thread(target=loop, args=(op,), daemon=True).start()
        time.sleep(0.5)
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "exiting\n"


@needs_testing_module
def test_a_forked_child_never_waits_on_the_parents_copies():
    proc = _run_script(
        """
        import os, time, numpy as np, tensorbridge._C_testing as T
        from tensorbridge import _cuda
        t = T.HostTransferTester(delay_us=2_000_000)
        d = np.arange(1 << 16, dtype=np.uint8); h = np.zeros_like(d)
        _cuda._completions.add(t.copy_async(d, h, True))
        time.sleep(0.1)
        _cuda._completions.add(t.copy_async(d, h, True))
        kept = t.copy_async(d, h, True)
        pid = os.fork()
        if pid == 0:
            for call in (kept.done, kept.wait):  # neither may claim the copy landed here
                try:
                    call()
                    os._exit(3)
                except RuntimeError as exc:
                    if "forked" not in str(exc):
                        os._exit(4)
            os._exit(0)
        t0 = time.time()
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), time.time() - t0 < 1.5)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "True"]


@needs_testing_module
def test_dropping_a_tester_with_an_armed_wait_failure_is_safe():
    proc = _run_script(
        """
        import numpy as np, tensorbridge._C_testing as T
        t = T.HostTransferTester(delay_us=1000)
        src = np.arange(1 << 20, dtype=np.uint8); dev = np.zeros_like(src)
        t.to_device(src, dev, chunk_bytes=1 << 18, buffers=2)
        t.fail_next_wait()
        del t
        print("survived", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "survived\n"
