"""Hostile input: each class of crash, hang or wrong byte found in review, on both paths.

Where a defect could crash or hang the interpreter, the case runs in a subprocess with a
timeout, so it fails one test instead of the run. Values are compared with the idiom
(``numpy.copyto``, ``torch.from_numpy``) on fresh random data, outputs poisoned first.
"""

from __future__ import annotations

import dataclasses as dataclass_module
import gc
import os
import re
import subprocess
import sys
import textwrap
import threading
import weakref
import zlib

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _batch, _cuda, _handle

from conftest import HAS_EXTENSION, POISON, TESTING, is_poisoned, needs_testing_module, poisoned

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(tb.__file__)))
PATHS = ["extension", "fallback"]


def run_python(code: str, path: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter on the given path; a crash or hang fails the test."""
    if path == "extension" and not HAS_EXTENSION:
        pytest.skip(f"extension not available: {_backend.ENGINE.fallback_reason}")
    env = dict(os.environ)
    # the tensorbridge this process imported (installed, or the source tree with _C built)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.pop("TENSORBRIDGE_DISABLE_EXTENSION", None)
    if path == "fallback":
        env["TENSORBRIDGE_DISABLE_EXTENSION"] = "1"
    # the child must run on the path asked for, never silently on the other one
    live = path == "extension"
    check = f"import tensorbridge\nassert tensorbridge.info()['extension'] is {live}\n"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", check + textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no answer within {timeout} s")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --------------------------------------------------------------- arrays holding references

REFERENCE_CASES = {
    "object out=": "tb.to_numpy(a, out=out)",
    "object copy=True": "out = tb.to_numpy(a, copy=True)",
    "object dtype=object out=": "tb.to_numpy(a, dtype=object, out=out)",
    "object batch": "tb.to_numpy_batch({'k': a}, out={'k': out})",
    "record with an object field": "tb.to_numpy(a, out=out)",
    "StringDType": "tb.to_numpy(a, out=out)",
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_arrays_holding_references_survive_their_source(case, path):
    if case == "StringDType" and not hasattr(np, "dtypes"):
        pytest.skip("StringDType needs NumPy >= 2")
    make = {
        "record with an object field": """
            dt = np.dtype([("i", "i4"), ("o", "O")])
            a = np.array([(i, Obj(i)) for i in range(3000)], dtype=dt)
            out = np.empty(3000, dt)
            check = lambda: sum(r["o"].i for r in out) == sum(range(3000))
        """,
        "StringDType": """
            sd = np.dtypes.StringDType()
            a = np.array(["x" * (20 + i % 7) + str(i) for i in range(3000)], dtype=sd)
            expected = a.tolist()
            out = np.empty(3000, sd)
            check = lambda: out.tolist() == expected
        """,
    }.get(
        case,
        """
            a = np.array([Obj(i) for i in range(3000)], dtype=object)
            out = np.empty(3000, object)
            check = lambda: [o.i for o in out] == list(range(3000))
        """,
    )
    code = "\n".join(
        [
            "import gc, numpy as np, tensorbridge as tb",
            "class Obj:",
            "    def __init__(self, i):",
            "        self.i = i",
            textwrap.dedent(make),
            REFERENCE_CASES[case],
            "del a",
            "gc.collect()",
            "assert check(), 'values changed'",
            "print('ok')",
        ]
    )
    assert "ok" in run_python(code, path).stdout


@pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled core is not built")
def test_core_refuses_raw_copies_of_references():
    a = np.array([object() for _ in range(4)], dtype=object)
    with pytest.raises(TypeError, match=r"numpy\.copyto"):
        _backend._LOADED.copy(np.empty(4, object), a, 0)


def test_object_copies_take_references(backend):
    items = [object() for _ in range(50)]
    a = np.array(items, dtype=object)
    before = sys.getrefcount(items[7])
    out = np.empty(50, object)
    tb.to_numpy(a, out=out)
    after = sys.getrefcount(items[7])  # (outside the assert, which would hold one more)
    assert after == before + 1  # out holds its own reference
    assert all(o is i for o, i in zip(out, items, strict=True))


# --------------------------------------------------------------- alignment


def misaligned(n: int, dtype) -> np.ndarray:
    """A writeable array of n elements at an odd byte address, poisoned."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + 1, np.uint8)
    raw.fill(POISON)
    return raw[1:].view(dtype)


@pytest.mark.parametrize("path", PATHS)
def test_large_copy_into_misaligned_out(path):
    # 2.4 MiB: above the size from which torch's own copy_ is preferred.
    code = """
        import numpy as np, torch, tensorbridge as tb
        n = 150_000
        g = torch.Generator().manual_seed(5)
        for dtype in (torch.complex128, torch.float64, torch.int32):
            x = torch.randn(n, dtype=torch.float64, generator=g).mul(1000).to(dtype)
            raw = np.zeros(n * x.element_size() + 1, np.uint8)
            out = raw[1:].view(x.numpy().dtype)
            tb.to_numpy(x, out=out)
            assert out.tobytes() == x.numpy().tobytes(), dtype
            # a misaligned source tensor too (torch.from_numpy shares the odd address)
            src = torch.from_numpy(out)
            dst = np.empty_like(out)
            tb.to_numpy(src, out=dst)
            assert dst.tobytes() == x.numpy().tobytes(), dtype
        print("ok")
    """
    assert "ok" in run_python(code, path).stdout


def test_misaligned_arrays_become_aligned_tensors(backend, rng):
    for dtype in (np.complex128, np.float32, np.int64, np.dtype(">f8")):
        a = misaligned(1000, dtype)
        a[...] = rng.standard_normal(1000) * 100
        t = tb.from_numpy(a)
        assert t.data_ptr() % t.element_size() == 0
        ref = a.astype(np.dtype(dtype).newbyteorder("="))
        assert t.numpy().tobytes() == ref.tobytes()
        # ops on the result are safe, and so are casts and out= through to_tensor
        assert torch.equal(
            tb.to_tensor(a, dtype=torch.complex128), torch.from_numpy(ref).to(torch.complex128)
        )
        out = torch.empty(1000, dtype=t.dtype)
        assert torch.equal(tb.to_tensor(a, out=out), torch.from_numpy(ref))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_arrays_aligned_to_their_parts_only_become_aligned_tensors(backend, rng, dtype):
    # NumPy calls a complex array aligned when its parts are; torch's complex numbers are
    # aligned to their whole size, as they are in a tensor of their own.
    dtype = np.dtype(dtype)
    raw = np.empty(1001 * dtype.itemsize, np.uint8)
    start = (-raw.ctypes.data) % dtype.itemsize + dtype.itemsize // 2
    a = raw[start : start + 1000 * dtype.itemsize].view(dtype)
    a[...] = rng.standard_normal(1000) + 1j * rng.standard_normal(1000)
    assert a.flags.aligned and a.ctypes.data % dtype.itemsize
    t = tb.from_numpy(a)
    assert t.data_ptr() % t.element_size() == 0
    assert t.numpy().tobytes() == a.tobytes()


def test_to_tensor_refuses_a_misaligned_out_tensor(backend):
    out = torch.from_numpy(misaligned(100, np.complex128))
    with pytest.raises(ValueError, match="multiple of its element size"):
        tb.to_tensor(np.ones(100, np.complex128), out=out)
    assert is_poisoned(out.numpy())


# --------------------------------------------------------------- thread counts


@pytest.mark.parametrize("path", PATHS)
def test_set_num_threads_is_bounded_on_both_paths(path):
    code = """
        import tensorbridge as tb
        from tensorbridge import _backend
        limit = _backend.MAX_THREADS
        for bad in (0, -1, limit + 1, 100_000):
            try:
                tb.set_num_threads(bad)
            except ValueError as e:
                assert f"from 1 to {limit}" in str(e), e
            else:
                raise AssertionError(f"accepted {bad}")
        for bad in (2.0, "4", True):
            try:
                tb.set_num_threads(bad)
            except TypeError:
                pass
            else:
                raise AssertionError(f"accepted {bad!r}")
        tb.set_num_threads(limit)
        tb.set_num_threads(1)
        print("ok")
    """
    assert "ok" in run_python(code, path).stdout


def test_a_refused_thread_start_raises_instead_of_hanging():
    # The address-space limit makes the OS refuse thread stacks after a few threads.
    code = """
        import resource, numpy as np, tensorbridge as tb
        src = np.random.default_rng(0).random((2048, 1024))
        dst = np.empty((1024, 2048))
        tb.to_numpy(src.T, out=dst)
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                  if l.startswith("VmSize"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (48 << 20), hard))
        tb.set_num_threads(64)
        try:
            tb.to_numpy(src.T, out=dst)
        except RuntimeError as e:
            assert "set_num_threads" in str(e), e
        else:
            raise AssertionError("64 threads started under a 48 MiB address-space margin")
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        tb.set_num_threads(2)
        dst[...] = 0
        tb.to_numpy(src.T, out=dst)
        assert np.array_equal(dst, src.T)
        print("ok")
    """
    assert "ok" in run_python(code, "extension", timeout=60).stdout


# --------------------------------------------------------------- byte order of non-numbers

BYTE_ORDER_CASES = {
    "unicode": (lambda r: np.array(["ab", "cd", "é€"]), "U2"),
    "unicode-4": (lambda r: np.array(["abcd", "wxyz"]), "U4"),
    "record": (
        lambda r: np.array([(1, 2), (3, -4)], dtype=[("a", "<i4"), ("b", "<i4")]),
        [("a", "i4"), ("b", "i4")],
    ),
    "mixed record": (
        lambda r: np.array([(1, 2.5, 7)], dtype=[("a", "<i4"), ("b", ">f8"), ("c", "<i2")]),
        [("a", "i4"), ("b", "f8"), ("c", "i2")],
    ),
    "longdouble": (lambda r: r.standard_normal(7).astype(np.longdouble), np.longdouble),
    "clongdouble": (
        lambda r: (r.standard_normal(7) + 1j * r.standard_normal(7)).astype(np.clongdouble),
        np.clongdouble,
    ),
    "datetime": (lambda r: r.integers(0, 2**40, 9).astype("M8[ns]"), "M8[ns]"),
    "float64": (lambda r: r.standard_normal(9), np.float64),
    "complex64": (lambda r: (r.standard_normal(9) + 1j).astype(np.complex64), np.complex64),
}


@pytest.mark.parametrize("case", list(BYTE_ORDER_CASES))
@pytest.mark.parametrize("order", ["<", ">"])
def test_copies_into_another_byte_order_match_numpy(backend, rng, case, order):
    make, out_dtype = BYTE_ORDER_CASES[case]
    a = make(rng)
    dt = np.dtype(out_dtype).newbyteorder(order)
    out, ref = poisoned(a.shape, dt), poisoned(a.shape, dt)
    np.copyto(ref, a, casting="equiv")
    assert tb.to_numpy(a, out=out) is out
    assert out.tobytes() == ref.tobytes()
    # and back, from a strided view
    back, ref_back = poisoned(a.shape, a.dtype), poisoned(a.shape, a.dtype)
    np.copyto(ref_back, ref, casting="equiv")
    tb.to_numpy(out[::-1], out=back[::-1])
    assert back.tobytes() == ref_back.tobytes()


# --------------------------------------------------------------- aliasing outs


def overlapping_view(dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """16 elements over 7 slots, and the poisoned buffer under them."""
    base = poisoned(7, dtype)
    view = np.lib.stride_tricks.as_strided(base, (16,), (base.itemsize // 2 or 1,))
    if base.itemsize == 1:
        view = np.lib.stride_tricks.as_strided(base, (4, 4), (1, 1))
    return view, base


OUT_ALIASES = {
    "16 elements over 7 slots": lambda: overlapping_view(),
    "rows over rows": lambda: (
        np.lib.stride_tricks.as_strided(b := poisoned(20, np.float64), (4, 4), (16, 8)),
        b,
    ),
}


@pytest.mark.parametrize("alias", list(OUT_ALIASES))
def test_self_overlapping_out_is_refused_everywhere(backend, rng, alias):
    out, base = OUT_ALIASES[alias]()
    a = rng.standard_normal(out.shape)
    x = torch.from_numpy(a.copy())
    calls = {
        "to_numpy(array)": lambda: tb.to_numpy(a, out=out),
        "to_numpy(tensor)": lambda: tb.to_numpy(x, out=out),
        "to_numpy(tensor, dtype)": lambda: tb.to_numpy(x.float(), dtype=np.float64, out=out),
        "to_numpy_batch": lambda: tb.to_numpy_batch([x, a], out=[None, out]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"overlap|share memory") as info:
            call()
        assert "pass" in str(info.value), name
        assert is_poisoned(base), name


def test_interleaved_out_that_does_not_overlap_is_accepted(backend, rng):
    base = poisoned(8, np.uint8)
    out = np.lib.stride_tricks.as_strided(base, (2, 3), (3, 2))  # offsets 0 2 4 3 5 7
    a = rng.integers(0, 255, (2, 3), dtype=np.uint8)
    tb.to_numpy(a, out=out)
    assert np.array_equal(out, a)
    tb.to_numpy(torch.from_numpy(a), out=out)
    assert np.array_equal(out, a)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1, 6).expand(4, 6),
        lambda: torch.zeros(10).as_strided((4, 4), (2, 1)),
    ],
    ids=["expanded", "as_strided"],
)
def test_to_tensor_refuses_a_self_overlapping_out(backend, make):
    out = make()
    with pytest.raises(ValueError, match="pass"):
        tb.to_tensor(np.ones(tuple(out.shape), np.float32), out=out)
    assert not out.any()


# --------------------------------------------------------------- batches


def test_batch_checks_every_out_before_writing(backend, rng):
    leaf = rng.standard_normal(6)
    other = rng.standard_normal(6)
    o1 = poisoned(6, np.float64)
    with pytest.raises(ValueError, match="leaf 1 shares memory with that leaf"):
        tb.to_numpy_batch([other, leaf], out=[o1, leaf[::-1]])
    assert is_poisoned(o1)
    # an out over another leaf: writing it first would change what that leaf holds
    with pytest.raises(ValueError, match="out of leaf 0 shares memory with leaf 1"):
        tb.to_numpy_batch([other, leaf], out=[leaf, None])
    # two outs over the same memory
    o2 = poisoned(12, np.float64)
    with pytest.raises(ValueError, match="outs of leaves 0 and 1 share memory"):
        tb.to_numpy_batch([other, leaf], out=[o2[:6], o2[5:11]])
    assert is_poisoned(o2)
    # a CPU tensor leaf viewed by an out
    t = torch.from_numpy(rng.standard_normal(6))
    with pytest.raises(ValueError, match="shares memory"):
        tb.to_numpy_batch({"t": t, "a": other}, out={"t": None, "a": t.numpy()})
    # separate outs are fine
    o3, o4 = poisoned(6, np.float64), poisoned(6, np.float64)
    tb.to_numpy_batch([other, leaf], out=[o3, o4])
    assert np.array_equal(o3, other) and np.array_equal(o4, leaf)


class Checked(tuple):
    """A tuple subclass that validates its items, as torch.Size does."""

    def __new__(cls, items):
        items = tuple(items)
        if not all(isinstance(i, (int, np.ndarray, torch.Tensor)) for i in items):
            raise TypeError("Checked takes ints and arrays")
        return super().__new__(cls, items)


def test_batches_with_validating_tuples(backend, rng):
    a = rng.standard_normal((2, 3)).astype(np.float32)
    batch = {"shape": torch.Size([2, 3]), "x": torch.from_numpy(a), "c": Checked([1, a])}
    back = tb.to_numpy_batch(batch)
    assert back["shape"] == torch.Size([2, 3]) and type(back["shape"]) is torch.Size
    assert type(back["c"]) is Checked and np.array_equal(back["c"][1], a)
    moved = tb.to_device(batch, "cpu", dtype=torch.float64)
    assert type(moved["shape"]) is torch.Size and moved["shape"] == torch.Size([2, 3])
    assert moved["x"].dtype == torch.float64 and type(moved["c"]) is Checked
    assert torch.equal(moved["c"][1], torch.from_numpy(a).double())


# --------------------------------------------------------------- exception types


def test_strided_nested_tensor_gets_a_type_error(backend):
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.strided)
    for call in (lambda: tb.to_numpy(nt), lambda: tb.to_tensor(nt, "cpu")):
        with pytest.raises(TypeError, match=r"x\.unbind\(\)"):
            call()


@pytest.mark.skipif(
    _backend.ENGINE.C is None or not _backend.ENGINE.C.cuda_compiled, reason="no CUDA build"
)
@pytest.mark.parametrize("name", ["cuda_copy_pinned", "cuda_copy_small"])
def test_blocking_copy_bindings_check_the_host_side_before_any_driver_call(name):
    """Refused with the GIL held, before the device is touched (so on any machine)."""
    call = getattr(_backend.ENGINE.C, name)
    a = np.full(64, 7, np.float32)
    read_only = a.copy()
    read_only.flags.writeable = False
    for host, nbytes, to_host in (
        (a[::2], a[::2].nbytes, True),  # not C-contiguous
        (a, a.nbytes - 4, True),  # not the size it says
        (read_only, read_only.nbytes, True),  # written into
    ):
        with pytest.raises(ValueError, match=name):
            call(0, 0, host, 0, nbytes, to_host)
    assert (a == 7).all()


@pytest.mark.parametrize("kind", ["sparse-csr", "sparse-coo", "nested"])
@pytest.mark.parametrize("elements", [64, 1 << 19], ids=["small", "2MiB"])
def test_sparse_and_nested_tensors_with_an_out_get_a_type_error(backend, kind, elements):
    """At every size: the fast paths for large copies (torch's threads on the host, one
    DMA on a GPU) ask for sizes and contiguity, which these layouts raise RuntimeErrors
    for; the refusal must be the full path's TypeError, before anything is written."""
    dense = torch.rand(2, elements)
    x = {
        "sparse-csr": lambda: dense.to_sparse_csr(),
        "sparse-coo": lambda: dense.to_sparse(),
        "nested": lambda: torch.nested.nested_tensor(list(dense), layout=torch.strided),
    }[kind]()
    out = np.full((2, elements), 7, np.float32)
    with pytest.raises(TypeError, match=r"to_dense|unbind"):
        tb.to_numpy(x, out=out)
    assert (out == 7).all()


@pytest.mark.parametrize("dtype", [np.float32, "float32", torch.float32, np.dtype("float32")])
def test_images_to_tensor_takes_any_dtype_spelling(backend, rng, dtype):
    x = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    got = tb.images_to_tensor(x, dtype=dtype, mean=0.5, std=0.25)
    ref = (torch.from_numpy(x).float() / 255 - 0.5) / 0.25
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.permute(0, 3, 1, 2))
    with pytest.raises(TypeError, match="floats"):
        tb.images_to_tensor(x, dtype="int32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
@pytest.mark.parametrize(
    "call",
    [
        lambda: tb.to_tensor(np.ones(3), "cuda"),
        lambda: tb.to_tensor(np.ones(3), torch.device("cuda", 0)),
        lambda: tb.to_tensor(np.ones(3 << 20, np.uint8), "cuda:0", dtype=torch.float32),
        lambda: tb.to_device({"x": np.ones(3)}, "cuda"),
        lambda: tb.images_to_tensor(np.ones((1, 2, 2, 3), np.uint8), "cuda"),
        lambda: tb.Prefetcher([np.ones(3)], "cuda"),
        lambda: tb.to_device({"x": np.ones(3)}, 0),
        lambda: tb.to_tensor(np.ones(3), 1),
    ],
    ids=[
        "to_tensor",
        "to_tensor-device",
        "to_tensor-cast",
        "to_device",
        "images",
        "prefetcher",
        "to_device-index",
        "to_tensor-index",
    ],
)
def test_cuda_without_cuda_names_the_reason_and_the_fix(backend, call):
    with pytest.raises(ValueError, match="CUDA") as info:
        call()
    message = str(info.value)
    assert tb.info()["cuda_reason"] in message
    assert "device='cpu'" in message


def test_unknown_devices_are_refused_clearly(backend):
    with pytest.raises(ValueError, match="not a device torch knows"):
        tb.to_tensor(np.ones(3), "gpu")
    with pytest.raises(TypeError, match="device must be"):
        tb.to_tensor(np.ones(3), 1.5)


class InstanceInterface:
    """An object whose __array_interface__ is set on the instance (NumPy accepts it)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.__array_interface__ = a.__array_interface__


def test_instance_level_array_interface_is_accepted(backend, rng):
    a = rng.standard_normal((3, 4))
    obj = InstanceInterface(a)
    assert np.array_equal(tb.to_numpy(obj), np.asarray(obj))
    assert torch.equal(tb.to_tensor(obj), torch.from_numpy(np.asarray(obj)))


# --------------------------------------------------------------- transfers in flight


def test_failed_wait_keeps_what_the_copy_may_still_touch():
    class Buffer:
        pass

    buf = Buffer()
    ref = weakref.ref(buf)

    def block() -> None:
        raise RuntimeError("the device reported an error")

    t = _handle.Transfer(None, poll=lambda: False, block=block, keepalive=buf)
    del buf
    with pytest.raises(RuntimeError, match="device reported"):
        t.wait()
    del t
    gc.collect()
    assert ref() is not None, "memory a failed copy may still touch was freed"


def test_completion_watcher_drops_copies_nobody_waits_for():
    done = {1: threading.Event(), 2: threading.Event(), 3: threading.Event()}
    waited: list[int] = []

    class Source:
        pass

    class FakePending:  # the watcher's side of a PendingCopy
        def __init__(self, i: int, source: Source) -> None:
            self.i, self.source = i, source

        def done(self) -> bool:
            return done[self.i].is_set()

        def wait(self) -> None:
            assert done[self.i].wait(10)
            waited.append(self.i)
            if self.i == 3:
                raise RuntimeError("copy failed")

    watcher = _cuda.CompletionWatcher(idle_s=0.05)
    sources = {i: Source() for i in done}
    refs = {i: weakref.ref(s) for i, s in sources.items()}
    for i, s in sources.items():
        watcher.add(FakePending(i, s))
    del s
    sources.clear()
    assert watcher.pending() == 3
    for e in done.values():
        e.set()
    for _ in range(1000):
        if watcher.pending() == 0 and watcher._thread is None:
            break
        threading.Event().wait(0.01)
    gc.collect()
    assert waited == [1, 2, 3]  # every copy waited for, in order
    assert all(r() is None for r in refs.values())  # and dropped (a failed one included:
    # the real PendingCopy keeps its memory itself, see above)
    assert watcher._thread is None  # the thread ends when idle
    watcher.add(FakePending(1, Source()))  # and a new one starts on demand
    for _ in range(1000):
        if watcher.pending() == 0:
            break
        threading.Event().wait(0.01)
    assert waited == [1, 2, 3, 1]


@needs_testing_module
def test_a_large_array_in_a_packed_batch_uses_the_same_staging_blocks(rng):
    C = TESTING
    chunk, buffers = 64 << 10, 3
    tester = C.HostTransferTester(delay_us=50)
    arrays = [
        rng.integers(0, 255, 1000, dtype=np.uint8),
        rng.standard_normal((300, 700)),  # 1.6 MiB: many blocks' worth
        rng.integers(0, 255, 3000, dtype=np.uint8),
    ]
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.nbytes // 256) * 256
    device = np.full(end, POISON, np.uint8)
    tester.to_device_many(arrays, offsets, device, chunk_bytes=chunk, buffers=buffers)
    tester.drain()
    for a, off in zip(arrays, offsets, strict=True):
        assert device[off : off + a.nbytes].tobytes() == a.tobytes()
    held = tester.stats()["bytes_held"]
    assert held == buffers * C.pool_size_class(chunk), "a second set of blocks was leased"


# --------------------------------------------------------------- found by review


@pytest.mark.parametrize("path", PATHS)
def test_casts_in_a_forked_child_after_the_parent_used_torch(path):
    code = """
        import os, signal, numpy as np, torch, tensorbridge as tb
        a = np.random.default_rng(0).random((512, 512))
        (torch.from_numpy(a) * 2).float().sum()  # the parent's intra-op pool is live
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)
            t = tb.to_tensor(a, dtype=torch.float32)
            b = tb.to_device({"x": a}, "cpu", dtype=torch.float32)
            tb.images_to_tensor(np.zeros((4, 64, 64, 3), np.uint8))
            ok = torch.equal(t, torch.from_numpy(a).float()) and torch.equal(b["x"], t)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"child status {status} (14: hung until the alarm)"
        print("ok")
    """
    assert "ok" in run_python(code, path).stdout


def test_batch_outs_are_matched_by_key_not_position(backend):
    batch = {"a": torch.full((3,), 1.0), "b": torch.full((3,), 2.0)}
    oa, ob = poisoned(3, np.float32), poisoned(3, np.float32)
    got = tb.to_numpy_batch(batch, out={"b": ob, "a": oa})
    assert (oa == 1).all() and (ob == 2).all() and got["a"] is oa and got["b"] is ob
    ox = poisoned(3, np.float32)
    with pytest.raises(ValueError, match="must hold the batch's keys"):
        tb.to_numpy_batch(batch, out={"x": ox, "y": None})
    assert is_poisoned(ox)


def test_a_refused_leaf_stops_the_batch_before_any_out_is_written(backend):
    o = poisoned(3, np.float32)
    for bad in (torch.ones(3).to_sparse(), torch.empty(3, device="meta")):
        with pytest.raises(TypeError):
            tb.to_numpy_batch([torch.ones(3), bad], out=[o, None])
        assert is_poisoned(o)


@dataclass_module.dataclass
class Sample:
    image: np.ndarray
    label: int = dataclass_module.field(init=False, default=-1)


def test_dataclass_fields_set_after_init_survive(backend, rng):
    s = Sample(rng.standard_normal(4))
    s.label = 7
    assert tb.to_device(s, "cpu").label == 7
    assert tb.to_numpy_batch(s).label == 7
    assert torch.equal(tb.collate([s, s]).label, torch.tensor([7, 7]))


def test_broadcast_views_with_negative_strides_are_not_expanded(backend):
    base = np.arange(4, dtype=np.float32)[::-1]
    a = np.broadcast_to(base, (1 << 14, 1 << 12, 4))  # 1 GiB if expanded
    t = tb.from_numpy(a)
    assert t.shape == a.shape and t.untyped_storage().nbytes() == 16
    assert t[123, 456].tolist() == base.tolist()
    small = np.broadcast_to(base, (3, 2, 4))
    assert np.array_equal(tb.from_numpy(small).numpy(), np.ascontiguousarray(small))


def test_valid_large_outs_and_dtype_aliases_are_accepted(backend, rng):
    x = torch.from_numpy(rng.standard_normal((1, 300_000)).astype(np.float32))
    out = np.empty((1, 300_000), np.float32)[::-1]  # a negative stride on a size-1 dim
    assert np.array_equal(tb.to_numpy(x, out=out), x.numpy())
    u = torch.from_numpy(rng.integers(0, 2**62, 300_000, dtype=np.uint64))
    out = np.empty(300_000, np.ulonglong)
    assert np.array_equal(tb.to_numpy(u, out=out), u.numpy())
    a = np.arange(5, dtype=np.ulonglong)[::-1]
    assert tb.from_numpy(a).tolist() == a.tolist()


@pytest.mark.parametrize("device", ["mps", "xpu", "xla", "lazy", "hpu"])
def test_other_accelerators_are_refused_clearly(backend, device):
    try:
        torch.empty(0, device=device)
    except Exception:
        pass
    else:
        pytest.skip(f"{device} is usable here")
    with pytest.raises(ValueError, match="is not usable here") as refused:
        tb.to_tensor(np.zeros(3), device)
    # one line, ending with the fix: not torch's dispatcher table (thousands of characters)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400
    assert str(refused.value).endswith("pass device='cpu', or a device this torch build supports.")
    with pytest.raises(ValueError, match="is not usable here"):
        tb.to_device({"x": np.zeros(3)}, device)


@pytest.mark.parametrize("dtype", ["qint8", "quint8", "bits8", "uint1", "int4"])
def test_casts_to_dtypes_no_cast_can_make_are_type_errors(backend, dtype):
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    with pytest.raises(TypeError, match="cannot be the target of a cast"):
        tb.to_tensor(np.zeros(3), dtype=getattr(torch, dtype))


def test_cyclic_and_very_deep_batches_are_value_errors(backend):
    cyclic: list = [np.ones(2)]
    cyclic.append(cyclic)
    deep: list = [np.ones(2)]
    for _ in range(5000):
        deep = [deep]
    for batch in (cyclic, deep):
        for call in (lambda b: tb.to_device(b, "cpu"), tb.to_numpy_batch):
            with pytest.raises(ValueError, match="nested too deeply or contains itself"):
                call(batch)


def _nested(leaf, depth: int) -> list:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


_DEEP_CALLS = [
    ("to_device", lambda b: tb.to_device(b, "cpu")),
    ("to_device", lambda b: tb.to_device(b, "cpu", dtype=torch.float16)),
    ("to_numpy_batch", tb.to_numpy_batch),
    ("to_numpy_batch", lambda b: tb.to_numpy_batch(b, non_blocking=True).wait()),
    ("PackedBatch.pack", lambda b: tb.PackedBatch.pack(b).to("cpu")),
]


@pytest.mark.parametrize("depth", [300, 498, 2000])
@pytest.mark.parametrize(
    ("name", "call"), _DEEP_CALLS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_batch_too_deep_is_refused_naming_the_function_at_every_depth(backend, name, call, depth):
    """Some paths refused without naming their function; at 498 levels (Python's recursion
    limit reached while rebuilding, not flattening) a raw RecursionError escaped."""
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: the batch is nested too deeply"):
        call(_nested(torch.ones(1), depth))
    assert call(_nested(torch.ones(1), 50)) is not None  # (deep, but not too deep)


def test_a_dtype_key_torch_cannot_cast_from_is_named_as_a_source():
    """dtype={torch.uint1: ...} was refused as if uint1 were the cast's target."""
    with pytest.raises(TypeError, match=r"^to_device: dtype= has the key torch\.uint1, a source"):
        tb.to_device({"a": np.ones(2)}, "cpu", dtype={torch.uint1: torch.float32})
    with pytest.raises(TypeError, match=r"^to_device: dtype=torch\.qint8 cannot be the target"):
        tb.to_device({"a": np.ones(2)}, "cpu", dtype={"a": torch.qint8})


