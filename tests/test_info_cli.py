"""info(), the fallback switch, the command line, and the benchmark smoke run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _cuda
from tensorbridge.bench import _plot, cpu, gpu, load, measure, save, tune
from tensorbridge.bench._report import format_report, machine, summary, vs_best
from tensorbridge.bench._rows import Report, Row
from tensorbridge.bench._runner import measure_group

from conftest import HAS_CUDA, forced_fallback

ENV = {k: v for k, v in os.environ.items() if k not in (_backend.DISABLE_ENV, _backend.MODE_ENV)}


def run_child(
    args: list[str], stdout: Any = subprocess.PIPE, program: str = sys.executable, **env: str
) -> subprocess.CompletedProcess:
    """``program`` (this Python) with ``args``, stderr (and stdout, unless it is given a
    file) captured as text, in this run's environment less tensorbridge's switches plus
    ``env``."""
    return subprocess.run(
        [program, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **env},
        timeout=120,
        check=False,
    )


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return run_child(["-c", code], **env)


def test_info_reports_the_live_path():
    info = tb.info()
    for key in ("version", "extension", "cuda", "devices", "fallback_reason", "threads"):
        assert key in info
    assert info["version"] == tb.__version__
    assert info["extension"] == (_backend.ENGINE.C is not None)
    assert (info["fallback_reason"] is None) == info["extension"]
    assert info["cuda"] == HAS_CUDA or not info["extension"]
    if not info["cuda"]:
        assert isinstance(info["cuda_reason"], str) and info["cuda_reason"].endswith(".")
        if torch.version.cuda is None and torch.version.hip is None:  # (the first to fix)
            assert info["cuda_reason"] == (
                f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): "
                "install a CUDA build of torch to use a GPU."
            )
        assert info["devices"] == 0 or not HAS_CUDA
    assert info["threads"] >= 1


def test_info_under_forced_fallback():
    with forced_fallback():
        info = tb.info()
    assert info["extension"] is False
    assert "forced" in info["fallback_reason"]
    assert info["threads"] == 1


def test_a_malformed_legacy_switch_is_refused_at_import():
    proc = run_python("import tensorbridge", TENSORBRIDGE_DISABLE_EXTENSION="garbage")
    assert proc.returncode != 0
    assert "TENSORBRIDGE_DISABLE_EXTENSION='garbage' is not understood" in proc.stderr
    proc = run_python(
        "import tensorbridge as tb; print(tb.info()['extension_mode'])",
        TENSORBRIDGE_DISABLE_EXTENSION="0",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "auto", proc.stderr


def test_the_pure_python_path_reports_the_one_thread_it_copies_on():
    proc = run_python(
        "import json, tensorbridge as tb; print(json.dumps(tb.info()['ranks']))",
        TENSORBRIDGE_EXTENSION="off",
        TENSORBRIDGE_NUM_THREADS="8",
    )
    assert proc.returncode == 0, proc.stderr
    ranks = json.loads(proc.stdout)
    assert (ranks["threads"], ranks["threads_source"]) == (1, "pure-Python path")


def test_environment_variable_forces_the_fallback():
    proc = run_python(
        "import json, tensorbridge as tb; print(json.dumps(tb.info()))",
        TENSORBRIDGE_DISABLE_EXTENSION="1",
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["extension"] is False
    assert "TENSORBRIDGE_DISABLE_EXTENSION=1" in info["fallback_reason"]
    # the README's other spellings, and the reason quotes the one that is set
    proc = run_python(
        "import tensorbridge as tb; print(tb.info()['fallback_reason'])",
        TENSORBRIDGE_DISABLE_EXTENSION="yes",
    )
    assert proc.returncode == 0 and "TENSORBRIDGE_DISABLE_EXTENSION=yes is set" in proc.stdout
    proc = run_python(
        "import torch, numpy as np, tensorbridge as tb;"
        "o = np.empty((3, 2), np.float32);"
        "tb.to_numpy(torch.arange(6.).reshape(2, 3).t(), out=o); print(o.sum())",
        TENSORBRIDGE_DISABLE_EXTENSION="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == 15.0


@pytest.mark.skipif(
    _backend.extension_mode() == "off", reason="the extension is disabled on purpose"
)
@pytest.mark.skipif(
    not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))),
    reason="no C++ compiler or CMake: the pure-Python install is expected",
)
def test_extension_is_built_and_used_where_a_compiler_exists():
    assert _backend._LOADED is not None, _backend.ENGINE.fallback_reason
    assert tb.info()["extension"] is True
    assert tb.info()["extension_path"].endswith((".so", ".pyd"))
    # and the CUDA translation unit is compiled wherever nvcc is
    if shutil.which("nvcc"):
        assert tb.info()["cuda_compiled"] is True


def test_cli_info():
    proc = run_child(["-m", "tensorbridge", "info", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == tb.__version__
    proc = run_child(["-m", "tensorbridge", "info"])
    assert "fallback_reason" in proc.stdout


def test_cli_info_check_fails_where_torch_has_a_gpu_the_engine_cannot_use(monkeypatch, capsys):
    """``info --check`` on a GPU machine whose core was built without the CUDA toolkit
    (or cannot use the GPU): exit 1, naming the reason; where torch has no GPU, the
    check is the compiled core's alone."""
    from tensorbridge import __main__ as cli

    if tb.info()["cuda"]:
        pytest.skip("the CUDA engine is in use here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)  # (a ROCm build: not the engine's GPUs)
    assert not cli._torch_has_a_gpu()
    monkeypatch.undo()
    real = tb.info()  # (on the pure-Python path too: the core's check is not this one)
    monkeypatch.setattr(tb, "info", lambda: {**real, "extension": True})
    monkeypatch.setattr(cli, "_torch_has_a_gpu", lambda: False)
    assert cli.main(["info", "--check"]) == 0
    monkeypatch.setattr(cli, "_torch_has_a_gpu", lambda: True)
    capsys.readouterr()
    assert cli.main(["info", "--check"]) == 1
    err = capsys.readouterr().err
    reason = real["cuda_reason"]
    assert (
        err
        == f"info --check: torch can use a GPU but tensorbridge's CUDA engine cannot: {reason}\n"
    )


@pytest.mark.parametrize("command", ["info", "bench", "bench-gpu", "bench-tune"])
def test_cli_help_with_stdout_closed_exits_cleanly(command):
    """``python -m tensorbridge bench --help >&-`` (no stdout at all: sys.stdout is None):
    the help goes to stderr, as argparse's own printing does, and nothing fails."""
    proc = run_child(
        ["-c", f'"$0" -m tensorbridge {command} --help >&-', sys.executable], program="bash"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if command != "info":  # (info prints with print(), which writes nowhere)
        assert proc.stderr.startswith(f"usage: python -m tensorbridge {command}")


@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["--help"]])
def test_cli_piped_into_a_reader_that_leaves_says_nothing(args):
    """``python -m tensorbridge info | head -1``: the reader closes the pipe before the
    report is written; no BrokenPipeError traceback follows."""
    with subprocess.Popen(
        [sys.executable, "-m", "tensorbridge", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # (gone before the first line)
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "args",
    [["info"], ["info", "--json"], ["bench", "--help"], ["bench-gpu", "-h"], ["bench-tune", "-h"]],
)
def test_cli_onto_a_full_disk_says_so_in_one_line(args):
    """``python -m tensorbridge info > /dev/full``: one line naming the write error and a
    failing status, no traceback (and no 'Exception ignored' from the flush at exit). A
    benchmark's ``--help`` too: argparse drops a help text it cannot write."""
    with open("/dev/full", "w") as full:
        proc = run_child(["-m", "tensorbridge", *args], stdout=full)
    assert proc.returncode == 1
    assert proc.stderr == "tensorbridge: write error: No space left on device\n", proc.stderr


@pytest.mark.parametrize("args", [["info"], ["--help"]])
def test_cli_over_the_file_size_limit_says_so_in_one_line(tmp_path, args):
    """``ulimit -f 0; python -m tensorbridge info > file``: Python ignores SIGXFSZ, so the
    write fails with EFBIG; one line, exit 1, as for a full disk (``--help`` too: its
    text is written as the parser exits). The limit is set once tensorbridge is imported
    (importing torch may need to write a temporary file)."""
    code = (
        "import resource, sys; from tensorbridge import __main__ as cli; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
        f"sys.argv = ['tensorbridge', *{args!r}]; sys.exit(cli.run())"
    )
    with open(tmp_path / "out.txt", "w") as out:
        proc = run_child(["-c", code], stdout=out)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "tensorbridge: write error: File too large\n", proc.stderr


def test_cli_raises_other_os_errors_as_they_are(monkeypatch):
    """Only errors that say the output has nowhere to go are shortened to a line."""
    from tensorbridge import __main__ as cli

    def denied(argv=None):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "main", denied)
    with pytest.raises(PermissionError):
        cli.run()


