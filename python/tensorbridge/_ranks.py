"""This process's share of the node, when a launcher starts one process per GPU.

torchrun (and the launchers that follow it) tells each process its place on the node with
``LOCAL_RANK`` (0 to ``LOCAL_WORLD_SIZE - 1``) and ``LOCAL_WORLD_SIZE`` (the processes on
this node). Each process has its own staging pool per device it uses and its own copy
threads, so the single-process defaults (a pinned budget of an eighth of RAM, from 256 MiB
to 8 GiB, per device pool; a copy thread per core, up to 12) taken ``LOCAL_WORLD_SIZE``
times over would oversubscribe the node. Under such a launcher a rank's defaults are the
node's divided by ``LOCAL_WORLD_SIZE``: the budget (at least ``MIN_RANK_BUDGET``) and the
cores this process may run on (at least one thread).

What decides, first match wins:

1. ``set_pinned_budget()`` / ``set_num_threads()``, called in the process;
2. ``TENSORBRIDGE_PINNED_BUDGET`` / ``TENSORBRIDGE_NUM_THREADS``;
3. the rank's share (both ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` set and consistent);
4. the single-process default.

The environment is read once, at import (as ``TENSORBRIDGE_EXTENSION`` is): a launcher
that sets the variables in a process after it imported tensorbridge does not split it.
Malformed ``LOCAL_*`` values belong to the launcher, so they give one ``UserWarning`` that
names the variable and the fix, and the process keeps the single-process defaults;
malformed ``TENSORBRIDGE_*`` values are refused (ValueError at import), like every other
tensorbridge switch.

tensorbridge never changes torch's current device: ``"cuda"`` without an index means
torch's current device, as in torch. :func:`rank_device` gives the device a rank should
make current (``torch.cuda.set_device(tb.rank_device())``), and ``info()["ranks"]`` shows
the split.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from . import _backend

LOCAL_RANK_ENV = "LOCAL_RANK"
LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"
BUDGET_ENV = "TENSORBRIDGE_PINNED_BUDGET"
THREADS_ENV = "TENSORBRIDGE_NUM_THREADS"

#: The smallest rank share of the pinned budget: eight staging blocks of the pipeline's
#: largest chunk (8 MiB), so a rank on a crowded small node still stages its transfers.
MIN_RANK_BUDGET = 64 << 20
#: The most copy threads a default gives one process (the compiled core's own cap,
#: ``default_threads`` in csrc/core/thread_pool.cpp).
MAX_DEFAULT_THREADS = 12
#: The largest launcher values taken at face value (no node runs more processes).
MAX_LOCAL_WORLD_SIZE = 1 << 16

_SPLIT_FIX = (
    "tensorbridge keeps the single-process defaults (the whole node's pinned budget and copy "
    f"threads in this process): set {LOCAL_RANK_ENV} to this process's index on the node "
    f"(0 to {LOCAL_WORLD_SIZE_ENV} - 1) and {LOCAL_WORLD_SIZE_ENV} to the number of processes "
    f"on the node, as torchrun does, or set {BUDGET_ENV} and {THREADS_ENV} (or call "
    "set_pinned_budget() and set_num_threads()) in each process."
)


@dataclasses.dataclass(frozen=True)
class LocalRanks:
    """Where this process stands on its node, as the launcher's environment says."""

    local_rank: int | None  # None: no launcher (or values that could not be used)
    local_world_size: int  # 1 without a launcher
    problem: str | None = None  # why the environment's values were not used


def _int_env(environ: Mapping[str, str], name: str, lo: int) -> tuple[int | None, str | None]:
    raw = environ[name]
    text = raw.strip()
    if not re.fullmatch(r"[+]?[0-9]{1,18}", text):  # (ASCII digits: int() takes others)
        return None, f"{name}={raw!r} is not a whole number >= {lo}"
    value = int(text)
    if value < lo or value > MAX_LOCAL_WORLD_SIZE:
        return None, f"{name}={raw!r} is outside {lo} to {MAX_LOCAL_WORLD_SIZE}"
    return value, None


