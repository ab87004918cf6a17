"""Data-loader helpers: collate into pinned memory, a device prefetcher, image batches."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Literal, NoReturn, TypeVar, cast, overload

import numpy as np
import torch

from . import _backend, _dtypes, _interop, _registry
from ._batch import _K, _T, _V, DTypeSpec, _ArrayT, _ListT, _TupleT, dtype_rule, moved
from ._convert import Device, _check_storage, readable, to_numpy, to_tensor
from ._packed import ARENA, PackedBatch, arena, estimate_nbytes
from ._tree import Path, flatten, is_namedtuple, key_text, path_text, rebuild_dataclass

# --------------------------------------------------------------------------- collate


def _in_worker() -> bool:
    info = torch.utils.data.get_worker_info()
    return info is not None


#: collate's samples when none are given: ``collate(pad=...)`` is a slip for
#: ``functools.partial(collate, pad=...)``, refused with that fix.
class _NoSamples:
    def __repr__(self) -> str:
        return "<required>"  # (what help() and an IDE show as the default)


_NO_SAMPLES: Any = _NoSamples()


@overload
def collate(
    samples: Sequence[Any],
    *,
    pad: Mapping[str, float] | None = ...,
    fields: Mapping[str, type[list[Any]]] | None = ...,
    packed: Literal[False] = ...,
) -> Any: ...
@overload
def collate(
    samples: Sequence[Any],
    *,
    pad: Mapping[str, float] | None = ...,
    fields: Mapping[str, type[list[Any]]] | None = ...,
    packed: Literal[True],
) -> PackedBatch: ...
@overload
def collate(
    samples: Sequence[Any],
    *,
    pad: Mapping[str, float] | None = ...,
    fields: Mapping[str, type[list[Any]]] | None = ...,
    packed: bool,
) -> Any: ...
def collate(
    samples: Sequence[Any] = _NO_SAMPLES,
    *,
    pad: Mapping[str, float] | None = None,
    fields: Mapping[str, type[list[Any]]] | None = None,
    packed: bool = False,
) -> Any:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that stacks each field with
    one copy; in the main process of a GPU machine, straight into page-locked memory,
    which saves the pin-memory thread's second copy.

    In the main process with a usable GPU the stacked tensors are pinned (torch's
    caching host allocator reuses the memory); in worker processes (CUDA must not be
    touched in a forked child) and without a GPU they are ordinary tensors. Pass
    ``pin_memory=torch.cuda.is_available()`` to the DataLoader either way: its pin-memory
    thread hands a batch that is pinned already on as it is, and pins a worker's batch
    on its own thread, off the training loop's. Structures,
    numbers and strings are collated like ``default_collate``, with one difference:
    numbers of mixed types become one array as ``numpy.asarray`` makes it, whatever the
    order: ``[1, 2.5]`` gives float64 where ``default_collate`` follows sample 0 and
    gives float32, and ``np.int64`` with ``np.float32`` gives float64 where it gives
    float32. A tensor that requires grad is refused (the batch is a copy, which would
    drop the graph).

    Samples that do not fit together are refused with a ValueError or TypeError naming
    the field as a path into the batch (``batch["a"][0]["b"]``) and the sample that
    differs from sample 0 (``sample i``: the i-th of ``samples``, its place in the batch,
    not its index in the dataset): arrays of different shapes, dicts with other keys, sequences
    of other lengths, another kind of value (an array in one sample, an int in another),
    or samples nested more than 100 levels deep (or holding themselves).

    For dict samples, two arguments change how named fields (keys of the sample dicts)
    are collated; every other field is collated as without them:

    - ``pad={"tokens": 0}``: a ragged field (arrays, tensors or lists of numbers whose
      first dimension differs; the other dimensions must match) is padded at the end of
      its first dimension to the longest sample with the given value, into one tensor of
      shape (batch, longest, ...). The lengths before padding come next to it, under
      ``"tokens_lengths"``, as an int64 tensor of shape (batch,). The value must fit the
      field's dtype; a sample field already named ``"tokens_lengths"`` is refused. A
      batch whose samples are all empty lists says nothing of the field's dtype and
      takes the value's: give it the field's type (``0`` for token ids, ``0.0`` for a
      float field).
    - ``fields={"meta": list}``: the field stays a Python list of the samples' values,
      not collated (variable-length boxes, strings, objects). ``list`` is the only
      override accepted.

    Both are refused (TypeError or ValueError) for samples that are not dicts, for keys
    the samples do not have and for a key named in both. With a DataLoader, pass
    ``collate_fn=functools.partial(tb.collate, pad={"tokens": 0})``: it pickles, so it
    works in worker processes too.

    ``packed=True`` returns a :class:`PackedBatch` instead: every field is stacked
    straight into one buffer (in shared memory in a worker process, so it reaches the
    main process as a handle), which crosses to a device in one copy with ``.to()``.
    Use it with ``pin_memory=True`` (the pin-memory thread pins the one buffer), or
    with :class:`Prefetcher`, or hand it to Lightning or accelerate as it is.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> b = tb.collate([{"x": np.ones(3), "y": 1}, {"x": np.zeros(3), "y": 0}])
        >>> b["x"].shape, b["y"]
        (torch.Size([2, 3]), tensor([1, 0]))
        >>> b = tb.collate([{"tokens": [5, 6, 7], "meta": "a"}, {"tokens": [8], "meta": {}}],
        ...                pad={"tokens": -1}, fields={"meta": list})
        >>> b["tokens"], b["tokens_lengths"], b["meta"]
        (tensor([[ 5,  6,  7],
                [ 8, -1, -1]]), tensor([3, 1]), ['a', {}])
    """
    if samples is _NO_SAMPLES:  # (the overloads require samples: mypy says so first)
        given = [f"{k}={{...}}" for k, v in (("pad", pad), ("fields", fields)) if v]
        given += [f"packed={packed!r}"] if packed else []
        options = ", ".join(given) or "pad={...}"
        raise TypeError(
            "collate() got no samples: it is the collate_fn itself, which the DataLoader "
            f"calls with each batch's samples: pass collate_fn=functools.partial(tb.collate, "
            f"{options})."
        )
    if isinstance(samples, Mapping) or not isinstance(
        samples, (Sequence, np.ndarray, torch.Tensor)
    ):
        raise TypeError(
            f"collate takes a list of samples, got {_kind(samples)}: pass a list (a "
            "DataLoader passes one), e.g. collate([sample0, sample1])."
        )
    if not len(samples):
        raise ValueError(
            "collate needs at least one sample, got none: pass a non-empty list (a DataLoader "
            "with batch_size >= 1 always does)."
        )
    packed = _backend.bool_arg(packed, "collate: packed")
    if packed:
        with arena(estimate_nbytes(samples, pad, fields)) as a:
            return a.packed(collate(samples, pad=pad, fields=fields))
    if pad is None and fields is None:
        return _collate(samples, (), 0)
    return _collate_dict(samples, (), 0, _field_rules(samples[0], pad, fields))