def test_cli_raises_a_broken_pipe_that_is_not_its_output(monkeypatch):
    """Only stdout's reader going away ends the command quietly; another pipe breaking
    (a benchmark's worker, say) is an error as before. The console script runs the same."""
    from tensorbridge import __main__ as cli

    def broken(argv=None):
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(cli, "main", broken)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        cli.run()
    scripts = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert 'tensorbridge = "tensorbridge.__main__:run"' in scripts.read_text()


def test_cli_rejects_unknown_command():
    proc = run_child(["-m", "tensorbridge", "frobnicate"])
    assert proc.returncode == 2
    assert "usage" in proc.stderr


@pytest.mark.parametrize("fallback", [False, True], ids=["extension", "fallback"])
def test_benchmark_smoke(tmp_path, capsys, fallback):
    """A tiny run of the whole benchmark, so it never rots."""
    args = [
        "--sizes",
        "4K",
        "64K",
        "--repeats",
        "2",
        "--refused-size",
        "64K",
        "--quiet",
        "--save",
        str(tmp_path),
    ]
    assert cpu.main(args + (["--fallback"] if fallback else [])) == 0
    text = capsys.readouterr().out
    for needle in (
        "tensorbridge CPU benchmark",
        "tb.to_numpy(x, out=out)",
        "np.copyto(out, x.numpy())",
        "torch.from_numpy(out).copy_(x)",
        "x.detach().cpu().numpy()",
        "tb.from_numpy(a[::-1])",
        "vs best",
    ):
        assert needle in text
    lines = text.splitlines()
    if fallback or _backend.ENGINE.C is None:  # (no packed path to sum up)
        assert lines[-1].startswith("summary, geometric mean of 'vs best' per section")
    else:  # the summary, then the packed path's host side per array
        assert lines[-3].startswith("summary, geometric mean of 'vs best' per section")
        assert lines[-2] == ""
        assert re.fullmatch(
            r"batch: the packed path's host side costs \d+\.\d\d us .*; "
            r"\d+\.\d\d us of it with arrays of 16 B \(no copy to speak of\)",
            lines[-1],
        )
    bf16_view = [ln for ln in text.splitlines() if "[ml_dtypes view]" in ln]
    if bf16_view:  # (with ml_dtypes) a view moves no bytes: no GB/s, no ratio
        assert bf16_view[0].split("[ml_dtypes view]")[1].split() == ["view"], bf16_view
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1
    data = json.loads(saved[0].read_text())
    assert data["machine"]["path"] == (
        "fallback" if fallback else ("extension" if _backend.ENGINE.C is not None else "fallback")
    )
    assert all(row["median_s"] > 0 for row in data["rows"])


