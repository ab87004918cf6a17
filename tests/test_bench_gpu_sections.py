"""bench-gpu's sections, run end to end on the CPU with torch's CUDA calls faked.

A GPU machine's time is short and rare: a section that breaks there (a wrong argument, a
row without its direction or memory, a verdict that cannot be judged) costs its results
for that run. Here every section runs through ``bench-gpu``'s own ``main`` with its
device tensors on the CPU (``gpu.DEVICE``), torch's stream and synchronization calls made
no-ops and page-locking a copy, so that the rows, the JSON fields, the text, the verdicts
and the plot are all produced; what it measures means nothing. The routing sweep
(``bench-tune``) and the epoch benchmark's GPU branch (pinned loader, a sleeping kernel as
the model step, CUDA events timing the GPU's idle gaps) run the same way.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

from tensorbridge import _backend, _cuda, _registry
from tensorbridge.bench import _plot, gpu, loader, tune
from tensorbridge.bench._report import machine
from tensorbridge.bench._runner import Runner

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
    "collated batches -> device",
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


def test_the_routing_sweep_runs_and_saves_what_it_recommends(
    cuda_on_the_cpu, monkeypatch, tmp_path, capsys
):
    """bench-tune end to end: both parts, the routing it recommends, the saved sweep, and
    the settings it changes while measuring put back."""
    monkeypatch.setattr(_backend.ENGINE, "_cuda_engine", True)  # (the fixture's GPU)

    def settings() -> tuple:
        routing = _cuda.ROUTING
        return (
            _cuda.transfer_options(),
            (routing.small_d2h, routing.small_h2d, routing.small_direct),
            _registry.registration_options(),
            _backend.get_num_threads(),
        )

    before = settings()
    argv = ["--repeats", "2", "--threads", "1", "2", "--chunks-mib", "1", "2"]
    argv += ["--buffers", "4", "--sizes-mib", "1", "--save", str(tmp_path)]
    assert tune.main(argv) == 0
    assert settings() == before
    (saved,) = tmp_path.glob("*-tune-fake-gpu-80gb.json")
    data = json.loads(saved.read_text())
    rows = data["rows"]
    small = [r for r in rows if r["part"] == "small"]
    assert len(small) == 8 * 2 and {r["direction"] for r in small} == {"d2h", "h2d"}
    assert all(r[k] > 0 for r in small for k in ("torch_gbs", "direct_gbs", "engine_gbs"))
    pipeline = [r for r in rows if r["part"] == "pipeline"]
    assert {(r["threads"], r["chunk_bytes"], r["direction"]) for r in pipeline} == {
        (t, c << 20, d) for t in (1, 2) for c in (1, 2) for d in ("d2h", "h2d")
    }
    assert all(r["bytes"] == 1 << 20 and r["buffers"] == 4 and r["gbs"] > 0 for r in pipeline)
    assert data["recommended_routing"] == tune.recommended_routing(rows)
    assert set(data["routing"]) == {"small_d2h", "small_h2d", "small_direct"}
    out = capsys.readouterr().out
    assert "measured here small_d2h" in out and f"saved {saved}" in out


class _FakeEvent:
    """torch.cuda.Event on the CPU: the host's clock when recorded."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.at - self.at) * 1e3  # (milliseconds, as CUDA's)


# (the stock loader asks for pinned batches, which CPU-only torch warns it cannot give)
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_the_epoch_benchmark_gpu_branch_reports_the_idle_gaps(monkeypatch):
    """The epoch benchmark as bench-gpu runs it (pinned stock loader, a kernel of fixed
    length as the model step, CUDA events around each step), on the CPU: every method's
    epoch, then one row of GPU idle time per method, from the timed epochs alone."""
    slept: list[int] = []

    def sleep(cycles: int) -> None:
        slept.append(cycles)
        time.sleep(cycles / 1e9)  # (a 1 GHz clock)

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", sleep)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    r = Runner(2, progress=False)
    loader.bench_loader(r, "cpu", images=48, batch=16, size=16, workers=0, step_s=1e-3, gpu=True)

    epochs = [row for row in r.rows if row.case.startswith("one epoch")]
    idle = [row for row in r.rows if row.case.startswith("GPU idle")]
    assert [row.method for row in idle] == [row.method for row in epochs] and len(idle) == 3
    assert [row.baseline for row in idle] == [True, False, False]
    for row in epochs + idle:
        assert row.section == "end to end on cpu" and row.samples == 2 and row.median_s > 0, row
    for row in idle:
        assert row.p10_s <= row.median_s <= row.p90_s < 1, row  # (seconds per gap)
    # the model step: about 1 ms of the measured clock (20M cycles timed it, then 1M warmed it)
    assert slept[:2] == [1_000_000, 20_000_000]
    assert all(0.3e6 < c < 3e6 for c in slept[2:]) and len(slept) > 2 * 3 * 3
