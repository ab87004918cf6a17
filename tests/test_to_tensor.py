"""to_tensor against torch.as_tensor, both backends: sharing, dtype casts, out=, tensors
passed through; random NumPy views with and without a cast (hypothesis)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorbridge as tb
from tensorbridge import _backend

from conftest import (
    NP_DTYPES,
    PROPERTY_SETTINGS,
    forced_fallback,
    fresh,
    no_warnings,
    numpy_views,
    random_tensor,
    reference_numpy,
)


@pytest.mark.parametrize("np_dtype", NP_DTYPES, ids=str)
def test_to_tensor_cpu_shares_like_as_tensor(backend, gen, np_dtype):
    a = fresh(np_dtype, gen)[:, 1::2]
    t = tb.to_tensor(a)
    ref = torch.as_tensor(a)
    assert t.data_ptr() == ref.data_ptr() and t.stride() == ref.stride()
    assert torch.equal(t, ref)


_TENSOR_TARGETS = {
    "to_tensor": lambda d: tb.to_tensor(np.ones(2, np.float32), dtype=d),
    "to_device": lambda d: tb.to_device({"x": np.ones(2, np.float32)}, "cpu", dtype=d),
    "images_to_tensor": lambda d: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), dtype=d),
}


@pytest.mark.parametrize("fn", list(_TENSOR_TARGETS))
@pytest.mark.parametrize("name", ["float", "int"])
def test_a_name_numpy_and_torch_read_differently_is_refused_for_tensors(fn, name):
    """dtype="float" is float64 to NumPy and float32 to torch (torch.float): a tensor
    target refuses it, naming both, rather than pick NumPy's silently."""
    with pytest.raises(TypeError, match=rf"'{name}' is {name}64 to NumPy but {name}32 to torch"):
        _TENSOR_TARGETS[fn](name)


def test_any_name_numpy_reads_apart_from_torch_is_refused_for_tensors(monkeypatch):
    """Not a list of names: a NumPy that read "half" as float64 (as NumPy 1 reads
    "cfloat" as complex128) makes it refused where the result is a tensor."""
    real = np.dtype

    def numpy_reading_half_as_float64(spec, *args, **kwargs):
        return real(np.float64) if spec == "half" else real(spec, *args, **kwargs)

    monkeypatch.setattr(np, "dtype", numpy_reading_half_as_float64)
    with pytest.raises(TypeError, match=r"'half' is float64 to NumPy but float16 to torch"):
        tb.to_tensor(np.ones(2, np.float32), dtype="half")
    monkeypatch.undo()
    assert tb.to_tensor(np.ones(2, np.float32), dtype="half").dtype == torch.float16


def test_numpy_targets_read_strings_as_numpy_then_as_torch_names():
    x = torch.from_numpy(np.random.default_rng().standard_normal(5).astype(np.float32))
    got = tb.to_numpy(x, dtype="float")  # (NumPy's float: a NumPy target reads it as NumPy)
    np.testing.assert_array_equal(got, x.numpy().astype(np.float64))
    assert got.dtype == np.float64
    numpy_2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
    # NumPy 1 reads "cfloat" as complex128 (a NumPy target keeps NumPy's reading); NumPy 2
    # has no such name, so it is torch's: complex64
    expected = np.dtype(np.complex64 if numpy_2 else np.complex128)
    got = tb.to_numpy(x, dtype="cfloat")
    np.testing.assert_array_equal(got, x.numpy().astype(expected))
    assert got.dtype == expected
    if numpy_2:  # (for a tensor, torch's reading; refused on NumPy 1, which reads it apart)
        assert tb.to_tensor(x.numpy(), dtype="cfloat").dtype == torch.cfloat
    else:
        with pytest.raises(TypeError, match="complex128 to NumPy but complex64 to torch"):
            tb.to_tensor(x.numpy(), dtype="cfloat")
    with pytest.raises(TypeError, match=r"torch's complex32: .*numpy\.complex64"):
        tb.to_numpy(x, dtype="chalf")


