"""The dtype tables: torch <-> NumPy, including ml_dtypes for bfloat16 and float8.

bfloat16 and the float8 formats have no NumPy builtin; ml_dtypes provides them with
the same bit layout as torch, so a tensor's storage can be reinterpreted as an
ml_dtypes array (and back) without a copy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch

DTypeLike = np.dtype | type | str | torch.dtype

NATIVE: dict[torch.dtype, np.dtype] = {
    torch.bool: np.dtype(np.bool_),
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if hasattr(torch, _name):
        NATIVE[getattr(torch, _name)] = np.dtype(_name)

# torch dtype -> ml_dtypes name; present only where this torch has the dtype.
_ML_NAMES: dict[torch.dtype, str] = {
    getattr(torch, n): n
    for n in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, n)
}

# Same-size integer dtypes used to reinterpret ml_dtypes storage.
_STORAGE: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.uint8, np.dtype(np.uint8)),
    2: (torch.int16, np.dtype(np.int16)),
}

_NP_TO_TORCH: dict[np.dtype, torch.dtype] = {v: k for k, v in NATIVE.items()}

_ml: ModuleType | None
try:
    import ml_dtypes as _ml
except ImportError:  # optional: bfloat16/float8 then need dtype=
    _ml = None


def ml_dtypes_name(dtype: torch.dtype) -> str | None:
    """The ml_dtypes name of a torch dtype that NumPy holds only with ml_dtypes
    (``"bfloat16"``, ``"float8_e4m3fn"``...), installed or not; None for the others."""
    return _ML_NAMES.get(dtype)


_ML: dict[torch.dtype, np.dtype] = {}
if _ml is not None:
    for _t, _n in _ML_NAMES.items():
        if hasattr(_ml, _n):
            _ML[_t] = np.dtype(getattr(_ml, _n))
            _NP_TO_TORCH[_ML[_t]] = _t


#: torch dtype -> (NumPy dtype, None for dtypes .numpy() knows, else the same-size
#: integer torch dtype through which the storage is viewed as an ml_dtypes array).
FAST_PATH: dict[torch.dtype, tuple[np.dtype, torch.dtype | None]] = {
    **{t: (n, None) for t, n in NATIVE.items()},
    **{t: (n, _STORAGE[n.itemsize][0]) for t, n in _ML.items()},
}


_ML_NUMPY = frozenset(_ML.values())


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype that holds ``dtype`` bit for bit, or a TypeError that names the fix."""
    np_dtype = NATIVE.get(dtype)
    if np_dtype is not None:
        return np_dtype
    np_dtype = _ML.get(dtype)
    if np_dtype is not None:
        return np_dtype
    if dtype in _ML_NAMES:
        raise TypeError(
            f"{dtype} has no NumPy dtype without ml_dtypes: install it "
            f"(pip install ml_dtypes) to get {_ML_NAMES[dtype]} arrays, or pass "
            "dtype=numpy.float32 to convert."
        )
    if dtype == torch.complex32:
        raise TypeError(f"{dtype} has no NumPy dtype: pass dtype=numpy.complex64 to convert.")
    if dtype.is_floating_point:
        raise TypeError(f"{dtype} has no NumPy dtype: pass dtype=numpy.float32 to convert.")
    raise TypeError(f"{dtype} has no NumPy dtype: convert it first, e.g. x.to(torch.int32).")


def is_ml_dtype(np_dtype: np.dtype) -> bool:
    """True for the ml_dtypes types (bfloat16, float8...) that torch stores natively."""
    return np_dtype in _ML_NUMPY


def storage_dtypes(itemsize: int) -> tuple[torch.dtype, np.dtype]:
    """Same-size integer dtypes through which ml_dtypes storage is reinterpreted."""
    return _STORAGE[itemsize]


