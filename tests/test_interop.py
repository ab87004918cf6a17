"""Arrays of other frameworks, against the real frameworks: JAX and TensorFlow on the CPU
(installed by CI through the ``test-interop`` extra; skipped where missing), CuPy, JAX
and Numba on a GPU (``-m gpu``).

Each case checks values and dtypes bit for bit against the framework's own idiom
(``np.asarray(x)``, ``torch.from_dlpack(x)``, ``cupy.asnumpy(x)``), and zero-copy by
data pointers.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import HAS_CUDA, assert_same, ml_dtypes, poisoned

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPES = [(), (0, 3), (7,), (3, 4, 5), (64, 33)]


def _shape_id(shape):
    return "x".join(map(str, shape)) or "0d"


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax", reason="JAX is not installed (pip install '.[test-interop]')")
    return jax


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip(
        "tensorflow", reason="TensorFlow is not installed (pip install '.[test-interop]')"
    )


def _rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _random(rng: np.random.Generator, shape, dtype: np.dtype) -> np.ndarray:
    """Fresh random values of any dtype (random bits for the 1-byte floats)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    if dtype.itemsize == 1:  # float8: every bit pattern
        return rng.integers(0, 256, shape, dtype=np.uint8).view(dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def _host_pointer(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _tensor_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes (any dtype, bfloat16 too) in C order."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def _torch_dtype_of(np_dtype: np.dtype) -> torch.dtype:
    return tb.from_numpy(np.zeros(1, np_dtype)).dtype


# ------------------------------------------------------------------------- JAX (CPU)

JAX_DTYPES = ["float32", "int32", "uint8", "int8", "uint16", "bool", "float16", "complex64"]
JAX_ML_DTYPES = ["bfloat16", "float8_e4m3fn", "float8_e5m2"]
JAX_ALL = JAX_DTYPES + [
    pytest.param(d, marks=pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes"))
    for d in JAX_ML_DTYPES
]


def _jax_array(jax, rng, shape, dtype):
    host = _random(rng, shape, np.dtype(getattr(ml_dtypes, dtype, None) or dtype))
    return jax.device_put(host, jax.devices("cpu")[0]), host


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", JAX_ALL)
def test_jax_to_numpy_is_the_zero_copy_view_numpy_gives(jax, request, backend, shape, dtype):
    x, host = _jax_array(jax, _rng(request), shape, dtype)
    expected = np.asarray(x)  # the idiom: a read-only view of JAX's buffer
    got = tb.to_numpy(x)
    assert_same(got, host)
    assert got.dtype == expected.dtype  # bfloat16/float8 as ml_dtypes, never upcast
    if got.size:
        assert _host_pointer(got) == x.unsafe_buffer_pointer()  # zero-copy
        assert not got.flags.writeable  # JAX arrays are immutable: so is the view

    out = poisoned(shape, got.dtype, "F")
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, host)
    fresh = tb.to_numpy(x, copy=True)
    assert_same(fresh, host)
    assert fresh.flags.writeable and (not fresh.size or _host_pointer(fresh) != _host_pointer(got))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", JAX_ALL)
def test_jax_to_tensor_shares_memory_like_from_dlpack(jax, request, backend, shape, dtype):
    x, host = _jax_array(jax, _rng(request), shape, dtype)
    expected = torch.from_dlpack(x)  # the idiom
    got = tb.to_tensor(x)
    assert got.dtype == expected.dtype == _torch_dtype_of(host.dtype)
    assert tuple(got.shape) == shape and got.device.type == "cpu"
    assert np.array_equal(_tensor_bits(got), _tensor_bits(expected))
    assert np.array_equal(_tensor_bits(got), np.ascontiguousarray(host).reshape(-1).view(np.uint8))
    if got.numel():
        assert got.data_ptr() == x.unsafe_buffer_pointer()  # zero-copy
    assert tb.to_tensor(x, "cpu").data_ptr() == got.data_ptr()


def test_jax_bfloat16_cast_and_transposes(jax, request, backend):
    jnp = jax.numpy
    rng = _rng(request)
    host = _random(rng, (5, 6), np.float32)
    cpu = jax.devices("cpu")[0]
    x = jax.device_put(host, cpu).astype(jnp.bfloat16).T  # JAX materializes the transpose
    ref = np.asarray(x)
    got = tb.to_numpy(x, dtype=np.float32)
    assert_same(got, ref.astype(np.float32))
    t = tb.to_tensor(x, dtype=torch.float64)
    assert t.dtype == torch.float64
    assert np.array_equal(t.numpy(), ref.astype(np.float64))
    out = poisoned((12, 10), ref.dtype)[::2, ::2]
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, ref)


def test_jax_arrays_inside_batches(jax, request, backend):
    jnp = jax.numpy
    rng = _rng(request)
    a, b = _random(rng, (4, 3), np.float32), _random(rng, (4,), np.int32)
    batch = {"x": jnp.asarray(a), "y": [jnp.asarray(b), "label"], "n": 3}
    moved = tb.to_device(batch, "cpu")
    assert isinstance(moved["x"], torch.Tensor) and np.array_equal(moved["x"].numpy(), a)
    assert np.array_equal(moved["y"][0].numpy(), b) and moved["y"][1] == "label"
    cast = tb.to_device(batch, "cpu", dtype={"x": torch.float64})
    assert cast["x"].dtype == torch.float64
    assert moved["n"] == 3
    back = tb.to_numpy_batch(batch)
    assert_same(back["x"], a)
    assert_same(back["y"][0], b)


def test_deleted_jax_array_is_refused_with_a_fix(jax, backend):
    x = jax.numpy.ones(4)
    x.delete()
    for call in (tb.to_numpy, tb.to_tensor):
        with pytest.raises(ValueError, match=r"refused to export.*deleted.*x.copy\(\)"):
            call(x)


def test_jax_int4_reaches_numpy_but_torch_refuses_it_clearly(jax, backend):
    if ml_dtypes is None or not hasattr(jax.numpy, "int4"):
        pytest.skip("needs int4 in JAX and ml_dtypes")
    x = jax.numpy.arange(-4, 4, dtype=jax.numpy.int4)
    got = tb.to_numpy(x)  # DLPack has no int4; NumPy's protocol does
    assert_same(got, np.asarray(x))
    with pytest.raises(TypeError, match="int4"):
        tb.to_tensor(x)


# ------------------------------------------------------------------------- TensorFlow (CPU)

TF_DTYPES = [
    "float32",
    "float64",
    "int32",
    "int64",
    "uint8",
    "int8",
    "uint16",
    "bool",
    "float16",
    "complex64",
]


def _tf_tensor(tf, rng, shape, dtype):
    if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        host = _random(rng, shape, np.float32)
        tf_dtype = getattr(tf, dtype, None) or getattr(tf.dtypes.experimental, dtype)
        x = tf.cast(tf.constant(host), tf_dtype)
        return x, x.numpy()  # TF's own rounding (and saturation) of the cast
    host = _random(rng, shape, dtype)
    return tf.constant(host), host


def _tf_numpy_view(x) -> np.ndarray | None:
    """TF's zero-copy NumPy view, or None where TF has none (0-d bfloat16 and float8:
    its __array__ returns a NumPy scalar, a copy)."""
    try:
        return np.asarray(x)
    except ValueError:
        return None


TF_ALL = TF_DTYPES + [
    pytest.param(d, marks=pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes"))
    for d in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
]


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", TF_ALL)
def test_tf_to_numpy_matches_numpy_and_shares_its_buffer(tf, request, backend, shape, dtype):
    x, host = _tf_tensor(tf, _rng(request), shape, dtype)
    expected = x.numpy()  # the idiom (a copy)
    got = tb.to_numpy(x)
    assert_same(got, expected)
    assert_same(got, host)
    view = _tf_numpy_view(x)
    if got.size and view is not None:
        assert _host_pointer(got) == _host_pointer(view)  # TF's buffer, no copy
    out = poisoned(shape, got.dtype)
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", TF_ALL)
def test_tf_to_tensor_zero_copy_in_its_own_dtype(tf, request, backend, shape, dtype):
    x, host = _tf_tensor(tf, _rng(request), shape, dtype)
    got = tb.to_tensor(x)
    assert got.dtype == _torch_dtype_of(host.dtype)  # bfloat16 -> torch.bfloat16, float8 too
    assert tuple(got.shape) == shape and got.device.type == "cpu"
    assert np.array_equal(_tensor_bits(got), np.ascontiguousarray(host).reshape(-1).view(np.uint8))
    view = _tf_numpy_view(x)
    if got.numel() and view is not None:
        assert got.data_ptr() == _host_pointer(view)  # TF's buffer, no copy


def test_tf_non_numeric_and_variables(tf, request, backend):
    rng = _rng(request)
    words = tf.constant([b"ab", b"c"])
    got = tb.to_numpy(words)  # through NumPy's protocol: DLPack would abort the process
    assert got.dtype == object and list(got) == [b"ab", b"c"]
    with pytest.raises(TypeError, match="object"):
        tb.to_tensor(words)
    host = _random(rng, (3, 4), np.float32)
    v = tf.Variable(host)
    assert_same(tb.to_numpy(v), host)
    assert np.array_equal(tb.to_tensor(v).numpy(), host)
    assert np.array_equal(tb.to_tensor(tf.transpose(tf.constant(host))).numpy(), host.T)


def test_tf_symbolic_tensor_is_refused_with_a_fix(tf, backend):
    seen = []

    @tf.function
    def traced(x):
        with pytest.raises(ValueError, match=r"refused to export.*eagerly"):
            tb.to_numpy(x)
        seen.append(True)
        return x

    traced(tf.constant([1.0, 2.0]))
    assert seen


def test_tf_tensors_inside_batches(tf, request, backend):
    rng = _rng(request)
    a = _random(rng, (2, 5), np.float32)
    batch = [tf.constant(a), tf.cast(tf.constant(a), tf.bfloat16)]
    moved = tb.to_device(batch, "cpu")
    assert moved[0].dtype == torch.float32 and np.array_equal(moved[0].numpy(), a)
    assert moved[1].dtype == torch.bfloat16
    assert torch.equal(moved[1], torch.from_numpy(a).to(torch.bfloat16))
    back = tb.to_numpy_batch(batch)
    assert_same(back[0], a)


# ------------------------------------------------------------------------- GPU: CuPy, JAX, Numba

gpu = pytest.mark.gpu
GPU_DTYPES = ["float32", "float16", "int64", "uint8", "bool", "complex64"]


@pytest.fixture(scope="module")
def cupy():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return pytest.importorskip("cupy")


def _cupy_layouts(cupy, host):
    x = cupy.asarray(host)
    return {
        "contiguous": x,
        "transposed": x.T,
        "holes": x[::2, 1::3],
        "offset": x[1:, 2:],
        "reversed": x[::-1],  # negative strides: torch has none, so one flip on the device
        "reversed-holes": x[1::2, ::-3],
    }


@gpu
@pytest.mark.parametrize(
    "layout", ["contiguous", "transposed", "holes", "offset", "reversed", "reversed-holes"]
)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cupy_to_tensor_is_zero_copy_and_to_numpy_matches_asnumpy(cupy, request, dtype, layout):
    host = _random(_rng(request), (64, 48), dtype)
    x = _cupy_layouts(cupy, host)[layout]
    t = tb.to_tensor(x)
    assert t.is_cuda and t.device.index == x.device.id
    if not layout.startswith("reversed"):
        assert t.data_ptr() == x.data.ptr  # the same device memory
        assert tuple(t.stride()) == tuple(s // x.itemsize for s in x.strides)
    expected = cupy.asnumpy(x)  # the idiom
    assert np.array_equal(
        _tensor_bits(t), np.ascontiguousarray(expected).reshape(-1).view(np.uint8)
    )
    got = tb.to_numpy(x)
    assert_same(got, expected)
    out = poisoned(x.shape, expected.dtype, "F")
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, expected)
    handle = tb.to_numpy(x, out=poisoned(x.shape, expected.dtype), non_blocking=True)
    assert_same(handle.wait(), expected)


@gpu
def test_cupy_work_on_its_own_stream_is_ordered_before_ours(cupy, request):
    """The producer's stream is handed over: data a CuPy kernel is still writing on a
    side stream is read only after that kernel (repeated, so a missing wait shows)."""
    n = 1 << 24
    for trial in range(5):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x = cupy.zeros(n, dtype=cupy.float32)
            for _ in range(20):  # a queue of work long enough to still be running
                x += 1.0
            t = tb.to_tensor(x)
            got = tb.to_numpy(x)
        assert torch.all(t == 20.0).item(), f"trial {trial}: read before CuPy's writes"
        assert (got == 20.0).all()


@gpu
def test_cupy_to_tensor_other_device_and_dtype(cupy, request):
    host = _random(_rng(request), (33, 17), np.float32)
    x = cupy.asarray(host)
    on_cpu = tb.to_tensor(x, "cpu")
    assert on_cpu.device.type == "cpu" and np.array_equal(on_cpu.numpy(), host)
    half = tb.to_tensor(x, dtype=torch.float16)
    assert half.is_cuda and torch.equal(half.cpu(), torch.from_numpy(host).half())
    assert_same(tb.to_numpy(x, dtype=np.float64), host.astype(np.float64))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool"])
def test_jax_gpu_arrays_zero_copy_and_back(jax, request, dtype):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("this JAX has no GPU backend")
    if dtype == "bfloat16" and ml_dtypes is None:
        pytest.skip("ml_dtypes")
    host = _random(_rng(request), (256, 130), np.dtype(getattr(ml_dtypes, dtype, None) or dtype))
    x = jax.device_put(host, device)
    t = tb.to_tensor(x)
    assert t.is_cuda and t.data_ptr() == x.unsafe_buffer_pointer()  # zero-copy
    assert t.dtype == _torch_dtype_of(host.dtype)
    assert np.array_equal(_tensor_bits(t), host.reshape(-1).view(np.uint8))
    assert_same(tb.to_numpy(x), np.asarray(x))
    out = poisoned(host.shape, host.dtype, "F")
    assert tb.to_numpy(x, out=out) is out
    assert_same(out, host)


@gpu
def test_numba_cuda_array_interface(request):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    cuda = pytest.importorskip("numba.cuda")
    host = _random(_rng(request), (40, 30), np.float64)
    d = cuda.to_device(host)
    t = tb.to_tensor(d)
    assert t.is_cuda and t.data_ptr() == d.__cuda_array_interface__["data"][0]
    assert np.array_equal(t.cpu().numpy(), host)
    assert_same(tb.to_numpy(d), host)
    stream = cuda.stream()
    d2 = cuda.to_device(host, stream=stream)  # its interface names `stream`
    out = poisoned(host.shape, host.dtype)
    assert tb.to_numpy(d2, out=out) is out
    assert_same(out, host)


# ------------------------------------------------------------------------- edge cases (CPU)


def test_numpy_scalars_are_refused_as_before(backend):
    for value in (np.float64(1.5), np.str_("abc"), np.bytes_(b"ab")):
        for call in (tb.to_numpy, tb.to_tensor):
            with pytest.raises(TypeError, match=r"NumPy scalar.*numpy\.asarray"):
                call(value)


def test_array_protocol_returning_a_non_array_is_refused(backend):
    class NotAnArray:  # numpy.asarray refuses it too
        def __init__(self, value):
            self.value = value

        def __array__(self, dtype=None, copy=None):
            return self.value

    for value in (None, "abc", {"a": 1}, [1, 2]):
        with pytest.raises(ValueError, match="refused to export"):
            tb.to_numpy(NotAnArray(value))


class _Column:
    """A pandas-like column: NumPy's protocol hands out a view of its data, read-only
    where the data is shared (copy-on-write)."""

    def __init__(self, data: np.ndarray, shared: bool) -> None:
        self.data, self.shared = data, shared

    def __array__(self, dtype=None, copy=None):
        view = self.data.view()
        view.flags.writeable = not self.shared
        return view


@pytest.mark.parametrize("layout", ["contiguous", "reversed", "fortran"])
def test_to_tensor_copies_what_numpys_protocol_hands_out_read_only(backend, layout):
    """A tensor cannot be read-only: one sharing a pandas column's copy-on-write data
    would let a write change every Series sharing it (torch.as_tensor copies a Series).
    Read-only data is copied, with no warning; writeable data is still shared (where
    torch can share it)."""
    data = np.random.default_rng(7).random((5, 3))
    data = {"reversed": data[::-1], "fortran": np.asfortranarray(data)}.get(layout, data)
    before = data.copy()
    got = tb.to_tensor(_Column(data, shared=True))  # (a warning fails the test)
    assert np.array_equal(got.numpy(), before) and got.dtype == torch.float64
    got[0, 0] = -1.0
    assert np.array_equal(data, before)  # the owner's data is untouched
    for kw in ({"dtype": torch.float32}, {"device": "cpu"}):
        assert np.array_equal(
            tb.to_tensor(_Column(data, True), **kw).numpy(),
            before.astype(np.float32 if kw.get("dtype") else np.float64),
        )
    if layout != "reversed":  # (negative strides are copied: torch has none)
        shared = tb.to_tensor(_Column(data, shared=False))
        shared[0, 0] = -1.0  # (writeable: shared, as numpy.asarray gives it)
        assert data[0, 0] == -1.0


def test_tf_bfloat16_views_are_read_only_like_float32(tf, request, backend):
    host = _random(_rng(request), (4, 3), np.float32)
    for x in (tf.constant(host), tf.cast(tf.constant(host), tf.bfloat16)):
        got = tb.to_numpy(x)
        assert not got.flags.writeable  # TF tensors are immutable: the view is too
        before = x.numpy().copy()
        with pytest.raises(ValueError):
            got[0, 0] = 1
        assert_same(x.numpy(), before)


def test_batch_leaves_torch_cannot_hold_pass_through(jax, tf, backend):
    text = tf.constant([b"a", b"b"])
    key = jax.random.key(0)
    moved = tb.to_device({"text": text, "key": key, "x": np.ones(2)}, "cpu")
    assert moved["text"] is text and moved["key"] is key
    assert torch.equal(moved["x"], torch.ones(2, dtype=torch.float64))
    cast = tb.to_device({"text": text, "x": np.ones(2)}, "cpu", dtype=torch.float32)
    assert cast["text"] is text and cast["x"].dtype == torch.float32


def test_to_numpy_batch_refusal_leaves_every_out_untouched(jax, backend):
    dead = jax.numpy.ones(2)
    dead.delete()
    out0 = poisoned((3,), np.float32)
    before = out0.copy()
    with pytest.raises(ValueError, match="refused to export"):
        tb.to_numpy_batch([jax.numpy.arange(3.0), dead], out=[out0, None])
    assert_same(out0, before)
    wrong = poisoned((4,), np.float32)
    with pytest.raises(ValueError, match="shape"):
        tb.to_numpy_batch([torch.ones(3), torch.ones(4)], out=[out0, wrong[:3]])
    assert_same(out0, before)