def read_local_ranks(environ: Mapping[str, str] | None = None) -> LocalRanks:
    """``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` from ``environ`` (default: ``os.environ``).

    Never raises: values it cannot use come back as ``LocalRanks(None, 1, problem)``,
    ``problem`` naming the variable and the fix.
    """
    env = os.environ if environ is None else environ
    has_rank, has_size = LOCAL_RANK_ENV in env, LOCAL_WORLD_SIZE_ENV in env
    if not has_rank and not has_size:
        return LocalRanks(None, 1)
    if not (has_rank and has_size):
        present, missing = (
            (LOCAL_RANK_ENV, LOCAL_WORLD_SIZE_ENV)
            if has_rank
            else (LOCAL_WORLD_SIZE_ENV, LOCAL_RANK_ENV)
        )
        return LocalRanks(None, 1, f"{present} is set but {missing} is not: {_SPLIT_FIX}")
    rank, rank_problem = _int_env(env, LOCAL_RANK_ENV, 0)
    size, size_problem = _int_env(env, LOCAL_WORLD_SIZE_ENV, 1)
    problem = rank_problem or size_problem
    if problem is None and rank is not None and size is not None and rank >= size:
        problem = (
            f"{LOCAL_RANK_ENV}={rank} is not below {LOCAL_WORLD_SIZE_ENV}={size} (local ranks "
            f"run from 0 to {size - 1})"
        )
    if problem is not None or rank is None or size is None:
        return LocalRanks(None, 1, f"{problem}: {_SPLIT_FIX}")
    return LocalRanks(rank, size)


# ------------------------------------------------------------------------------ shares


