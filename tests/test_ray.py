"""``tensorbridge.ray.Collate`` against the real Ray on a local cluster (2 CPUs, shared by
the module): the batches of ``iter_torch_batches(collate_fn=tb.ray.Collate(...))`` against
Ray's default ``iter_torch_batches()`` (values, dtypes, shapes, column order) on fresh random
data, the columns Ray gives as Python objects, and one ``TorchTrainer`` run with two CPU
workers fed through ``Collate`` from their dataset shards.

CI installs Ray through the ``ray`` extra; without it these tests skip (the import checks
at the top run either way).
"""

from __future__ import annotations

import doctest
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorbridge as tb

from conftest import HAS_CUDA, no_warnings

SKIP = 'Ray is not installed (pip install ".[ray]")'


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_import_tensorbridge_does_not_import_ray():
    proc = _python(
        "import sys, tensorbridge\n"
        "assert 'ray' not in sys.modules and 'tensorbridge.ray' not in sys.modules\n"
        "assert not hasattr(tensorbridge, 'ray')\n"
        "try:\n"
        "    tensorbridge.ray\n"
        "except AttributeError as e:\n"
        "    assert 'import tensorbridge.ray (it needs Ray)' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('tensorbridge.ray without importing it')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_ray_the_import_names_the_extra_to_install():
    proc = _python(
        "import sys\n"
        "sys.modules['ray'] = None  # (as if it were not installed)\n"
        "import tensorbridge.ray\n"
    )
    assert proc.returncode != 0
    assert "ImportError: tensorbridge.ray needs Ray Data and Ray Train" in proc.stderr
    assert 'pip install "tensorbridge[ray]"' in proc.stderr


# --------------------------------------------------------------------- Collate on its own


@pytest.fixture(scope="module")
def tbray() -> Any:
    pytest.importorskip("ray", reason=SKIP)
    import tensorbridge.ray

    return tensorbridge.ray


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _read_only(**columns: np.ndarray) -> dict[str, np.ndarray]:
    """A batch as Ray gives it: column arrays over read-only buffers."""
    for a in columns.values():
        a.flags.writeable = False
    return columns


def test_collate_is_the_numpy_collate_class_ray_asks_for(tbray):
    from ray.data.collate_fn import NumpyBatchCollateFn

    assert tb.ray is tbray  # (import tensorbridge.ray makes tb.ray reachable)
    assert isinstance(tbray.Collate(), NumpyBatchCollateFn)


def test_docstring_example_runs(tbray):
    result = doctest.testmod(tbray, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed


def test_collate_packs_the_columns_into_one_writable_buffer(tbray, rng):
    batch = _read_only(
        image=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        score=rng.standard_normal(4).astype(np.float32),
        label=rng.integers(0, 10, 4),
    )
    with no_warnings():  # (torch warns when a tensor shares a read-only array: none here)
        got = tbray.Collate(device="cpu")(batch)
    assert list(got) == ["image", "score", "label"]
    for name, a in batch.items():
        assert got[name].dtype == torch.from_numpy(a.copy()).dtype
        assert np.array_equal(got[name].numpy(), a)
    bases = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(bases) == 1  # one buffer: the batch crossed in one copy
    got["image"][0] = 0  # its own memory: writable, and Ray's buffers are untouched
    assert batch["image"][0].any()


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, "float64", {"image": torch.float32}, {torch.int64: torch.int32}],
    ids=["float16", "float64-str", "by-column", "by-source-dtype"],
)
def test_collate_casts_as_to_device_does(tbray, rng, dtype):
    batch = _read_only(
        image=rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8),
        score=rng.standard_normal(3).astype(np.float32),
        label=rng.integers(0, 10, 3),
    )
    got = tbray.Collate(device="cpu", dtype=dtype)(batch)
    want = tb.to_device({k: a.copy() for k, a in batch.items()}, "cpu", dtype=dtype)
    for name in batch:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name], want[name])