def test_the_view_the_raw_bytes_refusal_names_gives_back_a_bfloat16_array():
    """A bfloat16 array through a producer's __array_interface__ arrives as raw bytes
    ('|V2'): the refusal names views that give the numbers back, with ml_dtypes and
    without it; both, done as written, equal the bfloat16 tensor torch makes itself."""
    want = torch.randn(5).to(torch.bfloat16)

    class Producer:  # (the interface carries '|V2', not bfloat16)
        def __init__(self) -> None:
            self.__array_interface__ = {
                "data": (want.data_ptr(), False),
                "shape": (5,),
                "typestr": "|V2",
                "version": 3,
            }

    a = Producer()
    with pytest.raises(TypeError, match="raw bytes") as info:
        tb.to_tensor(a)
    message = str(info.value)
    without = "torch.from_numpy(numpy.asarray(a).view(numpy.int16)).view(torch.bfloat16)"
    assert without in message
    got = eval(without, {"torch": torch, "numpy": np, "a": a})
    assert got.dtype == torch.bfloat16 and torch.equal(
        got.view(torch.int16), want.view(torch.int16)
    )
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert "numpy.asarray(a).view(ml_dtypes.bfloat16)" in message
    got = tb.to_tensor(
        eval(
            "numpy.asarray(a).view(ml_dtypes.bfloat16)",
            {"numpy": np, "a": a, "ml_dtypes": ml_dtypes},
        )
    )
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_torch_dtype_names_work_as_targets_without_ml_dtypes():
    """dtype="bfloat16" (as the README shows) names torch's dtype where NumPy has none (no
    ml_dtypes): a torch target takes it; a NumPy target says what to install."""
    code = """
import sys
sys.modules["ml_dtypes"] = None  # (as where it is not installed)
import numpy as np, torch, tensorbridge as tb
x = {"x": np.ones(2, np.float32), "n": np.arange(2)}
out = tb.to_device(x, "cpu", dtype="bfloat16")
assert out["x"].dtype == torch.bfloat16 and out["n"].dtype == torch.int64
assert tb.to_tensor(np.ones(2, np.float32), dtype="bfloat16").dtype == torch.bfloat16
try:
    tb.to_numpy(torch.ones(2), dtype="bfloat16")
except TypeError as e:
    assert "pip install ml_dtypes" in str(e), e
else:
    raise AssertionError("not refused")
try:  # (a bfloat16 array that lost its dtype on the way: raw bytes)
    tb.from_numpy(np.zeros(2, "V2"))
except TypeError as e:
    assert "view(ml_dtypes.bfloat16)" in str(e) and "pip install ml_dtypes" in str(e), e
else:
    raise AssertionError("not refused")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("short", "name"), [("fp16", "float16"), ("BF16", "bfloat16"), ("fp32", "float32")]
)
def test_short_dtype_names_are_refused_with_the_name_to_pass(short, name):
    """'fp16' and friends are not NumPy's or torch's names: the refusal names the one to
    pass, and that one works."""
    calls = [
        lambda d: tb.to_tensor(np.ones(2), dtype=d),
        lambda d: tb.to_device({"x": np.ones(2)}, "cpu", dtype=d),
    ]
    if name != "bfloat16" or tb.info()["ml_dtypes"]:
        calls.append(lambda d: tb.to_numpy(torch.ones(2), dtype=d))
    for call in calls:
        with pytest.raises(TypeError, match=rf"dtype='{short}'.*pass '{name}' or torch\.{name}$"):
            call(short)
        call(getattr(torch, name))  # (the fix works)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        (torch.float32, torch.float32),
        (np.float64, torch.float64),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (np.int32, torch.int32),
    ],
    ids=["torch.float32", "np.float64", "str-float16", "bfloat16", "np.int32"],
)
def test_to_tensor_dtype_casts(backend, gen, dtype, torch_dtype):
    a = fresh(np.dtype(np.uint8), gen)[::-1, :, ::2]
    t = tb.to_tensor(a, dtype=dtype)
    expected = torch.from_numpy(a.copy()).to(torch_dtype)
    assert t.dtype == torch_dtype
    assert torch.equal(t, expected)


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=str)
def test_to_tensor_out(backend, gen, device):
    a = fresh(np.dtype(np.float32), gen)
    out = torch.full(a.shape, float("nan"))
    r = tb.to_tensor(a, device, out=out)
    assert r is out
    assert torch.equal(out, torch.from_numpy(a))
    out64 = torch.full(a.shape, float("nan"), dtype=torch.float64).transpose(0, 2)
    with pytest.raises(ValueError, match="shape"):
        tb.to_tensor(a, out=out64)
    out64 = torch.full(a.shape, float("nan"), dtype=torch.float64)
    tb.to_tensor(a, out=out64, dtype=torch.float64)
    assert torch.equal(out64, torch.from_numpy(a).double())


def test_to_tensor_out_beside_the_source_in_one_buffer(backend, gen):
    """An out interleaved with the source in one buffer but sharing no byte (even slots
    into odd ones) is written as the idiom writes it; one that shares bytes is refused
    before anything is written."""
    for src_of in (lambda buf: buf[::2], lambda buf: torch.from_numpy(buf)[::2]):
        buf = fresh(np.dtype(np.float32), gen).reshape(-1)[:8].copy()
        want = buf.copy()
        want[1::2] = want[::2]
        out = torch.from_numpy(buf)[1::2]
        assert tb.to_tensor(src_of(buf), out=out) is out
        assert np.array_equal(buf, want)
        before = buf.copy()
        with pytest.raises(ValueError, match="out shares memory with the source"):
            tb.to_tensor(src_of(buf)[:3], out=torch.from_numpy(buf)[2:5])
        assert np.array_equal(buf, before)


def test_to_tensor_accepts_tensors(backend, gen):
    x = random_tensor((3, 4), torch.float32, gen)
    assert tb.to_tensor(x) is x
    assert torch.equal(tb.to_tensor(x, dtype=torch.float64), x.double())


def test_to_tensor_non_native_and_negative(backend, gen):
    a = fresh(np.dtype(np.int32), gen).astype(">i4")[::-1, ::2]
    t = tb.to_tensor(a, "cpu", non_blocking=True)
    assert torch.equal(t, torch.from_numpy(a.astype("<i4").copy()))


def _read_only_arrays(gen):
    a = fresh(np.dtype(np.uint8), gen)
    return {
        "frombuffer": np.frombuffer(a.tobytes(), np.uint8).reshape(a.shape),  # bytes: read-only
        "flag": a.copy(),  # writeable=False below
        "broadcast": np.broadcast_to(a[:1], a.shape),  # zero strides, read-only
    }


@pytest.mark.parametrize("kind", ["frombuffer", "flag", "broadcast"])
def test_a_read_only_array_copied_makes_no_warning(backend, gen, kind):
    """A cast or out= copies the array, so nothing shares its read-only memory: no
    warning from torch (Arrow buffers and bytes are read-only); the same values."""
    a = _read_only_arrays(gen)[kind]
    a.flags.writeable = False
    expected = torch.from_numpy(a.copy())
    with no_warnings():
        cast = tb.to_tensor(a, "cpu", dtype=torch.float32)
        out = tb.to_tensor(a, out=torch.empty(a.shape, dtype=torch.uint8))
        cast_here = tb.to_tensor(a, dtype=torch.int16)
    assert torch.equal(cast, expected.float()) and torch.equal(out, expected)
    assert torch.equal(cast_here, expected.to(torch.int16))
    # shared, like torch.from_numpy: torch's warning is right there
    with pytest.raises(UserWarning, match="not writable"), no_warnings():
        tb.to_tensor(a)


def test_a_read_only_array_from_numpy_copies_makes_no_warning(backend, gen, capfd):
    """Negative strides and another byte order: from_numpy copies, so the tensor shares
    nothing read-only. (torch warns before it refuses such an array, and with its error
    pending prints the warning to stderr, where no filter reaches it.)"""
    a = fresh(np.dtype(np.uint16), gen)
    native = np.frombuffer(a.tobytes(), np.uint16).reshape(a.shape)  # bytes: read-only
    big = np.frombuffer(a.astype(">u2").tobytes(), ">u2").reshape(a.shape)
    with no_warnings():
        flipped = tb.from_numpy(native[::-1])
        swapped = tb.from_numpy(big)
        both = tb.to_tensor(big[::-1])
    assert torch.equal(flipped, torch.from_numpy(a[::-1].copy()))
    assert torch.equal(swapped, torch.from_numpy(a))
    assert torch.equal(both, torch.from_numpy(a[::-1].copy()))
    assert "not writable" not in capfd.readouterr().err


# random complex views cast to a real dtype are a case here; torch warns that it drops the
# imaginary part
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("path", ["extension", "fallback"])
@PROPERTY_SETTINGS
@given(a=numpy_views(), cast=st.sampled_from([None, torch.float64, torch.int32, np.float32]))
def test_to_tensor_properties(path, a, cast):
    if path == "extension" and _backend.ENGINE.C is None:
        pytest.skip("extension not available")
    ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
    with ctx:
        t = tb.to_tensor(a, "cpu", dtype=cast)
        native = np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
        expected = torch.from_numpy(native)
        if cast is not None:
            expected = expected.to(tb._dtypes.as_torch_dtype(cast))
        assert t.dtype == expected.dtype and t.shape == expected.shape
        # bytes, not values: random bits make NaNs, and both sides cast with torch
        assert reference_numpy(t).tobytes() == reference_numpy(expected).tobytes()
        out = torch.empty(a.shape, dtype=expected.dtype)
        assert tb.to_tensor(a, out=out, dtype=cast) is out
        assert reference_numpy(out).tobytes() == reference_numpy(expected).tobytes()