def unsupported_numpy(np_dtype: np.dtype) -> TypeError:
    """The refusal of a NumPy dtype torch lacks, naming the fix."""
    kind = np_dtype.kind
    if kind in "US":
        fix = "encode or tokenize the strings into an integer array first"
    elif kind == "O":
        fix = "convert it to a numeric array first, e.g. numpy.asarray(a, dtype=numpy.float32)"
    elif kind in "Mm":
        fix = "convert it with a.astype('int64') (or a.view('int64')) first"
    elif kind in "fc" and np_dtype.itemsize > 8 + 8 * (kind == "c"):
        fix = "convert it with a.astype(numpy.float64) (or numpy.complex128) first"
    elif kind == "V" and np_dtype.names:
        fix = f"pass one field at a time, e.g. a[{np_dtype.names[0]!r}]"
    elif np_dtype.type is np.void and np_dtype.subdtype is None and np_dtype.itemsize:
        # Raw bytes: what a bfloat16 or float8 array becomes when its dtype is lost on the
        # way (``__array_interface__`` and the buffer protocol carry only '|V2', '|V1').
        size = np_dtype.itemsize
        if size == 2:
            fix = (
                "it is raw bytes, as a bfloat16 array arrives through __array_interface__ or "
                "the buffer protocol: view them as what they hold, e.g. "
                "numpy.asarray(a).view(ml_dtypes.bfloat16), or without ml_dtypes "
                "torch.from_numpy(numpy.asarray(a).view(numpy.int16)).view(torch.bfloat16) "
                "(numpy.float16 if they held float16)"
            )
        elif size == 1:
            fix = (
                "it is raw bytes, as a float8 array arrives through __array_interface__ or "
                "the buffer protocol: view them as what they hold, e.g. "
                "numpy.asarray(a).view(ml_dtypes.float8_e4m3fn) (the float8 type they "
                "held), or numpy.uint8 for bytes"
            )
        else:
            number = {4: "numpy.float32", 8: "numpy.float64"}.get(size, "numpy.uint8")
            fix = (
                "it is raw bytes: view them as the numbers they hold, e.g. "
                f"numpy.ascontiguousarray(a).view({number})"
            )
        if _ml is None and size <= 2:
            fix += " (pip install ml_dtypes for NumPy's bfloat16 and float8)"
    elif kind == "V" and _ml is None:
        fix = "install ml_dtypes (pip install ml_dtypes) for bfloat16/float8 arrays"
    else:
        fix = "convert it to a supported numeric dtype first"
    return TypeError(f"numpy dtype {np_dtype} has no torch equivalent: {fix}.")


def torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    """The torch dtype for a NumPy dtype of either byte order, or a TypeError naming the fix."""
    t = _NP_TO_TORCH.get(np_dtype)
    if t is None and np_dtype.byteorder not in "=|":
        t = _NP_TO_TORCH.get(np_dtype.newbyteorder("="))
    if t is None:
        raise unsupported_numpy(np_dtype)
    return t


#: Short names of the ML world that NumPy and torch do not know, and the name they do.
#: ("f16" is not one of them: NumPy reads it as a 16-byte float, its longdouble.)
_SHORT_NAMES = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "fp64": "float64",
    "fp8": "float8_e4m3fn",
}


