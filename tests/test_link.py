"""The simulated link (``_C.LinkSimulator``) and ``bench --sections link``.

The simulator runs the real pipeline and pool over a modeled link; these tests check
that what it moves is right (every layout, both directions, several copy threads, two
streams at once), that its model holds as a lower bound (a copy never completes sooner
than its bytes take at the link's rate), and that the benchmark's JSON carries the
transfer contract: the run's P and H, and per row direction, memory, gbs,
vs_best_baseline and of_limit computed from the rows themselves.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tensorbridge import _backend, _cuda
from tensorbridge.bench import cpu
from tensorbridge.bench._results import load, row_records
from tensorbridge.bench._rows import MiB, Row

from conftest import HAS_EXTENSION, random_array

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
POISON = 0xAB


def simulator(gbs: float = 0.0, latency_us: float = 0.0, budget: int = 1 << 30):
    return _backend.ENGINE.C.LinkSimulator(gbs, latency_us, budget)


def poisoned(shape, dtype, kind: str) -> np.ndarray:
    """An array of `kind` layout whose every byte is POISON."""
    base = np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, POISON, np.uint8)
    if kind == "F":
        return base.view(dtype).reshape(shape[::-1]).T
    a = base.view(dtype).reshape(shape)
    return a[::-1] if kind == "reversed" else a


@pytest.mark.parametrize("kind", ["C", "F", "reversed"])
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip_any_layout_and_thread_count(kind, threads):
    rng = np.random.default_rng(threads)
    a = random_array((97, 131), "<f8", rng)
    sim = simulator(latency_us=30)  # late completions: a block reused too early shows
    src = poisoned(a.shape, a.dtype, kind)
    src[...] = a
    device = np.full(a.nbytes, POISON, np.uint8)
    up = sim.to_device(src, device, chunk_bytes=4096, buffers=2 * threads, threads=threads)
    assert device.tobytes() == a.tobytes()
    out = poisoned(a.shape, a.dtype, kind)
    down = sim.to_host(device, out, chunk_bytes=4096, buffers=2 * threads, threads=threads)
    np.testing.assert_array_equal(out, a)
    assert up["threads"] == down["threads"] == threads
    assert sim.stats()["bytes_in_use"] == 0


def test_two_streams_both_directions_at_once():
    rng = np.random.default_rng(1)
    up_src = random_array((256, 1024), "<f4", rng)
    down_src = random_array((256, 1024), "<f4", rng)
    sim = simulator(gbs=2.0, latency_us=10)
    up_dev = np.full(up_src.nbytes, POISON, np.uint8)
    down_dev = np.frombuffer(down_src.tobytes(), np.uint8).copy()
    out = np.full(down_src.shape, np.nan, np.float32)
    kw = {"chunk_bytes": 64 << 10, "buffers": 4, "threads": 2}
    t = threading.Thread(target=sim.to_host, args=(down_dev, out), kwargs={**kw, "stream": 1})
    t.start()
    sim.to_device(up_src, up_dev, **kw, stream=0)
    t.join()
    assert up_dev.tobytes() == up_src.tobytes()
    np.testing.assert_array_equal(out, down_src)


def test_a_copy_takes_at_least_its_bytes_at_the_link_rate():
    """The model is a lower bound: 8 MiB at 1 GB/s never completes in under 8.4 ms."""
    sim = simulator(gbs=1.0, latency_us=100)
    host = np.ones(8 * MiB, np.uint8)
    device = np.zeros(8 * MiB, np.uint8)
    t0 = time.perf_counter()
    sim.copy(device, host, False)
    elapsed = time.perf_counter() - t0
    assert elapsed >= (8 * MiB / 1e9 + 100e-6) * 0.999
    assert device.tobytes() == host.tobytes()


def test_host_ceiling_times_each_copy():
    secs = simulator().host_ceiling(1 * MiB, True, 4)
    assert len(secs) == 4 and all(s > 0 for s in secs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.to_host(np.zeros(8, np.uint8), np.zeros(4, np.float32)), "large enough"),
        (lambda s: s.to_device(np.zeros(4, np.float32), np.zeros(8, np.uint8)), "large enough"),
        (lambda s: s.copy(np.zeros(8, np.uint8), np.zeros(4, np.uint8), True), "same size"),
        (lambda s: s.host_ceiling(0, True, 3), "positive"),
    ],
    ids=["small-device-d2h", "small-device-h2d", "copy-sizes", "ceiling-zero"],
)
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(simulator())


@pytest.mark.parametrize(
    ("gbs", "latency_us", "match"),
    [
        (-1.0, 0.0, "bandwidth_gbs must be 0"),
        (float("nan"), 0.0, "bandwidth_gbs must be 0"),
        (float("inf"), 0.0, "bandwidth_gbs must be 0"),
        (1e-12, 0.0, "bandwidth_gbs must be 0"),  # (a copy would be modeled for years)
        (1.0, -1.0, "latency_us must be"),
        (1.0, float("inf"), "latency_us must be"),
        (1.0, 2e7, "latency_us must be"),
    ],
)
def test_an_impossible_link_is_refused(gbs, latency_us, match):
    with pytest.raises(ValueError, match=match):
        simulator(gbs=gbs, latency_us=latency_us)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.to_host(np.zeros(64, np.uint8), np.empty(8, object)),
        lambda s: s.to_device(np.array([object()] * 8), np.zeros(64, np.uint8)),
        lambda s: s.copy(np.zeros(64, np.uint8), np.empty(8, object), True),
    ],
    ids=["to_host", "to_device", "copy"],
)
def test_arrays_of_references_are_refused_before_any_byte_moves(call):
    with pytest.raises(TypeError, match="Python references"):
        call(simulator())


def test_copy_reads_a_read_only_source():
    sim = simulator()
    host = np.arange(64, dtype=np.uint8)
    host.flags.writeable = False
    device = np.zeros(64, np.uint8)
    sim.copy(device, host, False)
    assert device.tobytes() == host.tobytes()
    device.flags.writeable = False
    out = np.zeros(64, np.uint8)
    sim.copy(device, out, True)
    assert out.tobytes() == host.tobytes()
    with pytest.raises(ValueError, match="read-only"):
        sim.copy(device, out, False)  # the destination, though, must be writeable


@pytest.mark.parametrize("nbytes", [1, 64 << 10, 1 * MiB, 4 * MiB, 16 * MiB, 1 << 30, 1 << 36])
@pytest.mark.parametrize("threads", [1, 2, 16])
def test_staging_plan_gives_each_copy_thread_two_chunks(nbytes, threads):
    chunk, buffers = _cuda.staging_plan(nbytes, threads)
    opts = _cuda.transfer_options()
    assert buffers == opts["buffers"]
    assert 1 * MiB <= chunk <= opts["chunk_bytes"]
    workers = max(1, min(threads, buffers // 2, nbytes // (2 * MiB)))
    if chunk < opts["chunk_bytes"] and nbytes >= 2 * chunk:
        assert -(-nbytes // chunk) >= 2 * workers  # at least two chunks per copy thread


def test_row_records_derive_the_contract_fields_from_the_rows():
    def row(method, baseline, median_s, memory="pageable-fresh", direction="d2h", size=MiB):
        return Row(
            "s",
            direction,  # (each direction is its own row group, as in the benchmarks)
            size,
            method,
            baseline,
            median_s,
            median_s,
            median_s,
            3,
            2.0,
            direction,
            memory,
        )

    rows = [
        row("torch a", True, 2e-3),
        row("torch b", True, 1e-3),
        row("tb", False, 0.5e-3),
        row("tb pinned", False, 0.25e-3, memory="pinned"),  # no pinned baseline: no ratio
        row("tb up", False, 0.5e-3, direction="h2d"),
    ]
    recs = row_records(rows)
    gbs = [MiB / r.median_s / 1e9 for r in rows]
    assert [r["gbs"] for r in recs] == pytest.approx(gbs)
    assert [r["of_limit"] for r in recs] == pytest.approx([g / 2.0 for g in gbs])
    assert [r["vs_best_baseline"] for r in recs] == [None, None, 2.0, None, None]


def test_bench_link_saves_the_contract(tmp_path: Path, capsys):
    status = cpu.main(
        [
            "--sections",
            "link",
            "--sizes",
            "1M",
            "16M",
            "--repeats",
            "2",
            "--quiet",
            "--link-gbs",
            "4",
            "--save",
            str(tmp_path),
        ]
    )
    assert status == 0
    text = capsys.readouterr().out
    assert "simulated link" in text and "of lim" in text and "link: the pipeline reached" in text
    (saved,) = tmp_path.glob("*.json")
    data = json.loads(saved.read_text())
    for key in ("P_d2h", "P_h2d", "H_d2h", "H_h2d"):
        assert data[key] > 0
    assert data["link_gbs"] == 4.0
    rows = data["rows"]
    assert {r["direction"] for r in rows} == {"d2h", "h2d", "both"}
    assert {r["memory"] for r in rows} == {"simulated"}
    assert {r["size"] for r in rows if r["direction"] != "both"} == {1 * MiB, 16 * MiB}
    for r in rows:
        limit = min(4.0, data[f"H_{r['direction']}"]) if r["direction"] != "both" else None
        if limit is not None:
            assert r["peak_gbs"] == pytest.approx(limit)
        assert r["of_limit"] == pytest.approx(r["gbs"] / r["peak_gbs"])
        assert (r["vs_best_baseline"] is None) == r["baseline"]
    report = load(str(saved))
    assert report.limits["H_d2h"] == data["H_d2h"]
    assert len(report.rows) == len(rows)


def test_bench_link_refuses_a_bad_link(capsys):
    with pytest.raises(SystemExit):
        cpu.main(["--sections", "link", "--link-gbs", "0"])
    assert "--link-gbs must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cpu.main(["--sections", "link", "--link-latency-us", "inf"])


@pytest.mark.parametrize("memory", ["pinned", "pageable-reused", "pageable-fresh"])
def test_gpu_rows_are_judged_against_p_or_min_p_h(memory):
    from tensorbridge.bench.gpu import Limits

    lim = Limits(P_d2h=50.0, P_h2d=40.0, H_d2h=30.0, H_h2d=60.0)
    pinned = memory == "pinned"
    assert lim.of("d2h", memory) == (50.0 if pinned else 30.0)
    assert lim.of("h2d", memory) == 40.0
    assert lim.of("both", memory) == lim.of("d2h", memory) + lim.of("h2d", memory)


def test_gpu_plot_draws_transfer_rows_and_limits(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="needs matplotlib (the plot extra)")
    from tensorbridge.bench._rows import Report
    from tensorbridge.bench.gpu import plot

    rows = [
        Row(
            sec,
            "c",
            size,
            method,
            method.startswith("torch"),
            size / 10e9,
            size / 11e9,
            size / 9e9,
            3,
            10.0,
            d,
            "pageable-reused",
        )
        for sec, d in (("device -> host, float32", "d2h"), ("host -> device, float32", "h2d"))
        for size in (MiB, 16 * MiB)
        for method in ("torch idiom", "tb method")
    ]
    limits = {"P_d2h": 50.0, "P_h2d": 40.0, "H_d2h": 30.0, "H_h2d": 60.0}
    machine = {"gpu": "a GPU", "pcie": "gen 5 x16", "cpu": "a CPU"}
    path = tmp_path / "plot.png"
    plot(Report(machine, rows, limits), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s: s.to_host(np.zeros(64, np.uint8), np.empty(10, [])), ValueError, "zero bytes"),
        (lambda s: s.to_device(np.empty(10, []), np.zeros(64, np.uint8)), ValueError, "zero"),
        (
            lambda s: s.to_device(np.ones(16, np.uint8), np.array([object(), object()])),
            TypeError,
            "Python references",
        ),
        (
            lambda s: s.to_host(np.array([object(), object()]), np.ones(16, np.uint8)),
            TypeError,
            "Python references",
        ),
        (
            lambda s: s.to_host(
                np.zeros(1 << 16, np.uint8), np.zeros(1 << 16, np.uint8), chunk_bytes=1
            ),
            ValueError,
            "chunk_bytes",
        ),
        (lambda s: s.host_ceiling(1, True, 10**9), ValueError, "repeats"),
        (lambda s: s.host_ceiling(1 << 40, True, 3), ValueError, "4 GiB"),
    ],
    ids=[
        "zero-itemsize-out",
        "zero-itemsize-src",
        "object-device-written",
        "object-device-read",
        "tiny-chunk",
        "huge-repeats",
        "huge-ceiling",
    ],
)
def test_hostile_arguments_are_refused_before_anything_moves(call, error, match):
    with pytest.raises(error, match=match):
        call(simulator())


@pytest.mark.parametrize("shift", [1, 4096])
def test_device_and_host_sharing_memory_is_refused(shift):
    buf = np.zeros(1 << 20, np.uint8)
    device, host = buf[shift:], buf[: (1 << 20) - shift]
    sim = simulator()
    with pytest.raises(ValueError, match="share memory"):
        sim.to_host(device, host)
    with pytest.raises(ValueError, match="share memory"):
        sim.to_device(host, device)
    with pytest.raises(ValueError, match="share memory"):
        sim.copy(device, host, True)


def test_a_forked_child_gets_an_error_from_the_parents_simulator_and_exits():
    """The engine threads do not come along: use raises, and dropping it does not hang."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, sys, threading, numpy as np
        from tensorbridge import _C
        import tensorbridge._C_testing as T
        sim, tester = _C.LinkSimulator(0.0, 0.0), T.HostTransferTester()
        a, dev = np.ones(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
        busy = threading.Thread(target=lambda: [sim.to_device(a, dev) for _ in range(30)])
        busy.start()
        pid = os.fork()
        if pid == 0:
            try:
                sim.to_device(a, dev)
                os._exit(3)
            except RuntimeError as exc:
                if "forked" not in str(exc):
                    os._exit(4)
            fresh = _C.LinkSimulator(0.0, 0.0)
            fresh.to_device(a, dev)
            del sim, tester, fresh
            sys.exit(0)
        busy.join()
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0"]