def test_measure_reports_spread():
    med, p10, p90, number = measure(lambda i: None, repeats=5, min_sample_s=1e-4)
    assert 0 <= p10 <= med <= p90
    assert number >= 1


def test_measure_rotates_across_samples():
    """The call index counts on from one sample to the next, so a method slow enough to
    run once per sample still rotates through its buffers."""
    seen: list[int] = []
    measure_group([seen.append], repeats=5, min_sample_s=0, warmup=0)
    assert seen[-5:] == [0, 1, 2, 3, 4]


def test_benchmark_results_round_trip(tmp_path):
    """save() then load() gives back the machine and the same rows, in order."""
    rows = [
        Row("overhead", "tensor -> ndarray", 0, "tb.to_numpy(x)", False, 1e-6, 9e-7, 2e-6, 5),
        Row("overhead", "tensor -> ndarray", 0, "x.numpy()", True, 5e-7, 4e-7, 6e-7, 5),
        Row("device -> host", "into out", 4096, "t.cpu()", True, 1e-5, 9e-6, 2e-5, 5, 54.8),
    ]
    report = Report(machine(), rows)
    text = format_report(report)
    base = save(report, text, str(tmp_path / "results"), "run")
    assert (tmp_path / "results" / "run.txt").read_text() == text + "\n"
    back = load(base + ".json")
    assert back.rows == rows
    assert back.machine == json.loads(json.dumps(report.machine))
    assert format_report(back) == text
    # a second run of the same day never overwrites the first
    again = save(report, "second", str(tmp_path / "results"), "run")
    assert (
        again.endswith("run-2") and (tmp_path / "results" / "run-2.txt").read_text() == "second\n"
    )
    assert (tmp_path / "results" / "run.txt").read_text() == text + "\n"


RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def committed(pattern: str) -> list[Path]:
    """The files in benchmarks/results matching pattern as the last commit has them, sorted:
    a benchmark run's own fresh output there (bench-gpu and bench-tune save before the CPU
    tests run in benchmarks/run_gpu.sh) is not what these tests judge. Outside a git
    checkout of this project (a copy of the files alone), every matching file."""
    found = sorted(RESULTS.glob(pattern))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=RESULTS, capture_output=True, text=True, timeout=60, check=True
        ).stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
        if top != RESULTS.parent.parent.resolve():
            return found  # (a copy inside some other repository)
        listed = git("ls-tree", "-r", "--name-only", "HEAD", "--", ".").splitlines()
        modified = git("diff", "--name-only", "--relative", "HEAD", "--", ".").splitlines()
    except (OSError, subprocess.SubprocessError):
        return found
    committed = {RESULTS / Path(name).name for name in listed}
    changed = {RESULTS / Path(name).name for name in modified}
    return [path for path in found if path in committed and path not in changed]


@pytest.mark.parametrize("path", committed("*-[cg]pu-*.json"), ids=lambda p: p.name)
def test_committed_results_still_load(path):
    """The results under benchmarks/results load, and print as the .txt saved beside them."""
    report = load(str(path))
    assert report.rows and all(row.median_s > 0 for row in report.rows)
    title = "tensorbridge GPU benchmark" if "-gpu-" in path.name else "tensorbridge CPU benchmark"
    assert path.with_suffix(".txt").read_text().startswith(format_report(report, title))


