"""The data-loader helpers: collate (against default_collate, in a DataLoader with workers),
Prefetcher, images_to_tensor, and the example training script that uses all three."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import pickle
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _batch, _loader

from conftest import Pair, no_warnings

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

# ------------------------------------------------------------------------- collate


def _collate_dataset():
    rng = np.random.default_rng(3)
    return [
        {
            "image": rng.integers(0, 256, (6, 5, 3)).astype(np.uint8),
            "label": i % 4,
            "score": float(i) / 3,
            "name": f"s{i}",
            "box": torch.tensor([i, i + 1.0]),
        }
        for i in range(24)
    ]


def test_collate_matches_default_collate(backend):
    data = _collate_dataset()
    ours = tb.collate(data[:8])
    ref = torch.utils.data.default_collate(data[:8])
    assert ours.keys() == ref.keys()
    for k in ("image", "label", "box"):
        assert torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype
    assert torch.allclose(ours["score"], ref["score"].to(ours["score"].dtype))
    assert ours["name"] == ref["name"]
    pairs = tb.collate([Pair(np.ones(2), 1), Pair(np.zeros(2), 2)])
    assert isinstance(pairs, Pair) and pairs.image.shape == (2, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_in_a_dataloader(workers):
    data = _collate_dataset()
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=8,
        num_workers=workers,
        collate_fn=tb.collate,
        pin_memory=False,
        timeout=120 if workers else 0,  # a stuck worker fails the test instead of hanging it
    )
    batches = list(loader)
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        expected = torch.utils.data.default_collate(data[8 * j : 8 * j + 8])
        assert torch.equal(batch["image"], expected["image"])
        assert torch.equal(batch["label"], expected["label"])


def _assert_collated_like(ours, ref):
    """ours equals default_collate's result: same containers, same tensors and dtypes."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == ref.dtype
        assert torch.equal(ours, ref)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for k in ref:
            _assert_collated_like(ours[k], ref[k])
    elif isinstance(ref, tuple) and hasattr(ref, "_fields"):
        assert type(ours) is type(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_collated_like(a, b)
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_collated_like(a, b)
    else:
        assert ours == ref


def test_collate_nested_structures_match_default_collate(backend):
    rng = np.random.default_rng(5)

    def sample(i):
        return {
            "a": [{"b": rng.standard_normal(3).astype(np.float32), "c": (i, i * 2)}],
            "pair": Pair(rng.integers(0, 9, (2, 2)), torch.tensor(float(i))),
            "flags": [True, i % 2 == 0],
            "deep": _nest(rng.integers(0, 9, 2), 50),
        }

    data = [sample(i) for i in range(4)]
    _assert_collated_like(tb.collate(data), torch.utils.data.default_collate(data))


def _nest(leaf, depth):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _cyclic_list():
    a = [np.zeros(2)]
    a.append(a)
    return a


def _cyclic_dict():
    d = {"x": np.zeros(2)}
    d["self"] = d
    return d


# (id, samples, exception, what the message must say: the field's path and the samples)
COLLATE_MISFITS = [
    (
        "ragged field",
        [{"tokens": np.zeros(11)}, {"tokens": np.zeros(11)}, {"tokens": np.zeros(3)}],
        ValueError,
        r'^collate: batch\["tokens"\]: sample 2 has shape \(3,\), sample 0 has \(11,\); '
        r"samples must have equal shapes",
    ),
    (
        "ragged deep field",
        [{"a": [{"b": np.zeros(2)}]}, {"a": [{"b": np.zeros((2, 1))}]}],
        ValueError,
        r'batch\["a"\]\[0\]\["b"\]: sample 1 has shape \(2, 1\), sample 0 has \(2,\)',
    ),
    (
        "ragged namedtuple field",
        [{"p": Pair(np.zeros(2), 1)}, {"p": Pair(np.zeros(4), 1)}],
        ValueError,
        r'batch\["p"\]\.image: sample 1 has shape \(4,\)',
    ),
    (
        "ragged top level",
        [np.zeros(3), np.zeros(4)],
        ValueError,
        r"^collate: batch: sample 1 has shape \(4,\), sample 0 has \(3,\)",
    ),
    (
        "missing and extra keys",
        [{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 1, "z": 3}],
        ValueError,
        r'^collate: batch: sample 2 lacks key "y" and has the extra key "z" \(compared '
        r"with sample 0\); every sample must have the same keys",
    ),
    (
        "missing nested key",
        [{"m": {"a": 1, "b": 2}}, {"m": {"a": 1}}],
        ValueError,
        r'batch\["m"\]: sample 1 lacks key "b" \(compared',
    ),
    (
        "extra keys only",
        [{"x": 1}, {"x": 1, 3: 3, "w": 0}],
        ValueError,
        r'sample 1 has the extra keys 3, "w" \(compared',
    ),
    (
        "lists of other lengths",
        [{"boxes": [1, 2, 3]}, {"boxes": [1, 2]}],
        ValueError,
        r'batch\["boxes"\]: sample 1 has 2 items, sample 0 has 3 items; sequences .* equal '
        r"lengths",
    ),
    (
        "array, then an int",
        [{"x": np.zeros(2)}, {"x": np.zeros(2)}, {"x": 5}],
        TypeError,
        r'batch\["x"\]: sample 2 is int, sample 0 is numpy.ndarray; every sample must hold '
        r"the same kind of value",
    ),
    (
        "int, then an array",
        [{"x": 5}, {"x": np.zeros(2)}],
        TypeError,
        r'batch\["x"\]: sample 1 is numpy.ndarray, sample 0 is int',
    ),
    (
        "tensor, then None",
        [[torch.zeros(1)], [None]],
        TypeError,
        r"batch\[0\]: sample 1 is NoneType, sample 0 is torch.Tensor",
    ),
    (
        "dict, then a list",
        [{"x": {"a": 1}}, {"x": [1]}],
        TypeError,
        r'batch\["x"\]: sample 1 is list, sample 0 is dict',
    ),
    (
        "namedtuple, then a tuple",
        [Pair(1, 2), (1, 2)],
        TypeError,
        r"batch: sample 1 is tuple, sample 0 is conftest.Pair",
    ),
    (
        "strings in an array",
        [{"s": np.array(["a"])}, {"s": np.array(["b"])}],
        TypeError,
        r'^collate: batch\["s"\]: numpy dtype <U1 .* encode or tokenize',
    ),
    (
        "cyclic list",
        [_cyclic_list(), _cyclic_list()],
        ValueError,
        r"batch\[1\]\[1\].*: the samples are nested more than 100 levels deep, or contain "
        r"themselves",
    ),
    (
        "cyclic dict",
        [_cyclic_dict(), _cyclic_dict()],
        ValueError,
        r'batch\["self"\]\["self"\].*more than 100 levels deep, or contain themselves',
    ),
    (
        "nested 150 levels",
        [_nest(np.zeros(1), 150), _nest(np.zeros(1), 150)],
        ValueError,
        r"more than 100 levels deep",
    ),
    ("no samples", [], ValueError, r"at least one sample.*pass a non-empty list"),
    ("a dict, not a list", {"x": np.zeros(2)}, TypeError, r"takes a list of samples, got dict"),
]


@pytest.mark.parametrize(
    ("samples", "exc", "pattern"),
    [c[1:] for c in COLLATE_MISFITS],
    ids=[c[0] for c in COLLATE_MISFITS],
)
def test_collate_misfits_name_the_field_and_the_sample(backend, samples, exc, pattern):
    with pytest.raises(exc, match=pattern):  # not a KeyError, zip's error or RecursionError
        tb.collate(samples)


def test_collate_checks_keys_of_every_mapping_kind():
    """Plain dicts, dict subclasses and mixes: the same keys are required of each; a
    defaultdict's missing key is refused, not made up by the lookup."""
    lacking = collections.defaultdict(int, {"x": 1})
    samples = [{"x": 1, "y": 2}, lacking]
    with pytest.raises(ValueError, match=r'sample 1 lacks key "y"'):
        tb.collate(samples)
    assert dict(lacking) == {"x": 1}  # not written to
    ordered = [collections.OrderedDict(x=1, y=2), collections.OrderedDict(y=2, z=3)]
    with pytest.raises(ValueError, match=r'sample 1 lacks key "x" and has the extra key "z"'):
        tb.collate(ordered)
    with pytest.raises(ValueError, match=r'sample 2 has the extra key "z"'):
        tb.collate([{"x": 1}, {"x": 2}, {"x": 3, "z": 4}])
    mixed = [{"x": np.ones(2), "y": 1}, collections.OrderedDict(y=2, x=np.zeros(2))]
    _assert_collated_like(tb.collate(mixed), torch.utils.data.default_collate(mixed))


# ------------------------------------------------------------------------- pad=, fields=


def _ragged_samples(rng, n, dtype, inner=()):
    """Token-like samples of random lengths (one empty): arrays, tensors, strided views."""
    out = []
    for i in range(n):
        length = 0 if i == 2 else int(rng.integers(1, 9))
        tokens = rng.integers(0, 2 if dtype == np.bool_ else 100, (length, *inner)).astype(dtype)
        value = [tokens, torch.from_numpy(tokens), np.repeat(tokens, 2, axis=0)[::2]][i % 3]
        out.append({"label": i, "tokens": value, "meta": {"id": f"s{i}", "w": i / 4}})
    return out


def _pad_reference(values, fill, dtype):
    """torch's own idiom for a padded batch: pad_sequence over each sample as a tensor."""
    seqs = [torch.as_tensor(np.asarray(v, dtype=dtype)) for v in values]
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=fill)


