"""The README's integrations beside each framework's default path, on the host.

``python -m tensorbridge bench --sections integrations`` (opt in; needs the ``hf``,
``accelerate`` and ``lightning`` extras):

- Hugging Face datasets: one epoch of a DataLoader over an in-memory dataset (``rows`` rows
  of a ``size`` x ``size`` x 3 uint8 image, a float, an int label and a string; batches of
  ``batch``; no workers, so formatting and collating in this process are what is timed):
  ``with_format("torch")`` + default collate and ``with_format("numpy")`` + default collate
  against ``with_format("numpy")`` + ``tb.collate``, plain and packed (then ``.to("cpu")``).
  Once with the formats' default dtypes (integer arrays become int64), once with
  ``dtype=None`` (the images stay uint8).
- accelerate and Lightning: ``send_to_device`` / ``move_data_to_device`` of one batch to
  'cpu', as a dict of tensors and as a ``PackedBatch``; and collate + the move, from the
  samples.
- Ray Data (where the ``ray`` extra is installed): one epoch of ``iter_torch_batches`` to
  'cpu' from a materialized dataset, Ray's default collate against ``tb.ray.Collate``, on
  a local cluster of two CPUs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from typing import Any

import numpy as np
import torch

from .._loader import collate
from ._runner import Method, Runner

PACKAGES = ("datasets", "accelerate", "lightning")
MISSING = (
    "the integrations section needs datasets, accelerate and Lightning: "
    'pip install ".[hf,accelerate,lightning]"'
)


def missing() -> str | None:
    """Why the section cannot run here (a package is not installed), or None."""
    absent = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    return f"{MISSING} ({', '.join(absent)} missing)" if absent else None


def _versions() -> str:
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)


def _dataset(rows: int, size: int) -> Any:
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "image": datasets.Array3D((size, size, 3), "uint8"),
            "score": datasets.Value("float32"),
            "label": datasets.ClassLabel(num_classes=10),
            "caption": datasets.Value("string"),
        }
    )
    columns = {
        "image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
        "score": rng.standard_normal(rows).astype(np.float32),
        "label": rng.integers(0, 10, rows),
        "caption": [f"picture {i}" for i in range(rows)],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def _epoch(loader: Any, packed: bool = False) -> None:
    for b in loader:
        if packed:
            b.to("cpu")


def _hf_methods(ds: Any, batch: int, **format_kwargs: Any) -> list[Method]:
    def loader(fmt: str, **kwargs: Any) -> Any:
        return torch.utils.data.DataLoader(
            ds.with_format(fmt, **format_kwargs), batch_size=batch, **kwargs
        )

    to_torch = loader("torch")
    numpy_default = loader("numpy")
    ours = loader("numpy", collate_fn=collate)
    packed = loader("numpy", collate_fn=functools.partial(collate, packed=True))
    return [
        ('with_format("torch") + default collate', True, lambda i: _epoch(to_torch)),
        ('with_format("numpy") + default collate', True, lambda i: _epoch(numpy_default)),
        ('with_format("numpy") + tb.collate', False, lambda i: _epoch(ours)),
        (
            'with_format("numpy") + tb.collate(packed=True) + .to("cpu")',
            False,
            lambda i: _epoch(packed, packed=True),
        ),
    ]


def _samples(n: int, size: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    return [
        {
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "score": float(rng.standard_normal()),
            "label": i % 10,
            "caption": f"picture {i}",
        }
        for i in range(n)
    ]


def _move_methods(name: str, move: Any, samples: list[Any]) -> tuple[list[Method], list[Method]]:
    """(the move of one collated batch, collate + the move) for one framework's function."""
    default = torch.utils.data.default_collate
    as_dict = collate(samples)
    packed = collate(samples, packed=True)
    moved = [
        (f"{name}(dict of tensors)", True, lambda i: move(as_dict, "cpu")),
        (f"{name}(PackedBatch)", False, lambda i: move(packed, "cpu")),
    ]
    collated = [
        (f"default_collate + {name}", True, lambda i: move(default(samples), "cpu")),
        (f"tb.collate + {name}", False, lambda i: move(collate(samples), "cpu")),
        (
            f"tb.collate(packed=True) + {name}",
            False,
            lambda i: move(collate(samples, packed=True), "cpu"),
        ),
    ]
    return moved, collated


def bench_integrations(r: Runner, rows: int = 2048, size: int = 64, batch: int = 64) -> None:
    """Each integration of the README against the framework's default path (see above)."""
    from accelerate.utils import send_to_device
    from lightning.fabric.utilities.apply_func import move_data_to_device

    sec = f"integrations, on the host ({_versions()})"
    ds = _dataset(rows, size)
    epoch = (
        f"HF datasets, one epoch: {rows} rows of {size}x{size}x3 uint8 + 3 columns, batch {batch}"
    )
    r.group(sec, epoch, 0, _hf_methods(ds, batch))
    r.group(sec, epoch + ", dtype=None (uint8 kept)", 0, _hf_methods(ds, batch, dtype=None))
    samples = _samples(batch, size)
    one = f"{batch} samples of {size}x{size}x3 uint8 + 3 fields"
    for name, move in (
        ("send_to_device", send_to_device),
        ("move_data_to_device", move_data_to_device),
    ):
        moved, collated = _move_methods(name, move, samples)
        r.group(sec, f"{name} of one collated batch to 'cpu' ({one})", 0, moved)
        r.group(sec, f"collate + {name} to 'cpu' ({one})", 0, collated)
    _bench_ray(r, sec, rows, size, batch)


def _bench_ray(r: Runner, sec: str, rows: int, size: int, batch: int) -> None:
    """Ray Data, one epoch of ``iter_torch_batches`` to 'cpu': Ray's default collate
    against ``tb.ray.Collate``, on a local cluster of two CPUs (skipped without Ray)."""
    if importlib.util.find_spec("ray") is None:
        return
    import ray

    from .. import ray as tb_ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rng = np.random.default_rng(0)
        items = [
            {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "label": i % 10}
            for i in range(rows)
        ]
        ds = ray.data.from_items(items).materialize()  # (in the object store: no reading timed)
        collate_fn = tb_ray.Collate(device="cpu")

        def default(i: int) -> None:
            for _ in ds.iter_torch_batches(batch_size=batch, device="cpu"):
                pass

        def ours(i: int) -> None:
            for _ in ds.iter_torch_batches(batch_size=batch, device="cpu", collate_fn=collate_fn):
                pass

        r.group(
            sec,
            f"Ray Data {ray.__version__}, one epoch of iter_torch_batches: {rows} rows of "
            f"{size}x{size}x3 uint8 + label, batch {batch}, to 'cpu'",
            0,
            [
                ("iter_torch_batches() (Ray's default collate)", True, default),
                ("iter_torch_batches(collate_fn=tb.ray.Collate())", False, ours),
            ],
        )
    finally:
        if started:
            ray.shutdown()