_FLAGS = [
    ("to_numpy: copy", lambda v: tb.to_numpy(torch.ones(2), copy=v)),
    ("to_numpy: non_blocking", lambda v: tb.to_numpy(torch.ones(2), non_blocking=v)),
    ("to_tensor: non_blocking", lambda v: tb.to_tensor(np.ones(2), non_blocking=v)),
    ("to_tensor: non_blocking", lambda v: tb.to_tensor(np.ones(2), "cpu", non_blocking=v)),
    ("to_device: non_blocking", lambda v: tb.to_device({"x": np.ones(2)}, "cpu", non_blocking=v)),
    ("to_numpy_batch: non_blocking", lambda v: tb.to_numpy_batch([torch.ones(2)], non_blocking=v)),
    ("Prefetcher: non_blocking", lambda v: tb.Prefetcher([np.ones(2)], "cpu", non_blocking=v)),
    (
        "images_to_tensor: channels_first",
        lambda v: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), channels_first=v),
    ),
    (
        "images_to_tensor: non_blocking",
        lambda v: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), non_blocking=v),
    ),
    (
        "PackedBatch.to: non_blocking",
        lambda v: tb.PackedBatch.pack({"x": np.ones(2)}, pin=False).to("cpu", non_blocking=v),
    ),
    (
        "PackedBatch.to: copy",
        lambda v: tb.PackedBatch.pack({"x": np.ones(2)}, pin=False).to("cpu", copy=v),
    ),
    ("collate: packed", lambda v: tb.collate([np.ones(2)], packed=v)),
]