def node_pinned_budget() -> int:
    """The single-process pinned budget per device pool: an eighth of physical memory,
    from 256 MiB to 8 GiB (the compiled core's ``default_pinned_budget``, computed the
    same way on the pure-Python path)."""
    C = _backend._LOADED
    if C is not None:
        return int(C.default_pinned_budget())
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # (not POSIX)
        ram = 0
    if ram <= 0:
        ram = 8 << 30
    return min(max(ram // 8, 256 << 20), 8 << 30)


def rank_pinned_budget(node_budget: int, local_world_size: int) -> int:
    """One rank's share of the node's pinned budget, at least ``MIN_RANK_BUDGET``."""
    if local_world_size <= 1:
        return node_budget
    return max(node_budget // local_world_size, MIN_RANK_BUDGET)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, which a container's or a
    launcher's CPU set narrows), or ``os.cpu_count()`` where the OS does not say."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def rank_threads(local_world_size: int, cpus: int) -> int:
    """One rank's copy threads: its share of ``cpus``, from 1 to ``MAX_DEFAULT_THREADS``.

    The cores are divided even when the launcher already bound each rank to its own
    cores (a rank cannot tell its own binding from its container's), which errs on
    the side of fewer threads: set ``TENSORBRIDGE_NUM_THREADS`` to the cores per rank then.
    """
    return max(1, min(MAX_DEFAULT_THREADS, cpus // max(1, local_world_size)))


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_budget(raw: str, name: str = BUDGET_ENV) -> int:
    """A byte count as the environment spells it: ``"268435456"``, ``"256M"``, ``"256MiB"``,
    ``"8G"`` (K, M, G, T: powers of 1024). Range 0 to 2**62.

    Raises:
        ValueError: anything else, naming the variable and the fix.
    """
    m = re.fullmatch(r"\s*[+]?([0-9]{1,19})\s*(?:([kmgtKMGT])(?:i?[bB])?|[bB])?\s*", raw)
    value = int(m[1]) * _UNITS[(m[2] or "").lower()] if m else -1
    if not 0 <= value <= 2**62:
        raise ValueError(
            f"{name}={raw!r} is not a byte count from 0 to 2**62: set it to a number of bytes, "
            "optionally with K, M, G or T (powers of 1024), e.g. 2G, or unset it for the "
            "default."
        )
    return value


def parse_threads(raw: str, name: str = THREADS_ENV) -> int:
    """A copy-thread count from the environment, 1 to 256.

    Raises:
        ValueError: anything else, naming the variable and the fix.
    """
    text = raw.strip()
    value = int(text) if re.fullmatch(r"[+]?[0-9]{1,18}", text) else 0
    if not 1 <= value <= _backend.MAX_THREADS:
        raise ValueError(
            f"{name}={raw!r} is not a thread count from 1 to {_backend.MAX_THREADS}: set it "
            "to the cores this process should copy with (e.g. the cores per GPU), or unset it "
            "for the default."
        )
    return value


# ------------------------------------------------------------------------------ settings


@dataclasses.dataclass
class Setting:
    """A knob's value and what set it: ``default`` (value None for threads: the core's own
    default, asked when reported), ``rank share``, the environment variable's name, or
    the setter's name."""

    value: int | None
    source: str


@dataclasses.dataclass
class Settings:
    """The pinned budget per device pool and the copy threads this process runs with."""

    pinned_budget: Setting
    threads: Setting


def decide(local: LocalRanks, environ: Mapping[str, str] | None = None) -> Settings:
    """The process's settings from the environment (default: ``os.environ``) and its place
    on the node: the environment's overrides, else the rank's share, else the defaults.

    Raises:
        ValueError: ``TENSORBRIDGE_PINNED_BUDGET`` or ``TENSORBRIDGE_NUM_THREADS`` is
            malformed.
    """
    env = os.environ if environ is None else environ
    split = local.local_world_size > 1
    if env.get(BUDGET_ENV, "").strip():
        budget = Setting(parse_budget(env[BUDGET_ENV]), BUDGET_ENV)
    elif split:
        budget = Setting(
            rank_pinned_budget(node_pinned_budget(), local.local_world_size), "rank share"
        )
    else:
        budget = Setting(node_pinned_budget(), "default")
    if env.get(THREADS_ENV, "").strip():
        threads = Setting(parse_threads(env[THREADS_ENV]), THREADS_ENV)
    elif split:
        threads = Setting(rank_threads(local.local_world_size, usable_cpus()), "rank share")
    else:
        threads = Setting(None, "default")
    return Settings(budget, threads)


def apply(settings: Settings) -> None:
    """Hands settings that are not the defaults to the compiled core. Neither call
    touches CUDA or starts a thread: the pools and the thread pool take them when they
    are made."""
    C = _backend._LOADED  # (the core's state is the process's, whichever path is live)
    if C is None:
        return
    if settings.pinned_budget.source != "default" and hasattr(C, "cuda_set_pinned_budget"):
        C.cuda_set_pinned_budget(settings.pinned_budget.value)
    if settings.threads.source != "default" and settings.threads.value is not None:
        C.set_num_threads(settings.threads.value)


def note_pinned_budget(nbytes: int) -> None:
    """``set_pinned_budget(nbytes)`` was called: it wins from now on."""
    SETTINGS.pinned_budget = Setting(nbytes, "set_pinned_budget()")


def note_threads(n: int) -> None:
    """``set_num_threads(n)`` was called: it wins from now on."""
    SETTINGS.threads = Setting(n, "set_num_threads()")


# ------------------------------------------------------------------------------ the rank


def rank_device() -> torch.device:
    """The device this process should use: its local rank's GPU under a launcher.

    - Under a launcher (``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` set, as torchrun does):
      ``cuda:LOCAL_RANK``, modulo the GPUs this process sees (so a launcher that gives each
      rank one GPU through ``CUDA_VISIBLE_DEVICES`` gets ``cuda:0``, and four ranks on two
      GPUs share them two by two);
    - otherwise torch's current CUDA device;
    - ``cpu`` where torch cannot use CUDA.

    tensorbridge does not make it current: ``"cuda"`` without an index means torch's
    current device in tensorbridge calls as in torch, so call
    ``torch.cuda.set_device(tb.rank_device())`` once at the start of each rank (before
    ``init_process_group``), as DDP asks anyway. Read at import, like the split.

    Example:
        >>> import tensorbridge as tb
        >>> tb.rank_device().type in ("cpu", "cuda")
        True
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if LOCAL.local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", LOCAL.local_rank % max(1, torch.cuda.device_count()))


def ranks_info(cuda: bool, devices: int, numa_nodes: list[int | None]) -> dict[str, Any]:
    """``info()["ranks"]``: this process's place on the node and what it runs with."""
    device = None
    if cuda and devices > 0 and LOCAL.local_rank is not None:
        device = LOCAL.local_rank % devices
    threads = SETTINGS.threads.value
    compiled = _backend.ENGINE.C is not None  # (else one thread copies, whatever is set)
    return {
        "local_rank": LOCAL.local_rank,
        "local_world_size": LOCAL.local_world_size,
        "device": None if device is None else f"cuda:{device}",
        "numa_node": numa_nodes[device]
        if device is not None and device < len(numa_nodes)
        else None,
        "pinned_budget": SETTINGS.pinned_budget.value,
        "pinned_budget_source": SETTINGS.pinned_budget.source,
        "threads": threads if threads is not None and compiled else _backend.get_num_threads(),
        "threads_source": SETTINGS.threads.source if compiled else "pure-Python path",
        "reason": LOCAL.problem,
    }


#: Where this process stands on its node (read once, at import).
LOCAL = read_local_ranks()
#: The pinned budget and copy threads this process runs with, and what set them.
SETTINGS = decide(LOCAL)
apply(SETTINGS)
if LOCAL.problem is not None:
    warnings.warn(LOCAL.problem, UserWarning, stacklevel=1)
