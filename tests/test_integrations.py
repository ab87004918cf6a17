"""The README's one-line integrations, against the real packages on the CPU: Hugging Face
datasets through ``tb.collate``, and a ``PackedBatch`` handed to accelerate's
``send_to_device`` and to Lightning's default ``transfer_batch_to_device``.

CI installs them through the ``hf``, ``accelerate`` and ``lightning`` extras; each test
skips where its package is missing. Every batch is compared with the framework's own
default path (``with_format("torch")`` + default collate, ``send_to_device`` or
``move_data_to_device`` on the unpacked batch) on values, dtypes, shapes and structure.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import tensorbridge as tb

from conftest import no_warnings

# Lightning 2.6 asks torch's pytree for LeafSpec, which torch 2.13 deprecates: a warning
# from Lightning's own code at every fit, not from tensorbridge.
LIGHTNING_PYTREE = r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"


@pytest.fixture(scope="module")
def datasets() -> Any:
    return pytest.importorskip(
        "datasets", reason="Hugging Face datasets is not installed (pip install '.[hf]')"
    )


@pytest.fixture(scope="module")
def accelerate() -> Any:
    pytest.importorskip(
        "accelerate", reason="accelerate is not installed (pip install '.[accelerate]')"
    )
    import accelerate.utils

    return accelerate


@pytest.fixture(scope="module")
def lightning() -> Any:
    pytest.importorskip(
        "lightning", reason="Lightning is not installed (pip install '.[lightning]')"
    )
    import lightning.fabric.utilities.apply_func
    import lightning.pytorch

    return lightning


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def assert_same_batch(got: Any, want: Any) -> None:
    """The same structure and container types; tensors equal in values, dtype, shape and
    device; other values equal."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), type(got)
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device)
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for k in want:
            assert_same_batch(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_batch(g, w)
    else:
        assert not isinstance(got, (torch.Tensor, tb.PackedBatch))
        assert got == want


# --------------------------------------------------------------------- Hugging Face datasets

ROWS, SHAPE = 40, (16, 16, 3)


def _hf_dataset(datasets: Any, rng: np.random.Generator) -> Any:
    """An in-memory dataset with the columns of an image set: a fixed-shape uint8 image,
    a float, an int label and a string."""
    features = datasets.Features(
        {
            "image": datasets.Array3D(SHAPE, "uint8"),
            "score": datasets.Value("float32"),
            "label": datasets.ClassLabel(num_classes=10),
            "caption": datasets.Value("string"),
        }
    )
    columns = {
        "image": rng.integers(0, 256, (ROWS, *SHAPE), dtype=np.uint8),
        "score": rng.standard_normal(ROWS).astype(np.float32),
        "label": rng.integers(0, 10, ROWS),
        "caption": [f"picture {i}" for i in range(ROWS)],
    }
    return datasets.Dataset.from_dict(columns, features=features), columns


@pytest.mark.parametrize("packed", [False, True], ids=["collate", "packed"])
@pytest.mark.parametrize(
    "format_kwargs",
    [{}, {"dtype": None}],
    ids=["default-dtypes", "native-dtypes"],
)
def test_hf_numpy_format_and_tb_collate_give_the_torch_format_batches(
    datasets, rng, format_kwargs, packed
):
    """``with_format("numpy")`` + ``tb.collate`` gives the batches of ``with_format("torch")``
    + default collate: both formats make integer arrays int64 and float arrays float32,
    and with ``dtype=None`` both keep the column's own dtypes (uint8 images)."""
    ds, columns = _hf_dataset(datasets, rng)
    collate_fn = functools.partial(tb.collate, packed=True) if packed else tb.collate
    ours = DataLoader(ds.with_format("numpy", **format_kwargs), batch_size=8, collate_fn=collate_fn)
    reference = DataLoader(ds.with_format("torch", **format_kwargs), batch_size=8)
    with no_warnings():
        got = [b.to("cpu") if packed else b for b in ours]
    want = list(reference)
    assert len(got) == len(want) == ROWS // 8
    image_dtype = torch.int64 if not format_kwargs else torch.uint8
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_batch(g, w)
        rows = slice(8 * n, 8 * n + 8)
        assert g["image"].dtype == image_dtype and g["image"].shape == (8, *SHAPE)
        assert np.array_equal(g["image"].numpy(), columns["image"][rows])
        assert g["score"].dtype == torch.float32
        assert g["score"].tolist() == columns["score"][rows].tolist()
        assert g["label"].dtype == torch.int64
        assert g["label"].tolist() == columns["label"][rows].tolist()
        assert g["caption"] == columns["caption"][rows]  # strings stay a list


def test_hf_packed_batches_from_worker_processes(datasets, rng):
    """Packed in DataLoader workers (in shared memory), the batches reach the main process
    whole and equal to the torch format's."""
    ds, _ = _hf_dataset(datasets, rng)
    ours = DataLoader(
        ds.with_format("numpy"),
        batch_size=8,
        num_workers=2,
        collate_fn=functools.partial(tb.collate, packed=True),
    )
    reference = DataLoader(ds.with_format("torch"), batch_size=8)
    got = list(ours)
    assert all(isinstance(p, tb.PackedBatch) for p in got)
    for p, w in zip(got, reference, strict=True):
        assert_same_batch(p.to("cpu"), w)


def test_hf_read_only_rows_collate_without_torchs_warning(datasets, rng):
    """A ragged column (token ids) reaches ``collate_fn`` as read-only views of Arrow's
    memory: torch warns when a tensor shares one (``default_collate`` does that), while
    ``tb.collate`` copies them into the batch and stays silent, padded or packed."""
    lengths = [5, 2, 7, 3, 1, 6, 4, 7]
    tokens = [rng.integers(1, 30000, n) for n in lengths]
    ds = datasets.Dataset.from_dict({"tokens": tokens, "label": list(range(8))})
    # what the DataLoader hands its collate_fn: the rows as the numpy format gives them
    rows = next(iter(DataLoader(ds.with_format("numpy"), batch_size=8, collate_fn=list)))
    assert not any(r["tokens"].flags.writeable for r in rows)  # Arrow's memory, zero-copy
    with pytest.raises(UserWarning, match="not writable"), no_warnings():
        torch.as_tensor(rows[0]["tokens"])  # (the guard below would catch it)
    with no_warnings():
        batch = tb.collate(rows, pad={"tokens": 0})
        packed = tb.collate(rows, pad={"tokens": 0}, packed=True).to("cpu")
    want = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in tokens], batch_first=True)
    for b in (batch, packed):
        assert b["tokens"].dtype == torch.int64 and torch.equal(b["tokens"], want)
        assert b["tokens_lengths"].tolist() == lengths
        assert b["label"].tolist() == list(range(8))