@pytest.mark.parametrize(
    ("dtype", "fill", "inner"),
    [
        (np.int64, -3, ()),
        (np.uint8, 7, ()),
        (np.float32, 0.5, (3,)),
        (np.float16, float("-inf"), ()),
        (np.bool_, True, (2, 2)),
    ],
)
def test_collate_pad_matches_pad_sequence(backend, dtype, fill, inner):
    samples = _ragged_samples(np.random.default_rng(11), 7, dtype, inner)
    batch = tb.collate(samples, pad={"tokens": fill})
    values = [s["tokens"] for s in samples]
    ref = _pad_reference(values, fill, dtype)
    assert batch["tokens"].dtype == ref.dtype and batch["tokens"].shape == ref.shape
    assert torch.equal(batch["tokens"], ref)
    lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
    assert batch["tokens_lengths"].dtype == torch.int64
    assert torch.equal(batch["tokens_lengths"], lengths)
    assert list(batch) == ["label", "tokens", "tokens_lengths", "meta"]  # next to the field
    # every other field as without pad=
    rest = [{k: v for k, v in s.items() if k != "tokens"} for s in samples]
    ours = {k: v for k, v in batch.items() if not k.startswith("tokens")}
    _assert_collated_like(ours, torch.utils.data.default_collate(rest))


def test_collate_pad_of_lists_and_lists_of_rows():
    samples = [{"t": [4, 5, 6]}, {"t": []}, {"t": [7]}]
    batch = tb.collate(samples, pad={"t": 0})
    ref = _pad_reference([s["t"] for s in samples[:1]], 0, np.int64)  # dtype of a list of ints
    assert batch["t"].dtype == ref.dtype
    assert batch["t"].tolist() == [[4, 5, 6], [0, 0, 0], [7, 0, 0]]
    assert batch["t_lengths"].tolist() == [3, 0, 1]
    rows = [{"t": [[1.5, 2.5]] * n} for n in (2, 0, 1)]
    got = tb.collate(rows, pad={"t": -1.0})
    expected = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r["t"], dtype=torch.float64).reshape(-1, 2) for r in rows],
        batch_first=True,
        padding_value=-1.0,
    )
    assert torch.equal(got["t"], expected) and got["t_lengths"].tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("fill", "dtype"),
    [
        (0, torch.int64),
        (-1.0, torch.float64),
        (np.float32(0), torch.float32),
        (False, torch.bool),
        (np.longdouble(1), torch.float64),  # (torch has no longdouble: NumPy's [] as before)
    ],
)
def test_collate_pad_of_only_empty_lists_takes_the_pad_values_dtype(fill, dtype):
    """A batch whose samples are all [] says nothing of its dtype (NumPy makes float64 of
    it): the pad value's, so a batch of empty token lists is int64 like the others."""
    batch = tb.collate([{"t": []}, {"t": []}, {"t": []}], pad={"t": fill})
    assert batch["t"].dtype == dtype and tuple(batch["t"].shape) == (3, 0)
    assert batch["t_lengths"].tolist() == [0, 0, 0]
    one = tb.collate([{"t": []}, {"t": [2]}], pad={"t": 0 if dtype == torch.bool else fill})
    assert one["t"].dtype == torch.int64  # (a sample with numbers says it)


def test_collate_fields_list_keeps_the_values():
    metas = [{"boxes": [(1, 2)] * i, "name": f"s{i}"} if i else None for i in range(4)]
    samples = [{"x": np.full(2, i), "meta": m} for i, m in enumerate(metas)]
    batch = tb.collate(samples, fields={"meta": list})
    assert type(batch["meta"]) is list
    assert all(a is b for a, b in zip(batch["meta"], metas, strict=True))  # the same objects
    assert torch.equal(batch["x"], torch.utils.data.default_collate([s["x"] for s in samples]))
    both = tb.collate(
        [{"t": [1], "m": "a"}, {"t": [2, 3], "m": 5}], pad={"t": 0}, fields={"m": list}
    )
    assert both["m"] == ["a", 5] and both["t"].tolist() == [[1, 0], [2, 3]]


@pytest.mark.parametrize("context", [None, "spawn"])
def test_collate_pad_in_a_dataloader(context):
    data = _ragged_samples(np.random.default_rng(12), 24, np.int64)
    collate_fn = functools.partial(tb.collate, pad={"tokens": -1}, fields={"meta": list})
    assert pickle.loads(pickle.dumps(collate_fn)).keywords == collate_fn.keywords
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=8,
        num_workers=2 if context is None else 1,
        multiprocessing_context=context,
        collate_fn=collate_fn,
        pin_memory=False,
        timeout=120,
    )
    batches = list(loader)
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        chunk = data[8 * j : 8 * j + 8]
        values = [s["tokens"] for s in chunk]
        assert torch.equal(batch["tokens"], _pad_reference(values, -1, np.int64))
        assert batch["tokens_lengths"].tolist() == [len(v) for v in values]
        assert batch["meta"] == [s["meta"] for s in chunk]


