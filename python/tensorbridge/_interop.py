"""Arrays of other frameworks: DLPack, the CUDA array interface and NumPy's protocols.

JAX, TensorFlow, CuPy, Numba, pandas and friends each export their memory through one
or more of ``__dlpack__``, ``__cuda_array_interface__`` and ``__array__`` /
``__array_interface__``. :func:`import_array` turns such an object into a torch tensor
or a NumPy array over the same memory wherever the producer allows it, so that
``to_numpy`` and ``to_tensor`` then treat it exactly like their native inputs:

- device memory becomes a CUDA tensor through DLPack (``torch.from_dlpack`` hands the
  consumer's current stream to the producer, which orders its pending work before it),
  else through the CUDA array interface (whose ``stream`` the current stream waits on);
- host memory becomes a NumPy array through ``__array__`` when a NumPy array is the goal
  (a producer's read-only flag survives: JAX and TensorFlow buffers are immutable), else
  a tensor through DLPack; the other protocol is the fallback when one refuses.

bfloat16 and float8 arrive as torch bfloat16/float8 (DLPack) or ml_dtypes arrays (NumPy
protocols): never upcast.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import _dtypes

PROTOCOLS = "__dlpack__, __cuda_array_interface__, __array__ or __array_interface__"

# DLPack device types whose memory the host can read directly.
_HOST_DEVICES = {1, 3}  # kDLCPU, kDLCUDAHost (page-locked host memory)


def is_foreign_array(obj: Any) -> bool:
    """True for a tensor of another framework: an object exposing DLPack or the CUDA array
    interface that is not a torch tensor or NumPy array. (Objects with only NumPy's
    protocols, such as PIL images or pandas frames, are not: batches leave them as they are.)
    """
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return False
    return hasattr(type(obj), "__dlpack__") or hasattr(type(obj), "__cuda_array_interface__")


def exposes_array(obj: Any) -> bool:
    """True for an object exposing one of :data:`PROTOCOLS` (what ``import_array``
    takes), torch tensors and NumPy arrays aside."""
    return is_foreign_array(obj) or _has_numpy_protocol(obj)


def _dlpack_device(obj: Any) -> tuple[int, int] | None:
    try:
        kind, index = obj.__dlpack_device__()
        return int(kind), int(index)
    except Exception:  # no __dlpack_device__, or one that fails: decide without it
        return None


def _dlpack_would_abort(obj: Any) -> bool:
    """TensorFlow aborts the process (a failed CHECK, not an exception) when a string,
    resource or variant tensor is exported through DLPack; those go through __array__."""
    if not type(obj).__module__.startswith("tensorflow"):
        return False
    dtype: Any = getattr(obj, "dtype", None)
    try:
        numeric = dtype.is_floating or dtype.is_integer or dtype.is_bool or dtype.is_complex
        return not numeric or dtype.is_quantized
    except AttributeError:
        return True


def _via_cuda_array_interface(obj: Any) -> torch.Tensor:
    interface = obj.__cuda_array_interface__
    t = torch.as_tensor(obj, device="cuda")  # zero-copy over the interface's pointer
    stream = interface.get("stream")
    if isinstance(stream, int) and stream != 0 and t.numel():
        _wait_for_producer(stream, t.device)
    return t


def _wait_for_producer(stream: int, device: torch.device) -> None:
    """Version 3 of the interface: the producer's work on ``stream`` comes before ours."""
    current = torch.cuda.current_stream(device)
    if stream == 1:  # the legacy default stream: torch's default stream
        legacy = torch.cuda.default_stream(device)
        if current.cuda_stream != legacy.cuda_stream:
            current.wait_stream(legacy)
    elif stream == 2:  # a per-thread default stream torch cannot name: wait for the device
        torch.cuda.synchronize(device)
    elif stream != current.cuda_stream:
        current.wait_stream(torch.cuda.ExternalStream(stream, device=device))


def _has_negative_strides(obj: Any, interface: dict | None) -> bool:
    strides = interface.get("strides") if interface is not None else getattr(obj, "strides", None)
    try:
        return strides is not None and any(int(s) < 0 for s in strides)
    except (TypeError, ValueError):
        return False


class _PositiveStrides:
    """A CUDA array interface over the same memory as ``owner``'s, every negative stride
    made positive (counted from the lowest address); it keeps ``owner`` alive."""

    def __init__(self, owner: Any, interface: dict) -> None:
        self._owner = owner
        self.__cuda_array_interface__ = interface