def _field_rules(first: Any, pad: Any, fields: Any) -> dict[Any, tuple[str, Any]]:
    """{key: ("pad", value) or ("list", None)} from collate's pad= and fields=, checked."""
    given = "pad=" if pad is not None else "fields="
    if not isinstance(first, Mapping):
        raise TypeError(
            f"collate: {given} names fields of dict samples, but sample 0 is {_kind(first)}: "
            f"return a dict from the dataset, or collate without {given}."
        )
    rules: dict[Any, tuple[str, Any]] = {}
    for name, arg, example in (("pad", pad, "0"), ("fields", fields, "list")):
        if arg is None:
            continue
        if not isinstance(arg, Mapping):
            raise TypeError(
                f"collate: {name}= must be a dict from a field name to "
                f"{'the pad value' if name == 'pad' else 'list'}, got {_kind(arg)}: pass e.g. "
                f'{name}={{"tokens": {example}}}.'
            )
        for key, value in arg.items():
            if key not in first:
                raise ValueError(
                    f"collate: {name}= names {key_text(key)}, which the samples do not have "
                    f"(they have {', '.join(key_text(k) for k in first)}): pass one of those "
                    "keys."
                )
            if key in rules:
                raise ValueError(
                    f"collate: {key_text(key)} is named in both pad= and fields=: keep it in "
                    "one (pad= to pad it into a tensor, fields= to keep it as a list)."
                )
            if name == "fields":
                if value is not list:
                    shown = getattr(value, "__name__", repr(value))
                    raise TypeError(
                        f"collate: fields={{{key_text(key)}: {shown}}}: the only override is "
                        "list, which keeps the field as a Python list of the samples' values: "
                        f"pass fields={{{key_text(key)}: list}} (or pad= to pad a ragged "
                        "array field)."
                    )
                rules[key] = ("list", None)
                continue
            if not isinstance(key, str):
                raise TypeError(
                    f"collate: pad= names {key!r}; pad= takes string keys, since the lengths go "
                    "under the key + '_lengths': use string keys in the samples."
                )
            if not isinstance(value, _NUMBERS) or isinstance(value, np.timedelta64):
                raise TypeError(
                    f"collate: pad={{{key_text(key)}: {value!r}}}: the pad value fills the "
                    f"padded positions and must be a number, got {_kind(value)}: pass e.g. "
                    f"pad={{{key_text(key)}: 0}}."
                )
            lengths = lengths_key(key)
            if lengths in first:
                raise ValueError(
                    f"collate: pad={{{key_text(key)}: ...}} adds the lengths as "
                    f"{key_text(lengths)}, but the samples already have that key: rename "
                    "it in the dataset."
                )
            rules[key] = ("pad", value)
    return rules


# Samples deeper than this are refused (a cycle would otherwise end in a RecursionError).
_MAX_DEPTH = 100

_NUMBERS = _dtypes.NUMBERS
# What collate stacks or walks into (the rest it keeps as a list).
_STACKED = (np.ndarray, torch.Tensor, Mapping, list, tuple, *_NUMBERS)

# (a Path into the batch is built as the walk descends and formatted only for a message)


