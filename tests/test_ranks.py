"""Ranks on one node: the launcher's LOCAL_RANK / LOCAL_WORLD_SIZE split the pinned budget
and the copy threads, the environment and the setters override the split, malformed values
warn or refuse, and info()["ranks"] shows it all. Two real ranks (torch.distributed, gloo)
run in test_distributed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tensorbridge as tb
from tensorbridge import _backend, _ranks

from conftest import HAS_CUDA, HAS_EXTENSION, forced_fallback

MIB = 1 << 20
# The variables this file sets, removed from what the child processes inherit.
OWN = (
    _ranks.LOCAL_RANK_ENV,
    _ranks.LOCAL_WORLD_SIZE_ENV,
    _ranks.BUDGET_ENV,
    _ranks.THREADS_ENV,
    _backend.MODE_ENV,
    _backend.DISABLE_ENV,
    "PYTHONWARNINGS",
)
ENV = {k: v for k, v in os.environ.items() if k not in OWN}

REPORT = (
    "import json, tensorbridge as tb\n"
    "from tensorbridge import _backend\n"
    "C = _backend._LOADED\n"
    "info = tb.info()\n"
    "core = C.cuda_pinned_stats()['budget'] if hasattr(C, 'cuda_pinned_stats') else None\n"
    "threads = C.get_num_threads() if C is not None else None\n"
    "print(json.dumps({'ranks': info['ranks'], 'threads': info['threads'],\n"
    "                  'core_budget': core, 'core_threads': threads,\n"
    "                  'extension': info['extension'],\n"
    "                  'stats_budget': tb.pinned_stats()['budget']}))\n"
)


def run(code: str = REPORT, *, warnings_as_errors: bool = True, **env: str):
    """Runs code in a fresh interpreter with env added: (exit status, stdout, stderr)."""
    args = [sys.executable, *(["-W", "error"] if warnings_as_errors else []), "-c", code]
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**ENV, **env}, timeout=120, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def report(**env: str) -> dict:
    status, out, err = run(**env)
    assert status == 0, err
    return json.loads(out)


def node_budget() -> int:
    return _ranks.node_pinned_budget()


# --------------------------------------------------------------------------- the environment


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, (None, 1)),
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, (0, 1)),
        ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, (3, 8)),
        ({"LOCAL_RANK": " 1 ", "LOCAL_WORLD_SIZE": "+2\n"}, (1, 2)),
    ],
)
def test_read_local_ranks(environ, expected):
    local = _ranks.read_local_ranks(environ)
    assert (local.local_rank, local.local_world_size) == expected
    assert local.problem is None


@pytest.mark.parametrize(
    "environ, names",
    [
        ({"LOCAL_RANK": "abc", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='abc' is not a whole number"),
        ({"LOCAL_RANK": "-1", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='-1' is not a whole number"),
        ({"LOCAL_RANK": "", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='' is not a whole number"),
        ({"LOCAL_RANK": "1.0", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='1.0'"),
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' is outside 1 to"),
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "two"}, "LOCAL_WORLD_SIZE='two'"),
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "9" * 30}, "LOCAL_WORLD_SIZE='999"),
        ({"LOCAL_RANK": "\u0660", "LOCAL_WORLD_SIZE": "2"}, "is not a whole number"),
        (
            {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
        ),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK is set but LOCAL_WORLD_SIZE is not"),
        ({"LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE is set but LOCAL_RANK is not"),
    ],
)
def test_malformed_launcher_values_are_not_used_and_the_problem_names_the_fix(environ, names):
    local = _ranks.read_local_ranks(environ)
    assert (local.local_rank, local.local_world_size) == (None, 1)
    assert local.problem is not None and names in local.problem
    assert "keeps the single-process defaults" in local.problem
    assert "as torchrun does" in local.problem and "set_pinned_budget()" in local.problem


@pytest.mark.parametrize(
    "raw, value",
    [("0", 0), ("268435456", 256 * MIB), ("256M", 256 * MIB), ("256MiB", 256 * MIB),
     ("2g", 2 << 30), (" 1 GB ", 1 << 30), ("512k", 512 << 10), ("1T", 1 << 40),
     ("512b", 512), ("1KiB", 1 << 10), ("+2G", 2 << 30)],
)  # fmt: skip
def test_parse_budget(raw, value):
    assert _ranks.parse_budget(raw) == value


@pytest.mark.parametrize(
    "raw",
    ["", "-1", "1X", "1.5G", "G", "abc", "9" * 20, "5000000000T", "1ib", "1iB", "\u0661\u0662"],
)
def test_parse_budget_refuses_with_the_variable_and_the_fix(raw):
    with pytest.raises(ValueError, match=r"TENSORBRIDGE_PINNED_BUDGET=.* e\.g\. 2G, or unset it"):
        _ranks.parse_budget(raw)


def test_parse_threads():
    assert _ranks.parse_threads(" 4 ") == 4
    assert _ranks.parse_threads("256") == 256
    assert _ranks.parse_threads("00001") == _ranks.parse_threads("+1") == 1  # as int() reads
    for raw in ("0", "257", "-2", "four", "", "1.5", "\u0664", "9" * 30):
        with pytest.raises(ValueError, match=r"TENSORBRIDGE_NUM_THREADS=.* from 1 to 256"):
            _ranks.parse_threads(raw)


# --------------------------------------------------------------------------- the shares


def test_budget_share():
    assert _ranks.rank_pinned_budget(8 << 30, 1) == 8 << 30
    assert _ranks.rank_pinned_budget(8 << 30, 8) == 1 << 30
    assert _ranks.rank_pinned_budget(8 << 30, 3) == (8 << 30) // 3
    # a crowded small node: never below the minimum
    assert _ranks.rank_pinned_budget(256 * MIB, 8) == _ranks.MIN_RANK_BUDGET == 64 * MIB


def test_thread_share():
    assert _ranks.rank_threads(1, 64) == 12  # the core's own cap
    assert _ranks.rank_threads(8, 64) == 8
    assert _ranks.rank_threads(8, 16) == 2
    assert _ranks.rank_threads(2, 2) == 1
    assert _ranks.rank_threads(8, 4) == 1  # at least one
    assert _ranks.rank_threads(3, 32) == 10


def test_node_budget_on_the_fallback_matches_the_core(monkeypatch):
    if not HAS_EXTENSION:
        pytest.skip("needs the compiled core to compare with")
    core = _ranks.node_pinned_budget()
    assert core == _backend._LOADED.default_pinned_budget()
    monkeypatch.setattr(_backend, "_LOADED", None)
    assert _ranks.node_pinned_budget() == core  # the pure-Python path computes the same


def test_decide_orders_setter_env_share_default():
    none = _ranks.LocalRanks(None, 1)
    four = _ranks.LocalRanks(2, 4)
    cpus = _ranks.usable_cpus()
    s = _ranks.decide(none, {})
    assert (s.pinned_budget.value, s.pinned_budget.source) == (node_budget(), "default")
    assert (s.threads.value, s.threads.source) == (None, "default")
    s = _ranks.decide(four, {})
    assert s.pinned_budget.value == max(node_budget() // 4, 64 * MIB)
    assert s.threads.value == max(1, min(12, cpus // 4))
    assert s.pinned_budget.source == s.threads.source == "rank share"
    env = {"TENSORBRIDGE_PINNED_BUDGET": "96M", "TENSORBRIDGE_NUM_THREADS": "5"}
    for local in (none, four):
        s = _ranks.decide(local, env)
        assert (s.pinned_budget.value, s.pinned_budget.source) == (96 * MIB, _ranks.BUDGET_ENV)
        assert (s.threads.value, s.threads.source) == (5, _ranks.THREADS_ENV)
    s = _ranks.decide(four, {"TENSORBRIDGE_PINNED_BUDGET": "  ", "TENSORBRIDGE_NUM_THREADS": ""})
    assert s.pinned_budget.source == s.threads.source == "rank share"  # blank: unset
    with pytest.raises(ValueError, match="TENSORBRIDGE_NUM_THREADS='x'"):
        _ranks.decide(four, {"TENSORBRIDGE_NUM_THREADS": "x"})


# --------------------------------------------------------------------------- in a process


def test_info_has_the_ranks_and_numa_keys():
    info = tb.info()
    ranks = info["ranks"]
    assert set(ranks) == {
        "local_rank",
        "local_world_size",
        "device",
        "numa_node",
        "pinned_budget",
        "pinned_budget_source",
        "threads",
        "threads_source",
        "reason",
    }
    assert isinstance(info["numa_nodes"], list)
    assert len(info["numa_nodes"]) == (info["devices"] if info["cuda"] else 0)
    assert all(n is None or (isinstance(n, int) and n >= 0) for n in info["numa_nodes"])
    if not HAS_CUDA:
        assert info["numa_nodes"] == [] and ranks["device"] is None and ranks["numa_node"] is None
    json.dumps(info)  # (python -m tensorbridge info --json prints it)


def test_single_process_defaults():
    r = report()
    ranks = r["ranks"]
    assert ranks["local_rank"] is None and ranks["local_world_size"] == 1
    assert ranks["pinned_budget"] == node_budget() and ranks["pinned_budget_source"] == "default"
    assert ranks["threads"] == r["threads"] and ranks["threads_source"] == "default"
    assert ranks["reason"] is None


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_two_local_ranks_split_the_node(local_rank):
    r = report(LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE="2")
    ranks = r["ranks"]
    assert ranks["local_rank"] == int(local_rank) and ranks["local_world_size"] == 2
    share = max(node_budget() // 2, 64 * MIB)
    threads = max(1, min(12, len(os.sched_getaffinity(0)) // 2))
    assert (ranks["pinned_budget"], ranks["pinned_budget_source"]) == (share, "rank share")
    assert (ranks["threads"], ranks["threads_source"]) == (threads, "rank share")
    assert ranks["reason"] is None
    if r["extension"]:  # the compiled core got them, not just the report
        assert r["core_threads"] == threads and r["threads"] == threads
        if r["core_budget"] is not None:
            assert r["core_budget"] == share
    if HAS_CUDA:
        assert ranks["device"] == f"cuda:{int(local_rank) % tb.info()['devices']}"


def test_the_environment_wins_over_the_share():
    r = report(
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="2",
        TENSORBRIDGE_PINNED_BUDGET="96MiB",
        TENSORBRIDGE_NUM_THREADS="3",
    )
    ranks = r["ranks"]
    assert (ranks["pinned_budget"], ranks["pinned_budget_source"]) == (
        96 * MIB,
        "TENSORBRIDGE_PINNED_BUDGET",
    )
    assert (ranks["threads"], ranks["threads_source"]) == (3, "TENSORBRIDGE_NUM_THREADS")
    if r["extension"]:
        assert r["core_threads"] == 3
        if r["core_budget"] is not None:
            assert r["core_budget"] == 96 * MIB


def test_the_setters_win_over_the_share():
    code = (
        "import tensorbridge as tb\n"
        "tb.set_pinned_budget(80 << 20)\n"
        "tb.set_num_threads(5)\n" + REPORT
    )
    status, out, err = run(code, LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    assert status == 0, err
    r = json.loads(out)
    ranks = r["ranks"]
    assert (ranks["pinned_budget"], ranks["pinned_budget_source"]) == (
        80 << 20,
        "set_pinned_budget()",
    )
    assert (ranks["threads"], ranks["threads_source"]) == (5, "set_num_threads()")
    assert r["stats_budget"] == 80 << 20  # (pinned_stats agrees, with a GPU or without)
    if r["extension"]:
        assert r["core_threads"] == 5 == r["threads"]


@pytest.mark.parametrize(
    "env, names",
    [
        ({"LOCAL_RANK": "abc", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='abc'"),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 is not below"),
        ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0'"),
    ],
)
def test_malformed_launcher_values_warn_once_and_keep_the_defaults(env, names):
    status, out, err = run(warnings_as_errors=False, **env)
    assert status == 0, err
    assert err.count(": UserWarning: ") == 1 and names in err, err
    ranks = json.loads(out)["ranks"]
    assert ranks["local_rank"] is None and ranks["local_world_size"] == 1
    assert ranks["pinned_budget_source"] == ranks["threads_source"] == "default"
    assert names in ranks["reason"]


@pytest.mark.parametrize(
    "name, value", [("TENSORBRIDGE_PINNED_BUDGET", "lots"), ("TENSORBRIDGE_NUM_THREADS", "0")]
)
def test_malformed_own_variables_are_refused_at_import(name, value):
    status, _, err = run(**{name: value})
    assert status == 1
    assert f"ValueError: {name}={value!r}" in err and "unset it for the default" in err


def test_the_pure_python_path_reports_the_same_split():
    r = report(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", TENSORBRIDGE_EXTENSION="off")
    assert r["extension"] is False
    ranks = r["ranks"]
    assert ranks["pinned_budget"] == max(node_budget() // 2, 64 * MIB)
    assert ranks["threads"] == max(1, min(12, len(os.sched_getaffinity(0)) // 2))
    assert r["threads"] == 1  # (it copies on one thread whatever is set)


def test_rank_device():
    dev = tb.rank_device()
    if not HAS_CUDA:
        assert dev.type == "cpu"
    else:
        assert dev.type == "cuda" and dev.index is not None
    code = "import tensorbridge as tb; print(tb.rank_device())"
    status, out, err = run(code, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert status == 0, err
    expected = "cpu" if not HAS_CUDA else f"cuda:{1 % tb.info()['devices']}"
    assert out.strip() == expected


def test_info_under_forced_fallback_keeps_the_keys():
    with forced_fallback():
        info = tb.info()
    assert info["ranks"]["local_world_size"] >= 1 and "numa_nodes" in info
