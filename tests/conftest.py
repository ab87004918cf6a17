"""Shared fixtures and the helpers more than one test file uses: both backends, every dtype,
many layouts, random data and views, bit-exact comparison."""

from __future__ import annotations

import collections
import contextlib
import warnings
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend

try:
    import ml_dtypes
except ImportError:  # the suite still runs; ml_dtypes cases are skipped
    ml_dtypes = None

HAS_EXTENSION = _backend._LOADED is not None
# The test-only compiled helpers (testing builds: the default; not in release wheels).
TESTING = _backend.Engine.host_engine()
needs_testing_module = pytest.mark.skipif(
    TESTING is None, reason="tensorbridge._C_testing is not built (a -DTB_TESTING=OFF build?)"
)
HAS_CUDA = torch.cuda.is_available()

POISON = 0xAB  # byte written into outputs before a conversion, so unwritten bytes show
Pair = collections.namedtuple("Pair", "image label")  # a namedtuple leaf container in batches


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@contextlib.contextmanager
def forced_fallback() -> Iterator[None]:
    """Runs the block on the pure-Python path: swaps the one engine every call site asks."""
    saved = _backend.ENGINE
    _backend.ENGINE = _backend.Engine(
        None, "the fallback path was forced by the test suite (tests/conftest.py)."
    )
    try:
        yield
    finally:
        _backend.ENGINE = saved


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Any warning raises, torch's once-per-process ones included: torch says that a tensor
    shares a non-writable array only the first time in a process, so without
    ``set_warn_always`` an earlier test could hide it here."""
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        torch.set_warn_always(was)


@pytest.fixture(params=["extension", "fallback"])
def backend(request):
    """Runs a test on the compiled path and on the pure-Python fallback."""
    if request.param == "extension":
        if not HAS_EXTENSION:
            pytest.skip(f"extension not available: {_backend.ENGINE.fallback_reason}")
        if not _backend.ENGINE.extension:
            pytest.skip(f"the pure-Python path is forced: {_backend.ENGINE.fallback_reason}")
        yield "extension"
    else:
        with forced_fallback():
            yield "fallback"


# ------------------------------------------------------------------------- dtypes

NATIVE_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
ML_DTYPES = [
    d
    for d in (
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
        getattr(torch, "float8_e8m0fnu", None),
    )
    if d is not None
]
ALL_DTYPES = NATIVE_DTYPES + ML_DTYPES
NP_DTYPES = [np.dtype(torch.empty(0, dtype=d).numpy().dtype) for d in NATIVE_DTYPES]

needs_ml = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")


def dtype_param(d: torch.dtype):
    marks = [needs_ml] if d in ML_DTYPES else []
    return pytest.param(d, id=str(d).replace("torch.", ""), marks=marks)


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Fresh random data of any dtype: random bits for the 1-byte floats, values otherwise."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=gen)
    if dtype.is_floating_point:
        if dtype.itemsize == 1:  # any bit pattern is a valid float8 (NaNs included)
            return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype)
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def random_array(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """Random bytes viewed as any NumPy dtype (void and complex too): the core's copies move
    bytes, so any bit pattern is a valid input."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=max(1, int(np.prod(shape))) * dtype.itemsize, dtype=np.uint8)
    return raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


def fresh(np_dtype: np.dtype, gen: torch.Generator) -> np.ndarray:
    """A fresh random array of shape (6, 8, 10) in a native NumPy dtype."""
    t_dtype = next(d for d in NATIVE_DTYPES if torch.empty(0, dtype=d).numpy().dtype == np_dtype)
    return random_tensor((6, 8, 10), t_dtype, gen).numpy()


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test, so failures reproduce and data differs between tests."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


# ------------------------------------------------------------------------- layouts