def test_collate_refuses_a_bad_dtype_when_made_and_a_name_no_column_has_per_batch(tbray):
    with pytest.raises(TypeError, match=r"tb.ray.Collate: a single dtype= casts the floating"):
        tbray.Collate(dtype=torch.int32)
    collate = tbray.Collate(device="cpu", dtype={"imgae": torch.float32})
    with pytest.raises(ValueError, match=r"tb.ray.Collate: dtype= names 'imgae'.*'image'"):
        collate({"image": np.zeros((2, 3), np.uint8), "id": np.array(["a", "b"])})


def _objects(*values: Any) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # (one by one: NumPy would read tensors as arrays)
        column[i] = v
    return column


def test_collate_stacks_equal_shaped_object_rows_as_ray_does(tbray, rng):
    rows = [rng.integers(0, 9, 3) for _ in range(4)]
    column = np.empty(4, dtype=object)
    column[:] = rows
    got = tbray.Collate(device="cpu")({"lst": column})
    assert got["lst"].dtype == torch.int64 and got["lst"].tolist() == np.stack(rows).tolist()


@pytest.mark.parametrize(
    "column",
    [
        np.array(["a", "bc", "d"]),
        np.array([b"a", b"bc", b"d"]),
        np.array(["a", None, "d"], dtype=object),
        np.array([["a", "b"], ["c", "d"], ["e", "f"]], dtype=object),
        _objects(["a", "b"], ["c"], []),
        _objects(*(np.array(v, dtype=object) for v in (["a", None], [], ["b", "c", "d"]))),
    ],
    ids=[
        "str",
        "bytes",
        "object-str-with-none",
        "object-rows-of-str",
        "ragged-lists-of-str",
        "ragged-arrow-lists-of-str",
    ],
)
def test_collate_keeps_string_columns_as_ray_gave_them(tbray, column):
    got = tbray.Collate(device="cpu")({"x": np.arange(3.0), "id": column})
    assert list(got) == ["x", "id"]
    assert got["id"] is column
    assert got["x"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("column", "match"),
    [
        (
            _objects(np.arange(3), np.arange(2)),
            r"column 'c' holds arrays of different shapes \(row 0 \(3,\), row 1 \(2,\)\).*pad "
            r"them to one shape.*ds.drop_columns\(\['c'\]\)",
        ),
        (
            _objects({"a": 1}, {"b": 2}),
            r"column 'c' holds Python objects \(dict\).*convert them to numbers or strings",
        ),
        (  # (NumPy stacks them as strings: no string column the user had)
            _objects("a", 1),
            r"column 'c' holds Python objects \(int, str\).*convert them to numbers or strings",
        ),
        (  # (lists of numbers and strings: NumPy's strings too, not lists of strings)
            _objects([1, "a"], [2, "b"]),
            r"column 'c' holds Python objects \(list\).*convert them to numbers or strings",
        ),
        (  # (float64 of a uint64 beyond int64 and a signed int: digits lost)
            _objects(np.uint64(2**63 + 1), -1),
            r"column 'c' holds an int beyond int64, which made it float64 \(losing digits\)",
        ),
        (  # (the same from array rows)
            _objects(np.array([2**63 + 1], np.uint64), np.array([-1])),
            r"column 'c' holds an int beyond int64, which made it float64 \(losing digits\)",
        ),
        (
            _objects(torch.ones(2).to_sparse(), torch.ones(2).to_sparse()),
            r"column 'c': row 0 needs a dense \(strided\) tensor.*x\.to_dense\(\)",
        ),
        (  # (ragged nested lists: NumPy cannot make one array of a row)
            _objects([[1, 2], [3]], [[1, 2], [3, 4]]),
            r"column 'c' holds (arrays of different shapes|Python objects)",
        ),
        (  # (rows of tensors NumPy cannot read)
            _objects([torch.tensor(1.0, requires_grad=True)], [torch.tensor(2.0)]),
            r"column 'c' holds Python objects \(list\)",
        ),
        (
            _objects(*torch.zeros(2, 3, dtype=torch.complex32)),
            r"column 'c': row 0 is a torch\.complex32 tensor, which NumPy has no dtype for",
        ),
        (
            np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"),
            r"column 'c' is datetime64\[D\], which torch has no dtype for.*int64",
        ),
    ],
    ids=[
        "ragged",
        "dicts",
        "strings-and-ints",
        "lists-of-both",
        "uint64-and-int",
        "uint64-and-int-rows",
        "ragged-nested-rows",
        "tensor-list-rows",
        "sparse-rows",
        "complex32-rows",
        "datetime",
    ],
)
def test_collate_refuses_what_no_tensor_holds_naming_the_column_and_the_fix(tbray, column, match):
    with pytest.raises(TypeError, match=match):
        tbray.Collate(device="cpu")({"ok": np.arange(len(column)), "c": column})