@pytest.mark.parametrize(("name", "call"), _FLAGS, ids=[f[0] for f in _FLAGS])
def test_flags_take_true_or_false_not_truthy_strings(backend, name, call):
    """copy="no" made a copy, non_blocking="no" a Transfer, channels_first="False"
    channels-first output: flags are True or False (NumPy's, and 0 or 1, too)."""
    for wrong in ("no", "False", 2, -1, 0.0, None):
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be True or False, got"):
            call(wrong)
    for right in (True, False, np.bool_(True), 0, 1, np.int64(0)):
        call(right)


def _freed(n: int, keep: int) -> torch.Tensor:
    """A tensor whose storage was freed (keep=0, as FSDP frees sharded parameters) or
    shrunk in place to keep bytes: its elements lie past its memory."""
    t = torch.arange(float(n))
    t.untyped_storage().resize_(keep)
    return t


_READS_FREED = [
    ("to_numpy", tb.to_numpy),  # (freed only: torch's numpy() gives a new, unwritten array)
    ("to_numpy_batch", lambda t: tb.to_numpy_batch({"a": t})),
    ("to_numpy: out", lambda t: tb.to_numpy(t, out=np.full(t.shape, -7.0, np.float32))),
    ("to_numpy: copy", lambda t: tb.to_numpy(t, copy=True)),
    ("to_numpy: dtype", lambda t: tb.to_numpy(t, dtype=np.float64)),
    ("to_tensor", lambda t: tb.to_tensor(t, dtype=torch.float64)),
    ("to_device", lambda t: tb.to_device({"a": t}, "cpu", dtype=torch.float16)),
    (
        "to_numpy_batch: out",
        lambda t: tb.to_numpy_batch({"a": t}, out={"a": np.full(t.shape, -7.0, np.float32)}),
    ),
    ("PackedBatch.pack", lambda t: tb.PackedBatch.pack({"a": t})),
    ("collate", lambda t: tb.collate([t, t])),
]


