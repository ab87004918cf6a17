"""Nested batches: flatten to leaves once, rebuild the same structure from new leaves.

Containers are dicts (and other mappings), lists, tuples, namedtuples and dataclasses;
everything else is a leaf (arrays, tensors, numbers, strings, ``torch.Size``...). A walk
never rebuilds a container it only reads, so a container that validates its items
(``torch.Size`` takes only ints) is rebuilt only from the leaves it is given back.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import itertools
import reprlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

# The common leaves, checked by exact type first: the container checks cost far more.
# torch.Size is a tuple of ints but a leaf: shape metadata travels as it is.
_LEAF_TYPES = frozenset(
    {
        np.ndarray,
        torch.Tensor,
        torch.nn.Parameter,
        torch.Size,
        int,
        float,
        complex,
        str,
        bool,
        bytes,
        type(None),
    }
)

# A spec node: None for a leaf, else (kind, meta, children specs).
Spec = Any


def key_repr(key: Any) -> str:
    """A key as a message shows it: its repr, shortened, or its type where repr fails."""
    try:
        return reprlib.repr(key)
    except Exception:  # (a key whose __repr__ raises must not hide the message)
        return f"<{type(key).__name__}>"


#: A leaf's place in a batch, for messages: ("[", key or index) or (".", field name) steps.
Path = tuple[tuple[str, Any], ...]


def key_text(key: Any) -> str:
    """A key as a path shows it: a string in double quotes (``"tokens"``, a
    ``numpy.str_`` too), else its repr (an Enum's member is not the string it formats
    as). The string is read as str's own, not through a subclass's ``__str__``."""
    if isinstance(key, str) and not isinstance(key, enum.Enum):
        text = str.__str__(key)
        if '"' not in text and "\\" not in text:
            return f'"{text}"'
    return key_repr(key)


def path_text(path: Path) -> str:
    """``batch["a"][0].b``: where a leaf sits in the batch, for messages."""
    steps = [f"[{key_text(v)}]" if kind == "[" else f".{v}" for kind, v in path]
    if len(steps) > 12:  # a cycle or a deep nest: the start and the end say enough
        steps = [*steps[:6], f"...({len(steps) - 9} more)...", *steps[-3:]]
    return "batch" + "".join(steps)


def leaf_path(spec: Spec, index: int) -> str | None:
    """Where leaf ``index`` of a batch that :func:`flatten` gave ``spec`` sits
    (``batch["a"][1]``), or None for a batch that is itself the leaf. Walks the spec:
    for messages, not for the per-leaf path."""
    if spec is None:
        return None
    path: list[tuple[str, Any]] = []
    while spec is not None:
        kind, meta, children = spec
        if kind == "dict":
            steps = [("[", k) for k in meta]
        elif kind == "mapping":
            steps = [("[", k) for k in meta.keys()]
        elif kind == "namedtuple":
            steps = [(".", f) for f in meta._fields]
        elif kind == "dataclass":
            steps = [(".", n) for n in meta[1]]
        else:  # list, sequence
            steps = [("[", i) for i in range(len(children))]
        for step, child in zip(steps, children, strict=True):
            n = _count(child)
            if index < n:
                path.append(step)
                spec = child
                break
            index -= n
        else:
            raise IndexError("leaf_path: no such leaf")
    return path_text(tuple(path))


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


#: The deepest nesting a batch may have: far beyond any real batch, and shallow enough
#: that rebuilding it (unflatten, from however deep a call stack it runs) never meets
#: Python's recursion limit where flattening it did not.
MAX_DEPTH = 200


def flatten(obj: Any, fn: str | None = None) -> tuple[list[Any], list[Any], Spec]:
    """(leaves, keys, spec): the leaves in order, each leaf's key (the nearest dict key or
    dataclass field name, None at the top) and what :func:`unflatten` needs to rebuild.
    ``fn`` names the public function in the refusal of a batch nested too deeply (more
    than MAX_DEPTH + 1 containers, or containing itself)."""
    leaves: list[Any] = []
    keys: list[Any] = []
    try:
        spec = _flatten(obj, None, leaves, keys, 0)
    except RecursionError:
        raise _too_deep(fn) from None
    return leaves, keys, spec


def _too_deep(fn: str | None) -> ValueError:
    return ValueError(
        f"{fn + ': ' if fn else ''}the batch is nested too deeply or contains itself (a "
        "list holding itself, say): pass a structure of at most a few hundred levels, "
        "without cycles."
    )


def flatten_as(
    obj: Any, spec: Spec, what: str = "out", paths: list[str] | None = None
) -> list[Any]:
    """The leaves of ``obj`` in the order of another structure's ``spec``: dict entries by
    key (not by position), sequences by index, namedtuple and dataclass fields by name.
    None where a container is expected stands for None at every leaf below it. ``paths``,
    when given, gets each leaf's path (``out["a"][1]``) for messages."""
    leaves: list[Any] = []
    _flatten_as(obj, spec, what, leaves, paths)
    return leaves


