"""tb.ray.Collate against Ray Data's default path, and in a Ray Train run, with the real Ray."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tensorbridge[ray]')")
pytest.importorskip("ray.train", reason="ray.train is not installed")

import tensorbridge as tb  # noqa: E402
import tensorbridge.ray  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # (Ray's own deprecations, raised inside Ray: not ours to fix)
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
    pytest.mark.filterwarnings("ignore::FutureWarning:ray"),
]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # (so two passes can be compared row by row)
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def _items(rng, n=40):
    return [
        {
            "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "x": rng.standard_normal(5).astype(np.float32),
            "w": rng.standard_normal(),  # float64
            "label": int(i % 7),
            "name": f"s{i}",
        }
        for i in range(n)
    ]


def _concat(batches, key):
    return torch.cat([b[key] for b in batches])


def test_collate_gives_ray_defaults_tensors(cluster):
    rng = np.random.default_rng(7)
    ds = ray.data.from_items(_items(rng))
    with warnings.catch_warnings():
        torch.set_warn_always(True)  # (torch warns once per process otherwise)
        # no read-only warning for Ray's object store arrays
        warnings.filterwarnings("error", message=".*not writable")
        got = list(ds.iter_torch_batches(batch_size=16, collate_fn=tb.ray.Collate()))
    expected = list(ds.drop_columns(["name"]).iter_torch_batches(batch_size=16))
    assert [len(b["label"]) for b in got] == [16, 16, 8]
    for key in ("image", "x", "w", "label"):
        g, e = _concat(got, key), _concat(expected, key)
        assert (g.dtype, g.shape, g.device.type) == (e.dtype, e.shape, "cpu"), key
        assert torch.equal(g, e), key
    names = np.concatenate([b["name"] for b in got])
    assert names.tolist() == [f"s{i}" for i in range(40)]  # strings stay NumPy
    out = got[0]["image"]
    out += 1  # tensors of their own, writable: Ray's arrays are untouched
    assert torch.equal(_concat(expected, "image")[:16], _concat(got, "image")[:16] - 1)


def test_collate_casts_like_to_device(cluster):
    rng = np.random.default_rng(8)
    ds = ray.data.from_items(_items(rng, 16))
    batch = next(
        iter(ds.iter_torch_batches(batch_size=16, collate_fn=tb.ray.Collate(dtype="float16")))
    )
    assert batch["x"].dtype == torch.float16 and batch["w"].dtype == torch.float16
    assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.int64
    mapped = tb.ray.Collate(dtype={"label": torch.int32})
    batch = next(iter(ds.iter_torch_batches(batch_size=16, collate_fn=mapped)))
    assert batch["label"].dtype == torch.int32 and batch["x"].dtype == torch.float32


def test_collate_refuses_bad_arguments_when_made():
    with pytest.raises(TypeError, match="floating dtype"):
        tb.ray.Collate(dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match="device"):
        tb.ray.Collate(device="gpu0")
    with pytest.raises(TypeError, match="dict of arrays"):
        tb.ray.Collate(device="cpu")([np.ones(2)])


def test_a_ray_train_run_feeds_a_model_through_collate(cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(9)
    items = [
        {"x": rng.standard_normal(4).astype(np.float32), "y": np.float32(i % 2)} for i in range(64)
    ]
    ds = ray.data.from_items(items)
    seen = tmp_path / "seen"
    seen.mkdir()

    def train_loop(config):
        import ray.train
        import torch

        import tensorbridge as tb
        import tensorbridge.ray

        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        shard = ray.train.get_dataset_shard("train")
        rows, loss = 0, None
        for batch in shard.iter_torch_batches(batch_size=8, collate_fn=tb.ray.Collate()):
            assert batch["x"].dtype == torch.float32 and batch["x"].shape[1] == 4
            loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch["y"])
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['seen']}/{rank}.json", "w") as f:
            json.dump({"rows": rows, "loss": float(loss)}, f)
        ray.train.report({"loss": float(loss), "rows": rows})

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"seen": str(seen)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": ds},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="tb"),
    )
    result = trainer.fit()
    assert result.error is None
    reports = {p.stem: json.loads(p.read_text()) for p in seen.glob("*.json")}
    assert sorted(reports) == ["0", "1"]  # both workers trained
    assert sum(r["rows"] for r in reports.values()) == 64  # on shards that cover the data
    assert all(r["rows"] > 0 and np.isfinite(r["loss"]) for r in reports.values())