def _collate(samples: Sequence[Any], path: Path, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(
            f"collate: {path_text(path)}: the samples are nested more than {_MAX_DEPTH} levels "
            "deep, or contain themselves (a list holding itself, say): pass samples of at "
            f"most {_MAX_DEPTH} levels, without cycles."
        )
    first = samples[0]
    # Leaves are checked only when they fail (another kind of value in a sample fails
    # there); containers are checked first, since zip over a dict would not fail.
    if isinstance(first, (np.ndarray, torch.Tensor)):
        try:
            return _stack(samples, path)
        except (AttributeError, TypeError):  # e.g. an int has no .shape
            _check_kind(samples, (np.ndarray, torch.Tensor), path)  # names the odd one
            raise
    if isinstance(first, Mapping):
        return _collate_dict(samples, path, depth)
    if is_namedtuple(first):
        _check_kind(samples, type(first), path)
        return type(first)(
            *(
                _collate(list(field), (*path, (".", name)), depth + 1)
                for name, field in zip(first._fields, zip(*samples, strict=True), strict=True)
            )
        )
    if isinstance(first, (list, tuple)):
        _check_kind(samples, (list, tuple), path)
        for i, s in enumerate(samples):
            if len(s) != len(first):
                raise ValueError(
                    f"collate: {path_text(path)}: sample {i} has {_items(len(s))}, sample 0 has "
                    f"{_items(len(first))}; sequences are collated item by item and need equal "
                    f"lengths: {_ragged_fix(path, _paddable_lists(samples))}."
                )
        return [
            _collate(list(field), (*path, ("[", j)), depth + 1)
            for j, field in enumerate(zip(*samples, strict=True))
        ]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        _check_kind(samples, type(first), path)
        return rebuild_dataclass(
            first,
            {
                f.name: _collate(
                    [getattr(s, f.name) for s in samples], (*path, (".", f.name)), depth + 1
                )
                for f in dataclasses.fields(first)
                if hasattr(first, f.name)
            },
        )
    if isinstance(first, _NUMBERS):
        types = set(map(type, samples))
        if len(types) > 1:  # (an array among numbers: refused either way round)
            if (
                isinstance(first, np.generic)
                and all(_numpy_0d(s) for s in samples)
                and any(isinstance(s, (np.ndarray, torch.Tensor)) for s in samples)
            ):
                return _stack(samples, path)  # (as a 0-d array first stacks them: either order)
            _check_kind(samples, _NUMBERS, path)
        try:
            stacked = torch.as_tensor(np.asarray(samples))
        except (TypeError, ValueError) as exc:  # None or a string among the numbers
            _check_kind(samples, _NUMBERS, path)
            raise _no_dtype(path, str(exc)) from exc
        # Ints beyond int64: Python ones that became uint64 (refused though it holds them:
        # torch would make them int64 elsewhere), and any that became float64 or complex128
        # beside a signed int, a float or a complex number (their low digits gone).
        if (stacked.dtype == torch.uint64 and any(map(_beyond_int64, samples))) or (
            stacked.dtype in (torch.float64, torch.complex128)
            and not all(issubclass(t, (float, complex, np.inexact)) for t in types)
            and lost_ints(stacked, samples)
        ):
            raise _no_dtype(path, f"an int beyond int64 made them {stacked.dtype}")
        if ARENA.get() is not None:  # (into the packed buffer)
            return _empty(tuple(stacked.shape), stacked.dtype).copy_(stacked)
        return stacked
    types = set(map(type, samples))
    if any(issubclass(t, PackedBatch) for t in types):  # (else a list .to() would not move)
        i = next(i for i, s in enumerate(samples) if isinstance(s, PackedBatch))
        raise TypeError(
            f"collate: {path_text(path)}: sample {i} is a PackedBatch, which collate does not "
            "stack: return its batch from the dataset (.unpack()) and pack the collated "
            "batch instead (collate(samples, packed=True))."
        )
    # Strings, None and anything else: as a list, like default_collate; the same whichever
    # sample comes first, so a value that would stack elsewhere is refused here too
    # (samples all of sample 0's type hold none: it is not one).
    for i, s in enumerate(samples if len(types) > 1 else ()):
        if isinstance(s, _STACKED):
            raise TypeError(
                f"collate: {path_text(path)}: sample {i} is {_kind(s)}, sample 0 is "
                f"{_kind(first)}; every sample must hold the same kind of value here: "
                f"convert it in the dataset{_list_fix(path)}."
            )
    return list(samples)


def _collate_dict(
    samples: Sequence[Any],
    path: Path,
    depth: int,
    rules: Mapping[Any, tuple[str, Any]] | None = None,
) -> Any:
    first = samples[0]
    keys = first.keys()
    if len(set(map(type, samples))) == 1 and type(first) is dict:
        # The common case, plain dicts: gathering the fields finds a missing key (KeyError),
        # the sizes then an extra one; no per-sample comparison of keys.
        try:
            columns = [[s[k] for s in samples] for k in keys]
        except KeyError:
            _refuse_keys(samples, path)
        if sum(map(len, samples)) != len(keys) * len(samples):  # (none has fewer keys)
            _refuse_keys(samples, path)
    else:  # other mappings (a defaultdict would make up a missing key): compare the keys
        _check_kind(samples, Mapping, path)
        if any(s.keys() != keys for s in samples):
            _refuse_keys(samples, path)
        columns = [[s[k] for s in samples] for k in keys]
    fields: dict[Any, Any] = {}
    for k, values in zip(keys, columns, strict=True):
        rule, fill = rules.get(k, ("", None)) if rules else ("", None)
        if rule == "list":
            fields[k] = values
        elif rule == "pad":
            fields[k], fields[lengths_key(k)] = _pad(values, (*path, ("[", k)), fill)
        else:
            fields[k] = _collate(values, (*path, ("[", k)), depth + 1)
    try:
        return cast(Any, type(first))(fields)
    except TypeError:  # e.g. a defaultdict: a plain dict, like default_collate
        return fields


def _refuse_keys(samples: Sequence[Any], path: Path) -> NoReturn:
    keys = samples[0].keys()
    i, s = next((i, s) for i, s in enumerate(samples) if s.keys() != keys)
    missing = [k for k in keys if k not in s]
    extra = [k for k in s if k not in keys]
    problem = " and ".join(
        p
        for p in (
            f"lacks {_keys_text(missing)}" if missing else "",
            f"has the extra {_keys_text(extra)}" if extra else "",
        )
        if p
    )
    raise ValueError(
        f"collate: {path_text(path)}: sample {i} {problem} (compared with sample 0); "
        "every sample must have the same keys: return the same keys from the "
        "dataset for every sample (None or an empty array for a missing value)."
    )


def lengths_key(key: str) -> str:
    """Where pad= puts a field's lengths: ``"tokens"`` -> ``"tokens_lengths"`` (a str
    Enum member's value, not its name: ``f"{key}"`` of one is ``"Field.TOKENS"``)."""
    return f"{str.__str__(key)}_lengths"


def _numpy_0d(x: Any) -> bool:
    """A NumPy scalar, a 0-d array or a 0-d tensor: they stack alike."""
    return isinstance(x, np.generic) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 0)


def _beyond_int64(x: Any) -> bool:
    return type(x) is int and not -(2**63) <= x < 2**63