def _row(section, case, size, method, baseline, median_s):
    return Row(section, case, size, method, baseline, median_s, median_s * 0.9, median_s * 1.1, 5)


def test_a_view_row_says_view_and_has_no_ratio():
    rows = [
        _row("refused", "bfloat16", 1 << 20, "tb.to_numpy(x)  [ml_dtypes view]", False, 1e-7),
        _row("refused", "bfloat16", 1 << 20, "x.float().numpy()", True, 1e-3),
        _row("refused", "swap", 1 << 20, "tb.from_numpy(a)", False, 1e-3),
        _row("refused", "swap", 1 << 20, "a.astype('<f4')", True, 2e-3),
    ]
    assert [r.is_view() for r in rows] == [True, False, False, False]
    lines = format_report(Report(machine(), rows)).splitlines()
    view = next(ln for ln in lines if "[ml_dtypes view]" in ln)
    assert view.split("[ml_dtypes view]")[1].split() == ["view"], view  # no GB/s, no ratio
    copy = next(ln for ln in lines if "x.float().numpy()" in ln)
    assert copy.split()[1] == "1.05"  # 1 MiB in 1 ms; the baseline itself has no ratio
    # the summary counts the one real ratio (2 ms / 1 ms), not the view's
    assert lines[-1].endswith(": refused 2.00x (1)")


def test_the_summary_is_each_sections_geometric_mean_of_vs_best():
    rows = [
        _row("out, GB/s", "a", 4096, "tb", False, 1e-6),
        _row("out, GB/s", "a", 4096, "base", True, 2e-6),  # tb 2x
        _row("out, GB/s", "a", 65536, "tb", False, 4e-6),
        _row("out, GB/s", "a", 65536, "base", True, 2e-6),  # tb 0.5x
        _row("out, GB/s", "a", 65536, "slower base", True, 8e-6),
        _row("overhead (x, y), tiny", "t", 0, "tb", False, 1e-6),
        _row("overhead (x, y), tiny", "t", 0, "base", True, 3e-6),  # 3x
        _row("overhead (x, y), tiny", "t", 0, "tb again", False, 1e-6),  # 3x
        _row("only baselines: none", "b", 0, "base", True, 1e-6),
    ]
    assert summary(rows) == (
        "summary, geometric mean of 'vs best' per section (rows): "
        "out 1.00x (2); overhead (x, y) 3.00x (2)"
    )
    assert summary(rows[-1:]).endswith("no row has a baseline to compare with")
    assert format_report(Report(machine(), rows)).splitlines()[-1] == summary(rows)
    # sections whose short titles coincide (one per direction) keep their whole titles
    per_direction = [
        _row(f"cache, {d}, float32", "a", 4096, m, m == "base", t)
        for d in ("d2h", "h2d")
        for m, t in (("tb", 1e-6), ("base", 2e-6))
    ]
    assert summary(per_direction).endswith(
        "cache, d2h, float32 2.00x (1); cache, h2d, float32 2.00x (1)"
    )


def test_the_batch_summary_is_the_host_side_slope_per_array():
    from tensorbridge.bench import loader

    host = loader.HOST_SIDE
    rows = [
        _row("batches", "10 arrays of 4 KiB over a simulated 25 GB/s link", 0, host, False, 30e-6),
        _row("batches", "1000 arrays of 4 KiB over a simulated 25 GB/s link", 0, "loop", True, 1),
        _row(
            "batches",
            "1000 arrays of 4 KiB over a simulated 25 GB/s link",
            0,
            host,
            False,
            1.515e-3,
        ),
        _row("batches", "100 arrays of 4 KiB over a simulated 25 GB/s link", 0, host, False, 1e-3),
        # the ragged row is not one of the 4 KiB points (its 1000 would tie with theirs)
        _row("batches", f"{loader.RAGGED_CASE} over a simulated link", 0, host, False, 9e-3),
    ]
    assert loader.summary(rows) == (
        "batch: the packed path's host side costs 1.50 us per array (from 10 to 1000 "
        "arrays of 4 KiB: layout, staging copy, views; target 1 us)"
    )
    assert loader.summary(rows[1:3]) == ""  # one host-side row: no slope


def test_table_columns_fit_the_longest_case_and_method():
    long_method = "torch.from_numpy(a).pin_memory().to('cuda', non_blocking=True) " * 2
    long_case = "a case with a long name, " * 3
    rows = [
        _row("sec", "short", 1 << 30, "tb", False, 0.1),
        _row("sec", "short", 1 << 30, long_method, True, 0.2),
        _row("sec", long_case, 4096, "tb", False, 1e-6),
        _row("sec", long_case, 4096, "np", True, 2e-6),
    ]
    lines = format_report(Report(machine(), rows)).splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("case "))
    table = lines[header : header + 6]
    method_at = table[0].index("method")
    value_end = table[0].index("GB/s") + len("GB/s")
    for line, row in zip(table[2:], rows, strict=True):
        assert line.index(row.method) == method_at, line  # every method starts in one column
        value = f"{row.value():.2f}"
        assert line.index(value, method_at + len(row.method)) + len(value) == value_end, line
    assert table[2].startswith("short ") and table[4].startswith(long_case)
    assert len(table[1]) == len(table[0]) and set(table[1]) == {"-"}