# (id, samples, keyword arguments, exception, what the message must say)
_TOKENS = [{"tokens": np.arange(3), "n": 1}, {"tokens": np.arange(2), "n": 2}]
PAD_MISFITS = [
    (
        "a bool pad value for numbers",  # (True would pad with 1)
        _TOKENS,
        {"pad": {"tokens": True}},
        ValueError,
        r"pad value True would fill the padded positions of this int64 field with 1: pass "
        r'the number itself, e\.g\. pad=\{"tokens": 0\}',
    ),
    ("pad for list samples", [[1], [2]], {"pad": {"a": 0}}, TypeError, r"dict samples.*list"),
    ("pad for an unknown key", _TOKENS, {"pad": {"tokns": 0}}, ValueError, r'"tokns".*"tokens"'),
    ("fields for an unknown key", _TOKENS, {"fields": {"m": list}}, ValueError, r'names "m"'),
    ("pad not a dict", _TOKENS, {"pad": 0}, TypeError, r'pad= must be a dict.*pad=\{"tokens": 0'),
    ("pad value a string", _TOKENS, {"pad": {"tokens": "0"}}, TypeError, r"must be a number"),
    (
        "fields other than list",
        _TOKENS,
        {"fields": {"n": tuple}},
        TypeError,
        r"only override is list",
    ),
    ("fields as a string", _TOKENS, {"fields": {"n": "list"}}, TypeError, r"only override is list"),
    (
        "a key in pad and fields",
        _TOKENS,
        {"pad": {"tokens": 0}, "fields": {"tokens": list}},
        ValueError,
        r"both pad= and fields=",
    ),
    (
        "lengths key taken",
        [{"tokens": np.arange(2), "tokens_lengths": 2}],
        {"pad": {"tokens": 0}},
        ValueError,
        r'"tokens_lengths", but the samples already have that key',
    ),
    (
        "pad value outside uint8",
        [{"t": np.arange(2, dtype=np.uint8)}, {"t": np.arange(1, dtype=np.uint8)}],
        {"pad": {"t": -1}},
        ValueError,
        r"pad value -1 does not fit the field's dtype uint8",
    ),
    (
        "fraction for integers",
        [{"t": [1, 2]}, {"t": [1]}],
        {"pad": {"t": 0.5}},
        ValueError,
        r"pad value 0.5 does not fit .* int64",
    ),
    (
        "overflowing float16",
        [{"t": np.ones(2, np.float16)}, {"t": np.ones(1, np.float16)}],
        {"pad": {"t": 1e6}},
        ValueError,
        r"does not fit the field's dtype float16",
    ),
    (
        "overflowing complex64",
        [{"t": np.ones(2, np.complex64)}, {"t": np.ones(1, np.complex64)}],
        {"pad": {"t": 1e39}},
        ValueError,
        r"pad value 1e\+39 does not fit the field's dtype complex64",
    ),
    (
        "a longdouble beyond float64's range",
        [{"t": np.ones(2)}, {"t": np.ones(1)}],
        {"pad": {"t": np.longdouble("1e400")}},
        ValueError,
        r"pad value np\.longdouble\('1e\+400'\) does not fit the field's dtype float64",
    ),
    (
        "a longdouble fraction for integers",
        [{"t": [1, 2]}, {"t": [1]}],
        {"pad": {"t": np.longdouble("1e-400")}},
        ValueError,
        r"does not fit the field's dtype int64",
    ),
    (
        "a timedelta",
        [{"t": [1, 2]}, {"t": [1]}],
        {"pad": {"t": np.timedelta64(3, "s")}},
        TypeError,
        r"the pad value fills the padded positions and must be a number, got numpy\.timedelta64",
    ),
    (
        "an int beyond float's range",
        [{"t": np.ones(2)}, {"t": np.ones(1)}],
        {"pad": {"t": 2**1024}},
        ValueError,
        r"pad value 179769313486231590772930519078902473361797697894230657273\.\.\. does not fit "
        r"the field's dtype float64",
    ),
    (
        "pad a scalar field",
        [{"t": 1}, {"t": 2}],
        {"pad": {"t": 0}},
        TypeError,
        r'batch\["t"\]: pad= pads arrays.*sample 0 is int',
    ),
    (
        "pad a 0-d array",
        [{"t": np.array(1)}, {"t": np.array(2)}],
        {"pad": {"t": 0}},
        ValueError,
        r"sample 0 is a scalar",
    ),
    (
        "pad strings",
        [{"t": ["a", "b"]}, {"t": ["c"]}],
        {"pad": {"t": 0}},
        TypeError,
        r"holds <U1 values; pad= pads numbers",
    ),
    (
        "pad rows of other widths",
        [{"t": np.zeros((2, 3))}, {"t": np.zeros((2, 4))}],
        {"pad": {"t": 0}},
        ValueError,
        r"sample 1 has shape \(2, 4\), sample 0 has \(2, 3\); pad= pads the first dimension "
        r"only",
    ),
    (
        "pad lists of ragged lists",
        [{"t": [[1], [2, 3]]}],
        {"pad": {"t": 0}},
        ValueError,
        r"sample 0 is a list of lists of different lengths",
    ),
]


