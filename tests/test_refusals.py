"""Every refusal: the right exception type, a message that names the fix, nothing written.

This table is also the reference for the README's list of refusals.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _interop

from conftest import is_poisoned, poisoned

F32 = np.float32


class _RefusingProducer:
    """An array of some framework whose only protocol refuses to export (as JAX does for
    a deleted array, or NumPy < 2.1 for a read-only one)."""

    def __dlpack__(self, **kwargs):
        raise BufferError("Cannot export readonly array since signalling readonly is unsupported")

    def __dlpack_device__(self):
        return (1, 0)


_RefusingProducer.__module__ = "producer"  # the same name in messages run as a script or test

# (id, call, exception, message pattern)
TO_NUMPY_INPUTS = [
    ("list", lambda: tb.to_numpy([1, 2]), TypeError, r"got list of numbers: use numpy.asarray"),
    (
        "list of tensors",
        lambda: tb.to_numpy([torch.ones(1)]),
        TypeError,
        r"got list.*to_numpy_batch",
    ),
    ("dict", lambda: tb.to_numpy({"a": torch.ones(1)}), TypeError, r"got dict"),
    ("scalar", lambda: tb.to_numpy(3.0), TypeError, r"got float.*torch.as_tensor"),
    ("string", lambda: tb.to_numpy("abc"), TypeError, r"got str"),
    (
        "no array protocol",
        lambda: tb.to_numpy(object()),
        TypeError,
        r"__dlpack__, __cuda_array_interface__, __array__ or __array_interface__.*got object",
    ),
    (
        "export refused",
        lambda: tb.to_numpy(_RefusingProducer()),
        ValueError,
        r"refused to export.*BufferError: Cannot export readonly.*x.copy\(\)",
    ),
    ("sparse", lambda: tb.to_numpy(torch.eye(3).to_sparse()), TypeError, r"to_dense\(\)"),
    (
        "nested",
        lambda: tb.to_numpy(torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])),
        TypeError,
        r"nested tensor: use x.unbind\(\)",
    ),
    ("sparse-csr", lambda: tb.to_numpy(torch.eye(3).to_sparse_csr()), TypeError, r"to_dense"),
    ("meta", lambda: tb.to_numpy(torch.empty(3, device="meta")), TypeError, r"meta tensor"),
    (
        "quantized",
        lambda: tb.to_numpy(torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)),
        TypeError,
        r"dequantize\(\)",
    ),
    (
        "complex32",
        lambda: tb.to_numpy(torch.zeros(2, dtype=torch.complex32)),
        TypeError,
        r"dtype=numpy.complex64",
    ),
    (
        "bad-dtype-arg",
        lambda: tb.to_numpy(torch.zeros(2), dtype="notadtype"),
        TypeError,
        r"not a NumPy or torch dtype",
    ),
]

OUT_CASES = [
    ("out-list", lambda out: [0.0] * 4, TypeError, r"out must be a numpy.ndarray.*numpy.empty"),
    ("out-tensor", lambda out: torch.zeros(4), TypeError, r"out must be a numpy.ndarray"),
    ("out-shape", lambda out: out[:3], ValueError, r"shape \(3,\).*\(4,\)"),
    ("out-dtype", lambda out: out.view(np.int32), TypeError, r"dtype int32.*dtype=int32"),
    ("out-readonly", lambda out: _readonly(out), ValueError, r"read-only"),
    (
        "out-zero-stride",
        lambda out: np.lib.stride_tricks.as_strided(out, (4,), (0,)),
        ValueError,
        r"zero stride",
    ),
    (
        "out-overlapping-elements",
        lambda out: np.lib.stride_tricks.as_strided(out, (4,), (2,)),
        ValueError,
        r"overlap in memory.*pass an array that owns one slot",
    ),
]


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    ("case", "call", "exc", "pattern"), TO_NUMPY_INPUTS, ids=[c[0] for c in TO_NUMPY_INPUTS]
)
def test_to_numpy_refuses_input(backend, case, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize(
    ("case", "make_out", "exc", "pattern"), OUT_CASES, ids=[c[0] for c in OUT_CASES]
)
@pytest.mark.parametrize("source", ["contiguous", "strided", "bf16-as-f32", "grad"])
def test_to_numpy_refuses_out_before_writing(backend, case, make_out, exc, pattern, source):
    base = poisoned((4,), F32)
    out = make_out(base)
    x = {
        "contiguous": torch.arange(4.0),
        "strided": torch.arange(8.0)[::2],
        "bf16-as-f32": torch.arange(4.0).bfloat16(),
        "grad": torch.arange(4.0, requires_grad=True),
    }[source]
    kwargs = {"dtype": np.float32} if source == "bf16-as-f32" else {}
    with pytest.raises(exc, match=pattern):
        tb.to_numpy(x, out=out, **kwargs)
    assert is_poisoned(base)


@pytest.mark.parametrize("how", ["same-view", "overlapping", "numpy-self"])
def test_to_numpy_refuses_out_overlapping_source(backend, how):
    x = torch.arange(10.0)
    if how == "same-view":
        src, out = x, x.numpy()
    elif how == "overlapping":
        src, out = x[:8], x.numpy()[2:]
    else:
        src = x.numpy()
        out = src[::-1]
    before = x.clone()
    with pytest.raises(ValueError, match="shares memory"):
        tb.to_numpy(src, out=out)
    assert torch.equal(x, before)


def test_interleaved_out_that_does_not_overlap_is_fine(backend):
    x = torch.arange(10.0)
    tb.to_numpy(x[::2].clone(), out=x.numpy()[1::2])  # separate memory
    src = torch.arange(10.0)
    tb.to_numpy(src[::2], out=src.numpy()[1::2])  # same buffer, disjoint elements
    np.testing.assert_array_equal(src.numpy()[1::2], src.numpy()[::2])


FROM_NUMPY_INPUTS = [
    ("list", [1, 2], TypeError, r"expects a numpy.ndarray.*numpy.asarray"),
    ("tensor", torch.ones(2), TypeError, r"got Tensor"),
    ("str", np.array(["a", "b"]), TypeError, r"<U1.*encode or tokenize"),
    ("bytes", np.array([b"a"]), TypeError, r"S1.*encode or tokenize"),
    ("object", np.array([1, None], dtype=object), TypeError, r"object.*numeric array"),
    ("datetime", np.array(["2024-01-01"], dtype="datetime64[D]"), TypeError, r"astype\('int64'\)"),
    ("timedelta", np.array([1], dtype="timedelta64[s]"), TypeError, r"astype\('int64'\)"),
    ("structured", np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), TypeError, r"one field"),
    (
        "void",
        np.zeros(2, dtype="V3"),
        TypeError,
        r"raw bytes.*ascontiguousarray\(a\)\.view\(numpy\.uint8\)",
    ),
    # (a bfloat16 array whose dtype a producer's __array_interface__ lost)
    (
        "void-2",
        np.zeros(2, dtype="V2"),
        TypeError,
        r"raw bytes.*asarray\(a\)\.view\(ml_dtypes\.bfloat16\)",
    ),
    (
        "void-1",
        np.zeros(2, dtype="V1"),
        TypeError,
        r"asarray\(a\)\.view\(ml_dtypes\.float8_e4m3fn\)",
    ),
    (
        "bad-strides",
        np.zeros(4, dtype=[("a", "u1"), ("b", "f4")])["b"],
        ValueError,
        r"ascontiguousarray",
    ),
]
if np.dtype(np.longdouble).itemsize > 8:
    FROM_NUMPY_INPUTS.append(
        ("longdouble", np.zeros(2, dtype=np.longdouble), TypeError, r"astype\(numpy.float64\)")
    )
    FROM_NUMPY_INPUTS.append(
        ("clongdouble", np.zeros(2, dtype=np.clongdouble), TypeError, r"complex128")
    )


@pytest.mark.parametrize(
    ("fn", "case", "value", "exc", "pattern"),
    [
        pytest.param(fn, *c, id=f"{fn}-{c[0]}")
        for fn in ("from_numpy", "to_tensor")
        for c in FROM_NUMPY_INPUTS
        if not (fn == "to_tensor" and c[0] == "tensor")
    ],
)
def test_from_numpy_refuses(backend, fn, case, value, exc, pattern):
    call = getattr(tb, fn)
    pattern = pattern if fn == "from_numpy" or case != "list" else r"to_tensor expects"
    refs = sys.getrefcount(value)
    for _ in range(3):
        with pytest.raises(exc, match=pattern):
            call(value)
    assert sys.getrefcount(value) == refs  # nothing holds on to the input after a refusal


TO_TENSOR_OUT = [
    ("not-tensor", lambda: np.zeros(4, F32), TypeError, r"out must be a torch.Tensor"),
    ("shape", lambda: torch.zeros(5), ValueError, r"shape \(5,\)"),
    ("dtype", lambda: torch.zeros(4, dtype=torch.float64), TypeError, r"dtype=torch.float64"),
    ("requires-grad", lambda: torch.zeros(4, requires_grad=True), ValueError, r"detach"),
    ("sparse", lambda: torch.zeros(4).to_sparse(), TypeError, r"dense"),
    ("device", lambda: torch.zeros(4, device="meta"), ValueError, r"out is on meta"),
    ("expanded", lambda: torch.zeros(1).expand(4), ValueError, r"zero stride"),
]


@pytest.mark.parametrize(
    ("case", "make_out", "exc", "pattern"), TO_TENSOR_OUT, ids=[c[0] for c in TO_TENSOR_OUT]
)
def test_to_tensor_refuses_out(backend, case, make_out, exc, pattern):
    out = make_out()
    snapshot = (
        out.clone()
        if isinstance(out, torch.Tensor) and out.layout == torch.strided and not out.is_meta
        else None
    )
    with pytest.raises(exc, match=pattern):
        tb.to_tensor(np.arange(4, dtype=F32), "cpu", out=out)
    if snapshot is not None:
        assert torch.equal(out.detach(), snapshot)


@pytest.mark.parametrize("how", ["same", "partial"])
def test_to_tensor_refuses_overlapping_out(backend, how):
    buf = np.arange(12, dtype=F32)
    a = buf[:8]
    out = torch.from_numpy(buf[:8] if how == "same" else buf[4:])
    with pytest.raises(ValueError, match="shares memory"):
        tb.to_tensor(a, out=out)
    np.testing.assert_array_equal(buf, np.arange(12, dtype=F32))


NUMBER_LISTS = [[1, 2, 3], (1.5, 2), [[0.5, 1], [2, np.float32(3)]], [True, np.int8(4)], []]


@pytest.mark.parametrize("numbers", NUMBER_LISTS, ids=["ints", "tuple", "nested", "numpy", "empty"])
def test_a_list_of_numbers_is_pointed_to_as_tensor(backend, numbers):
    """Numbers are data, not a batch: the message names the call that makes them a tensor
    (to_device would hand them back untouched), and that call works."""
    with pytest.raises(
        TypeError, match=r"got (list|tuple) of numbers: use torch.as_tensor\(x\)"
    ) as info:
        tb.to_tensor(numbers)
    assert "to_device" not in str(info.value)
    with pytest.raises(TypeError, match=r"of numbers: use numpy.asarray\(x\)") as info:
        tb.to_numpy(numbers)
    assert "to_device" not in str(info.value)
    assert torch.as_tensor(numbers).shape == np.asarray(numbers).shape  # the named fix works


def test_to_tensor_refuses_non_arrays(backend, monkeypatch):
    batches = ([np.zeros(2), np.ones(2)], (torch.ones(1), 3), [[1, 2], [np.ones(1)]])
    for batch in (*batches, {"a": {"b": [torch.ones(1)]}}):
        with pytest.raises(TypeError, match=r"to_tensor expects a torch.Tensor.*use to_device\(\)"):
            tb.to_tensor(batch)
    cyclic: list = [1]
    cyclic.append(cyclic)
    # no arrays: to_device would hand them back, so the fix is an array
    for plain in ([[1, 2], ["a"]], {"a": 1}, [1, "a"], [None], cyclic):
        with pytest.raises(TypeError, match=r"holds no arrays or tensors.*numpy\.asarray") as info:
            tb.to_tensor(plain)
        assert "to_device" not in str(info.value)
    # the look for arrays is bounded: each container once, 256 items in all
    looked: list = []
    real = _interop.is_foreign_array
    monkeypatch.setattr(_interop, "is_foreign_array", lambda x: looked.append(x) or real(x))
    shared: list = [[[[object()] * 64] * 64] * 64] * 64
    cycle: list = []
    cycle.extend([[cycle] * 100] * 100)
    for plain in (shared, cycle, [object()] * 10_000_000):
        looked.clear()
        with pytest.raises(TypeError, match=r"holds no arrays"):
            tb.to_tensor(plain)
        assert len(looked) <= 256
    with pytest.raises(TypeError, match=r"exposing __dlpack__.*got object.*numpy.asarray"):
        tb.to_tensor(object())
    with pytest.raises(ValueError, match=r"refused to export.*BufferError"):
        tb.to_tensor(_RefusingProducer())
    with pytest.raises(TypeError, match="not a NumPy or torch dtype"):
        tb.to_tensor(np.zeros(2), dtype=object())


def test_refusals_do_not_leak_references(backend):
    x = torch.ones(4)
    out = np.zeros(3, F32)
    refs = sys.getrefcount(x), sys.getrefcount(out)
    for _ in range(5):
        with pytest.raises(ValueError):
            tb.to_numpy(x, out=out)
    assert (sys.getrefcount(x), sys.getrefcount(out)) == refs


def test_messages_name_the_fix():
    """Each refusal message says what to do, not only what was wrong."""
    fixes = re.compile(
        r"use |pass |convert|install|allocate|encode|make |wrap |drop |"
        r"materialize|numpy\.|x\.|a\.",
        re.IGNORECASE,
    )
    for _case, call, exc, _ in TO_NUMPY_INPUTS:
        with pytest.raises(exc) as info:
            call()
        assert fixes.search(str(info.value)), str(info.value)


# ------------------------------------------------------------------------- the docs' table

OTHER_REFUSALS = [
    (
        "to_numpy_batch",
        "out of another structure",
        lambda: tb.to_numpy_batch({"a": torch.ones(2), "b": torch.ones(2)}, out={"a": None}),
    ),
    ("collate", "ragged samples", lambda: tb.collate([np.zeros(3), np.zeros(4)])),
    (
        "to_device",
        "a single dtype that is not floating",
        lambda: tb.to_device({"x": np.zeros(2)}, "cpu", dtype=torch.int64),
    ),
    (
        "Prefetcher",
        "a single dtype that is not floating",
        lambda: tb.Prefetcher([], "cpu", dtype="int32"),
    ),
    ("to_tensor", "no array protocol", lambda: tb.to_tensor(object())),
    ("to_tensor", "a list of numbers", lambda: tb.to_tensor([1, 2, 3])),
    ("to_tensor", "a list of arrays", lambda: tb.to_tensor([np.zeros(2), np.ones(2)])),
    ("to_tensor", "a list holding no arrays", lambda: tb.to_tensor([1, "a"])),
    (
        "to_device",
        "an object array in a batch",
        lambda: tb.to_device({"x": np.zeros(2), "meta": np.array([1, "a"], object)}, "cpu"),
    ),
    (
        "to_device",
        "a source dtype named by a string",
        lambda: tb.to_device({"x": np.arange(2)}, "cpu", dtype={"int64": torch.int32}),
    ),
    (
        "images_to_tensor",
        "nested lists",
        lambda: tb.images_to_tensor([[[[0, 0, 0]]]]),
    ),
    ("to_tensor", "export refused", lambda: tb.to_tensor(_RefusingProducer())),
    ("collate", "no samples", lambda: tb.collate([])),
    (
        "collate",
        "dict samples with other keys",
        lambda: tb.collate([{"x": 1, "y": 2}, {"x": 1, "z": 3}]),
    ),
    (
        "collate",
        "lists of other lengths",
        lambda: tb.collate([{"boxes": [1, 2, 3]}, {"boxes": [1, 2]}]),
    ),
    (
        "collate",
        "an array in one sample, an int in another",
        lambda: tb.collate([{"x": np.zeros(2)}, {"x": 5}]),
    ),
    ("collate", "a sample holding itself", lambda: tb.collate([_CYCLIC, _CYCLIC])),
    (
        "collate",
        "ragged nested field",
        lambda: tb.collate([{"a": [{"b": np.zeros(11)}]}, {"a": [{"b": np.zeros(3)}]}]),
    ),
    ("collate", "pad= for list samples", lambda: tb.collate([[1], [2]], pad={"a": 0})),
    ("collate", "pad= for an unknown key", lambda: tb.collate(_TOKENS, pad={"tokns": 0})),
    (
        "collate",
        "pad= value outside the dtype",
        lambda: tb.collate(
            [{"t": np.zeros(2, np.uint8)}, {"t": np.zeros(1, np.uint8)}], pad={"t": -1}
        ),
    ),
    (
        "collate",
        "pad= where the lengths key is taken",
        lambda: tb.collate([{"t": np.zeros(2), "t_lengths": 2}], pad={"t": 0}),
    ),
    (
        "collate",
        "pad= for a scalar field",
        lambda: tb.collate([{"t": 1}, {"t": 2}], pad={"t": 0}),
    ),
    ("collate", "fields= other than list", lambda: tb.collate(_TOKENS, fields={"n": tuple})),
    (
        "collate",
        "a key in pad= and fields=",
        lambda: tb.collate(_TOKENS, pad={"tokens": 0}, fields={"tokens": list}),
    ),
    ("Prefetcher", "depth 0", lambda: tb.Prefetcher([], "cpu", depth=0)),
    ("Prefetcher", "depth 10**9", lambda: tb.Prefetcher([], "cpu", depth=10**9)),
    ("empty_pinned", "object dtype", lambda: tb.empty_pinned(4, object)),
    (
        "images_to_tensor",
        "mean of the wrong length",
        lambda: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), mean=[0.5, 0.5]),
    ),
    (
        "images_to_tensor",
        "integer dtype",
        lambda: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), dtype=torch.int32),
    ),
    (
        "images_to_tensor",
        "float8 dtype (torch's arithmetic refuses it)",
        lambda: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), dtype=torch.float8_e4m3fn),
    ),
    (
        "to_tensor",
        "dtype= a NumPy dtype torch has none for ('f16' is float128)",
        lambda: tb.to_tensor(np.ones(2, np.float32), dtype="f16"),
    ),
    (
        "images_to_tensor",
        "grayscale (N, H, W) without a channel axis",
        lambda: tb.images_to_tensor(np.zeros((2, 8, 8), np.uint8)),
    ),
    (
        "images_to_tensor",
        "float images without scale=",
        lambda: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.float32)),
    ),
    ("images_to_tensor", "scale as a string", lambda: tb.images_to_tensor(_IMG, scale="1")),
    (
        "images_to_tensor",
        "mean as a generator",
        lambda: tb.images_to_tensor(_IMG, mean=(m for m in [0.5] * 3)),
    ),
    (
        "images_to_tensor",
        "mean on the 0-255 scale",
        lambda: tb.images_to_tensor(_IMG, mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4]),
    ),
    ("images_to_tensor", "std nan", lambda: tb.images_to_tensor(_IMG, std=float("nan"))),
    ("images_to_tensor", "std 0", lambda: tb.images_to_tensor(_IMG, std=0)),
    ("empty_pinned", "negative size", lambda: tb.empty_pinned((2, -1))),
    ("set_num_threads", "zero threads", lambda: tb.set_num_threads(0)),
    ("set_num_threads", "100000 threads", lambda: tb.set_num_threads(100_000)),
    (
        "to_numpy_batch",
        "out over its own leaf",
        lambda: tb.to_numpy_batch([_A8], out=[_A8[::-1]]),
    ),
    (
        "to_numpy_batch",
        "out over another leaf",
        lambda: tb.to_numpy_batch([np.zeros(8), _A8], out=[_A8, None]),
    ),
    (
        "to_numpy_batch",
        "two outs over the same memory",
        lambda: tb.to_numpy_batch([np.zeros(4), np.zeros(4)], out=[_A8[:4], _A8[2:6]]),
    ),
    ("to_tensor", "unknown device", lambda: tb.to_tensor(np.zeros(2), "gpu")),
    ("to_tensor", "device of another type", lambda: tb.to_tensor(np.zeros(2), 1.5)),
    (
        "images_to_tensor",
        "integer dtype as a string",
        lambda: tb.images_to_tensor(np.zeros((1, 2, 2, 3), np.uint8), dtype="int32"),
    ),
    ("transfer_options", "chunk below 4 KiB", lambda: tb.transfer_options(chunk_bytes=100)),
    ("set_pinned_budget", "negative budget", lambda: tb.set_pinned_budget(-1)),
    ("registration_options", "enabled as a string", lambda: tb.registration_options(enabled="no")),
    ("registration_options", "zero sightings", lambda: tb.registration_options(sightings=0)),
]


_A8 = np.zeros(8)
_IMG = np.zeros((1, 2, 2, 3), np.uint8)
_CYCLIC: list[object] = [np.zeros(2)]
_CYCLIC.append(_CYCLIC)
_TOKENS = [{"tokens": np.arange(3), "n": 1}, {"tokens": np.arange(2), "n": 2}]


def refusal_rows() -> list[tuple[str, str, str, str]]:
    """(function, input, exception, message) for every refusal the tests check."""

    def message(call):
        try:
            call()
        except (TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc)
        raise AssertionError("no refusal")

    rows = [("to_numpy", case, *message(call)) for case, call, _, _ in TO_NUMPY_INPUTS]
    for case, make_out, _, _ in OUT_CASES:
        rows.append(
            (
                "to_numpy",
                case.replace("-", " "),
                *message(
                    lambda m=make_out: tb.to_numpy(torch.arange(4.0), out=m(np.zeros(4, F32)))
                ),
            )
        )
    rows.append(
        (
            "to_numpy",
            "out overlapping the source",
            *message(lambda: _overlapping_out(torch.arange(4.0))),
        )
    )
    rows += [
        ("from_numpy", case, *message(lambda v=value: tb.from_numpy(v)))
        for case, value, _, _ in FROM_NUMPY_INPUTS
    ]
    rows += [
        (
            "to_tensor",
            f"out: {case}",
            *message(lambda m=make_out: tb.to_tensor(np.arange(4, dtype=F32), "cpu", out=m())),
        )
        for case, make_out, _, _ in TO_TENSOR_OUT
    ]
    rows += [(fn, case, *message(call)) for fn, case, call in OTHER_REFUSALS]
    return rows


def _overlapping_out(x: torch.Tensor) -> None:
    tb.to_numpy(x[:3], out=x.numpy()[1:])


def render_refusals() -> str:
    lines = [
        "# Refusals",
        "",
        "Every input tensorbridge refuses, the exception and its message. Nothing is written",
        "before a refusal. Generated from `tests/test_refusals.py` (run it as a script to",
        "regenerate: `python tests/test_refusals.py`); a test fails when this file is stale.",
        "",
        "| function | input | exception | message |",
        "| --- | --- | --- | --- |",
    ]
    for fn, case, exc, msg in refusal_rows():
        # (a table cell escapes "|" as "\\|": NumPy names dtypes like |S1 and |V3)
        cell = msg.replace("|", "\\|")
        lines.append(f"| `{fn}` | {case} | {exc} | {cell} |")
    return "\n".join(lines) + "\n"


DOC = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "refusals.md"


@pytest.mark.skipif(
    __import__("platform").machine() != "x86_64",
    reason="the table is generated on x86_64 (longdouble differs elsewhere)",
)
def test_refusal_table_in_the_docs_is_current():
    expected = render_refusals()
    assert DOC.read_text() == expected, "docs/refusals.md is stale: python tests/test_refusals.py"


if __name__ == "__main__":
    DOC.write_text(render_refusals())
    print(f"wrote {DOC}")