def test_contended_section_measures_beside_busy_processes_and_stops_them(monkeypatch, capsys):
    """bench --sections contended: the out= rows beside busy processes, which are gone
    when it returns."""
    started = []
    popen = subprocess.Popen

    def recording(cmd, *args, **kwargs):
        proc = popen(cmd, *args, **kwargs)
        if cpu.SPIN in cmd:
            started.append(proc)
        return proc

    monkeypatch.setattr(cpu.subprocess, "Popen", recording)
    assert cpu.main(["--sections", "contended", "--sizes", "64K", "2M", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    busy = cpu.busy_process_count()
    assert len(started) == busy >= 1 and all(p.poll() is not None for p in started)
    assert f"beside {busy} busy process" in out
    cases = [line.split()[:5] for line in out.splitlines() if line.startswith(("back", "2 ms"))]
    # (of the sizes given, only those the routing decides on)
    assert cases == [["back", "to", "back", "2", "MiB"], ["2", "ms", "apart", "2", "MiB"]], out
    assert "np.copyto(out, x.numpy())" in out and "torch.from_numpy(out).copy_(x)" in out
    # (whatever the routing is set to: with it off, the section shows what that costs)
    monkeypatch.setattr(_cuda.ROUTING, "host_torch_bytes", 1 << 62)
    assert cpu.contended_sizes([64 << 10, 32 << 20]) == [1 << 20]


@pytest.mark.skipif(sys.platform == "win32", reason="a parent's end reparents on POSIX")
def test_contended_section_busy_processes_end_with_their_parent():
    """A benchmark killed outright (SIGKILL) leaves no busy process spinning."""
    code = (
        "import os, subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {cpu.SPIN!r}, str(os.getpid())], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    )  # (the parent prints its child's pid and ends at once, maybe before the child starts)
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"busy process {pid} outlived its parent")


@pytest.mark.skipif(not _plot.available(), reason="needs matplotlib (the plot extra)")
def test_benchmark_plot(tmp_path):
    """--plot draws the CPU run; the GPU plot, through the same code, draws a committed run."""
    png = tmp_path / "cpu.png"
    args = ["--sizes", "4K", "64K", "--repeats", "2", "--refused-size", "64K", "--quiet"]
    assert cpu.main([*args, "--sections", "overhead", "out", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    gpu_png = tmp_path / "gpu.png"
    gpu.plot(load(str(RESULTS / "2026-11-23-gpu-nvidia-h100-80gb-hbm3.json")), str(gpu_png))
    assert gpu_png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_benchmark_plot_without_matplotlib_refuses_before_measuring(monkeypatch, capsys):
    monkeypatch.setattr(_plot, "available", lambda: False)
    monkeypatch.setattr(cpu, "run", lambda *a, **k: pytest.fail("measured anyway"))
    with pytest.raises(SystemExit) as exc:
        cpu.main(["--plot", "x.png"])
    assert exc.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_gpu_benchmarks_refuse_clearly_without_cuda(capsys):
    """bench-gpu and bench-tune import everywhere and say why they cannot run."""
    if HAS_CUDA:
        pytest.skip("a CUDA device is available")
    assert gpu.main(["--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench-gpu: needs a GPU, and torch has none here: ")
    if torch.version.cuda is None:
        assert f"torch {torch.__version__} is a CPU build: install a CUDA build" in err
    reason = _backend.cuda_status()[2]
    assert tune.main(["--repeats", "3"]) == 2
    want = f"bench-tune: needs a GPU and tensorbridge's compiled CUDA engine: {reason}\n"
    assert capsys.readouterr().err == want
    assert tune.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((224, 224, 3), np.uint8), ((16, 16, 3), np.uint8), ((8, 8), np.float32)],
    ids=["images (uniform group)", "small images (ragged group)", "float32"],
)
def test_gpu_benchmark_stacks_samples_on_the_copy_threads_like_numpy(shape, dtype):
    """The image row that stacks on the copy threads (it runs only on a GPU) gives
    np.stack's bytes, and refuses samples it cannot stack in order without gaps."""
    if _backend.ENGINE.C is None:
        pytest.skip("needs the compiled core")
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, shape).astype(dtype) for _ in range(5)]
    out = np.full((5, *shape), 77, dtype)  # (poisoned: unwritten bytes show)
    assert gpu.stack_on_copy_threads(samples, out) is out
    np.testing.assert_array_equal(out, np.stack(samples))
    for wrong in (
        [*samples, samples[0][:1]],  # two groups
        [s.view(np.uint8).reshape(-1) for s in samples],  # the bytes, but another dtype and shape
    ):
        with pytest.raises(ValueError, match=r"numpy\.stack"):
            gpu.stack_on_copy_threads(wrong, out)
    np.testing.assert_array_equal(out, np.stack(samples))  # (refused before writing)
    with pytest.raises(TypeError, match=r"numpy\.stack"):
        gpu.stack_on_copy_threads(samples, out.tolist())


def test_gpu_benchmark_saves_each_section_and_survives_a_failed_one(tmp_path, monkeypatch):
    """bench-gpu runs its sections in the order given and rewrites its files after each,
    so a run stopped by a time limit keeps what it measured; a section that raises is
    reported, the others still run, and the exit status is 1. (The device is faked: the
    sections' own measurements need a GPU.)"""
    fake = {"gpu": "Fake GPU 80GB", "torch_cuda": "13.0", "driver": "1.0", "pcie": "gen 5 x16"}
    host = machine()  # (before torch is told it has a device)
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "gpu_machine", lambda: {**host, **fake})
    monkeypatch.setattr(gpu, "pinned_peak", lambda repeats: (50.0, 40.0))
    monkeypatch.setattr(gpu, "host_ceiling", lambda repeats: (20.0, 30.0))
    seen: list[tuple[str, list[str]]] = []
    results = tmp_path / "results"

    def saved_sections() -> list[str]:
        files = list(results.glob("*.json")) if results.exists() else []
        if not files:
            return []
        assert len(files) == 1, files  # rewritten in place, never a second file
        return [row["section"] for row in json.loads(files[0].read_text())["rows"]]

    def section(name: str, fail: bool = False):
        def run(r, *rest):
            seen.append((name, saved_sections()))
            if fail:
                raise RuntimeError(f"{name} broke")
            r.rows.append(Row(name, "case", 4096, "tb", False, 1e-5, 9e-6, 2e-5, 3, 40.0, "h2d"))

        return run

    monkeypatch.setattr(gpu, "bench_h2d", section("h2d"))
    monkeypatch.setattr(gpu, "bench_d2h", section("d2h", fail=True))
    monkeypatch.setattr(gpu, "bench_registered", section("registered"))
    order = ["h2d", "d2h", "registered"]
    code = gpu.main(["--repeats", "2", "--quiet", "--save", str(results), "--sections", *order])
    assert code == 1
    # in the order given; each section found the previous ones' rows already on disk
    assert seen == [("h2d", []), ("d2h", ["h2d"]), ("registered", ["h2d"])]
    assert saved_sections() == ["h2d", "registered"]
    (json_file,) = results.glob("*.json")
    data = json.loads(json_file.read_text())
    assert list(data["machine"]["section_seconds"]) == ["h2d", "d2h", "registered"]
    assert data["machine"]["failed_sections"] == ["d2h"]
    assert (data["P_d2h"], data["H_h2d"]) == (50.0, 30.0)
    text = json_file.with_suffix(".txt").read_text()
    assert "failed: d2h" in text and "sections run, in order: h2d (" in text