@pytest.mark.parametrize(
    ("samples", "kwargs", "exc", "pattern"),
    [c[1:] for c in PAD_MISFITS],
    ids=[c[0] for c in PAD_MISFITS],
)
def test_collate_pad_and_fields_refusals(samples, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        tb.collate(samples, **kwargs)


def test_a_bool_field_pads_with_a_bool():
    masks = [{"m": np.array([True, False, True])}, {"m": np.array([False])}]
    got = tb.collate(masks, pad={"m": False})
    assert got["m"].dtype == torch.bool
    assert got["m"].tolist() == [[True, False, True], [False, False, False]]
    assert tb.collate(masks, pad={"m": True})["m"].tolist()[1] == [False, True, True]


def test_collate_called_without_samples_points_to_partial():
    # collate_fn=tb.collate(pad=...) is an easy slip for functools.partial(tb.collate, pad=...)
    with pytest.raises(
        TypeError,
        match=r"got no samples.*functools\.partial\(tb\.collate, "
        r"pad=\{\.\.\.\}\)",
    ):
        tb.collate(pad={"tokens": 0})
    with pytest.raises(TypeError, match=r"partial\(tb\.collate, fields=\{\.\.\.\}, packed=True\)"):
        tb.collate(fields={"meta": list}, packed=True)
    collate_fn = functools.partial(tb.collate, pad={"tokens": 0})  # the fix named works
    assert collate_fn(_TOKENS)["tokens_lengths"].tolist() == [3, 2]
    # (help() and an IDE show the default that makes the message possible as required)
    assert "samples: 'Sequence[Any]' = <required>" in str(inspect.signature(tb.collate))


def test_ragged_refusals_point_to_pad_and_fields():
    with pytest.raises(ValueError, match=r'pass pad=\{"tokens": 0\}.*"tokens_lengths"') as info:
        tb.collate(_TOKENS)
    assert 'fields={"tokens": list}' in str(info.value)
    fixed = tb.collate(_TOKENS, pad={"tokens": 0})  # the fix the message names works
    assert fixed["tokens"].tolist() == [[0, 1, 2], [0, 1, 0]]
    with pytest.raises(ValueError, match=r"pad or crop") as info:  # not paddable: other width
        tb.collate([{"t": np.zeros((2, 3))}, {"t": np.zeros((2, 4))}])
    assert "pad=" not in str(info.value)
    # images of another height: a resize or a crop first; pad= only where ragged by design
    images = [{"image": np.zeros((h, 8, 3), np.uint8)} for h in (8, 9)]
    with pytest.raises(
        ValueError,
        match=r'^collate: batch\["image"\]: sample 1 has shape \(9, 8, 3\), sample 0 has '
        r"\(8, 8, 3\); samples must have equal shapes: resize or crop them to one size in the "
        r'dataset, or, where the first dimension is ragged by design, pass pad=\{"image": 0\}',
    ):
        tb.collate(images)
    assert tb.collate(images, pad={"image": 0})["image"].shape == (2, 9, 8, 3)
    # lists of boxes (lists of 4 numbers), 1 and 2 per sample: pad= takes them too
    boxes = [{"boxes": [[1, 2, 3, 4]] * n} for n in (1, 2)]
    with pytest.raises(ValueError, match=r'pass pad=\{"boxes": 0\}.*"boxes_lengths"'):
        tb.collate(boxes)
    fixed = tb.collate(boxes, pad={"boxes": 0})
    assert fixed["boxes"].tolist() == [[[1, 2, 3, 4], [0, 0, 0, 0]], [[1, 2, 3, 4]] * 2]
    for unpaddable in (
        [{"b": [[1, 2, 3, 4]] * 2}, {"b": [[1, 2]]}],  # other widths
        [{"b": [[1], [2, 3]]}, {"b": [[1]]}],  # nested unevenly
        [{"b": ["a", "b"]}, {"b": ["c"]}],  # strings
    ):
        with pytest.raises(ValueError, match=r"pad or crop") as info:
            tb.collate(unpaddable)
        assert "pad=" not in str(info.value)
        with pytest.raises((TypeError, ValueError)):  # (and pad= refuses them indeed)
            tb.collate(unpaddable, pad={"b": 0})


# ------------------------------------------------------------------------- prefetcher


def test_prefetcher_cpu_pass_through_and_len(backend):
    batches = [{"x": np.full((2, 2), i), "i": i} for i in range(5)]
    pf = tb.Prefetcher(batches, "cpu", dtype={"x": torch.float64})
    assert len(pf) == 5
    got = list(pf)
    assert [b["i"] for b in got] == list(range(5))
    assert all(b["x"].dtype == torch.float64 and float(b["x"][0, 0]) == b["i"] for b in got)
    assert len(list(pf)) == 5  # iterating again works on a re-iterable input


def test_prefetcher_raises_errors_in_order():
    def gen():
        yield {"x": np.zeros(1)}
        yield {"x": np.ones(1)}
        raise RuntimeError("loader failed")

    seen = []
    with pytest.raises(RuntimeError, match="loader failed"):
        for b in tb.Prefetcher(gen(), "cpu"):
            seen.append(float(b["x"][0]))
    assert seen == [0.0, 1.0]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetcher_stream_path_yields_the_batches_before_a_refused_one(monkeypatch, depth):
    """The GPU path (a side stream, batches moved ahead) run here with torch's stream calls
    faked and its batches moved to the CPU: a batch it refuses (strings) is raised after
    the batches before it, as on the CPU path, and none of them is lost; the refusal
    names the Prefetcher, not the to_device inside it."""

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    real = _loader.moved
    monkeypatch.setattr(_loader, "moved", lambda b, device, *args: real(b, "cpu", *args))
    batches = [{"x": np.full(2, 0)}, {"x": np.full(2, 1)}, {"x": np.array(["bad"])}, {"x": 3}]
    for path in ("cpu", "stream"):
        pf = tb.Prefetcher(batches, "cpu", depth=depth)
        if path == "stream":
            pf.device = torch.device("cuda", 0)  # (what Prefetcher(batches, "cuda") holds)
        seen = []
        with pytest.raises(TypeError, match=r'^Prefetcher: batch\["x"\]: (?!.*to_device)'):
            for b in pf:
                seen.append(int(b["x"][0]))
        assert seen == [0, 1], path


def test_prefetcher_refusals_name_the_prefetcher():
    """What the user gave a batch to is the Prefetcher: its refusals say so (the batch
    nested too deeply, a freed storage, a leaf on the packed path), not to_device."""
    deep: list = [np.ones(2)]
    for _ in range(300):
        deep = [deep]
    freed = torch.ones(4)
    freed.untyped_storage().resize_(0)
    cases = [
        ([deep], "cpu", {}, r"^Prefetcher: the batch is nested too deeply"),
        (
            [{"t": freed}],
            "cpu",
            {"dtype": torch.float64},
            r'^Prefetcher: batch\["t"\]: (?!.*to_device).*freed',
        ),
        ([{"s": np.array(["x"])}], "cpu", {}, r'^Prefetcher: batch\["s"\]: (?!.*to_device)'),
    ]
    for batches, device, kw, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            list(tb.Prefetcher(batches, device, **kw))
    # the packed path (the one a GPU takes), over a simulated link
    C = _backend.ENGINE.C
    if C is not None:
        link = _batch.LinkSender(C.LinkSimulator(25.0, 0.0))
        for batch, message in (
            ({"t": freed, "a": np.ones(3)}, r'^Prefetcher: batch\["t"\]: (?!.*to_device).*freed'),
            (
                {"s": np.array(["x"]), "a": np.ones(3)},
                r'^Prefetcher: batch\["s"\]: (?!.*to_device)',
            ),
        ):
            with pytest.raises((TypeError, ValueError), match=message):
                _batch.send_batch(batch, torch.device("cpu"), link, None, False, "Prefetcher")


def test_prefetcher_early_break_closes_the_source():
    closed = []

    def gen():
        try:
            for i in range(100):
                yield {"x": np.full(1, i)}
        finally:
            closed.append(True)

    it = iter(tb.Prefetcher(gen(), "cpu"))
    next(it)
    it.close()
    assert closed == [True]


def test_prefetcher_validates_arguments():
    with pytest.raises(ValueError, match="depth"):
        tb.Prefetcher([], "cpu", depth=0)
    with pytest.raises(TypeError, match="no len"):
        len(tb.Prefetcher(iter([]), "cpu"))
    for not_batches in (5, None, object()):
        with pytest.raises(TypeError, match=r"Prefetcher wraps an iterable.*Prefetcher\(loader"):
            tb.Prefetcher(not_batches, "cpu")


@pytest.mark.parametrize("how", ["plain", "packed", "padded"])
def test_collate_refuses_tensors_that_require_grad_instead_of_dropping_the_graph(how):
    x = torch.ones(3, requires_grad=True)
    samples = [{"id": 0, "x": x}, {"id": 1, "x": x[:2] if how == "padded" else x * 2}]
    kwargs = {"packed": {"packed": True}, "padded": {"pad": {"x": 0}}}.get(how, {})
    with pytest.raises(ValueError, match=r'^collate: batch\["x"\]: .*requires grad.*\.detach\(\)'):
        tb.collate(samples, **kwargs)
    detached = [{k: v.detach() if k == "x" else v for k, v in s.items()} for s in samples]
    got = tb.collate(detached, **kwargs)
    got = got.unpack() if how == "packed" else got
    if how == "padded":  # (the second sample padded with 0 to the first's length)
        expected = torch.stack([x.detach(), torch.cat([x.detach()[:2], torch.zeros(1)])])
        assert got["x_lengths"].tolist() == [3, 2]
    else:
        expected = torch.stack([x.detach(), x.detach() * 2])
    assert torch.equal(got["x"], expected) and not got["x"].requires_grad


# ------------------------------------------------------------------------- images


@pytest.mark.parametrize("channels_first", [True, False])
def test_images_to_tensor_matches_torchvision_style(channels_first):
    x = np.random.default_rng(4).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    got = tb.images_to_tensor(x, mean=mean, std=std, channels_first=channels_first)
    ref = (torch.from_numpy(x).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / (
        torch.tensor(std, dtype=torch.float64)
    )
    ref = ref.permute(0, 3, 1, 2) if channels_first else ref
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_images_to_tensor_reads_read_only_images_without_a_warning():
    """Images in read-only memory (decoded into bytes, or Arrow's buffers) are only read
    into a new tensor: no warning from torch, the same values."""
    x = np.random.default_rng(5).integers(0, 256, (2, 6, 4, 3), dtype=np.uint8)
    ro = np.frombuffer(x.tobytes(), np.uint8).reshape(x.shape)
    with no_warnings():
        got = tb.images_to_tensor(ro, mean=0.5, std=0.25)
        on_cpu = tb.images_to_tensor(ro, "cpu", channels_first=False)
    assert torch.equal(got, tb.images_to_tensor(x, mean=0.5, std=0.25))
    assert torch.equal(on_cpu, tb.images_to_tensor(x, "cpu", channels_first=False))


def _torch_idiom(x, mean, std, scale=1 / 255):
    """torch's own normalization of channels-last images, in float32, channels first."""
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32))
    s = torch.as_tensor(np.asarray(std, dtype=np.float32))
    return torch.from_numpy(x).float().mul(scale).sub(m).div(s).movedim(-1, -3)