def test_read_only_arrow_arrays_collate_without_torchs_warning(datasets, rng):
    """Fixed-shape rows viewed zero-copy from an Arrow buffer are read-only too: stacked
    into the batch (plain and packed) with no warning, the same values."""
    import pyarrow as pa  # (a dependency of datasets)

    flat = rng.integers(0, 256, 8 * 48, dtype=np.uint8)
    images = pa.array(flat).to_numpy(zero_copy_only=True).reshape(8, 4, 4, 3)
    scores = pa.array(rng.standard_normal(8)).to_numpy(zero_copy_only=True)
    assert not images.flags.writeable and not scores.flags.writeable
    samples = [{"image": images[i], "score": scores[i : i + 1]} for i in range(8)]
    with no_warnings():
        got = [tb.collate(samples), tb.collate(samples, packed=True).to("cpu")]
    for b in got:
        assert np.array_equal(b["image"].numpy(), flat.reshape(8, 4, 4, 3))
        assert np.array_equal(b["score"].numpy(), scores.reshape(8, 1))


# --------------------------------------------------------------------- accelerate


def _samples(rng: np.random.Generator, n: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "label": int(rng.integers(0, 10)),
            "weight": float(rng.random()),
            "boxes": (rng.random((2, 4), dtype=np.float32), np.arange(2)),
            "id": f"s{i}",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("non_blocking", [False, True])
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_accelerate_send_to_device_moves_a_packed_batch(accelerate, rng, device, non_blocking):
    """accelerate calls ``.to(device, non_blocking=...)`` on anything with a ``.to``: a
    PackedBatch comes back as the batch in its own structure, equal to what
    ``send_to_device`` makes of the unpacked batch (and of ``default_collate``'s)."""
    send_to_device = accelerate.utils.send_to_device
    samples = _samples(rng)
    packed = tb.collate(samples, packed=True)
    got = send_to_device(packed, device, non_blocking=non_blocking)
    assert_same_batch(got, send_to_device(tb.collate(samples), device, non_blocking=non_blocking))
    stock = send_to_device(default_collate(samples), device, non_blocking=non_blocking)
    # (default_collate makes the float "weight" float64 and the boxes' tuple a list)
    assert torch.equal(got["image"], stock["image"]) and torch.equal(got["label"], stock["label"])
    assert got["weight"].tolist() == stock["weight"].tolist()
    assert torch.equal(got["boxes"][0], stock["boxes"][0]) and got["id"] == stock["id"]
    # a packed batch inside a structure moves as one leaf
    nested = send_to_device({"batch": packed, "step": 3}, device, non_blocking=non_blocking)
    assert_same_batch(nested, {"batch": got, "step": 3})


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __iter__(self) -> Iterator[Any]:
        return iter(self.samples)


@pytest.mark.parametrize("iterable", [False, True], ids=["map-style", "iterable"])
def test_accelerate_prepared_dataloader_yields_moved_batches(accelerate, rng, iterable):
    """``Accelerator.prepare`` wraps the loader (a map-style dataset's in accelerate's
    DataLoaderShard, an iterable one's in its DataLoaderDispatcher); the batches, packed
    by ``tb.collate``, come out moved by ``send_to_device``: dicts of tensors."""
    from accelerate.state import AcceleratorState

    samples = _samples(rng, 16)
    loader = DataLoader(
        _Stream(samples) if iterable else samples,
        batch_size=4,
        collate_fn=functools.partial(tb.collate, packed=True),
    )
    try:
        accelerator = accelerate.Accelerator(cpu=True)
        got = list(accelerator.prepare(loader))
    finally:
        AcceleratorState._reset_state(True)  # (a process-wide singleton)
    assert len(got) == 4
    for n, b in enumerate(got):
        assert_same_batch(b, tb.collate(samples[4 * n : 4 * n + 4]))


# --------------------------------------------------------------------- Lightning


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_lightning_move_data_to_device_moves_a_packed_batch(lightning, rng, device):
    """Lightning's ``move_data_to_device`` (the default ``transfer_batch_to_device``) calls
    ``.to(device)`` on anything with a ``.to``: the batch in its own structure, equal to
    what it makes of the unpacked batch."""
    move = lightning.fabric.utilities.apply_func.move_data_to_device
    samples = _samples(rng)
    packed = tb.collate(samples, packed=True)
    got = move(packed, device)
    assert_same_batch(got, move(tb.collate(samples), device))
    assert_same_batch(move([packed, {"n": 1}], device), [got, {"n": 1}])


@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
@pytest.mark.parametrize("hook", ["default", "README's override"])
def test_lightning_trainer_fits_from_packed_batches(lightning, rng, tmp_path, hook):
    """A Trainer fed by a DataLoader of packed batches (packed in 2 workers): the default
    ``transfer_batch_to_device`` hands ``training_step`` dicts of tensors, never a
    PackedBatch, with the values of the unpacked batches; so does the README's override
    (``batch.to(device, non_blocking=True)`` on a PackedBatch), which gets every batch."""
    samples = [
        {"x": rng.standard_normal(4).astype(np.float32), "y": i % 2, "id": f"s{i}"}
        for i in range(16)
    ]

    class Tiny(lightning.pytorch.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)
            self.seen: list[Any] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch)
            return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Overridden(Tiny):
        packed = 0

        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            if isinstance(batch, tb.PackedBatch):
                self.packed += 1
                return batch.to(device, non_blocking=True)
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # (2 workers: fewer make Lightning warn that the loader may be a bottleneck)
    loader = DataLoader(
        samples,
        batch_size=4,
        num_workers=2,
        collate_fn=functools.partial(tb.collate, packed=True),
    )
    model = Tiny() if hook == "default" else Overridden()
    trainer = lightning.pytorch.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    assert trainer.global_step == 3 and len(model.seen) == 3
    for n, batch in enumerate(model.seen):
        assert type(batch) is dict
        assert_same_batch(batch, tb.collate(samples[4 * n : 4 * n + 4]))
        assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64
    assert getattr(model, "packed", 3) == 3  # (the override: every batch came packed)