def test_gpu_targets_are_judged_from_the_runs_own_rows():
    """bench-gpu's closing lines: each target from the rows it names (the worst row where
    it holds at every size), 'not measured' without its rows, never a pass by default."""
    from tensorbridge.bench import targets

    KiB_, MiB_ = 1 << 10, 1 << 20

    def row(section, case, size, method, baseline, seconds, direction=None, memory=None, peak=None):
        return Row(
            section,
            case,
            size,
            method,
            baseline,
            seconds,
            seconds,
            seconds,
            5,
            peak,
            direction,
            memory,
        )

    d2h, h2d = "device -> host, float32", "host -> device, float32"
    reg = "registration cache, host -> device, float32"
    rows = [
        row(d2h, "to an array", 4 * KiB_, "pinned.copy_", True, 10e-6, "d2h", "pinned"),
        row(d2h, "to an array", 4 * KiB_, "tb [pinned out]", False, 12e-6, "d2h", "pinned"),
        row(h2d, "from an array", MiB_, "torch", True, 80e-6, "h2d", "pageable-reused"),
        row(h2d, "from an array", MiB_, "tb [pageable]", False, 100e-6, "h2d", "pageable-reused"),
        row(h2d, "from an array", MiB_, "torch pinned", True, 20e-6, "h2d", "pinned"),
        row(h2d, "from an array", MiB_, "tb [pinned a]", False, 24e-6, "h2d", "pinned"),
        # 16 MiB registered at 0.95 P (P_h2d = 40 GB/s) and 64 MiB at 0.85 P
        row(reg, "reused array", 16 * MiB_, "tb  [registered]", False, 16 * MiB_ / 38e9, "h2d"),
        row(reg, "reused array", 64 * MiB_, "tb  [registered]", False, 64 * MiB_ / 34e9, "h2d"),
        row(reg, "reused array", 4 * MiB_, "tb  [registered]", False, 1.0, "h2d"),  # < 16 MiB
        row(
            reg,
            "reused array",
            16 * MiB_,
            "tb  [staged: ...]",
            False,
            16 * MiB_ / 27e9,
            "h2d",
            "pageable-reused",
            30.0,
        ),
        row(  # a first sighting stages too, but what it times is mostly page faults
            reg,
            "registering a fresh array",
            16 * MiB_,
            "tb  [first sighting: staged]",
            False,
            16 * MiB_ / 6e9,
            "h2d",
            "pageable-fresh",
            30.0,
        ),
        row(
            "both directions at once, float32",
            "down + up",
            32 * MiB_,
            "tb",
            False,
            32 * MiB_ / 72e9,
            "both",
        ),
        row(
            "batches of small arrays -> device",
            "1000 x 4 KiB",
            4000 * KiB_,
            targets.LOOP,
            True,
            15e-3,
        ),
        row(
            "batches of small arrays -> device",
            "1000 x 4 KiB",
            4000 * KiB_,
            "per-leaf pin",
            True,
            40e-3,
        ),
        row("batches of small arrays -> device", "1000 x 4 KiB", 4000 * KiB_, "tb", False, 1e-3),
        row(
            "batches of small arrays -> device", "10 x 4 KiB", 40 * KiB_, targets.LOOP, True, 150e-6
        ),
        row("batches of small arrays -> device", "10 x 4 KiB", 40 * KiB_, "tb", False, 160e-6),
    ]
    report = Report(machine(), rows, {"P_d2h": 50.0, "P_h2d": 40.0, "H_d2h": 20.0, "H_h2d": 30.0})
    found = {v.target.split(":")[0]: v for v in targets.verdicts(report)}
    never = found["never slower than torch"]
    assert (never.met, never.measured) == (False, "worst 0.80x (tb [pageable], 1 MiB, h2d)")
    reg_v = found["a reused pageable array (registered) >= 0.9 P from 16 MiB, both ways"]
    assert (reg_v.met, reg_v.measured) == (False, "worst 0.85 P (h2d, 64 MiB)")
    staged = found["a pageable array staged (not registered) >= 0.8 min(P, H) from 16 MiB"]
    assert staged.met is True and staged.measured.startswith("worst 0.90 ")
    call = found["pinned memory"]
    assert (call.met, call.measured) == (False, "worst +4.0 us (h2d, 1 MiB)")
    both = found["both directions at once >= 1.6 P in total, reused buffers"]
    assert both.met is True and both.measured.startswith("worst 1.60 P (72.0 GB/s")
    assert found["1000 arrays of 4 KiB"].measured == "15.00x"  # the loop's, not per-leaf pinning
    assert found["1000 arrays of 4 KiB"].met is True
    assert (found["10 arrays of 4 KiB"].met, found["10 arrays of 4 KiB"].measured) == (
        False,
        "0.94x",
    )
    assert found["images from tb.collate, normalized"].met is None
    assert found["one DataLoader epoch"].met is None
    text = targets.lines(targets.verdicts(report))
    assert text[0] == "targets (3 of 9 met in this run):"
    assert "  [not measured] one DataLoader epoch" in "\n".join(text)
    # a run with no rows at all passes nothing
    empty = targets.verdicts(Report(machine(), [], {}))
    assert all(v.met is None for v in empty)
    # a zero, negative or NaN median (a hand-edited JSON file) is a row not measured: no
    # division by it, no verdict from it alone, and no 'vs best' for it or against it
    for bad in (0.0, -1e-6, float("nan")):
        broken = [
            row(d2h, "to an array", 4 * KiB_, "pinned.copy_", True, bad, "d2h", "pinned"),
            row(d2h, "to an array", 4 * KiB_, "tb [pinned out]", False, 12e-6, "d2h", "pinned"),
            row("batches of small arrays -> device", "10 x 4 KiB", 0, targets.LOOP, True, 1e-4),
            row("batches of small arrays -> device", "10 x 4 KiB", 0, "tb", False, bad),
        ]
        judged = {v.target.split(":")[0]: v for v in targets.verdicts(Report(machine(), broken))}
        assert judged["never slower than torch"].met is None
        assert judged["pinned memory"].met is None
        assert judged["10 arrays of 4 KiB"].met is None
        assert vs_best(broken) == [None, None, None, None]
        assert math.isnan(broken[3].value())