def _via_cuda_array_interface_flipped(obj: Any, interface: dict) -> torch.Tensor:
    """A view with negative strides (CuPy's ``x[::-1]``): torch cannot hold those, so the
    reversed dimensions are read forwards and flipped back with one copy on the device."""
    ptr, readonly = interface["data"]
    shape = tuple(int(n) for n in interface["shape"])
    strides = [int(s) for s in interface["strides"]]
    flips = []
    for d, n in enumerate(shape):
        if strides[d] < 0:
            if n > 0:
                ptr += (n - 1) * strides[d]
            strides[d] = -strides[d]
            flips.append(d)
    positive = dict(interface, data=(ptr, readonly), strides=tuple(strides))
    t = _via_cuda_array_interface(_PositiveStrides(obj, positive))
    return torch.flip(t, flips)


def _via_numpy(obj: Any, protect: bool = True) -> np.ndarray:
    try:
        a = np.asarray(obj)
    except ValueError:
        # Some producers' __array__ returns a NumPy scalar for 0-d data (TensorFlow does
        # for bfloat16 and float8), which np.asarray rejects; anything else stays refused.
        array = getattr(obj, "__array__", None)
        if array is None:
            raise
        value = array()
        if not isinstance(value, (np.ndarray, np.generic)):
            raise
        a = np.asarray(value)
    if protect and a.flags.writeable and not a.flags.owndata and _immutable_producer(obj):
        # TensorFlow hands out writeable views of some immutable tensors (bfloat16,
        # float8): writing to them would change the tensor behind TensorFlow's back.
        a = a.view()
        a.flags.writeable = False
    return a


def _has_numpy_protocol(obj: Any) -> bool:
    """What numpy.asarray accepts: ``__array__`` on the class, or ``__array_interface__``
    / ``__array_struct__`` on the class or the instance (NumPy reads those as attributes)."""
    kind = type(obj)
    names = ("__array__", "__array_interface__", "__array_struct__")
    if any(hasattr(kind, name) for name in names):
        return True
    for name in ("__array_interface__", "__array_struct__"):
        try:
            if name in getattr(obj, "__dict__", {}):
                return True
        except Exception:  # an object whose __dict__ itself refuses: no protocol
            return False
    return False


def _immutable_producer(obj: Any) -> bool:
    module = type(obj).__module__
    return module.startswith(("tensorflow", "jax")) and not hasattr(obj, "assign")


def import_array(obj: Any, fn: str, *, numpy_first: bool) -> torch.Tensor | np.ndarray:
    """``obj``'s data as a tensor or NumPy array, sharing its memory where allowed.

    Args:
        obj: an object exposing at least one of the protocols in :data:`PROTOCOLS`.
        fn: the public function's name, for error messages.
        numpy_first: for host memory, try the NumPy protocols before DLPack.

    Raises:
        TypeError: ``obj`` exposes none of the protocols.
        ValueError: every protocol it exposes refused to export its data.
    """
    if isinstance(obj, np.generic):
        raise no_protocol_error(obj, fn)
    kind = type(obj)
    dlpack = hasattr(kind, "__dlpack__") and not _dlpack_would_abort(obj)
    # (on the instance: JAX's class has the property, which raises for host arrays)
    try:
        interface = obj.__cuda_array_interface__
    except Exception:  # none, or (JAX) a property that raises for host arrays
        interface = None
    cai = isinstance(interface, dict)
    numpy_protocol = _has_numpy_protocol(obj)
    if not (dlpack or cai or numpy_protocol):
        raise no_protocol_error(obj, fn)

    device = _dlpack_device(obj) if dlpack else None
    on_device = cai or (device is not None and device[0] not in _HOST_DEVICES)
    reversed_dims = _has_negative_strides(obj, interface)
    ways: list[tuple[str, Callable[[Any], torch.Tensor | np.ndarray]]] = []
    if dlpack and not reversed_dims:
        # (torch.from_dlpack aborts the process on negative strides: never hand it those)
        ways.append(("__dlpack__", torch.from_dlpack))
    if cai and reversed_dims:
        ways.append(
            ("__cuda_array_interface__", lambda o: _via_cuda_array_interface_flipped(o, interface))
        )
    elif cai:
        ways.append(("__cuda_array_interface__", _via_cuda_array_interface))
    if numpy_protocol:
        # Host memory: NumPy's import keeps a producer's read-only flag. Device memory:
        # last, since it is the producer's own copy to the host (CuPy refuses it).
        # (read-only views for NumPy results; torch has no read-only tensors)
        numpy_way = ("__array__", lambda o: _via_numpy(o, protect=numpy_first))
        if numpy_first and not on_device:
            ways.insert(0, numpy_way)
        else:
            ways.append(numpy_way)
    if not ways:  # only DLPack, with negative strides
        raise ValueError(
            f"{fn} cannot import the {_describe(obj)}: it has negative strides, which torch "
            "cannot take through DLPack. Pass a copy with positive strides, e.g. x.copy() in "
            "its own framework."
        )

    refusals = []
    for name, way in ways:
        try:
            return way(obj)
        except Exception as exc:  # the producer's refusal (its own exception types)
            refusals.append((name, exc))
    detail = "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in refusals)
    fix = "Make a copy the producer can export first, e.g. x.copy() in its own framework"
    if type(obj).__module__.startswith("tensorflow"):
        fix += " (a symbolic TensorFlow tensor must be evaluated eagerly, outside tf.function)"
    raise ValueError(
        f"{fn} could not import the {_describe(obj)}: its producer refused to export it "
        f"({detail}). {fix}."
    ) from refusals[-1][1]