def lost_ints(stacked: torch.Tensor | np.ndarray, values: Any) -> bool:
    """Whether float64 (or complex128) ``stacked`` came from integers beyond int64 among
    ``values`` (nested lists too), whose low digits float64 does not hold. Looked for
    only where a magnitude of 2**63 or more says there may be one."""
    if isinstance(stacked, torch.Tensor):
        if not stacked.numel() or float(stacked.abs().max()) < 2.0**63:
            return False
    elif not stacked.size or float(np.abs(stacked).max()) < 2.0**63:
        return False

    def lost(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(map(lost, v))
        if isinstance(v, np.ndarray):  # (rows of an object column: a uint64 array, say)
            if v.dtype.kind == "O":
                return any(map(lost, v.ravel()))
            return v.dtype.kind == "u" and bool(v.size) and int(v.max()) >= 2**63
        if isinstance(v, torch.Tensor):  # (read as int64, a uint64 of 2**63 or more is < 0)
            return v.dtype == torch.uint64 and bool((v.view(torch.int64) < 0).any())
        return isinstance(v, (int, np.integer)) and not -(2**63) <= int(v) < 2**63

    return lost(values)


def _no_dtype(path: Path, why: str) -> TypeError:
    return TypeError(  # all numbers, but no tensor dtype holds them (an int over 2**63)
        f"collate: {path_text(path)}: these numbers fit no tensor dtype ({why}); convert them "
        f"in the dataset (a float, or an int within int64){_list_fix(path)}."
    )


def _check_kind(samples: Sequence[Any], kind: Any, path: Path) -> None:
    """Every sample holds the kind of value sample 0 does at ``path``."""
    if len(set(map(type, samples))) == 1:  # one type, sample 0's: no isinstance per sample
        return
    for i, s in enumerate(samples):
        if not isinstance(s, kind):
            raise TypeError(
                f"collate: {path_text(path)}: sample {i} is {_kind(s)}, sample 0 is "
                f"{_kind(samples[0])}; every sample must hold the same kind of value here: "
                f"convert it in the dataset (numpy.asarray for numbers meant to stack with "
                f"arrays){_list_fix(path)}."
            )


def _kind(x: Any) -> str:
    cls = type(x)
    module = cls.__module__.split(".")[0]
    return cls.__name__ if module == "builtins" else f"{module}.{cls.__name__}"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def _keys_text(keys: list[Any]) -> str:
    word = "key" if len(keys) == 1 else "keys"
    return f"{word} {', '.join(key_text(k) for k in keys)}"


def _top_key(path: Path) -> Any:
    """The sample dict's key when ``path`` names one of its fields, else None."""
    if len(path) == 1 and path[0][0] == "[" and isinstance(path[0][1], str):
        return path[0][1]
    return None


def _list_fix(path: Path) -> str:
    key = _top_key(path)
    if key is None:
        return ""
    return f", or keep the field as a list with fields={{{key_text(key)}: list}}"


def _paddable_lists(samples: Sequence[Any]) -> bool:
    """Whether pad= would take these list samples of different lengths: each numbers, or
    lists of numbers nested evenly, alike beyond the first dimension (an error path only:
    it converts every sample)."""
    inner = None
    for s in samples:
        if not s:
            continue  # ([] takes the others' inner shape)
        try:
            with warnings.catch_warnings():  # (NumPy < 1.24 warns on uneven nesting)
                warnings.simplefilter("ignore")
                a = np.asarray(s)
        except (ValueError, TypeError):  # lists nested unevenly
            return False
        if a.ndim == 0 or a.dtype.kind not in "biufc":
            return False
        if inner is None:
            inner = a.shape[1:]
        elif a.shape[1:] != inner:
            return False
    return True


def _ragged_fix(path: Path, paddable: bool, ndim: int = 1) -> str:
    key = _top_key(path)
    if key is None or not paddable:
        return f"pad or crop them to one size in the dataset{_list_fix(path)}"
    pad = (
        f"pass pad={{{key_text(key)}: 0}} to pad them to the longest (their lengths come as "
        f"{key_text(lengths_key(key))})"
    )
    if ndim >= 3:  # (images, say: ragged along their height by accident, not by design)
        return (
            f"resize or crop them to one size in the dataset, or, where the first "
            f"dimension is ragged by design, {pad}{_list_fix(path)}"
        )
    return f"{pad}{_list_fix(path)}"


def _check_stacked_ndim(ndim: int, path: Path) -> None:
    """Refuses samples that stack to more dimensions than a NumPy array holds (32 in
    NumPy 1, 64 in NumPy 2), which collate stacks into."""
    if ndim <= 32:
        return
    try:
        np.empty((0,) * ndim)
    except ValueError:
        raise ValueError(
            f"collate: {path_text(path)}: samples of {ndim - 1} dimensions stack to {ndim}, more "
            "than a NumPy array holds: merge some of their dimensions in the dataset (with "
            f"reshape){_list_fix(path)}."
        ) from None


def _host_array(x: np.ndarray | torch.Tensor, path: Path) -> np.ndarray:
    """A sample's array or tensor as a NumPy array; a refusal names the field."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.requires_grad:  # (to_numpy would detach it, silently)
        raise ValueError(
            f"collate: {path_text(path)}: a sample's tensor requires grad, which collating would "
            "drop (the batch is a copy): pass it with .detach() from the dataset, or stack "
            "that field with torch.stack."
        )
    if x.layout == torch.strided and _dtypes.numpy_dtype_or_none(x.dtype) is None:
        # (to_numpy's own refusal names its dtype= argument, which collate has not)
        if x.is_quantized:
            fix = "convert it in the dataset (x.dequantize())"
        elif x.dtype == torch.complex32:
            fix = "convert it in the dataset (x.to(torch.complex64))"
        elif _dtypes.ml_dtypes_name(x.dtype) is not None:  # (bfloat16, float8: no ml_dtypes)
            fix = "pip install ml_dtypes (NumPy's dtypes for it), or convert it (x.float())"
        else:  # (bits8, uint1-7, float4 and other dtypes without arithmetic to speak of)
            fix = (
                "view it as a dtype NumPy has in the dataset (x.view(torch.uint8)), or stack "
                "that field with torch.stack"
            )
        raise TypeError(
            f"collate: {path_text(path)}: a sample's tensor is {x.dtype}, which collate "
            f"cannot stack (it stacks through NumPy, which has no such dtype): "
            f"{fix}{_list_fix(path)}."
        )
    try:
        a = to_numpy(x)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"collate: {path_text(path)}: {exc}") from None
    _check_storage(x, f"collate: {path_text(path)}")  # (shrunk: the view reaches past its end)
    return a


def _stack(samples: Sequence[Any], path: Path) -> torch.Tensor:
    arrays = [_host_array(s, path) for s in samples]
    shape = (len(arrays), *arrays[0].shape)
    for i, a in enumerate(arrays):
        if a.shape != shape[1:]:
            paddable = a.ndim == len(shape) - 1 > 0 and a.shape[1:] == shape[2:]
            raise ValueError(
                f"collate: {path_text(path)}: sample {i} has shape {a.shape}, sample 0 has "
                f"{shape[1:]}; samples must have equal shapes: "
                f"{_ragged_fix(path, paddable, a.ndim)}."
            )
    _check_stacked_ndim(len(shape), path)
    _, t_dtype = _common_dtype(arrays, path)
    out_t = _empty(shape, t_dtype)
    out = to_numpy(out_t)  # a view: the stack lands in the tensor's memory, in one copy
    np.stack(arrays, out=out, casting="same_kind")
    return out_t


def _common_dtype(arrays: Sequence[np.ndarray], path: Path) -> tuple[np.dtype, torch.dtype]:
    """The dtype the samples stack as. Samples of different dtypes promote by torch's rules,
    as default_collate's torch.stack does, not NumPy's (which make float64 of int64 with
    float32, and of int64 with uint64, losing digits)."""
    originals = {a.dtype for a in arrays}
    try:  # (either byte order: a refusal names the dtype as the samples have it)
        t_dtypes = {_dtypes.torch_dtype(d) for d in originals}
    except TypeError as exc:  # no torch dtype (strings, objects)
        raise TypeError(f"collate: {path_text(path)}: {exc}") from None
    if len(t_dtypes) == 1:  # (one dtype, in one byte order or both: stacked in native order)
        return next(iter(originals)).newbyteorder("="), t_dtypes.pop()
    try:
        t_dtype = functools.reduce(torch.promote_types, t_dtypes)
        return _dtypes.numpy_dtype(t_dtype), t_dtype
    except RuntimeError:  # none common to all (torch does not promote uint16-uint64 with
        # other integers, or float8 with anything)
        names = ", ".join(sorted({str(a.dtype) for a in arrays}))
        raise TypeError(
            f"collate: {path_text(path)}: the samples are {names}, which torch promotes to no "
            "common dtype: convert them to one in the dataset."
        ) from None


def _pad(values: list[Any], path: Path, fill: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ragged field padded along its first dimension, and the lengths before padding."""
    where, key = path_text(path), key_text(path[-1][1])
    arrays: list[np.ndarray] = []
    empty_lists = []  # [] has no dtype or inner shape of its own: it takes the others'
    for i, v in enumerate(values):
        if isinstance(v, (torch.Tensor, np.ndarray)):
            a = _host_array(v, path)
        elif isinstance(v, (list, tuple)):
            try:
                a = np.asarray(v)
            except ValueError:  # lists of lists of different lengths
                raise ValueError(
                    f"collate: {where}: sample {i} is a {type(v).__name__} of lists of "
                    "different lengths; pad= pads the first dimension only: make the inner "
                    "lengths equal in the dataset."
                ) from None
            except (TypeError, RuntimeError):  # (tensors NumPy cannot read: grad, bfloat16)
                raise TypeError(
                    f"collate: {where}: sample {i} is a {type(v).__name__} holding values "
                    "NumPy cannot read as numbers (tensors that require grad, say): make it "
                    "one array or tensor in the dataset."
                ) from None
            if not len(v):
                empty_lists.append(i)
            elif a.dtype in (np.float64, np.complex128) and lost_ints(a, v):
                raise TypeError(
                    f"collate: {where}: sample {i} holds an int beyond int64, which made its "
                    f"numbers {a.dtype} (losing digits): convert them in the dataset (a "
                    "float, or an int within int64)."
                )
        else:
            raise TypeError(
                f"collate: {where}: pad= pads arrays, tensors and lists of numbers along their "
                f"first dimension; sample {i} is {_kind(v)}: return one of those from the "
                f"dataset, or drop {key} from pad=."
            )
        if a.ndim == 0:
            raise ValueError(
                f"collate: {where}: sample {i} is a scalar (shape ()), which has no first "
                f"dimension to pad: drop {key} from pad= (scalars need no padding)."
            )
        if a.dtype.kind not in "biufc" and not _dtypes.is_ml_dtype(a.dtype):
            raise TypeError(
                f"collate: {where}: sample {i} holds {a.dtype} values; pad= pads numbers: "
                "encode or tokenize them in the dataset, or keep the field as a list with "
                f"fields={{{key}: list}}."
            )
        arrays.append(a)
    fill_dtype = np.asarray(fill).dtype
    if (
        len(empty_lists) == len(arrays)
        and fill_dtype.kind in "biufc"
        and _dtypes.maybe_torch_dtype(fill_dtype) is not None  # (not longdouble)
    ):
        # (nothing in the batch says its dtype, which numpy would make float64 for []:
        # the pad value's, so a batch of empty token lists is int64 like any other)
        arrays = [np.empty((0,), fill_dtype) for _ in arrays]
    empty = set(empty_lists)
    shaped = [i for i in range(len(arrays)) if i not in empty] or [0]
    ref = shaped[0]
    inner = arrays[ref].shape[1:]
    for i in shaped:
        if arrays[i].shape[1:] != inner:
            raise ValueError(
                f"collate: {where}: sample {i} has shape {arrays[i].shape}, sample {ref} has "
                f"{arrays[ref].shape}; pad= pads the first dimension only, so the others must "
                "match: pad or crop them to one size in the dataset."
            )
    dtype, t_dtype = _common_dtype([arrays[i] for i in shaped], path)
    if isinstance(fill, (bool, np.bool_)) and dtype.kind != "b":
        # (pad={"tokens": True} reads as "pad it", but would fill with 1)
        raise ValueError(
            f"collate: {where}: the pad value {fill!r} would fill the padded positions of "
            f"this {dtype} field with {int(fill)}: pass the number itself, e.g. "
            f"pad={{{key}: 0}}."
        )
    if not _fits(fill, dtype):
        raise ValueError(
            f"collate: {where}: the pad value {_short(fill)} does not fit the field's dtype "
            f"{dtype}: pass a value that does, e.g. pad={{{key}: 0}}."
        )
    for i in empty_lists:
        arrays[i] = np.empty((0, *inner), dtype)
    lengths = [len(a) for a in arrays]
    _check_stacked_ndim(len(inner) + 2, path)
    out_t = _empty((len(arrays), max(lengths), *inner), t_dtype)
    out = to_numpy(out_t)
    for row, a, n in zip(out, arrays, lengths, strict=True):
        np.copyto(row[:n], a, casting="same_kind")
        row[n:] = fill
    lengths_t = _empty((len(arrays),), torch.int64)
    to_numpy(lengths_t)[:] = lengths
    return out_t, lengths_t


def _fits(value: Any, dtype: np.dtype) -> bool:
    """Whether the pad value is held exactly by ``dtype`` (floats and complex numbers: not
    overflowing to inf; an int beyond float's range fits none)."""
    if dtype.kind != "c" and isinstance(value, (complex, np.complexfloating)):
        return False
    if dtype.kind == "b":
        return bool(value == 0 or value == 1)
    if dtype.kind in "iu":
        if isinstance(value, (float, np.floating)):
            try:  # (exactly: a longdouble of 1e-400 is no integer, though float() is 0)
                if value != int(value):
                    return False
            except (OverflowError, ValueError):  # inf, nan
                return False
        info = np.iinfo(dtype)
        return bool(info.min <= int(value) <= info.max)
    try:
        number = complex(value)
    except OverflowError:  # (an int of 2**1024 or more)
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        held = np.asarray(number if dtype.kind == "c" else number.real).astype(dtype)
        # (finite as given: a longdouble of 1e400 is, though complex() makes it inf)
        given_finite = (
            bool(np.isfinite(value))
            if isinstance(value, np.generic)
            else (math.isfinite(number.real) and math.isfinite(number.imag))
        )
    return bool(np.isfinite(held) or not given_finite)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new batch tensor: pinned in the main process of a GPU machine; from the packed
    buffer under collate(packed=True)."""
    packing = ARENA.get()
    if packing is not None:
        return packing.empty(shape, dtype)
    pin = not _in_worker() and _backend.ENGINE.pinned_memory
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


# --------------------------------------------------------------------------- prefetcher


_B = TypeVar("_B")  # what a Prefetcher yields: a batch after to_device


class Prefetcher(Generic[_B]):
    """Yields the batches of ``iterable`` already on ``device``, moving batch i+1 on a
    side stream while the caller computes on batch i.

    On a GPU each batch goes through :func:`to_device` on a dedicated stream; before a
    batch is handed out the current stream waits for its copy (``wait_stream``) and its
    tensors are marked as used there (``record_stream``), so the caching allocator never
    reuses their memory too early. On the CPU each batch is converted as
    :func:`to_device` converts it (arrays become tensors sharing their memory, ``dtype``
    casts), with no side stream, so one training loop runs everywhere. Errors from the
    underlying iterator are raised in order, when the loop reaches them; breaking out of
    the loop early releases everything. ``dtype`` is :func:`to_device`'s: a single
    floating dtype casts the floating-point leaves only, a mapping casts the leaves it
    names.

    Typed as :func:`to_device` types one batch: batches of arrays or tensors come out as
    tensors, of dicts as dicts with the same keys, of lists as lists, of tuples as tuples;
    anything else, a DataLoader's batches among them (torch types them Any), as Any.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> batches = [{"x": np.full(2, i)} for i in range(3)]
        >>> [b["x"].tolist() for b in tb.Prefetcher(batches, "cpu")]
        [[0, 0], [1, 1], [2, 2]]
    """

    @overload
    def __init__(
        self: Prefetcher[torch.Tensor],
        iterable: Iterable[_ArrayT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[dict[_K, Any]],
        iterable: Iterable[dict[_K, _V]],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[list[Any]],
        iterable: Iterable[_ListT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[tuple[Any, ...]],
        iterable: Iterable[_TupleT],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    @overload
    def __init__(
        self: Prefetcher[Any],
        iterable: Iterable[_T],
        device: Device,
        *,
        depth: int = ...,
        dtype: DTypeSpec = ...,
        non_blocking: bool = ...,
    ) -> None: ...
    def __init__(
        self,
        iterable: Iterable[Any],
        device: Device,
        *,
        depth: int = 2,
        dtype: DTypeSpec = None,
        non_blocking: bool = True,
    ) -> None:
        # (each batch in flight holds its device memory: an unbounded depth would load the
        # whole iterable onto the device)
        depth = _backend.int_arg(
            depth,
            "Prefetcher: depth",
            1,
            64,
            "2 or 3 hide the copy time of a batch behind the compute of the one before.",
        )
        dtype_rule(dtype, "Prefetcher")  # refused here, not at the first batch
        if not isinstance(iterable, Iterable) and not hasattr(type(iterable), "__getitem__"):
            raise TypeError(
                f"Prefetcher wraps an iterable of batches (a DataLoader, a list, a "
                f"generator), got {_kind(iterable)}: pass the loader itself, e.g. "
                "Prefetcher(loader, 'cuda')."
            )
        self.iterable = iterable
        self.device = _backend.resolve_device(device, "Prefetcher")
        self.depth = depth
        self.dtype = dtype
        self.non_blocking = _backend.bool_arg(non_blocking, "Prefetcher: non_blocking")

    def __len__(self) -> int:
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"the wrapped {type(self.iterable).__name__} has no len(); iterate instead"
            ) from None

    def __iter__(self) -> Iterator[_B]:
        if self.device.type != "cuda":
            it = iter(self.iterable)
            try:
                for batch in it:
                    yield moved(batch, self.device, self.non_blocking, self.dtype, "Prefetcher")
            finally:  # an early break closes the source now, not when it is collected
                _close(it)
            return
        yield from self._cuda()

    def _cuda(self) -> Iterator[Any]:
        stream = torch.cuda.Stream(self.device)
        it = iter(self.iterable)
        queue: collections.deque[tuple[str, Any]] = collections.deque()
        exhausted = False

        def preload() -> None:
            nonlocal exhausted
            try:
                batch = next(it)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    on_device = moved(batch, self.device, True, self.dtype, "Prefetcher")
            except StopIteration:
                exhausted = True
                return
            except Exception as exc:
                # the source's error or a refused batch: raised when the loop gets there,
                # after the batches before it, as the CPU path raises it
                queue.append(("error", exc))
                exhausted = True
                return
            queue.append(("batch", on_device))

        try:
            while len(queue) < self.depth and not exhausted:
                preload()
            while queue:
                kind, item = queue.popleft()
                if kind == "error":
                    raise item
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for leaf in flatten(item)[0]:
                    if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
                        leaf.record_stream(current)
                if not exhausted:
                    preload()
                yield item
        finally:
            queue.clear()
            _close(it)


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if callable(close):
        close()


# --------------------------------------------------------------------------- images


#: images_to_tensor's mean and std: one number, or one per channel (numbers, an array or a
#: tensor).
PerChannel = float | Sequence[float] | np.ndarray | torch.Tensor | None


def images_to_tensor(
    images: Any,
    device: Device | None = None,
    *,
    dtype: _dtypes.DTypeLike = torch.float32,
    scale: float | None = None,
    mean: PerChannel = None,
    std: PerChannel = None,
    channels_first: bool = True,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Images (..., H, W, C), uint8 or any dtype with ``scale=``, to normalized floats on
    ``device``: ship narrow, cast there.

    The images cross the link as uint8 (a quarter of float32's bytes); on the device one
    kernel computes ``(x * scale - mean) / std`` and writes it directly in channels-first
    layout (..., C, H, W) when ``channels_first`` (torchvision's ``ToTensor`` + ``Normalize``).

    Args:
        images: a NumPy array, a tensor or another framework's array of shape
            (..., H, W, C): channels last, C is 1, 3 or 4. Grayscale images need their
            channel axis (``x[..., None]``: (N, H, W) -> (N, H, W, 1)). A 3-D array is one
            (H, W, C) image: an (N, H, W) array is refused when W is not 1, 3 or 4, and
            read as one image when it is. Likewise a channels-first (N, C, H, W) array is
            refused unless W is 1, 3 or 4, when it is read as channels-last: pass
            ``numpy.moveaxis(x, 1, -1)`` (a tensor: ``x.permute(0, 2, 3, 1)``) for such arrays.
        device: where the result goes (default: where the images are).
        dtype: the floating output dtype: torch, NumPy or a string (``"float16"``).
        scale: maps the pixel values to 0-1. uint8 images default to 1/255; any other
            integer or floating dtype must say it (``scale=1/65535`` for uint16,
            ``scale=1`` for floats already in 0-1).
        mean, std: a number or C numbers (a list, tuple, NumPy array or tensor), finite,
            on the 0-1 scale of ``x * scale``; 0 < std <= 1. A mean or std above 1 is
            refused: it looks like the 0-255 scale (divide it by 255).
        channels_first: write (..., C, H, W) instead of (..., H, W, C).
        non_blocking: an asynchronous host-to-device copy.

    Images that require grad keep their graph: they take torch's separate ops (the
    idiom's) instead of the one kernel, which autograd cannot record.

    Every argument is checked before anything is copied; a refusal is a TypeError (a
    wrong type) or ValueError (a wrong value) that names the fix.

    Example:
        >>> import numpy as np, tensorbridge as tb
        >>> x = np.full((2, 4, 4, 3), 255, np.uint8)
        >>> tb.images_to_tensor(x, mean=[0.5] * 3, std=[0.5] * 3).shape
        torch.Size([2, 3, 4, 4])
    """
    # torch, NumPy or string dtypes alike (None: the default, float32)
    dtype = torch.float32 if dtype is None else _dtypes.as_torch_dtype(dtype)
    if not dtype.is_floating_point or dtype.itemsize < 2:
        # (float8: torch's arithmetic refuses it, with a RuntimeError from deep inside)
        raise TypeError(
            f"images_to_tensor produces floats of 16 bits or more: pass e.g. "
            f"dtype=torch.float32 (or float16, bfloat16), not {dtype}"
        )
    if device is not None:
        device = _backend.resolve_device(device, "images_to_tensor")
    # another framework's array: a tensor over the same memory, where it is, to look at
    if isinstance(images, (np.ndarray, torch.Tensor)):
        src = images
    elif isinstance(images, (list, tuple, dict, np.generic)) or not _interop.exposes_array(images):
        raise _interop.no_protocol_error(images, "images_to_tensor")
    else:
        src = to_tensor(images)
    shape, pixels = tuple(src.shape), _pixel_dtype(src)
    if len(shape) < 3 or shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images_to_tensor expects channels-last images (..., H, W, C) with C 1, 3 or 4, "
            f"got shape {shape}: add the channel axis of grayscale images with x[..., None] "
            "((N, H, W) -> (N, H, W, 1)), and move the channels of (N, C, H, W) images last "
            "with x.permute(0, 2, 3, 1) (numpy.moveaxis(x, 1, -1))."
        )
    channels = shape[-1]
    if pixels == torch.bool or pixels.is_complex:
        raise TypeError(
            f"images_to_tensor takes images of real numbers, got {pixels}: convert them "
            "first, e.g. x.astype(numpy.uint8) for a 0/1 mask."
        )
    if scale is None:
        if pixels != torch.uint8:
            raise TypeError(
                f"images_to_tensor maps uint8 pixels (0-255) to 0-1 by default, but the "
                f"images are {pixels}: pass scale= to say how to reach 0-1 (scale=1/255 "
                "for 0-255 values of any dtype, 1/65535 for uint16, 1 for floats already "
                "in 0-1)."
            )
        scale = 1 / 255
    elif not _is_real(scale):  # (a 0-d array or tensor too, as for mean and std)
        raise TypeError(
            f"images_to_tensor: scale must be a number (an int or a float), got "
            f"{_kind(scale)} {_short(scale)}: pass e.g. scale=1/255."
        )
    elif not (math.isfinite(_float(scale)) and _float(scale) > 0):
        raise ValueError(
            f"images_to_tensor: scale must be a finite number above 0, got {_short(scale)}: "
            "pass what maps the pixels to 0-1, e.g. scale=1/255."
        )
    scale = _float(scale)  # (a Fraction or a NumPy number: a float for the coefficients)
    channels_first = _backend.bool_arg(channels_first, "images_to_tensor: channels_first")
    non_blocking = _backend.bool_arg(non_blocking, "images_to_tensor: non_blocking")
    m = _per_channel(mean, 0.0, "mean", channels)
    s = _per_channel(std, 1.0, "std", channels)
    if (s <= 0).any():
        raise ValueError(
            f"images_to_tensor: std must be above 0 (it divides), got std={std!r}: pass the "
            "per-channel standard deviations of the data, e.g. std=[0.229, 0.224, 0.225]."
        )
    if (m > 1).any():
        # (name only what is off the scale: a std already on 0-1 must stay as it is)
        which = "mean and std" if (s > 1).any() else "mean"
        how = (
            f"it looks like 0-255 scale: divide {which} by 255 (e.g. mean=[m / 255 for m in mean])"
            if (m <= 255).all()
            else f"divide {which} by the largest pixel value"
        )
        raise ValueError(
            f"images_to_tensor: mean={mean!r} is above 1, but mean and std apply to x * scale, "
            f"which is on a 0-1 scale: {how}."
        )
    if (s > 1).any():
        raise ValueError(
            f"images_to_tensor: std={std!r} is above 1, but mean and std apply to x * scale, "
            "which is on a 0-1 scale (where no standard deviation exceeds 0.5): it looks like "
            "0-255 scale: divide std by 255 (e.g. std=[s / 255 for s in std]); mean is on "
            "the 0-1 scale already."
        )
    if isinstance(images, torch.Tensor):
        # (memory the registration cache page-locked is its owner's pageable memory: waited)
        wait = non_blocking and _registry.CACHE.covers_tensor(images)
        x = images if device is None else images.to(device, non_blocking=non_blocking and not wait)
    else:
        if isinstance(src, np.ndarray) and (device is None or device.type == "cpu"):
            # x, on the host a tensor over the array, is only read into a new tensor: a
            # read-only array need not make torch warn (to_tensor handles other devices)
            src = readable(src)
        x = to_tensor(src, device, non_blocking=non_blocking)
    # float32 (or float64) coefficients: the kernel computes in that type and rounds once
    # into a float16 or bfloat16 out, as the idiom's .float()...then .half() does
    coef = torch.promote_types(dtype, torch.float32)
    if x.dtype not in _ADDCMUL_DTYPES:  # (uint16 and wider unsigned: few torch kernels)
        # (to the computing type, not the output's: 65535 is inf in float16 before scaling)
        x = x.to(coef)
    weight = torch.from_numpy(scale / s).to(dtype=coef, device=x.device)
    bias = torch.from_numpy(-m / s).to(dtype=coef, device=x.device)
    if x.requires_grad:  # autograd records no out= kernel: the idiom's ops, graph kept
        y = torch.addcmul(bias, x, weight).to(dtype)
        return y.movedim(-1, -3).contiguous() if channels_first else y.contiguous()
    if channels_first:
        out_shape = (*x.shape[:-3], channels, *x.shape[-3:-1])
        out = torch.empty(out_shape, dtype=dtype, device=x.device).movedim(-3, -1)
    else:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.addcmul(bias, x, weight, out=out)  # one kernel: cast, scale, shift, re-layout
    return out.movedim(-1, -3) if channels_first else out