# (mean, std) in every accepted form: numbers, lists, tuples, NumPy arrays, tensors, None
_NORMALIZATIONS = {
    "lists": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "tuples": ((0.5, 0.25, 0.75), (0.2, 0.3, 0.4)),
    "numpy": (np.array([0.4, 0.5, 0.6], np.float32), np.array([0.3, 0.3, 0.2])),
    "tensors": (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)),
    "numbers": (0.5, 0.25),
    "numpy scalars": (np.float32(0.5), np.float64(0.2)),
    "ints": (0, 1),
    "one-element": ([0.5], [0.5]),
    "none": (None, None),
}


@pytest.mark.parametrize("norm", list(_NORMALIZATIONS))
@pytest.mark.parametrize(
    ("dtype", "atol"),
    [
        (torch.float32, 1e-5),
        ("float16", 1e-2),
        (np.float16, 1e-2),
        (torch.bfloat16, 6e-2),
        ("float64", 1e-5),
    ],
    ids=["torch.float32", "str-float16", "numpy.float16", "torch.bfloat16", "str-float64"],
)
def test_images_to_tensor_matches_the_torch_idiom(norm, dtype, atol):
    x = np.random.default_rng(6).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    mean, std = _NORMALIZATIONS[norm]
    got = tb.images_to_tensor(x, mean=mean, std=std, dtype=dtype)
    ref = _torch_idiom(x, 0.0 if mean is None else mean, 1.0 if std is None else std)
    expected_dtype = {"float16": torch.float16, np.float16: torch.float16, "float64": torch.float64}
    assert got.dtype == expected_dtype.get(dtype, dtype) and got.shape == ref.shape
    assert torch.allclose(got.float(), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_first", [True, False])
def test_images_to_tensor_rounds_narrow_floats_once(dtype, channels_first):
    """float16 and bfloat16 results are the float32 result rounded once, as the idiom's
    .float()... then .to(dtype) gives, not computed in the narrow type."""
    x = np.random.default_rng(12).integers(0, 256, (4, 17, 13, 3), dtype=np.uint8)
    kw = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    got = tb.images_to_tensor(x, dtype=dtype, channels_first=channels_first, **kw)
    wide = tb.images_to_tensor(x, channels_first=channels_first, **kw)
    assert got.dtype == dtype and torch.equal(got, wide.to(dtype))


@pytest.mark.parametrize("channels_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_images_to_tensor_keeps_the_graph_of_images_that_require_grad(channels_first, dtype):
    """As the idiom does: the result requires grad, and gradients reach the images."""
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    kw = {"scale": 1, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.5], "dtype": dtype}
    got = tb.images_to_tensor(x, channels_first=channels_first, **kw)
    plain = tb.images_to_tensor(x.detach(), channels_first=channels_first, **kw)
    assert got.requires_grad and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.detach(), plain)
    got.float().sum().backward()
    expected = torch.tensor([1 / 0.2, 1 / 0.25, 1 / 0.5], dtype=torch.float64).expand(x.shape)
    assert torch.allclose(x.grad, expected, rtol=1e-3)


@pytest.mark.parametrize("shape", [(7, 5, 1), (2, 7, 5, 4), (2, 2, 3, 4, 3), (0, 3, 3, 3)])
def test_images_to_tensor_channels_and_leading_dims(shape):
    x = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    c = shape[-1]
    mean, std = list(np.linspace(0.2, 0.6, c)), list(np.linspace(0.1, 0.3, c))
    got = tb.images_to_tensor(x, mean=mean, std=std)
    assert torch.allclose(got, _torch_idiom(x, mean, std), atol=1e-5)
    from_tensor = tb.images_to_tensor(torch.from_numpy(x), mean=mean, std=std)
    assert torch.equal(from_tensor, got)


@pytest.mark.parametrize(
    ("images", "scale"),
    [
        (np.random.default_rng(8).integers(0, 65536, (2, 4, 4, 3)).astype(np.uint16), 1 / 65535),
        (np.random.default_rng(9).random((2, 4, 4, 3), dtype=np.float32), 1),
        (np.random.default_rng(10).integers(0, 256, (2, 4, 4, 3)).astype(">f4"), 1 / 255),
        (np.random.default_rng(11).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), 1 / 200),
    ],
    ids=["uint16", "float32-0-1", "big-endian-float32", "uint8-other-scale"],
)
def test_images_to_tensor_other_dtypes_with_scale(images, scale):
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    got = tb.images_to_tensor(images, mean=mean, std=std, scale=scale)
    native = images.astype(images.dtype.newbyteorder("="))
    ref = _torch_idiom(native.astype(np.float64), mean, std, scale)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("pixels", "scale"), [(np.uint16, 1 / 65535), (np.uint32, 1 / 200000), (np.int32, 1 / 70000)]
)
def test_wide_pixels_into_narrow_floats_round_once_as_the_idiom(pixels, scale, out_dtype):
    """16-bit and wider pixels into float16 or bfloat16: scaled in float32 and rounded
    once, the bits of the idiom's ``(x.float() * scale).to(dtype)``; cast to the output
    dtype first, 65535 was inf in float16 before any scaling."""
    top = min(np.iinfo(pixels).max, int(1 / scale))
    values = np.random.default_rng(12).integers(0, top + 1, 4095, dtype=np.int64)
    x = np.concatenate([values, [0, top, top - 1]]).astype(pixels).reshape(-1, 1, 2, 3)
    got = tb.images_to_tensor(x, dtype=out_dtype, scale=scale)
    idiom = (torch.from_numpy(x.astype(np.int64)).float() * scale).to(out_dtype)
    assert torch.equal(got, idiom.permute(0, 3, 1, 2))
    assert torch.isfinite(got).all()


def test_images_to_tensor_takes_any_real_number_as_scale_mean_and_std():
    """A Fraction, a NumPy number or an int is a number like a float (scale=Fraction(1,
    255) made an object array of the coefficients)."""
    x = np.random.default_rng(13).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    want = tb.images_to_tensor(x, scale=1 / 255, mean=0.5, std=0.25)
    for scale, mean, std in [
        (Fraction(1, 255), Fraction(1, 2), Fraction(1, 4)),
        (np.float32(1 / 255), np.float16(0.5), [np.float64(0.25)] * 3),
        (np.array(1 / 255), torch.tensor(0.5), np.array(0.25)),  # (0-d arrays and tensors)
        (torch.tensor(1 / 255, dtype=torch.float64), 0.5, 0.25),
    ]:
        got = tb.images_to_tensor(x, scale=scale, mean=mean, std=std)
        assert torch.allclose(got, want, atol=1e-6)
    one = tb.images_to_tensor(x, scale=1, mean=0.5, std=0.25)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no comparison kernels)
        got = tb.images_to_tensor(x, scale=torch.tensor(1, dtype=dtype), mean=0.5, std=0.25)
        assert torch.equal(got, one), dtype
    for bad in (
        torch.tensor(1.0, device="meta"),
        torch.tensor(1, dtype=torch.uint8).view(torch.bits8),
    ):
        with pytest.raises(TypeError, match=r"^images_to_tensor: scale must be a number"):
            tb.images_to_tensor(x, scale=bad)