def _keys_text(keys: Any) -> str:
    """Keys as a message shows them: ['a', 'b'] (sorted by their repr)."""
    return "[" + ", ".join(sorted(map(repr, keys))) + "]"


def _count(spec: Spec) -> int:
    return 1 if spec is None else sum(_count(c) for c in spec[2])


def _flatten_as(
    obj: Any, spec: Spec, path: str, leaves: list[Any], paths: list[str] | None
) -> None:
    if spec is None:
        leaves.append(obj)
        if paths is not None:
            paths.append(path)
        return
    if obj is None:
        leaves.extend([None] * _count(spec))
        if paths is not None:
            paths.extend([path] * _count(spec))
        return
    kind, meta, children = spec
    if kind in ("dict", "mapping"):
        keys = list(meta) if kind == "dict" else list(meta.keys())
        if not isinstance(obj, Mapping) or set(obj) != set(keys):
            got = _keys_text(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(
                f"{path} must hold the batch's keys {_keys_text(keys)}, got {got}: "
                "pass a structure of the same shape, with None where a new array is wanted."
            )
        for k, c in zip(keys, children, strict=True):
            _flatten_as(obj[k], c, f"{path}[{key_text(k)}]", leaves, paths)
        return
    if kind == "dataclass":
        names = meta[1]
        for n, c in zip(names, children, strict=True):
            if not hasattr(obj, n):
                raise ValueError(f"{path} has no field {n!r}: pass a structure like the batch.")
            _flatten_as(getattr(obj, n), c, f"{path}.{n}", leaves, paths)
        return
    if not isinstance(obj, (list, tuple)) or len(obj) != len(children):
        n = len(obj) if isinstance(obj, (list, tuple)) else type(obj).__name__
        raise ValueError(
            f"{path} must be a sequence of {len(children)} like the batch, got {n}: pass a "
            "structure of the same shape, with None where a new array is wanted."
        )
    for i, (v, c) in enumerate(zip(obj, children, strict=True)):
        _flatten_as(v, c, f"{path}[{i}]", leaves, paths)


def _flatten(obj: Any, key: Any, leaves: list[Any], keys: list[Any], depth: int) -> Spec:
    cls = type(obj)
    if cls in _LEAF_TYPES:
        leaves.append(obj)
        keys.append(key)
        return None
    if depth > MAX_DEPTH:
        raise RecursionError  # (flatten refuses it, naming the function)
    depth += 1
    if cls is list:
        if _LEAF_TYPES.issuperset(map(type, obj)):  # a list of leaves: no call per leaf
            leaves.extend(obj)
            keys.extend([key] * len(obj))
            return ("list", None, [None] * len(obj))
        return ("list", None, [_flatten(v, key, leaves, keys, depth) for v in obj])
    if cls is dict:
        if _LEAF_TYPES.issuperset(map(type, obj.values())):
            leaves.extend(obj.values())
            keys.extend(obj)
            return ("dict", list(obj), [None] * len(obj))
        return ("dict", list(obj), [_flatten(v, k, leaves, keys, depth) for k, v in obj.items()])
    if isinstance(obj, Mapping):
        return ("mapping", obj, [_flatten(v, k, leaves, keys, depth) for k, v in obj.items()])
    if is_namedtuple(obj):
        children = [
            _flatten(v, f, leaves, keys, depth) for f, v in zip(obj._fields, obj, strict=True)
        ]
        return ("namedtuple", cls, children)
    if isinstance(obj, (list, tuple)):
        return ("sequence", cls, [_flatten(v, key, leaves, keys, depth) for v in obj])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # every field, init=False ones too (set after construction, they hold data)
        names = [f.name for f in dataclasses.fields(obj) if hasattr(obj, f.name)]
        children = [_flatten(getattr(obj, n), n, leaves, keys, depth) for n in names]
        return ("dataclass", (obj, names), children)
    leaves.append(obj)
    keys.append(key)
    return None


def unflatten(spec: Spec, leaves: list[Any]) -> Any:
    """The structure ``spec`` describes, with ``leaves`` (as many as flatten gave) in it."""
    it = iter(leaves)
    result = _unflatten(spec, it)
    if next(it, _END) is not _END:
        raise ValueError("unflatten: more leaves than the structure holds")
    return result


_END = object()


def _unflatten(spec: Spec, it: Any) -> Any:
    if spec is None:
        try:
            return next(it)
        except StopIteration:
            raise ValueError("unflatten: fewer leaves than the structure holds") from None
    kind, meta, children = spec
    if any(children):  # (a leaf's spec is None, a container's a tuple)
        values = [_unflatten(c, it) for c in children]
    else:  # only leaves below: taken in one slice
        values = list(itertools.islice(it, len(children)))
        if len(values) != len(children):
            raise ValueError("unflatten: fewer leaves than the structure holds")
    if kind == "list":
        return values
    if kind == "dict":
        return dict(zip(meta, values, strict=True))
    if kind == "mapping":
        items = dict(zip(meta.keys(), values, strict=True))
        kept = _copy_with_items(meta, items)
        if kept is not None:
            return kept
        if isinstance(meta, collections.defaultdict):
            out: collections.defaultdict[Any, Any] = collections.defaultdict(meta.default_factory)
            out.update(items)
            return out
        try:
            rebuilt = type(meta)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
        # (a constructor that reads the dict as something else, a dataclass's first
        # field say, gives a mapping without these items: a plain dict then)
        return rebuilt if _holds(rebuilt, items) else items
    if kind == "namedtuple":
        try:
            return meta(*values)
        except TypeError:  # (a __new__ of its own, with other arguments)
            return meta._make(values)
    if kind == "sequence":
        try:
            return meta(values)
        except TypeError:  # a subclass whose constructor takes no iterable
            return list(values) if issubclass(meta, list) else tuple(values)
    obj, names = meta  # dataclass: a shallow copy keeps what the fields do not hold
    return rebuild_dataclass(obj, dict(zip(names, values, strict=True)))


#: What a dict subclass may not define for its copy to be its items and attributes:
#: its own construction, item setting, copying or attribute lookup.
_DICT_HOOKS = frozenset(
    {
        "__init__",
        "__new__",
        "__setitem__",
        "update",
        "__copy__",
        "__reduce__",
        "__reduce_ex__",
        "__setstate__",
        "__getattr__",
        "__getattribute__",
    }
)


def _copy_with_items(m: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    """A shallow copy of ``m`` holding ``items`` instead of its own, keeping what else it
    holds (a BatchEncoding's encodings, a subclass's attributes), as torch's
    default_convert keeps it; None where that is not known to be safe: then the mapping
    is rebuilt from its items. Only a ``UserDict`` subclass (whose copy has its own
    ``data`` dict) or a dict subclass that defines none of ``_DICT_HOOKS`` qualifies, and
    the items go in without the subclass's code (a Counter's update adds, an addict's
    merges into the caller's nested dicts, an AttrDict's copy skips its __init__)."""
    try:
        if isinstance(m, collections.UserDict):
            clone = copy.copy(m)
            data = getattr(clone, "data", None)
            if clone is m or type(data) is not dict or data is m.data or _mirrors(clone, m):
                return None
            dict.update(data, items)
            return clone
        if isinstance(m, dict) and not any(
            _DICT_HOOKS.intersection(vars(klass))
            for klass in type(m).__mro__
            if klass not in (dict, object)
        ):
            plain = copy.copy(m)  # (its own name: mypy typed the UserDict branch's)
            if plain is m or _mirrors(plain, m):
                return None
            dict.update(plain, items)
            return plain
    except Exception:  # (any copy that fails: rebuilt from the items instead)
        return None
    return None


def _holds(rebuilt: Any, items: dict[Any, Any]) -> bool:
    """Whether ``rebuilt`` is a mapping of exactly ``items`` (the same objects)."""
    try:
        return (
            isinstance(rebuilt, Mapping)
            and len(rebuilt) == len(items)
            and all(k in rebuilt and rebuilt[k] is v for k, v in items.items())
        )
    except Exception:  # (a lookup that fails: not one to trust)
        return False


def _mirrors(clone: Any, m: Mapping[Any, Any]) -> bool:
    """Whether the copy holds one of the mapping's items as an attribute too (a class
    that mirrors its items as attributes): that copy would keep the caller's values."""
    values = {id(v) for v in m.values()}
    state = getattr(clone, "__dict__", None)
    return isinstance(state, dict) and any(id(v) in values for k, v in state.items() if k != "data")


def hollow(spec: Spec) -> Spec:
    """``spec`` without the batch's own objects: the mappings and dataclasses it keeps (to
    rebuild their types) are replaced by copies whose items are None, so a spec that is
    stored (a PackedBatch's) holds no array of the batch alive, nor pickles one."""
    if spec is None:
        return None
    kind, meta, children = spec
    children = [hollow(c) for c in children]
    if kind == "mapping":
        meta = _unflatten((kind, meta, [None] * len(children)), iter([None] * len(children)))
    elif kind == "dataclass":
        obj, names = meta
        meta = (rebuild_dataclass(obj, dict.fromkeys(names)), names)
    return (kind, meta, children)


def rebuild_dataclass(obj: Any, fields: dict[str, Any]) -> Any:
    """A copy of dataclass ``obj`` with ``fields`` replaced, init=False fields included
    (``dataclasses.replace`` would reset those), frozen dataclasses too."""
    new = copy.copy(obj)
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new


def tree_map(fn: Callable[[Any, Any], Any], obj: Any, name: str | None = None) -> Any:
    """Applies fn(leaf, key) to every leaf, rebuilding the same container types (keys as
    :func:`flatten` gives them). ``name`` is the public function, for the refusal of a
    batch nested too deeply."""
    try:
        return _map(fn, obj, None, 0)
    except RecursionError:
        raise _too_deep(name) from None


def _map(fn: Callable[[Any, Any], Any], obj: Any, key: Any, depth: int) -> Any:
    # Lists and dicts of leaves (most batches) are mapped directly, without a spec: a
    # flatten and unflatten cost more than the per-leaf work of a small batch.
    cls = type(obj)
    if cls in _LEAF_TYPES:
        return fn(obj, key)
    if cls is list:
        if _LEAF_TYPES.issuperset(map(type, obj)):  # a list of leaves: one call per leaf
            return [fn(v, key) for v in obj]
        if depth >= MAX_DEPTH:
            raise RecursionError  # (as deep as flatten allows: tree_map refuses it)
        return [_map(fn, v, key, depth + 1) for v in obj]
    if cls is dict:
        if _LEAF_TYPES.issuperset(map(type, obj.values())):
            return {k: fn(v, k) for k, v in obj.items()}
        if depth >= MAX_DEPTH:
            raise RecursionError
        return {k: _map(fn, v, k, depth + 1) for k, v in obj.items()}
    leaves: list[Any] = []
    keys: list[Any] = []
    spec = _flatten(obj, key, leaves, keys, depth)
    return unflatten(spec, [fn(leaf, k) for leaf, k in zip(leaves, keys, strict=True)])