def test_tune_recommends_torch_up_to_the_largest_size_it_won():
    def small(direction: str, nbytes: int, torch_gbs: float, engine_gbs: float, direct=None):
        row = {
            "part": "small",
            "direction": direction,
            "bytes": nbytes,
            "torch_gbs": torch_gbs,
            "engine_gbs": engine_gbs,
        }
        return row if direct is None else {**row, "direct_gbs": direct}

    rows = [
        small("d2h", 4096, 1.0, 0.5),
        small("d2h", 65536, 1.0, 2.0),
        small("d2h", 524288, 3.0, 2.0),  # lost again: torch keeps everything up to here
        small("d2h", 1 << 20, 3.0, 4.0),
        small("h2d", 4096, 1.0, 1.5),  # never lost
        {"part": "pipeline", "direction": "h2d", "bytes": 1 << 24, "gbs": 9.0},
    ]
    expected = {"small_d2h": 524288, "small_h2d": 0, "small_direct": False}
    assert tune.recommended_routing(rows) == expected  # (no direct call timed)
    # the direct call replaces torch's copy where it was at least as fast at every size
    # torch's copy takes (sizes above those do not count)
    timed = [{**r, "direct_gbs": r["torch_gbs"] * 1.2} for r in rows[:5]]
    timed[3]["direct_gbs"] = 1.0  # 1 MiB: the engine's anyway
    assert tune.recommended_routing(timed) == {**expected, "small_direct": True}
    timed[2]["direct_gbs"] = 2.9  # slower than torch at 512 KiB
    assert tune.recommended_routing(timed) == expected