def test_collate_packs_bfloat16_and_float8_columns_as_torch_dtypes(tbray, rng):
    """ml_dtypes columns (NumPy kind 'V', as raw bytes are) are torch dtypes: packed,
    their bits kept, as PackedBatch.pack and to_tensor take them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        column = rng.standard_normal((4, 3)).astype(dtype)
        rows = _objects(*column)  # (a list column: one array per row, stacked)
        tensors = _objects(*tb.to_tensor(column))  # (rows that are torch's bfloat16 tensors)
        got = tbray.Collate(device="cpu")({"x": column, "rows": rows, "tensors": tensors})
        expected = tb.to_tensor(column)
        for key in ("x", "rows", "tensors"):
            assert got[key].dtype == expected.dtype, key
            assert torch.equal(got[key].view(torch.uint8), expected.view(torch.uint8)), key


def test_collate_refuses_a_tensor_row_that_requires_grad_as_a_tensor_column(tbray):
    """A row that requires grad would lose its graph in the packing: refused, as a tensor
    column that requires grad is, naming the column and the row."""
    rows = _objects(torch.ones(2, requires_grad=True), torch.ones(2))
    with pytest.raises(ValueError, match=r"^tb\.ray\.Collate: column 'c': row 0 is a tensor "):
        tbray.Collate(device="cpu")({"c": rows})
    got = tbray.Collate(device="cpu")({"c": _objects(*(r.detach() for r in rows))})
    assert torch.equal(got["c"], torch.ones(2, 2))


@pytest.mark.parametrize(
    ("column", "error", "match"),
    [
        (torch.ones(3, requires_grad=True), ValueError, r"column 'c': a tensor requires grad"),
        (torch.ones(3).to_sparse(), TypeError, r"column 'c' needs a dense \(strided\) tensor"),
        ([np.ones(2), np.array(["x"])], TypeError, r"column 'c'\[1\]: numpy dtype <U1"),
    ],
    ids=["grad", "sparse", "strings-in-a-list"],
)
def test_collate_names_itself_and_the_column_in_what_packing_refuses(tbray, column, error, match):
    """Columns that are not Ray's arrays (Collate called on a batch of one's own) are
    refused by the packing: in Collate's name, naming the column as its other refusals do."""
    with pytest.raises(error, match=rf"^tb\.ray\.Collate: {match}"):
        tbray.Collate(device="cpu")({"ok": np.arange(3), "c": column})


def test_collate_refuses_a_batch_that_is_not_a_dict(tbray):
    with pytest.raises(TypeError, match=r"takes Ray Data's NumPy batches.*got ndarray"):
        tbray.Collate(device="cpu")(np.arange(3))


def test_collate_device_auto_is_the_cpu_outside_ray_train_and_decided_again_when_unpickled(
    tbray,
):
    collate = tbray.Collate()
    assert collate.device is None and repr(collate) == "Collate(device='auto', dtype=None)"
    assert collate({"x": np.arange(2)})["x"].device == torch.device("cpu")
    assert collate.device == torch.device("cpu")
    again = pickle.loads(pickle.dumps(collate))
    assert again.device is None  # ("auto" is decided in the process that iterates)
    fixed = pickle.loads(pickle.dumps(tbray.Collate(device="cpu", dtype=torch.float16)))
    assert fixed.device == torch.device("cpu") and fixed._dtype == torch.float16