@pytest.mark.parametrize("n", [1000, 1 << 20])  # (the small copies' path and the large ones')
@pytest.mark.parametrize(("name", "call"), _READS_FREED, ids=[c[0] for c in _READS_FREED])
def test_a_tensor_whose_storage_was_freed_is_refused_not_read(backend, name, call, n):
    """A copy from a tensor whose storage was freed read address 0 (a segfault in the
    compiled core, and in torch's own copy_), or gave an unwritten array; one shrunk in
    place read past its end. (Shrunk, not freed: the zero-copy views, like x.numpy(),
    reach past it as torch's do, and copies into out= below 1 MiB read it as torch's
    copy_ does, a check that would cost every small copy; from 1 MiB it is refused.)"""
    views = name in ("to_numpy", "to_numpy_batch")
    small_out = "out" in name and n * 4 < _cuda.ROUTING.host_torch_bytes
    for keep in (0,) if views or small_out else (0, 40):
        with pytest.raises(ValueError, match=r"storage holds \d+ bytes but its elements reach"):
            call(_freed(n, keep))


def test_a_freed_storage_is_refused_before_out_is_written(backend):
    """(A storage shrunk but not freed is read as torch's own copy_ reads it on the copy
    into out's fast path: that check would cost every small copy.)"""
    out = np.full(1000, -7.0, np.float32)
    with pytest.raises(ValueError, match=r"shrunk in place.*summon_full_params"):
        tb.to_numpy(_freed(1000, 0), out=out)
    assert (out == -7.0).all()
    t = torch.arange(8.0)[2:6]  # (a view inside a whole storage is not refused)
    assert tb.to_numpy(t, copy=True).tolist() == [2.0, 3.0, 4.0, 5.0]
    assert tb.to_numpy(torch.zeros(0), copy=True).shape == (0,)