# name -> builds a tensor of that layout from (dtype, gen)
LAYOUTS: dict[str, Callable[[torch.dtype, torch.Generator], torch.Tensor]] = {
    "contiguous": lambda d, g: random_tensor((3, 5, 7), d, g),
    "scalar-0d": lambda d, g: random_tensor((), d, g),
    "empty": lambda d, g: random_tensor((0, 4), d, g),
    "single": lambda d, g: random_tensor((1, 1, 1), d, g),
    "transposed": lambda d, g: random_tensor((9, 13), d, g).t(),
    "permuted": lambda d, g: random_tensor((4, 5, 6), d, g).permute(2, 0, 1),
    "offset": lambda d, g: random_tensor((6, 9), d, g)[2:, 3:],
    "holes": lambda d, g: random_tensor((10, 12), d, g)[::3, 1::2],
    "expanded": lambda d, g: random_tensor((1, 7), d, g).expand(5, 7),
    "transposed-large": lambda d, g: random_tensor((700, 333), d, g).t(),  # > 256 KiB: threads
    "contiguous-large": lambda d, g: random_tensor((513, 517), d, g),
}


def layout_params():
    return [pytest.param(name, id=name) for name in LAYOUTS]


# ------------------------------------------------------------------------- property tests

# shared by the property tests of to_numpy, from_numpy and to_tensor
PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def numpy_views(draw):
    """Random NumPy views: steps (negative too), transposes, byte order, offsets."""
    dtype = np.dtype(draw(st.sampled_from(["u1", "i2", "i4", "f4", "f8", "c8", "c16", "?"])))
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder("S")
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    a = base.view(dtype).reshape(shape)
    if dtype.kind == "b":
        a = (base[: a.size] & 1).astype(bool).reshape(shape)
    slices = tuple(
        slice(draw(st.integers(0, n - 1)), None, draw(st.sampled_from([1, 2, -1, -3])))
        for n in shape
    )
    return a[(*slices, Ellipsis)].transpose(draw(st.permutations(range(ndim))))


# ------------------------------------------------------------------------- checks


def as_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same type, shape, dtype and bits (NaN payloads included)."""
    assert isinstance(actual, np.ndarray), type(actual)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert as_bytes(actual) == as_bytes(expected)


def reference_numpy(x: torch.Tensor) -> np.ndarray:
    """The idiom tensorbridge replaces; ml_dtypes via torch's own same-size int view."""
    x = x.detach().cpu().resolve_conj().resolve_neg()
    if x.dtype in ML_DTYPES:
        storage = torch.int16 if x.element_size() == 2 else torch.uint8
        np_dtype = np.dtype(getattr(ml_dtypes, str(x.dtype).replace("torch.", "")))
        return x.contiguous().view(storage).numpy().view(np_dtype)
    return x.numpy()


def poisoned(shape, dtype, order: str = "C") -> np.ndarray:
    out = np.empty(shape, dtype, order=order)
    out.ravel(order="K").view(np.uint8).fill(POISON)  # ravel of a fresh array is a view
    return out


def is_poisoned(a: np.ndarray) -> bool:
    """True when no byte of a was written since poisoned()."""
    return bool((np.ascontiguousarray(a).view(np.uint8) == POISON).all())


def strided_out(shape, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A writeable view with holes into a poisoned buffer: (view, whole buffer)."""
    big = np.empty(tuple(2 * n + 1 for n in shape), dtype)
    big.ravel(order="K").view(np.uint8).fill(POISON)
    view = big[(*(slice(1, 1 + 2 * n, 2) for n in shape), Ellipsis)]  # always a view
    return view, big


def assert_holes_poisoned(view: np.ndarray, big: np.ndarray) -> None:
    """Every byte of big outside view still holds the poison."""
    mask = np.ones(big.shape, bool)
    mask[tuple(slice(1, 1 + 2 * n, 2) for n in view.shape)] = False
    outside = np.ascontiguousarray(big[mask]).view(np.uint8)
    assert (outside == POISON).all(), "bytes outside out were written"


__all__ = ["tb"]


def run_in_threads(work: Callable[[int], None], n: int, timeout: float = 300) -> None:
    """Runs work(i) for i in range(n) on n threads at once; re-raises the first error and
    fails on a thread that does not finish (a deadlock)."""
    import threading

    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported by the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]