_ADDCMUL_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)


def _pixel_dtype(src: np.ndarray | torch.Tensor) -> torch.dtype:
    if isinstance(src, torch.Tensor):
        return src.dtype
    t = _dtypes.maybe_torch_dtype(src.dtype if src.dtype.isnative else src.dtype.newbyteorder("="))
    if t is None:
        raise TypeError(
            f"images_to_tensor takes images of numbers, got dtype {src.dtype}: pass uint8 "
            "images (or another numeric dtype with scale=)."
        )
    return t


def _per_channel(value: Any, default: float, name: str, channels: int) -> np.ndarray:
    """mean or std as ``channels`` float64 numbers, checked: numbers, one or one per channel,
    finite."""
    accepted = f"a number or {channels} numbers (a list, tuple, NumPy array or tensor)"
    if value is None:
        arr = np.array([default])
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        arr = np.array([_float(value)])
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        if not _real_dtype(value):
            raise TypeError(
                f"images_to_tensor: {name} must be {accepted} of real numbers, got an array of "
                f"{value.dtype}: pass e.g. {name}=[0.5] * {channels}."
            )
        if value.ndim > 1:
            raise ValueError(
                f"images_to_tensor: {name} must be {accepted}, one per channel, got shape "
                f"{tuple(value.shape)}: pass a flat one, e.g. {name}.reshape(-1)."
            )
        if isinstance(value, torch.Tensor):
            arr = value.detach().to("cpu", torch.float64).numpy().reshape(-1)
        else:
            arr = value.astype(np.float64).reshape(-1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if not _is_real(item):
                raise TypeError(
                    f"images_to_tensor: {name} must be {accepted}, but it holds "
                    f"{_kind(item)} {item!r}: pass numbers, e.g. {name}=[0.5] * {channels}."
                )
        arr = np.array([_float(v) for v in value], dtype=np.float64)
    else:
        fix = f"list({name})" if isinstance(value, Iterator) else f"{name}=[0.5] * {channels}"
        raise TypeError(
            f"images_to_tensor: {name} must be {accepted}, got {_kind(value)}: pass e.g. {fix}."
        )
    if arr.size not in (1, channels):
        raise ValueError(
            f"images_to_tensor: {name} must be a number or {channels} numbers (one per "
            f"channel), got {arr.size} ({name}={value!r}): pass e.g. {name}=[0.5] * {channels}."
        )
    if not np.isfinite(arr).all():
        raise ValueError(
            f"images_to_tensor: {name} must be finite numbers, got {name}={_short(value)}: pass "
            f"the per-channel {name} of the data, e.g. {name}=[0.5] * {channels}."
        )
    return np.broadcast_to(arr, (channels,)).copy()


def _float(value: Any) -> float:
    """A real number as a float: inf where it is beyond float's range (10**400), which
    the finiteness checks then refuse, not an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _short(value: Any) -> str:
    """repr(value), at most 60 characters (an int of 400 digits); a tensor torch cannot
    print (bits8) by its dtype."""
    try:
        text = repr(value)
    except Exception:  # (torch's repr reads the values: not every dtype has a kernel)
        text = f"<a tensor of {getattr(value, 'dtype', '?')}>"
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_real(item: Any) -> bool:
    """A real number: a Python or NumPy int or float, or a 0-d array or tensor of one."""
    if isinstance(item, bool):
        return False
    if isinstance(item, numbers.Real):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 0:
        return _real_dtype(item)
    return False


def _real_dtype(a: np.ndarray | torch.Tensor) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "iuf"
    # (a tensor whose numbers can be read: not a meta one, nor bits8, float8, quantized)
    return (
        not (a.dtype.is_complex or a.dtype == torch.bool or a.is_quantized or a.is_meta)
        and a.dtype.itemsize >= 2
    ) or a.dtype in (torch.uint8, torch.int8)