class _UnprintableKey:
    def __repr__(self) -> str:
        raise RuntimeError("a __repr__ that raises")


def test_a_key_whose_repr_raises_does_not_hide_the_refusal(backend):
    """The dtype= name check and the out= structure check raised the key's __repr__
    error instead of their own ValueError."""
    key = _UnprintableKey()
    with pytest.raises(ValueError, match=r"dtype= names 'nope'.*their keys: <_UnprintableKey"):
        tb.to_device({key: np.ones(2)}, "cpu", dtype={"nope": torch.float16})
    with pytest.raises(ValueError, match=r"out\[<_UnprintableKey.*\] has shape \(3,\)"):
        tb.to_numpy_batch({key: np.ones(2)}, out={key: np.ones(3)})


@pytest.mark.parametrize(
    "case", ["bfloat16", "not contiguous", "out in Fortran order", "to_device's packer"]
)
def test_a_shrunk_storage_is_refused_by_every_large_copy(backend, case):
    """Only the contiguous float copy into a C-ordered out was checked: these read past
    the storage's end (segfaults, 16M elements over a 4 KiB storage)."""
    n = 1 << 22
    t = torch.ones(n, 2, dtype=torch.bfloat16 if case == "bfloat16" else torch.float32)
    t = t[:, 0] if case == "not contiguous" else t
    t.untyped_storage().resize_(4096)
    dtype = np.float32 if case != "bfloat16" else tb.to_numpy(torch.ones(1, dtype=t.dtype)).dtype
    out = np.zeros(t.shape, dtype, order="F" if case == "out in Fortran order" else "C")
    with pytest.raises(ValueError, match=r"storage holds 4096 bytes but its elements reach"):
        if case == "to_device's packer":
            if not tb.info()["extension"]:
                pytest.skip("the packed path needs the compiled core")
            sender = _batch.LinkSender(tb._C.LinkSimulator(1000.0))
            batch = {"w": t, "x": np.ones(2)}
            _batch.send_batch(batch, torch.device("cpu"), sender, None, False)
        else:
            tb.to_numpy(t, out=out)
    assert not out.any()  # (nothing written)