@pytest.mark.skipif(HAS_CUDA, reason="checks a CUDA device asked for where there is none")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0, torch.device("cuda", 0)])
def test_a_cuda_collate_made_without_cuda_is_checked_where_the_batches_are(tbray, device):
    # A CPU-only driver builds it for GPU workers: no refusal until a batch comes.
    collate = tbray.Collate(device=device)
    assert collate.device is None
    assert repr(collate) == f"Collate(device={str(device)!r}, dtype=None)"
    again = pickle.loads(pickle.dumps(collate))
    batch = {"x": np.arange(3)}
    for c in (collate, again):
        with pytest.raises(ValueError, match=r"^tb.ray.Collate: device=.*CUDA.*device='cpu'"):
            c(batch)
        assert c.device is None
    assert batch["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("device", ["cdua", "cpu:x", -1, True, 1.5])
def test_collate_refuses_a_device_no_machine_has_when_made(tbray, device):
    with pytest.raises((TypeError, ValueError), match=r"^tb.ray.Collate: device"):
        tbray.Collate(device=device)


@pytest.mark.gpu
def test_collate_moves_a_batch_to_the_gpu_in_one_copy(tbray, rng):
    batch = _read_only(
        image=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        label=rng.integers(0, 10, 8),
    )
    collate = tbray.Collate(device="cuda", dtype={"image": torch.float32})
    assert collate.device == torch.device("cuda", torch.cuda.current_device())
    got = collate(batch)
    torch.cuda.current_stream().synchronize()
    assert got["image"].is_cuda and got["image"].dtype == torch.float32
    assert np.array_equal(got["image"].cpu().numpy(), batch["image"].astype(np.float32))
    assert got["label"].tolist() == batch["label"].tolist()


# --------------------------------------------------------------------- on a local cluster


@pytest.fixture(scope="module")
def cluster(tbray) -> Any:
    """A local Ray cluster of 2 CPUs for the whole module (its start takes seconds), with
    batches in order (so two passes over a dataset can be compared batch by batch)."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


def _same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want) > 1
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for name in w:
            assert isinstance(g[name], torch.Tensor), name
            assert (g[name].dtype, g[name].shape, g[name].device) == (
                w[name].dtype,
                w[name].shape,
                w[name].device,
            ), name
            assert torch.equal(g[name], w[name]), name


def _items(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [
        {
            "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "score": np.float32(rng.standard_normal()),
            "embedding": rng.standard_normal(5),  # float64
            "label": int(rng.integers(0, 10)),  # int64
            "boxes": [int(v) for v in rng.integers(0, 99, 4)],  # a list column
        }
        for _ in range(n)
    ]


def _datasets(cluster: Any, rng: np.random.Generator) -> dict[str, Any]:
    images = rng.integers(0, 256, (29, 8, 8, 3), dtype=np.uint8)
    return {
        "from_items": cluster.data.from_items(_items(rng, 37)),
        "from_numpy": cluster.data.from_numpy(images),
        "from_numpy-float32": cluster.data.from_numpy(
            rng.standard_normal((23, 6)).astype(np.float32)
        ),
    }


@pytest.mark.parametrize("source", ["from_items", "from_numpy", "from_numpy-float32"])
def test_batches_match_rays_default_path(cluster, tbray, rng, source):
    ds = _datasets(cluster, rng)[source].materialize()
    collate = tbray.Collate(device="cpu")
    got = list(ds.iter_torch_batches(batch_size=8, collate_fn=collate))
    want = list(ds.iter_torch_batches(batch_size=8))
    _same_batches(got, want)  # (the last batch is short: 37, 29 and 23 rows)


@pytest.mark.parametrize(
    "dtype", [torch.float16, {"image": torch.float32, "label": torch.int32}], ids=str
)
def test_dtype_casts_on_the_device_as_to_device_does(cluster, tbray, rng, dtype):
    ds = cluster.data.from_items(_items(rng, 20)).materialize()
    got = list(ds.iter_torch_batches(batch_size=6, collate_fn=tbray.Collate("cpu", dtype)))
    if isinstance(dtype, dict):
        want = [
            {k: t.to(dtype[k]) if k in dtype else t for k, t in b.items()}
            for b in ds.iter_torch_batches(batch_size=6)
        ]
    else:  # a single dtype casts the floating columns only: the labels stay int64
        want = [
            {k: t.to(dtype) if t.is_floating_point() else t for k, t in b.items()}
            for b in ds.iter_torch_batches(batch_size=6)
        ]
        assert want[0]["label"].dtype == torch.int64 and want[0]["image"].dtype == torch.uint8
    _same_batches(got, want)


def test_string_columns_stay_numpy_arrays_where_rays_default_path_refuses(cluster, tbray, rng):
    items = _items(rng, 12)
    for i, item in enumerate(items):
        item["id"] = f"sample-{i}"
    ds = cluster.data.from_items(items).materialize()
    got = list(ds.iter_torch_batches(batch_size=5, collate_fn=tbray.Collate(device="cpu")))
    assert [b["id"].tolist() for b in got] == [
        [f"sample-{i}" for i in range(s, min(s + 5, 12))] for s in (0, 5, 10)
    ]
    want = list(ds.drop_columns(["id"]).iter_torch_batches(batch_size=5))
    _same_batches([{k: v for k, v in b.items() if k != "id"} for b in got], want)
    with pytest.raises(TypeError, match=r"numpy\.str_"):  # what Ray's own path does with them
        list(ds.iter_torch_batches(batch_size=5))


def test_a_ragged_column_is_refused_naming_it(cluster, tbray):
    ds = cluster.data.from_items([{"tokens": np.arange(n % 3 + 1)} for n in range(6)])
    with pytest.raises(TypeError, match=r"column 'tokens' holds arrays of different shapes"):
        list(ds.iter_torch_batches(batch_size=3, collate_fn=tbray.Collate(device="cpu")))


def test_a_missing_list_value_is_refused_naming_the_row(tbray):
    column = np.empty(3, dtype=object)
    column[:] = [np.array([1, 2]), None, np.array([3, 4])]
    with pytest.raises(TypeError, match=r"column 'x' is missing in row 1 \(None\).*drop_columns"):
        tbray.Collate(device="cpu")({"x": column})


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: two epochs of its dataset shard through tb.ray.Collate into a
    tiny DDP model; rank 0 reports the loss and every rank's batch and row counts."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    import tensorbridge.ray

    shard = ray.train.get_dataset_shard("train")
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    collate = tensorbridge.ray.Collate(dtype=torch.float32)  # (the features are float64)
    batches = rows = 0
    for _ in range(2):
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=collate):
            loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            batches += 1
            rows += len(batch["y"])
    counts = [torch.zeros(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([batches, rows]))
    metrics = {
        "loss": float(loss),
        "batches": [int(c[0]) for c in counts],
        "rows": [int(c[1]) for c in counts],
        "device": str(collate.device),
        "train_device": str(ray.train.torch.get_device()),
        "x_dtype": str(batch["x"].dtype),
    }
    if ray.train.get_context().get_world_rank() == 0:
        # (Ray Train keeps the metrics of the reports that carry a checkpoint)
        path = Path(config["checkpoints"]) / "rank0"
        path.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path / "model.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))
    else:
        ray.train.report(metrics)


@pytest.mark.slow
def test_torch_trainer_feeds_two_cpu_workers_through_collate(cluster, tbray, rng, tmp_path):
    import ray.train
    import ray.train.torch
    from ray import cloudpickle

    # The workers cannot import this test file: the loop travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        rows = 48
        ds = cluster.data.from_items(
            [{"x": rng.standard_normal(4), "y": int(rng.integers(0, 2))} for _ in range(rows)]
        )
        trainer = ray.train.torch.TorchTrainer(
            _train_loop,
            train_loop_config={"batch_size": 8, "checkpoints": str(tmp_path / "checkpoints")},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
            run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="tb"),
            datasets={"train": ds},
        )
        result = trainer.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None
    metrics = result.metrics
    assert np.isfinite(metrics["loss"])
    assert all(b > 0 for b in metrics["batches"]) and len(metrics["batches"]) == 2
    assert sum(metrics["rows"]) == 2 * rows  # the two shards split the rows, two epochs each
    assert metrics["device"] == metrics["train_device"] == "cpu"
    assert metrics["x_dtype"] == "torch.float32"
    assert result.checkpoint is not None