_X = np.zeros((2, 4, 4, 3), np.uint8)

# (id, call, exception, what the message must say)
IMAGE_REFUSALS = [
    (
        "mean of 2 for 3 channels",
        lambda: tb.images_to_tensor(_X, mean=[0.5, 0.5]),
        ValueError,
        r"one per channel.*mean=\[0.5\] \* 3",
    ),
    (
        "integer dtype",
        lambda: tb.images_to_tensor(_X, dtype=torch.int32),
        TypeError,
        r"floats.*dtype=torch.float32",
    ),
    ("integer dtype string", lambda: tb.images_to_tensor(_X, dtype="int32"), TypeError, r"floats"),
    (
        "2-d",
        lambda: tb.images_to_tensor(np.zeros((4, 4), np.uint8)),
        ValueError,
        r"\(\.\.\., H, W, C\).*x\[\.\.\., None\]",
    ),
    (
        "grayscale (N, H, W)",
        lambda: tb.images_to_tensor(np.zeros((2, 8, 8), np.uint8)),
        ValueError,
        r"C 1, 3 or 4, got shape \(2, 8, 8\): add the channel axis .* x\[\.\.\., None\]",
    ),
    (
        "2 channels",
        lambda: tb.images_to_tensor(np.zeros((2, 8, 8, 2), np.uint8)),
        ValueError,
        r"C 1, 3 or 4",
    ),
    (
        "channels first",
        lambda: tb.images_to_tensor(np.zeros((2, 3, 8, 8), np.uint8)),
        ValueError,
        r"x.permute\(0, 2, 3, 1\)",
    ),
    (
        "float images, no scale",
        lambda: tb.images_to_tensor(_X.astype(np.float32)),
        TypeError,
        r"uint8 pixels .* images are torch.float32: pass scale=",
    ),
    (
        "int16 tensor, no scale",
        lambda: tb.images_to_tensor(torch.zeros(1, 2, 2, 3, dtype=torch.int16)),
        TypeError,
        r"pass scale=",
    ),
    (
        "bool images",
        lambda: tb.images_to_tensor(_X.astype(bool), scale=1),
        TypeError,
        r"real numbers, got torch.bool",
    ),
    (
        "string images",
        lambda: tb.images_to_tensor(np.full((1, 2, 2, 3), "a")),
        TypeError,
        r"images of numbers, got dtype <U1",
    ),
    (
        "scale a string",
        lambda: tb.images_to_tensor(_X, scale="1"),
        TypeError,
        r"scale must be a number \(an int or a float\), got str '1'",
    ),
    (
        "scale a list",
        lambda: tb.images_to_tensor(_X, scale=[1 / 255]),
        TypeError,
        r"scale must be a number.*got list",
    ),
    (
        "scale 0",
        lambda: tb.images_to_tensor(_X, scale=0),
        ValueError,
        r"scale must be a finite number above 0",
    ),
    (
        "scale nan",
        lambda: tb.images_to_tensor(_X, scale=float("nan")),
        ValueError,
        r"finite number above 0",
    ),
    (
        "mean a generator",
        lambda: tb.images_to_tensor(_X, mean=(m for m in [0.5] * 3)),
        TypeError,
        r"mean must be a number or 3 numbers \(a list, tuple, NumPy array or tensor\), "
        r"got generator: pass e.g. list\(mean\)",
    ),
    (
        "mean a string",
        lambda: tb.images_to_tensor(_X, mean="0.5"),
        TypeError,
        r"a list, tuple, NumPy array or tensor\), got str",
    ),
    ("mean a dict", lambda: tb.images_to_tensor(_X, mean={"r": 0.5}), TypeError, r"got dict"),
    (
        "mean holding a string",
        lambda: tb.images_to_tensor(_X, mean=[0.5, "0.5", 0.5]),
        TypeError,
        r"holds str '0.5'",
    ),
    (
        "mean holding a bool",
        lambda: tb.images_to_tensor(_X, mean=[0.5, True, 0.5]),
        TypeError,
        r"holds bool",
    ),
    (
        "mean complex",
        lambda: tb.images_to_tensor(_X, mean=np.full(3, 0.5j)),
        TypeError,
        r"real numbers, got an array of complex128",
    ),
    (
        "mean 2-d",
        lambda: tb.images_to_tensor(_X, mean=np.full((1, 3), 0.5)),
        ValueError,
        r"got shape \(1, 3\)",
    ),
    (
        "mean on 0-255",
        lambda: tb.images_to_tensor(_X, mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4]),
        ValueError,
        r"is above 1.*looks like 0-255 scale: divide mean and std by 255",
    ),
    (
        "one mean above 1",
        lambda: tb.images_to_tensor(_X, mean=[0.5, 1.5, 0.5]),
        ValueError,
        r"looks like 0-255 scale: divide mean by 255",  # (std, the default 1, is fine)
    ),
    (
        "mean inf",
        lambda: tb.images_to_tensor(_X, mean=float("inf")),
        ValueError,
        r"mean must be finite",
    ),
    (
        "std nan",
        lambda: tb.images_to_tensor(_X, std=float("nan")),
        ValueError,
        r"std must be finite numbers, got std=nan",
    ),
    (
        "std nan in a list",
        lambda: tb.images_to_tensor(_X, std=[0.2, np.nan, 0.2]),
        ValueError,
        r"std must be finite",
    ),
    (
        "std on 0-255",
        lambda: tb.images_to_tensor(_X, mean=[0.485, 0.456, 0.406], std=[58.4, 57.1, 57.4]),
        ValueError,
        r"std=\[58.4, 57.1, 57.4\] is above 1.*looks like 0-255 scale: divide std by 255 .*mean "
        r"is on the 0-1 scale already",
    ),
    ("std 0", lambda: tb.images_to_tensor(_X, std=0), ValueError, r"std must be above 0"),
    (
        "scale beyond float",
        lambda: tb.images_to_tensor(_X, scale=10**400),
        ValueError,
        r"scale must be a finite number above 0, got 10000000000000000000000000000000000000000"
        r"0000000000000000\.\.\.: pass",
    ),
    (
        "mean beyond float in a list",
        lambda: tb.images_to_tensor(_X, mean=[0.5, -(10**400), 0.5]),
        ValueError,
        r"mean must be finite numbers, got mean=\[0\.5, -10000",
    ),
    (
        "nested lists",
        lambda: tb.images_to_tensor([[[[1, 2, 3]]]]),
        TypeError,
        r"^images_to_tensor expects .*got list: make an array of the pixels first.*asarray\(x\)",
    ),
    (
        "std negative",
        lambda: tb.images_to_tensor(_X, std=[0.2, -0.1, 0.3]),
        ValueError,
        r"std must be above 0",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"), [c[1:] for c in IMAGE_REFUSALS], ids=[c[0] for c in IMAGE_REFUSALS]
)
def test_images_to_tensor_refusals(monkeypatch, call, exc, pattern):
    from tensorbridge import _loader

    def copied(*args, **kwargs):
        raise AssertionError("the images were copied before the refusal")

    monkeypatch.setattr(_loader, "to_tensor", copied)  # every check comes first
    with pytest.raises(exc, match=pattern):
        call()


