"""Differential fuzzing: the extension, the fallback and the NumPy/torch idiom, byte for byte.

Every example is built three times from one drawn spec (and one drawn seed): once for the
reference (``np.copyto(out, a, casting="equiv")``, ``a.copy()``, ``t.numpy()``,
``torch.from_numpy``) and once for each tensorbridge path. Outputs live in buffers poisoned
with 0xAB (a sentinel object or string where the dtype holds references), and the whole
buffer is compared, so bytes written outside ``out`` show as well as bytes not written.

Where the reference refuses, both paths must refuse with the same TypeError or ValueError
and leave every buffer as it was. Where only tensorbridge refuses, the ``out`` must be one
of the hostile kinds it documents (self-overlapping, zero strides, overlapping a source,
read-only) and the message must name a fix.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

import tensorbridge as tb
from tensorbridge import _backend

from conftest import POISON, forced_fallback, ml_dtypes

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LARGE_BYTES = (1 << 20) + 4096  # above the 1 MiB size at which torch's own copy takes over

StringDType = getattr(getattr(np, "dtypes", None), "StringDType", None)

DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype(np.bool_),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "longdouble": np.dtype(np.longdouble),
    "clongdouble": np.dtype(np.clongdouble),
    "datetime64[ns]": np.dtype("M8[ns]"),
    "U3": np.dtype("U3"),
    "S3": np.dtype("S3"),
    "object": np.dtype(object),
    "record": np.dtype([("a", "<i4"), ("b", "<f8")]),
    "record_obj": np.dtype([("a", "i4"), ("o", "O")]),
}
if StringDType is not None:
    DTYPES["StringDType"] = np.dtype(StringDType())
if ml_dtypes is not None:
    DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)

# NumPy dtypes torch holds (to_numpy(tensor) and from_numpy); bfloat16 through ml_dtypes.
NUMERIC = [
    n
    for n in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "bfloat16",
    )
    if n in DTYPES
]
REFUSABLE = ("self_overlap", "zero_stride", "overlap_src", "readonly")


# --------------------------------------------------------------------------- values


class Box:
    """A small custom object: compared by value, and by identity where references matter."""

    __slots__ = ("v",)

    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.v == self.v

    __hash__ = None  # type: ignore[assignment]


class _Poison:
    def __repr__(self) -> str:
        return "<poison>"


SENTINEL = _Poison()  # the poison of object slots
POISON_STR = "\xab" * 20  # the poison of StringDType slots (long: kept in the arena)
POISON_I4 = int(np.frombuffer(bytes([POISON] * 4), np.int32)[0])


def with_order(dt: np.dtype, order: str) -> np.dtype:
    """dt in byte order '<', '>' or '=' where it has one (records: every field)."""
    try:
        return dt.newbyteorder(order)
    except (TypeError, ValueError):  # StringDType has no byte order
        return dt


def has_order(dt: np.dtype) -> bool:
    return with_order(dt, "<") != with_order(dt, ">")


def is_ref(dt: np.dtype) -> bool:
    return bool(dt.hasobject)


def python_objects(rng: np.random.Generator, n: int) -> list[Any]:
    out: list[Any] = []
    for v in rng.integers(-(2**40), 2**40, n).tolist():
        kind = v % 3
        out.append(Box(v) if kind == 0 else v + 2**70 if kind == 1 else v)
    return out


def python_strings(rng: np.random.Generator, n: int) -> list[str]:
    chars = "aZ é€𝄞xyz"
    lengths = rng.integers(0, 40, n)  # some short (inline), some long (in the arena)
    return ["".join(chars[i] for i in rng.integers(0, len(chars), k)) for k in lengths]


def native_values(dt: np.dtype, n: int, rng: np.random.Generator) -> np.ndarray:
    """n fresh random values of dt (native byte order), deterministic in rng's seed."""
    if dt.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    if dt == np.dtype(object):
        a = np.empty(n, object)
        for i, v in enumerate(python_objects(rng, n)):
            a[i] = v
        return a
    if StringDType is not None and isinstance(dt, StringDType):
        return np.array(python_strings(rng, n), dtype=dt)
    if dt.names and dt.hasobject:
        a = np.empty(n, dt)
        a["a"] = rng.integers(-(2**31), 2**31, n)
        objects = python_objects(rng, n)
        for i in range(n):
            a["o"][i] = objects[i]
        return a
    if dt.kind == "U":
        pool = np.array(["", "a", "é€", "𝄞b", "xyz", "Zé𝄞", " a"], dtype=dt)
        return pool[rng.integers(0, len(pool), n)]
    if dt.kind in "fc" and dt.itemsize > (8 if dt.kind == "f" else 16):
        # longdouble: values, not bits (x87 padding); zeros first, so the padding is known
        a = np.zeros(n, dt)
        scale = 10.0 ** rng.integers(-30, 30, n)
        a.real = rng.standard_normal(n) * scale
        if dt.kind == "c":
            a.imag = rng.standard_normal(n) * scale
        return a
    # every bit pattern: NaN payloads, NaT, negative zeros, any bytes
    return rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).view(dt)