def _numpy_knows(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def as_numpy_dtype(dtype: Any, example: str = "numpy.float32") -> np.dtype:
    """Accepts a NumPy dtype-like or a torch.dtype (for ``dtype=`` arguments); a string
    NumPy does not know may be torch's name for a dtype NumPy has (``"cfloat"``).
    ``example``: the dtype a refusal suggests."""
    if isinstance(dtype, torch.dtype):
        return numpy_dtype(dtype)
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        name = _SHORT_NAMES.get(dtype.lower()) if isinstance(dtype, str) else None
        if name is not None:  # (torch has each of them; NumPy's bfloat16 is ml_dtypes')
            fix = f"pass {name!r} or torch.{name}" if _numpy_knows(name) else f"pass torch.{name}"
        elif (named := _torch_named(dtype)) is not None:  # torch's name ("cfloat")
            try:
                return numpy_dtype(named)
            except TypeError as none:  # ("chalf"; "bfloat16" without ml_dtypes)
                raise TypeError(
                    f"dtype={dtype!r} is torch's {str(named).removeprefix('torch.')}: {none}"
                ) from exc
        else:
            fix = f"pass e.g. {example}"
        raise TypeError(f"dtype={dtype!r} is not a NumPy or torch dtype: {fix}") from exc


def _torch_named(name: Any) -> torch.dtype | None:
    """The torch dtype a string names (``"bfloat16"``), or None."""
    found = getattr(torch, name, None) if isinstance(name, str) else None
    return found if isinstance(found, torch.dtype) else None


#: The Python and NumPy scalar number types (what a list of numbers may hold).
NUMBERS = (bool, int, float, complex, np.number, np.bool_)

_NO_CAST = "quantized, bit-packed and sub-byte dtypes"


def as_torch_dtype(dtype: Any) -> torch.dtype:
    """Accepts a torch.dtype or a NumPy dtype-like (for ``dtype=`` arguments).

    Refuses (TypeError) the torch dtypes a plain cast cannot produce: quantized,
    bit-packed and sub-byte ones (qint8, bits8, uint1, int4, float4...).
    """
    if dtype is None:  # (numpy.dtype(None) is float64: never what a dtype= mapping meant)
        raise TypeError(
            "dtype=None is not a dtype here: pass a dtype such as torch.float32, or, in a "
            "dtype= mapping, leave out the keys to keep as they are."
        )
    if isinstance(dtype, torch.dtype):
        if dtype not in NATIVE and dtype not in _ML_NAMES and dtype != torch.complex32:
            raise TypeError(
                f"dtype={dtype} cannot be the target of a cast ({_NO_CAST} are made by their "
                "own functions, e.g. torch.quantize_per_tensor): pass a plain dtype such as "
                "torch.float32."
            )
        return dtype
    named = _torch_named(dtype)
    if named is not None:  # a name torch has: NumPy's reading of it must agree
        try:
            np_meaning: torch.dtype | None = maybe_torch_dtype(np.dtype(dtype))
        except TypeError:
            np_meaning = None
        if np_meaning is None:  # ("bfloat16" without ml_dtypes; "cfloat" on NumPy 2)
            return as_torch_dtype(named)
        if np_meaning != named:  # ("float": float64 to NumPy, float32 to torch)
            theirs, ours = np.dtype(dtype).name, str(named).removeprefix("torch.")
            raise TypeError(
                f"dtype={dtype!r} is {theirs} to NumPy but {ours} to torch (torch.{dtype}): "
                f"name the width ({ours!r} or {theirs!r})."
            )
    np_dtype = as_numpy_dtype(dtype, "torch.float32")
    try:
        return torch_dtype(np_dtype)
    except TypeError:  # (the argument's fault, not the array's: say so)
        raise TypeError(
            f"dtype={dtype!r} is NumPy's {np_dtype}, which torch has no dtype for: pass a "
            "torch dtype such as torch.float32."
        ) from None


def canonical_numpy_dtype(np_dtype: np.dtype) -> np.dtype:
    """The dtype torch.from_numpy knows for np_dtype (numpy.ulonglong -> uint64, ...)."""
    t = _NP_TO_TORCH.get(np_dtype)
    native = NATIVE.get(t) if t is not None else None
    return native if native is not None and native.num != np_dtype.num else np_dtype


def maybe_torch_dtype(np_dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype for np_dtype, or None when torch has none."""
    return _NP_TO_TORCH.get(np_dtype)


def numpy_dtype_or_none(dtype: torch.dtype) -> np.dtype | None:
    """The NumPy dtype for a torch dtype, or None when there is none (or no ml_dtypes)."""
    return NATIVE.get(dtype) or _ML.get(dtype)