# ------------------------------------------------------------------------- the example


def test_example_trains_and_the_loss_falls():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_synthetic.py"
    spec = importlib.util.spec_from_file_location("train_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.train("cpu", steps=12, batch_size=16, workers=2, size=16, log=lambda s: None)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns the brightest channel


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_example_asked_for_cuda_without_it_says_why(monkeypatch):
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_synthetic.py"
    proc = subprocess.run(
        [sys.executable, str(path), "--device", "cuda", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--device cuda: torch sees no CUDA device: {tb.info()['cuda_reason']}" in proc.stderr


@pytest.mark.parametrize(
    ("a", "b"),
    [(None, np.ones(2)), ("a", 1), (None, 2.5), ("t", torch.ones(2)), (None, {"k": 1})],
    ids=["none-array", "str-int", "none-float", "str-tensor", "none-dict"],
)
def test_collate_refuses_a_mixed_field_whichever_sample_comes_first(a, b):
    for first, second in ((a, b), (b, a)):
        with pytest.raises(TypeError, match=r'batch\["x"\]: sample 1 is .*, sample 0 is'):
            tb.collate([{"x": first}, {"x": second}])


def test_collate_keeps_strings_and_none_as_a_list_in_any_order():
    for values in (["a", None], [None, "a"], [None, None]):
        assert tb.collate([{"x": v} for v in values]) == {"x": values}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [">U2", ">M8[s]", "<U2"])
def test_collate_names_a_dtype_torch_lacks_as_the_samples_have_it(packed, dtype):
    a = np.zeros(2, dtype)
    name = str(np.dtype(dtype))
    with pytest.raises(
        TypeError, match=rf'batch\["s"\]: numpy dtype {re.escape(name)} has no torch'
    ):
        tb.collate([{"s": a}, {"s": a}], packed=packed)


@pytest.mark.parametrize("how", ["plain", "packed", "padded"])
@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: torch.ones(2).to_sparse(), r"dense \(strided\) tensor.*x\.to_dense\(\)"),
        (lambda: torch.empty(2, device="meta"), r"cannot convert a meta tensor"),
    ],
    ids=["sparse", "meta"],
)
def test_collate_names_the_field_of_a_tensor_it_cannot_read(how, make, says):
    samples = [{"id": 1, "x": make()}, {"id": 2, "x": make()}]
    kwargs = {"packed": {"packed": True}, "padded": {"pad": {"x": 0}}}.get(how, {})
    with pytest.raises(TypeError, match=rf'^collate: batch\["x"\]: .*{says}'):
        tb.collate(samples, **kwargs)


def _numpy_max_dims() -> int:
    """32 in NumPy 1, 64 in NumPy 2."""
    try:
        np.empty((0,) * 64)
    except ValueError:
        return 32
    return 64


@pytest.mark.parametrize("how", ["stack", "packed", "pad"])
def test_collate_refuses_samples_that_stack_beyond_numpys_dimensions(how):
    n = _numpy_max_dims()
    rng = np.random.default_rng(n)
    kwargs = {"pad": {"x": 0}} if how == "pad" else {"packed": how == "packed"}
    rows = [2, 2] if how != "pad" else [2, 1]
    # one dimension fewer stacks, as default_collate does
    fits = [{"x": rng.standard_normal((r,) + (1,) * (n - 3) + (2,))} for r in rows]
    got = tb.collate(fits, **kwargs)
    got = got.unpack() if how == "packed" else got
    if how == "pad":
        assert torch.equal(got["x"][0], torch.from_numpy(fits[0]["x"]))
        assert torch.equal(got["x"][1, :1], torch.from_numpy(fits[1]["x"]))
        assert not got["x"][1, 1:].any() and got["x_lengths"].tolist() == rows
    else:
        assert torch.equal(got["x"], torch.utils.data.default_collate(fits)["x"])
    beyond = [{"x": np.zeros((r,) + (1,) * (n - 1))} for r in rows]
    with pytest.raises(
        ValueError,
        match=rf'batch\["x"\]: samples of {n} dimensions stack to {n + 1}, more than a NumPy '
        r"array holds: merge some of their dimensions",
    ):
        tb.collate(beyond, **kwargs)


def test_collate_names_numbers_no_tensor_dtype_holds():
    with pytest.raises(TypeError, match=r'batch\["y"\]\["x"\]: these numbers fit no tensor dtype'):
        tb.collate([{"y": {"x": 2**70}}, {"y": {"x": 1}}])


def test_images_to_tensor_dtype_none_is_the_default():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    got = tb.images_to_tensor(x, "cpu", dtype=None)
    want = tb.images_to_tensor(x, "cpu")
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("samples", [[2**63 + 1, 1], [2**64 - 1, 3], [-(2**63) - 1, 0]])
def test_collate_refuses_ints_beyond_int64_instead_of_losing_digits(samples):
    with pytest.raises(TypeError, match="fit no tensor dtype"):
        tb.collate(samples)
    assert torch.equal(tb.collate([2**63 - 1, -(2**63)]), torch.tensor([2**63 - 1, -(2**63)]))


def test_collate_refuses_tensors_numpy_has_no_dtype_for_naming_a_fix_it_has(monkeypatch):
    """complex32 and quantized tensors stack through NumPy, which lacks their dtypes: the
    refusal names a conversion in the dataset, not to_numpy's ``dtype=`` (collate has
    none), and the conversion named stacks; bfloat16 without ml_dtypes names ml_dtypes."""
    z = torch.randn(2, 3, dtype=torch.complex64)
    samples = [{"z": t.to(torch.complex32)} for t in z]
    with pytest.raises(
        TypeError,
        match=r'^collate: batch\["z"\]: a sample\'s tensor is torch\.complex32, which collate '
        r"cannot stack .*x\.to\(torch\.complex64\)\), or keep the field as a list",
    ):
        tb.collate(samples)
    fixed = tb.collate([{"z": s["z"].to(torch.complex64)} for s in samples])
    assert torch.equal(fixed["z"], torch.stack([s["z"].to(torch.complex64) for s in samples]))
    q = [torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)] * 2
    with pytest.raises(TypeError, match=r"torch\.qint8.*\(x\.dequantize\(\)\)\.$"):
        tb.collate(q)
    assert torch.equal(tb.collate([x.dequantize() for x in q]), torch.ones(2, 3))
    real = tb._dtypes.numpy_dtype_or_none
    monkeypatch.setattr(  # (as without ml_dtypes installed)
        tb._dtypes, "numpy_dtype_or_none", lambda d: None if d == torch.bfloat16 else real(d)
    )
    with pytest.raises(TypeError, match=r"torch\.bfloat16.*pip install ml_dtypes"):
        tb.collate([torch.ones(2, dtype=torch.bfloat16)] * 2)
    bits = torch.arange(4, dtype=torch.uint8).view(torch.bits8)  # (no ml_dtypes would help)
    with pytest.raises(TypeError, match=r"torch\.bits8.*\(x\.view\(torch\.uint8\)\)"):
        tb.collate([bits, bits])
    assert torch.equal(tb.collate([bits.view(torch.uint8)] * 2), torch.arange(4).repeat(2, 1))