def _numbers_only(obj: list[Any] | tuple[Any, ...]) -> bool:
    """A (nested) list or tuple of numbers only, such as ``[1, 2]`` or ``[[0.5], [1.5]]``."""
    todo, seen = [obj], {id(obj)}
    while todo:
        for item in todo.pop():
            if isinstance(item, (list, tuple)):
                if id(item) in seen:  # a list holding itself is no array
                    return False
                seen.add(id(item))
                todo.append(item)
            elif not isinstance(item, _dtypes.NUMBERS):
                return False
    return True


def _holds_arrays(obj: Any) -> bool:
    """Whether a list, tuple or dict holds an array or tensor (of NumPy, torch or another
    framework) among its first 256 items, nested ones included, each container looked
    at once; for a refusal's hint only."""
    todo, seen, budget = [obj], {id(obj)}, 256
    while todo and budget > 0:
        items = todo.pop()
        for item in itertools.islice(items.values() if isinstance(items, dict) else items, budget):
            budget -= 1
            if isinstance(item, (np.ndarray, torch.Tensor)):
                return True
            if isinstance(item, (list, tuple, dict)):
                if id(item) not in seen:
                    seen.add(id(item))
                    todo.append(item)
            elif not isinstance(item, _dtypes.NUMBERS) and is_foreign_array(item):
                return True
    return False


def _describe(obj: Any) -> str:
    kind = type(obj)
    module = kind.__module__.split(".")[0]
    return f"{module}.{kind.__name__}" if module != "builtins" else kind.__name__


def no_protocol_error(obj: Any, fn: str) -> TypeError:
    from ._packed import PackedBatch  # (imported late: it builds on this module)

    kind = type(obj).__name__
    if isinstance(obj, PackedBatch):  # (a whole batch: neither an array nor a protocol)
        if fn == "images_to_tensor":
            hint = "pass its images, e.g. images_to_tensor(packed.unpack()['image'], ...)"
        elif fn == "to_numpy":
            hint = "to_numpy_batch(packed) gives its arrays, in the batch's structure"
        else:
            hint = (
                "packed.to(device) or to_device(packed, device) gives its tensors, in the "
                "batch's structure (packed.unpack() on the host, no copy)"
            )
    elif fn == "images_to_tensor":  # (pixels: an array of them, in the dtype they have)
        hint = "make an array of the pixels first, e.g. numpy.asarray(x)"
    elif isinstance(obj, (list, tuple)) and _numbers_only(obj):
        # data, not a batch: to_device would hand the numbers back untouched
        kind += " of numbers"
        hint = "use torch.as_tensor(x) for a tensor (torch.as_tensor(x, device=...) on a GPU)"
        if fn == "to_numpy":
            hint = "use numpy.asarray(x) for an array (or torch.as_tensor(x) for a tensor)"
    elif isinstance(obj, (list, tuple, dict)) and not _holds_arrays(obj):
        # to_device and to_numpy_batch would hand it back untouched
        hint = (
            "it holds no arrays or tensors to convert: make an array of it first, e.g. "
            "numpy.asarray(x, dtype=...)"
        )
    elif isinstance(obj, (list, tuple, dict)):
        hint = "for a batch (a list, tuple or dict of arrays) use to_numpy_batch() or to_device()"
        if fn == "to_tensor":
            hint = "for a batch (a list, tuple or dict of arrays) use to_device()"
    elif isinstance(obj, np.generic):
        kind = f"the NumPy scalar {kind}"
        hint = "wrap it first with numpy.asarray(x) (or torch.as_tensor(x))"
    else:
        hint = "wrap it first with numpy.asarray(x) or torch.as_tensor(x)"
    return TypeError(
        f"{fn} expects a torch.Tensor, a numpy.ndarray or an array exposing {PROTOCOLS} "
        f"(JAX, TensorFlow, CuPy, Numba, pandas...); got {kind}: {hint}."
    )