def values(dt: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values of dt (any byte order) with the given shape, bit for bit reproducible."""
    native = with_order(dt, "=")
    v = native_values(native, math.prod(shape), rng)
    if dt != native:
        v = v.astype(dt) if is_ref(dt) else v.byteswap().view(dt)
    return v.reshape(shape)


def poison_fill(a: np.ndarray) -> None:
    """Fills an array of a reference-holding dtype with its poison."""
    if a.dtype == np.dtype(object):
        a[...] = SENTINEL
    elif a.dtype.names:
        a["a"] = POISON_I4
        a["o"][...] = SENTINEL
    else:
        a[...] = POISON_STR


def canon(x: Any) -> Any:
    """An element as a comparable value (poison named, custom objects by value)."""
    if x is SENTINEL:
        return "<poison>"
    if isinstance(x, tuple):
        return tuple(canon(v) for v in x)
    if isinstance(x, Box):
        return ("Box", x.v)
    return (type(x).__name__, x)


def snapshot(a: np.ndarray) -> Any:
    """The whole content of a buffer: raw bytes, or every element where it holds references."""
    if is_ref(a.dtype):
        return [canon(x) for x in a.ravel().tolist()]
    return a.tobytes()


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    perm: tuple[int, ...]  # memory order of the dimensions
    steps: tuple[int, ...]  # slice step per dimension (negative: reversed; |step| > 1: holes)
    offset: int  # bytes past an aligned start (plain data only; odd = misaligned)


@st.composite
def layouts(draw, ndim: int, negative: bool = True, offset: bool = True) -> Layout:
    kind = draw(st.sampled_from(["C", "F", "transposed", "reversed", "holes"]))
    perm, steps = tuple(range(ndim)), (1,) * ndim
    if kind == "F":
        perm = perm[::-1]
    elif kind == "transposed":
        perm = tuple(draw(st.permutations(range(ndim))))
    elif kind == "reversed" and negative:
        steps = (-1,) * ndim
    elif kind == "holes":
        choices = [2, 3, -1, -2] if negative else [1, 2, 3]
        steps = tuple(draw(st.lists(st.sampled_from(choices), min_size=ndim, max_size=ndim)))
        perm = tuple(draw(st.permutations(range(ndim))))
    off = draw(st.sampled_from([0, 0, 1, 3])) if offset else 0
    return Layout(perm, steps, off)


def place(
    shape: tuple[int, ...], dt: np.dtype, lay: Layout, tail: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A view of the given shape and layout into a fresh poisoned buffer: (view, buffer).

    Plain data lives in a uint8 buffer (so misaligned starts and the bytes around the view
    can be checked); reference-holding dtypes in an array of their own (poisoned slots)."""
    extents, slices = [], []
    for n, s in zip(shape, lay.steps, strict=True):
        if abs(s) == 1:
            extents.append(n)
            slices.append(slice(None, None, s))
        elif n == 0:
            extents.append(1)
            slices.append(slice(0, 0))
        else:
            extents.append(n * abs(s) + 1)
            slices.append(slice(1, 1 + n * s, s) if s > 0 else slice(n * -s - 1, None, s))
    phys_shape = tuple(extents[p] for p in lay.perm)
    if is_ref(dt):
        phys = np.empty(phys_shape, dt)
        poison_fill(phys)
        buf = phys
    else:
        nbytes = math.prod(phys_shape) * dt.itemsize
        buf = np.full(lay.offset + nbytes + tail, POISON, np.uint8)
        phys = np.ndarray(phys_shape, dt, buffer=buf, offset=lay.offset)
    view = phys.transpose(np.argsort(lay.perm))[(*slices, Ellipsis)]  # always a view
    assert view.shape == shape
    return view, buf


def fit(lay: Layout, ndim: int) -> Layout:
    """lay for ndim dimensions: a C layout (same offset) where the out's ndim differs."""
    if len(lay.perm) == ndim:
        return lay
    return Layout(tuple(range(ndim)), (1,) * ndim, lay.offset)


def wrong_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes np.copyto refuses for a source of ``shape`` (it broadcasts some others)."""
    cands = []
    for i, n in enumerate(shape):
        cands.append((*shape[:i], n + 1, *shape[i + 1 :]))
        if n > 1:
            cands.append((*shape[:i], n - 1, *shape[i + 1 :]))
        cands.append(shape[:i] + shape[i + 1 :])
    cands.append((*shape, 2))
    good = []
    for c in cands:
        try:
            np.copyto(np.empty(c, np.uint8), np.empty(shape, np.uint8))
        except ValueError:
            good.append(c)
    return good


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One (source, out) pair, as drawn: everything build() needs to make it again."""

    seed: int
    dtype: str
    src_order: str
    out_order: str
    shape: tuple[int, ...]
    src_layout: Layout
    out_layout: Layout
    category: str  # plain, readonly, wrong_dtype, wrong_shape, zero_stride, self_overlap,...
    tensor: bool = False  # the source is a CPU tensor (else a NumPy array)
    expand: bool = False  # tensor source with a zero stride (expand)
    wrong_dtype: str = "int32"
    wrong_shape: tuple[int, ...] = ()
    overlap: str = "same"  # overlap_src: same memory, flipped, or shifted by one byte
    zero_dim: int = 0
    overlap_unit: int = 1  # self_overlap: element stride of the two colliding dimensions


@st.composite
def shapes(draw, dt: np.dtype, large_ok: bool) -> tuple[int, ...]:
    if large_ok and not is_ref(dt) and draw(st.integers(0, 11)) == 0:
        n = LARGE_BYTES // dt.itemsize + draw(st.integers(0, 7))
        if draw(st.booleans()):
            return (n,)
        rows = draw(st.sampled_from([64, 257, 1024]))
        return (rows, -(-n // rows))
    ndim = draw(st.integers(0, 3))
    return tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))


@st.composite
def cases(
    draw, tensor: bool = False, categories: tuple[str, ...] | None = None, names=None
) -> Case:
    name = draw(st.sampled_from(names or (NUMERIC if tensor else list(DTYPES))))
    dt = DTYPES[name]
    orders = ["<", ">", "="] if has_order(dt) else ["="]
    src_order = "=" if tensor else draw(st.sampled_from(orders))
    shape = draw(shapes(dt, large_ok=True))
    ndim = len(shape)
    src_layout = draw(layouts(ndim, negative=not tensor, offset=not is_ref(dt)))
    big = math.prod(shape) * dt.itemsize >= 1 << 20
    if big and draw(st.booleans()):  # mostly plain, aligned and C-contiguous: the shortcut
        out_layout = Layout(tuple(range(ndim)), (1,) * ndim, 0)
    else:
        out_layout = draw(layouts(ndim, offset=not is_ref(dt)))
    all_categories = [
        "plain",
        "plain",
        "readonly",
        "wrong_dtype",
        "wrong_shape",
        "zero_stride",
        "self_overlap",
        "overlap_src",
    ]
    category = draw(st.sampled_from(categories or all_categories))
    case = Case(
        seed=draw(st.integers(0, 2**32 - 1)),
        dtype=name,
        src_order=src_order,
        out_order=draw(st.sampled_from(orders)),
        shape=shape,
        src_layout=src_layout,
        out_layout=out_layout,
        category=category,
        tensor=tensor,
        expand=tensor and draw(st.integers(0, 4)) == 0,
    )
    if category == "wrong_dtype":
        others = [n for n in DTYPES if n != name]
        other = draw(st.sampled_from(others))
        case = replace(case, wrong_dtype=other, out_order=draw(st.sampled_from(["<", ">", "="])))
    elif category == "wrong_shape":
        choices = wrong_shapes(source_shape(case))
        if choices:
            case = replace(case, wrong_shape=draw(st.sampled_from(choices)))
        else:  # a 0-d source broadcasts into every shape
            case = replace(case, category="plain")
    elif category == "zero_stride":
        dims = [i for i, n in enumerate(source_shape(case)) if n > 1]
        if dims:
            case = replace(case, zero_dim=draw(st.sampled_from(dims)))
        else:
            case = replace(case, category="plain")
    elif category == "self_overlap":
        case = replace(case, overlap_unit=draw(st.integers(1, 2)))
    elif category == "overlap_src":
        modes = ["same", "flipped"] + ([] if is_ref(dt) else ["shifted"])
        case = replace(case, overlap=draw(st.sampled_from(modes)))
    return case


def source_shape(case: Case) -> tuple[int, ...]:
    return (2, *case.shape) if case.expand else case.shape


@dataclass
class Built:
    src: Any  # np.ndarray or torch.Tensor
    out: np.ndarray
    watch: list[np.ndarray]  # every buffer the call may touch: compared whole


def tensor_numpy(t: torch.Tensor) -> np.ndarray:
    """t.numpy(), with bfloat16 through torch's own same-size int16 view."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def as_tensor(a: np.ndarray) -> torch.Tensor:
    if ml_dtypes is not None and a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def build_source(case: Case, tail: int = 1) -> tuple[Any, np.ndarray, np.ndarray]:
    """(source, its NumPy view, its buffer)."""
    rng = np.random.default_rng(case.seed)
    dt = with_order(DTYPES[case.dtype], case.src_order)
    view, buf = place(case.shape, dt, case.src_layout, tail=tail)
    view[...] = values(dt, case.shape, rng)
    if not case.tensor:
        return view, view, buf
    t = as_tensor(view)
    if case.expand:
        t = t.expand(2, *case.shape)
    return t, view, buf


def self_overlapping_out(shape, dt, case: Case) -> tuple[np.ndarray, np.ndarray] | None:
    """An out whose elements share memory: two dimensions with the same stride, or one with
    a stride under the itemsize (plain data); None where no such layout exists."""
    size = dt.itemsize
    dims = [i for i, n in enumerate(shape) if n > 1]
    strides = [size] * len(shape)
    if StringDType is not None and isinstance(dt, StringDType):
        return None  # as_strided cannot make StringDType views
    if len(dims) >= 2:
        unit = case.overlap_unit * size
        strides[dims[0]] = strides[dims[1]] = unit  # e.g. (4, 4) over 7 slots
        span = (shape[dims[0]] + shape[dims[1]] - 2) * unit + size
        for i in dims[2:]:
            strides[i] = span
            span += (shape[i] - 1) * span
    elif len(dims) == 1 and size > 1 and not is_ref(dt):
        strides[dims[0]] = size // 2
        span = (shape[dims[0]] - 1) * (size // 2) + size
    else:
        return None
    off = case.out_layout.offset
    if is_ref(dt):
        base = np.empty(span // size, dt)
        poison_fill(base)
        return as_strided(base, shape, tuple(strides), writeable=True), base
    buf = np.full(off + span + 1, POISON, np.uint8)
    return np.ndarray(shape, dt, buffer=buf, offset=off, strides=tuple(strides)), buf


def build_out(case: Case, src_view: np.ndarray, src_buf: np.ndarray) -> tuple[np.ndarray, list]:
    """(out, the buffers it lives in)."""
    shape = source_shape(case)
    name = case.wrong_dtype if case.category == "wrong_dtype" else case.dtype
    dt = with_order(DTYPES[name], case.out_order)
    cat = case.category
    if cat == "wrong_shape":
        shape = case.wrong_shape
    if cat == "overlap_src" and not case.expand:
        if case.overlap == "shifted":  # C order, one byte further into the source's buffer
            src_off = src_view.__array_interface__["data"][0] - src_buf.ctypes.data
            start = min(src_off + 1, src_buf.nbytes - math.prod(shape) * dt.itemsize)
            return np.ndarray(shape, dt, buffer=src_buf, offset=max(start, 0)), []
        if is_ref(dt) or dt == src_view.dtype:  # (no byte-order views of references)
            out = src_view
        else:
            out = src_view.view(dt)
        if case.overlap == "flipped" and out.ndim:
            out = out[(slice(None, None, -1),) * out.ndim]
        return out, []
    if cat == "self_overlap":
        made = self_overlapping_out(shape, dt, case)
        if made is not None:
            return made[0], [made[1]]
        cat = "zero_stride"  # one long dimension of 1-byte or reference items
        dims = [i for i, n in enumerate(shape) if n > 1]
        if not dims:
            cat = "plain"
        case = replace(case, zero_dim=dims[0] if dims else 0)
    if cat == "zero_stride":
        k = case.zero_dim
        small = (*shape[:k], 1, *shape[k + 1 :])
        view, buf = place(small, dt, fit(case.out_layout, len(small)))
        out = np.broadcast_to(view, shape)  # read-only: made writeable, as as_strided would
        out.flags.writeable = True
        return out, [buf]
    out, buf = place(shape, dt, fit(case.out_layout, len(shape)))
    if cat == "readonly":
        out.flags.writeable = False
    return out, [buf]


def build(case: Case) -> Built:
    src, src_view, src_buf = build_source(case)
    out, bufs = build_out(case, src_view, src_buf)
    return Built(src, out, [*bufs, src_buf])


def reference_source(src: Any) -> np.ndarray:
    return tensor_numpy(src) if isinstance(src, torch.Tensor) else src


# --------------------------------------------------------------------------- checking


def paths() -> list[str]:
    return (["extension"] if _backend.ENGINE.C is not None else []) + ["fallback"]


def on_path(path: str):
    return forced_fallback() if path == "fallback" else contextlib.nullcontext()


def attempt(fn) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # compared below
        return None, exc


def shares(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size > 0 and b.size > 0 and bool(np.shares_memory(a, b))


def self_overlapping(a: np.ndarray) -> bool:
    """True when two elements of a share a byte (every element's offset, enumerated)."""
    if a.size < 2:
        return False
    offsets = np.zeros((), np.int64)
    for n, s in zip(a.shape, a.strides, strict=True):
        offsets = offsets[..., None] + np.arange(n, dtype=np.int64) * s
    offsets = np.sort(offsets.ravel())
    return bool((np.diff(offsets) < a.itemsize).any())


def really_hostile(case: Case, built: Built) -> bool:
    """The out is of a kind tensorbridge may refuse where np.copyto writes through."""
    out = built.out
    if case.category == "overlap_src":
        return shares(out, reference_source(built.src))
    if case.category in ("zero_stride", "self_overlap"):
        return self_overlapping(out)
    return case.category in REFUSABLE


def assert_names_a_fix(exc: BaseException) -> None:
    msg = str(exc)
    assert ":" in msg and ("pass" in msg or "use" in msg), f"message names no fix: {msg!r}"


def assert_refused_alike(path_excs: dict[str, BaseException | None]) -> None:
    for path, exc in path_excs.items():
        assert isinstance(exc, (TypeError, ValueError)), f"{path}: did not refuse: {exc!r}"
    kinds = {TypeError if isinstance(e, TypeError) else ValueError for e in path_excs.values()}
    assert len(kinds) == 1, f"the paths refuse differently: {path_excs}"


def assert_identity(out: np.ndarray, src: np.ndarray) -> None:
    """Every object in out is the very object in src (references copied, not values)."""
    if out.dtype.names and "o" in out.dtype.names:
        out, src = out["o"], src["o"]
    if out.dtype != np.dtype(object):
        return
    for idx in np.ndindex(out.shape):
        assert out[idx] is src[idx], idx


def check_against_reference(case: Case, run) -> None:
    """run(built) -> what tensorbridge returns; compares every path with np.copyto."""
    ref = build(case)
    ref_ok = attempt(lambda: np.copyto(ref.out, reference_source(ref.src), casting="equiv"))
    ref_ok = ref_ok[1] is None
    excs: dict[str, BaseException | None] = {}
    for path in paths():
        built = build(case)
        before = [snapshot(b) for b in built.watch]
        with on_path(path):
            result, exc = attempt(lambda built=built: run(built))
        excs[path] = exc
        if exc is not None:
            assert [snapshot(b) for b in built.watch] == before, f"{path}: refused, but wrote"
            assert isinstance(exc, (TypeError, ValueError)), f"{path}: {exc!r}"
            if ref_ok:
                assert really_hostile(case, built), f"{path}: refused a valid call: {exc!r}"
                assert_names_a_fix(exc)
            continue
        assert ref_ok, f"{path}: accepted what np.copyto refuses"
        assert result is built.out
        after = [snapshot(b) for b in built.watch]
        expected = [snapshot(b) for b in ref.watch]
        for i, (a, e) in enumerate(zip(after, expected, strict=True)):
            assert a == e, f"{path}: buffer {i} differs from np.copyto's"
        if case.category == "plain":
            assert_identity(built.out, reference_source(built.src))
    assert len({e is None for e in excs.values()}) == 1, f"one path refused: {excs}"
    if not ref_ok or any(e is not None for e in excs.values()):
        assert_refused_alike(excs)


# --------------------------------------------------------------------------- tests


@SETTINGS
@given(case=cases())
def test_to_numpy_array_out(case):
    """tb.to_numpy(a, out=out) against np.copyto(out, a, casting="equiv")."""
    check_against_reference(case, lambda b: tb.to_numpy(b.src, out=b.out))


@SETTINGS
@given(case=cases(tensor=True))
def test_to_numpy_tensor_out(case):
    """tb.to_numpy(t, out=out) against np.copyto(out, t.numpy(), casting="equiv")."""
    check_against_reference(case, lambda b: tb.to_numpy(b.src, out=b.out))


@settings(SETTINGS, max_examples=60)
@given(case=cases(categories=("plain",)))
def test_to_numpy_array_copy(case):
    """tb.to_numpy(a, copy=True) against a.copy(): same bits, no shared memory."""
    ref = build(case).src.copy()
    for path in paths():
        built = build(case)
        before = [snapshot(b) for b in built.watch]
        with on_path(path):
            result = tb.to_numpy(built.src, copy=True)
        assert type(result) is np.ndarray
        assert result.dtype == ref.dtype and result.shape == ref.shape, path
        assert result.flags.writeable
        assert not shares(result, built.src), f"{path}: the copy shares memory with a"
        assert snapshot(result) == snapshot(ref), f"{path}: the copy differs from a.copy()"
        assert_identity(result, built.src)
        assert [snapshot(b) for b in built.watch] == before, f"{path}: the source changed"


def reference_from_numpy(a: np.ndarray) -> torch.Tensor:
    # (reshape: ascontiguousarray makes 0-d arrays 1-d)
    native = np.ascontiguousarray(a).reshape(a.shape).astype(with_order(a.dtype, "="))
    return as_tensor(native)


def tensor_bytes(t: torch.Tensor) -> bytes:
    return np.ascontiguousarray(tensor_numpy(t.contiguous())).tobytes()


@SETTINGS
@given(
    case=st.one_of(  # mostly numeric dtypes
        cases(categories=("plain",), names=NUMERIC), cases(categories=("plain",))
    )
)
def test_from_numpy(case):
    """tb.from_numpy(a) against torch.from_numpy of a native, compact copy; other dtypes are
    refused alike."""
    ref, ref_exc = attempt(lambda: reference_from_numpy(build(case).src))
    excs = {}
    for path in paths():
        built = build(case)
        before = [snapshot(b) for b in built.watch]
        with on_path(path):
            t, excs[path] = attempt(lambda built=built: tb.from_numpy(built.src))
        assert [snapshot(b) for b in built.watch] == before, f"{path}: the source changed"
        if ref_exc is not None:
            assert excs[path] is not None, f"{path}: converted a {built.src.dtype} array"
            continue
        assert excs[path] is None, f"{path}: {excs[path]!r}"
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        assert t.dtype == ref.dtype and tuple(t.shape) == tuple(ref.shape), path
        assert tensor_bytes(t) == tensor_bytes(ref), f"{path}: values differ"
        if t.numel():  # torch's kernels may assume aligned elements
            assert t.data_ptr() % t.element_size() == 0, path
    if ref_exc is not None:
        assert_refused_alike(excs)


@st.composite
def batches(draw):
    first = draw(st.one_of(cases(), cases(tensor=True)))
    second = draw(st.one_of(cases(), cases(tensor=True)))
    plain = not is_ref(DTYPES[first.dtype]) and not is_ref(DTYPES[second.dtype])
    cross = draw(st.sampled_from(["none", "none", "out_on_leaf", "outs_overlap"]))
    if not plain or first.category != "plain" or second.category != "plain":
        cross = "none"
    return first, second, cross


def build_batch(first: Case, second: Case, cross: str):
    a = build(first)
    if cross == "none":
        b = build(second)
    else:  # the first out lives inside the second leaf's buffer or the second out's
        need = a.out.nbytes + 8
        src, view, src_buf = build_source(second, tail=need if cross == "out_on_leaf" else 1)
        out, bufs = build_out(second, view, src_buf)
        if cross == "outs_overlap":
            buf = np.full(need + out.nbytes + 1, POISON, np.uint8)
            out = np.ndarray(out.shape, out.dtype, buffer=buf, offset=1)
            bufs = [buf]
        b = Built(src, out, [*bufs, src_buf])
        host = src_buf if cross == "out_on_leaf" else b.watch[0]
        a_out = np.ndarray(a.out.shape, a.out.dtype, buffer=host, offset=3)
        a = Built(a.src, a_out, a.watch[1:])
    return a, b


@SETTINGS
@given(spec=batches())
def test_to_numpy_batch(spec):
    """tb.to_numpy_batch({"a": .., "b": ..}, out=..) against np.copyto leaf after leaf; a
    refusal writes nothing at all."""
    first, second, cross = spec
    ra, rb = build_batch(first, second, cross)
    ref_ok = all(
        attempt(lambda r=r: np.copyto(r.out, reference_source(r.src), casting="equiv"))[1] is None
        for r in (ra, rb)
    )
    excs = {}
    for path in paths():
        a, b = build_batch(first, second, cross)
        watch = [*a.watch, *b.watch]
        before = [snapshot(w) for w in watch]
        with on_path(path):
            result, exc = attempt(
                lambda a=a, b=b: tb.to_numpy_batch(
                    {"a": a.src, "b": b.src}, out={"a": a.out, "b": b.out}
                )
            )
        excs[path] = exc
        if exc is not None:
            assert [snapshot(w) for w in watch] == before, f"{path}: refused, but wrote"
            assert isinstance(exc, (TypeError, ValueError)), f"{path}: {exc!r}"
            if ref_ok:
                hostile = (
                    (cross == "outs_overlap" and shares(a.out, b.out))
                    or (cross == "out_on_leaf" and shares(a.out, reference_source(b.src)))
                    or any(really_hostile(c, x) for c, x in ((first, a), (second, b)))
                )
                assert hostile, f"{path}: refused a valid batch: {exc!r}"
                assert_names_a_fix(exc)
            continue
        assert ref_ok, f"{path}: accepted a batch np.copyto refuses"
        assert result["a"] is a.out and result["b"] is b.out
        expected = [snapshot(w) for w in (*ra.watch, *rb.watch)]
        for i, (x, e) in enumerate(zip([snapshot(w) for w in watch], expected, strict=True)):
            assert x == e, f"{path}: buffer {i} differs from np.copyto's"
    if not ref_ok:
        assert_refused_alike(excs)


# --------------------------------------------------------------------------- references

SAFETY_CODE = textwrap.dedent(
    """
    import contextlib, gc, sys
    import numpy as np
    import tensorbridge as tb
    from tensorbridge import _backend

    KIND = sys.argv[1]
    sys.path.insert(0, sys.argv[2])  # tests/, for conftest
    from conftest import forced_fallback

    class Box:
        def __init__(self, v):
            self.v = v

    def make(n):
        if KIND == "object":
            a = np.empty(n, object)
            for i in range(n):
                a[i] = Box(i) if i % 2 else 2**80 + i
            return a
        if KIND == "record_obj":
            a = np.empty(n, [("a", "i4"), ("o", "O")])
            for i in range(n):
                a[i] = (i, Box(i))
            return a
        return np.array([f"string number {i} " * (1 + i % 3) for i in range(n)],
                        dtype=np.dtypes.StringDType())

    def canon(x):
        if isinstance(x, tuple) or type(x).__name__ == "void":
            return tuple(canon(v) for v in x)
        return ("Box", x.v) if isinstance(x, Box) else x

    def read(a, expected):
        gc.collect()
        junk = [Box(-i) for i in range(10000)] + [str(i) * 9 for i in range(10000)]
        got = [canon(x) for x in a.ravel().tolist()]
        for x in a.ravel():  # every element, read through the array
            repr(x)
        del junk
        assert got == expected, (got[:4], expected[:4])

    def layouts(n):
        yield lambda: make(n)
        yield lambda: make(2 * n)[::-2]
        yield lambda: make(n).reshape(5, -1).T

    for path in ("extension", "fallback"):
        if path == "extension" and _backend.ENGINE.C is None:
            continue
        ctx = forced_fallback() if path == "fallback" else contextlib.nullcontext()
        ctx.__enter__()
        for new in layouts(40):
            src = new()
            expected = [canon(x) for x in src.ravel().tolist()]
            out = np.empty(src.shape, src.dtype, order="F")
            tb.to_numpy(src, out=out)
            del src
            read(out, expected)
            src = new()
            copy = tb.to_numpy(src, copy=True)
            del src
            read(copy, expected)
            src, other = new(), new()
            outs = {"a": np.empty(src.shape, src.dtype), "b": np.empty(src.shape, src.dtype)}
            tb.to_numpy_batch({"a": src, "b": other}, out=outs)
            del src, other
            read(outs["a"], expected)
            read(outs["b"], expected)
            del out, copy, outs
            gc.collect()
        ctx.__exit__(None, None, None)
    print("ok")
    """
)

SAFETY_KINDS = ["object", "record_obj"] + (["StringDType"] if StringDType is not None else [])


@pytest.mark.parametrize("kind", SAFETY_KINDS)
def test_reference_safety(kind):
    """Copies of reference-holding arrays own their references: the source freed and
    collected, every element of the result still reads back (a crash is a segfault)."""
    python_dir = str(Path(tb.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SAFETY_CODE, kind, os.path.dirname(__file__)],
        timeout=60,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.stdout.strip().endswith("ok")
