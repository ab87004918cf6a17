"""bench-gpu's sections, run end to end on the CPU with torch's CUDA calls faked.

A GPU machine's time is short and rare: a section that breaks there (a wrong argument, a
row without its direction or memory, a verdict that cannot be judged) costs its results
for that run. Here every section runs through ``bench-gpu``'s own ``main`` with its
device tensors on the CPU (``gpu.DEVICE``), torch's stream and synchronization calls made
no-ops and page-locking a copy, so that the rows, the JSON fields, the text, the verdicts
and the plot are all produced; what it measures means nothing. The epoch benchmark's CUDA
branch is the one part left out (its CPU branch runs in the CPU benchmark's tests).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tensorbridge.bench import _plot, gpu
from tensorbridge.bench._report import machine

#: Every section's row groups, as bench-gpu names them.
TRANSFER_SECTIONS = {
    "device -> host, float32": "d2h",
    "host -> device, float32": "h2d",
    "both directions at once, float32": "both",
    "registration cache, device -> host, float32": "d2h",
    "registration cache, host -> device, float32": "h2d",
}
BATCH_SECTIONS = {
    "batches of small arrays -> device",
    "uint8 images -> normalized float NCHW on the device",
}


class _FakeStream:
    """torch.cuda.Stream() without a device."""


@pytest.fixture
def cuda_on_the_cpu(monkeypatch):
    """bench-gpu's view of a GPU, on the CPU: what the sections call of torch.cuda does
    nothing, .cuda() and .pin_memory() copy, pin_memory=True is dropped."""
    host = machine()
    fake = {"gpu": "Fake GPU 80GB", "torch_cuda": "13.0", "driver": "1.0", "pcie": "gen 5 x16"}
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "gpu_machine", lambda: {**host, **fake})
    monkeypatch.setattr(gpu, "pinned_peak", lambda repeats: (50.0, 40.0))
    monkeypatch.setattr(gpu, "host_ceiling", lambda repeats: (20.0, 30.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(
        torch.Tensor, "cuda", lambda self, device=None, non_blocking=False, **kw: self.clone()
    )
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None: self.clone())
    for name in ("empty", "ones"):
        make = getattr(torch, name)

        def unpinned(*args, _make=make, pin_memory=False, **kw):
            return _make(*args, **kw)

        monkeypatch.setattr(torch, name, unpinned)
    loaders: list[tuple] = []
    monkeypatch.setattr(gpu, "bench_loader", lambda r, device, **kw: loaders.append((device, kw)))
    return loaders


def test_every_gpu_benchmark_section_runs_and_reports_its_fields(cuda_on_the_cpu, tmp_path):
    results = tmp_path / "results"
    argv = ["--repeats", "2", "--quiet", "--sizes", "4K", "1M", "16M", "--save", str(results)]
    plot = tmp_path / "bench.png"
    if _plot.available():
        argv += ["--plot", str(plot)]
    assert gpu.main(argv) == 0  # (a section that raised would make it 1)

    (json_file,) = results.glob("*.json")
    data = json.loads(json_file.read_text())
    assert data["machine"]["failed_sections"] == []
    assert list(data["machine"]["section_seconds"]) == list(gpu.SECTIONS)
    assert (data["P_d2h"], data["P_h2d"], data["H_d2h"], data["H_h2d"]) == (50, 40, 20, 30)
    rows = data["rows"]
    assert {row["section"] for row in rows} == set(TRANSFER_SECTIONS) | BATCH_SECTIONS

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["section"], row["case"], row["size"]), []).append(row)
        assert row["median_s"] > 0 and row["samples"] == 2
        if row["section"] in TRANSFER_SECTIONS:
            assert row["gbs"] > 0, row
            assert row["direction"] == TRANSFER_SECTIONS[row["section"]], row
            assert row["memory"] in ("pinned", "pageable-reused", "pageable-fresh"), row
            assert row["of_limit"] > 0, row
            if not row["baseline"]:
                assert row["vs_best_baseline"] > 0, row
    for key, group in groups.items():
        baselines = [row for row in group if row["baseline"]]
        assert baselines and len(baselines) < len(group), key  # torch beside tensorbridge
    sizes = {s for (section, _, s) in groups if section == "device -> host, float32"}
    assert sizes == {4 << 10, 1 << 20, 16 << 20}
    assert {s for (section, _, s) in groups if section.startswith("both")} == {2 * (16 << 20)}
    assert {s for (section, _, s) in groups if section.startswith("registration")} == {16 << 20}

    text = json_file.with_suffix(".txt").read_text()
    assert "targets (" in text and "sections run, in order: d2h (" in text
    assert cuda_on_the_cpu == [
        ("cuda", {"images": 4096, "batch": 256, "size": 224, "workers": 8, "step_s": 5e-3})
    ]
    if _plot.available():
        assert plot.stat().st_size > 0