@pytest.mark.gpu
def test_a_packed_batch_reaches_the_gpu_through_accelerate_and_lightning(
    accelerate, lightning, rng
):
    """On a GPU (packed into pinned memory in the main process): send_to_device with
    non_blocking=True and move_data_to_device give the batch on the device, the values of
    the unpacked batch."""
    samples = _samples(rng)
    packed = tb.collate(samples, packed=True)
    want = tb.collate(samples)
    move = lightning.fabric.utilities.apply_func.move_data_to_device
    for got in (
        accelerate.utils.send_to_device(packed, "cuda", non_blocking=True),
        move(packed, torch.device("cuda")),
    ):
        assert got["image"].is_cuda and got["boxes"][0].is_cuda
        torch.cuda.current_stream().synchronize()
        assert_same_batch(move(got, "cpu"), want)


# --------------------------------------------------------------------- the benchmark


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # (Ray's own, when it starts)
def test_integrations_benchmark_smoke(datasets, accelerate, lightning):
    """A tiny run of ``bench --sections integrations``, so it never rots (its Ray Data
    rows too, where Ray is installed)."""
    import importlib.util

    from tensorbridge.bench import integrations
    from tensorbridge.bench._runner import Runner

    r = Runner(2, progress=False)
    integrations.bench_integrations(r, rows=16, size=8, batch=8)
    cases = {row.case for row in r.rows}
    ray = importlib.util.find_spec("ray") is not None
    assert len(r.rows) == 18 + 2 * ray and len(cases) == 6 + ray
    assert all(row.median_s > 0 for row in r.rows)
    assert {row.method for row in r.rows if not row.baseline} >= {
        'with_format("numpy") + tb.collate',
        "send_to_device(PackedBatch)",
        "move_data_to_device(PackedBatch)",
    }


def test_integrations_benchmark_refuses_before_measuring_without_its_packages(monkeypatch, capsys):
    from tensorbridge.bench import cpu, integrations

    monkeypatch.setattr(integrations, "PACKAGES", ("numpy", "no_such_package_here"))
    with pytest.raises(SystemExit) as exc:
        cpu.main(["--sections", "integrations", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install ".[hf,accelerate,lightning]" (no_such_package_here missing)' in err