def test_routing_defaults_are_the_newest_committed_sweep():
    """The size routing in _cuda.Routing is what the newest committed bench-tune sweep
    with small copies measured: changing one without the other fails here."""
    sweeps = []
    for path in committed("*-tune-*.json"):
        rows = json.loads(path.read_text())["rows"]
        if any(row["part"] == "small" for row in rows):
            sweeps.append((path.name[:10], path.name, rows))
    assert sweeps, "no committed bench-tune sweep with small copies"
    _, name, rows = max(sweeps)
    defaults = _cuda.Routing()
    assert tune.recommended_routing(rows) == {
        "small_d2h": defaults.small_d2h,
        "small_h2d": defaults.small_h2d,
        "small_direct": defaults.small_direct,
    }, name


@pytest.mark.parametrize(
    "argv",
    [
        ["--repeats", "0"],
        ["--buffers", "0"],
        ["--buffers", "1"],  # (the engine's range: 2 to 64)
        ["--buffers", "65"],
        ["--threads", "257"],
        ["--chunks-mib", str((1 << 20) + 1)],
        ["--sizes-mib", "-1"],
        ["--save", "FILE"],
    ],
)
def test_tune_refuses_bad_arguments_before_measuring(argv, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = [str(afile) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        tune.main(argv)
    assert exc.value.code == 2 and "needs a GPU" not in capsys.readouterr().err


def test_gpu_benchmark_refuses_a_zero_size_before_measuring(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--sizes", "0"])
    assert exc.value.code == 2 and "at least 4 bytes" in capsys.readouterr().err


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) leaves neither a truncated file nor its temporary."""
    from tensorbridge.bench import _results

    real_open = open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            f.write = lambda text: (_ for _ in ()).throw(OSError("disk full"))
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        _results.write_json(str(tmp_path / "r.json"), {}, [])
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_missing_extension_falls_back_with_a_reason():
    code = (
        "import sys, json; sys.modules['tensorbridge._C'] = None\n"
        "import torch, numpy as np, tensorbridge as tb\n"
        "o = np.empty(4, np.float32); tb.to_numpy(torch.arange(4.0), out=o)\n"
        "print(json.dumps([tb.info()['extension'], tb.info()['fallback_reason'], o.tolist()]))"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    extension, reason, values = json.loads(proc.stdout)
    assert extension is False
    assert "not installed" in reason and "pip install" in reason
    assert values == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("option", ["--save", "--plot"])
def test_bench_refuses_an_unwritable_output_before_measuring(option, tmp_path, capsys):
    from tensorbridge.bench import cpu

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / ("results" if option == "--save" else "p.png")  # under a file
    with pytest.raises(SystemExit):
        cpu.main(["--sections", "overhead", "--repeats", "2", option, str(target)])
    err = capsys.readouterr().err
    assert "is not a directory this process can write to" in err
    assert "measuring" not in err  # refused before the first row group


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--threads", "0"], "--threads must be an int from 1 to"),
        (["--threads", "-1"], "--threads must be an int from 1 to"),
        (["--sizes", "0"], "at least 4 bytes"),
        (["--sizes", "0.5"], "at least 4 bytes"),
        (["--refused-size", "0"], "at least 4 bytes"),
        (["--sizes", "4K", "100000G"], "GiB of memory with its baselines, and this machine has"),
        (["--plot", "DIR"], "is a directory: name a file, e.g."),
        (["--plot", "DIR/p.jpeg2"], "'.jpeg2' is not an image format matplotlib writes"),
        (["--plot", "DIR/p"], "the file has no extension: end it with .png"),
    ],
)
def test_bench_refuses_bad_arguments_before_measuring(argv, says, tmp_path, capsys):
    """A usage error is argparse's (exit 2, one line naming the option), before a run,
    not a traceback after it (or a plot written under another name)."""
    from tensorbridge.bench import cpu

    argv = [a.replace("DIR", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cpu.main(["--sections", "overhead", "--repeats", "2", "--quiet", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