def test_collate_refuses_uint64_scalars_that_a_signed_int_makes_float64():
    """NumPy makes float64 of a uint64 with a signed int: beyond 2**63 the low digits go.
    Refused, as the same values are as arrays or Python ints; within int64, or uint64
    scalars alone, they stack exactly."""
    big = np.uint64(2**63 + 1)
    for samples, made in (
        ([big, np.int64(-1)], "float64"),
        ([np.int8(-1), np.uint64(2**64 - 1)], "float64"),
        ([np.uint64(2**64 - 1), 0.5], "float64"),
        ([big, 1j], "complex128"),
        ([2**64 - 1, 1j], "complex128"),
    ):
        with pytest.raises(
            TypeError, match=rf"fit no tensor dtype \(an int beyond int64 made them torch\.{made}"
        ):
            tb.collate(samples)
    with pytest.raises(TypeError, match=r"sample 0 holds an int beyond int64.*complex128"):
        tb.collate([{"t": [big, 1j]}, {"t": [1j]}], pad={"t": 0})
    as_tensor = torch.tensor(2**63 + 1, dtype=torch.uint64)  # (a 0-d tensor: the same)
    with pytest.raises(TypeError, match=r"sample 0 holds an int beyond int64.*float64"):
        tb.collate([{"t": [as_tensor, torch.tensor(-1)]}, {"t": [5]}], pad={"t": 0})
    grad = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0)]  # (NumPy cannot read)
    for packed in (False, True):
        with pytest.raises(TypeError, match=r'^collate: batch\["t"\]: sample 0 is a list holding'):
            tb.collate([{"t": grad}, {"t": [3.0]}], pad={"t": 0}, packed=packed)
    with pytest.raises(TypeError, match=r'^collate: batch\["t"\]: sample 0 holds an int beyond'):
        tb.collate([{"t": [2**63 + 1, -1]}, {"t": [5]}], pad={"t": 0})
    with pytest.raises(TypeError, match=r"sample 1 holds an int beyond int64"):
        tb.collate([{"b": [[1.0, 2.0]]}, {"b": [[3, 2**63 + 5], [-1, 0]]}], pad={"b": 0})
    assert tb.collate([big, np.uint64(3)]).tolist() == [2**63 + 1, 3]  # (uint64 holds them)
    assert tb.collate([np.uint64(5), np.int64(-1)]).tolist() == [5.0, -1.0]  # (NumPy's rule)
    padded = tb.collate([{"t": [1e19, -1.0]}, {"t": [2.0]}], pad={"t": 0})  # (floats: as given)
    assert padded["t"].tolist() == [[1e19, -1.0], [2.0, 0.0]]


def test_pad_puts_a_str_enum_keys_lengths_under_its_value():
    """A (str, Enum) key is its value as a string: its lengths go under "tokens_lengths"
    (f"{key}" of the member is "Field.TOKENS"), and the refusal of a sample that has that
    key already names it."""
    import enum

    class Field(str, enum.Enum):
        TOKENS = "tokens"

    got = tb.collate([{Field.TOKENS: [1, 2]}, {Field.TOKENS: [3]}], pad={Field.TOKENS: 0})
    assert list(got) == [Field.TOKENS, "tokens_lengths"]
    assert got["tokens_lengths"].tolist() == [2, 1]
    with pytest.raises(ValueError, match=r'adds the lengths as "tokens_lengths", but the samples'):
        tb.collate([{Field.TOKENS: [1], "tokens_lengths": 1}], pad={Field.TOKENS: 0})


def test_collate_stacks_numpy_scalars_with_0d_arrays_in_either_order():
    """A NumPy scalar and a 0-d array (or tensor) stack alike, whichever comes first, as
    default_collate stacks them; a 1-d array among NumPy scalars is still refused."""
    zero_d = (np.array(1.0), torch.tensor(1.0, dtype=torch.float64))
    for one in zero_d:  # (default_collate stacks both orders, float64, with a warning)
        for samples in ([one, np.float64(2.0)], [np.float64(2.0), one]):
            got = tb.collate(samples)
            want = torch.tensor([float(s) for s in samples], dtype=torch.float64)
            assert got.dtype == torch.float64 and torch.equal(got, want)
    with pytest.raises(TypeError, match=r"sample 1 is numpy\.ndarray, sample 0 is numpy\.int64"):
        tb.collate([np.int64(2), np.array([1])])


def test_collate_refuses_an_array_among_numbers_in_either_order():
    for samples in ([1, np.array(5)], [np.array(5), 1]):
        with pytest.raises(TypeError, match=r"sample 1 is .*, sample 0 is"):
            tb.collate(samples)


_MIXED = [
    ("<f4", "<i8"),
    ("<f2", "<i4"),
    ("?", "u1"),
    ("i1", "u1"),
    ("<i8", "<c8"),
    ("<i2", "<f8"),
    ("u1", "<i8"),
    ("<i8", "bfloat16"),
    ("?", "bfloat16"),
    ("<f4", "bfloat16"),
]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("dtypes", _MIXED, ids=["-".join(d) for d in _MIXED])
def test_collate_promotes_mixed_dtypes_as_default_collate(backend, dtypes, as_tensors, packed):
    """Samples of different dtypes stack in torch's promoted dtype (default_collate's
    torch.stack), not NumPy's: int64 with float32 is float32, not float64."""
    if "bfloat16" in dtypes and ml_dtypes is None:
        pytest.skip("needs ml_dtypes")
    rng = np.random.default_rng(sum(map(ord, "".join(dtypes))))
    kinds = [ml_dtypes.bfloat16 if d == "bfloat16" else d for d in dtypes]
    arrays = [rng.integers(0, 100, (3, 2)).astype(kinds[k % 2]) for k in range(4)]
    samples = [tb.from_numpy(a) for a in arrays] if as_tensors else arrays
    got = tb.collate(samples, packed=packed)
    if packed:
        got = got.to("cpu")
    want = torch.utils.data.default_collate([tb.from_numpy(a) for a in arrays])
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("pair", [("<u8", "<i8"), ("<i8", "<u8"), ("<u4", "<i2")])
def test_collate_refuses_unsigned_with_signed_that_torch_does_not_promote(backend, pair):
    """NumPy would make float64 of uint64 with int64 (losing digits past 2**53)."""
    samples = [np.array([2**31 + 1], pair[0]), np.array([3], pair[1])]
    with pytest.raises(TypeError, match=r"batch: the samples are .*no\s+common dtype.*convert"):
        tb.collate(samples)
    with pytest.raises(RuntimeError):
        torch.utils.data.default_collate(samples)  # (torch refuses it too)


@pytest.mark.parametrize("packed", [False, True])
def test_collate_refuses_packed_batches_in_samples(packed):
    """A PackedBatch in a sample would stay a list of packed batches that .to() does not
    move: refused, naming the field and the fix."""
    inner = tb.PackedBatch.pack({"z": np.arange(3)})
    samples = [{"x": np.ones(2), "p": inner}, {"x": np.zeros(2), "p": inner}]
    with pytest.raises(TypeError, match=r'batch\["p"\]: sample 0 is a PackedBatch.*unpack'):
        tb.collate(samples, packed=packed)
    with pytest.raises(TypeError, match=r"batch\[1\]: sample 0 is a PackedBatch"):
        tb.collate([(1, inner), (2, inner)], packed=packed)


def test_collate_pads_mixed_dtypes_in_the_promoted_dtype(backend):
    if ml_dtypes is None:
        pytest.skip("needs ml_dtypes")
    samples = [{"t": np.arange(3)}, {"t": np.array([1.5, 2.5], ml_dtypes.bfloat16)}]
    got = tb.collate(samples, pad={"t": 0})
    want = torch.nn.utils.rnn.pad_sequence(
        [tb.from_numpy(s["t"]).to(torch.bfloat16) for s in samples], batch_first=True
    )
    assert got["t"].dtype == torch.bfloat16 and torch.equal(got["t"], want)
    assert got["t_lengths"].tolist() == [3, 2]
