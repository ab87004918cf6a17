"""Loads the compiled core once and hands every caller one engine object.

``ENGINE`` says what this process can use (the compiled core, its CUDA engine, the
test-only host engine) and why not, and holds the compiled module whose calls perform
the transfers. Call sites ask ``_backend.ENGINE`` at call time and never re-decide.

One switch, ``TENSORBRIDGE_EXTENSION``, read once at import:

- ``auto`` (the default): the compiled core when it loads; otherwise the pure-Python
  path, with one ``FallbackWarning`` per process saying why (``info()`` says it too);
- ``on``: the compiled core or an ImportError with the build's or the loader's reason;
- ``off``: the pure-Python path, silently. ``TENSORBRIDGE_DISABLE_EXTENSION=1`` is an
  older spelling of ``off``.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import sys
import threading
import warnings
from types import FrameType, ModuleType
from typing import Any

import numpy as np
import torch

from . import _numa
from ._version import __version__

MODE_ENV = "TENSORBRIDGE_EXTENSION"
DISABLE_ENV = "TENSORBRIDGE_DISABLE_EXTENSION"  # the older spelling of MODE_ENV=off
_BUILD_RECORD = "_build.json"  # written by setup.py next to the package's modules


class FallbackWarning(UserWarning):
    """tensorbridge runs on its pure-Python path although the compiled core was expected
    (``TENSORBRIDGE_EXTENSION=auto``); set ``TENSORBRIDGE_EXTENSION=off`` to silence it."""


def extension_mode() -> str:
    """``auto``, ``on`` or ``off``: the ``TENSORBRIDGE_EXTENSION`` switch.

    Raises:
        ValueError: the variable holds anything else.
    """
    raw = os.environ.get(MODE_ENV, "").strip().lower()
    if raw:
        if raw not in ("auto", "on", "off"):
            raise ValueError(
                f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not understood: set it to auto "
                "(the default), on or off."
            )
        return raw
    legacy = os.environ.get(DISABLE_ENV, "").strip().lower()
    if legacy in ("1", "true", "yes", "on"):
        return "off"
    if legacy not in ("", "0", "false", "no", "off"):
        raise ValueError(
            f"{DISABLE_ENV}={os.environ[DISABLE_ENV]!r} is not understood: set it to 1 or 0, "
            f"or use {MODE_ENV}=off (or auto) instead."
        )
    return "auto"


def build_record() -> dict[str, Any] | None:
    """What setup.py recorded about the compiled core's build, if it ran for this copy."""
    path = os.path.join(os.path.dirname(__file__), _BUILD_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):  # (a corrupt file: as if there were none)
        return None
    return record if isinstance(record, dict) else None


def _load_failure(exc: ImportError) -> str:
    missing = isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C"
    record = build_record() if missing else None  # (a module that fails to load says why)
    if (
        record is not None
        and record.get("built") is False
        and record.get("version") == __version__
        and isinstance(record.get("reason"), str)
    ):
        return f"{record['reason']} (recorded when this copy of tensorbridge was built)"
    if missing:
        return (
            "the compiled module tensorbridge._C is not installed (no build ran, or it "
            "failed); reinstall with 'pip install .' from the source tree, or "
            "'pip install -v .' to see the build's output."
        )
    detail = str(exc).rstrip()
    return f"the compiled module tensorbridge._C failed to load: {detail}" + (
        "" if detail.endswith(".") else "."
    )


def _load(mode: str) -> tuple[ModuleType | None, str | None]:
    if mode == "off":
        how = (
            f"{MODE_ENV}=off"
            if os.environ.get(MODE_ENV, "").strip()
            else f"{DISABLE_ENV}={os.environ.get(DISABLE_ENV, '').strip()}"
        )
        return None, f"{how} is set, so the pure-Python path is used."
    try:
        return importlib.import_module(f"{__package__}._C"), None
    except ImportError as exc:  # not built, built for another Python, a missing library...
        reason = _load_failure(exc)
    if mode == "on":
        raise ImportError(
            f"{MODE_ENV}=on, but the compiled core cannot be used: {reason} Set "
            f"{MODE_ENV}=auto to fall back to pure Python instead."
        )
    warnings.warn(
        f"tensorbridge uses its pure-Python path: {reason} Set {MODE_ENV}=off to silence "
        "this warning.",
        FallbackWarning,
        stacklevel=_importer_stacklevel(),
    )
    return None, reason


def _importer_stacklevel() -> int:
    """The stacklevel of the code that imported tensorbridge, for a warning raised while
    it loads: past tensorbridge's own frames and the import machinery's."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep  # (not tensorbridge_x/)
    frame: FrameType | None = sys._getframe(1)
    level = 1  # (level 1: the function that warns)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<frozen importlib"):  # (warn() skips those itself)
            if not name.startswith(package):
                return level
            level += 1
        frame = frame.f_back
    return 2


_MODE = extension_mode()  # read once: the switch decides at import
_LOADED, _LOAD_FAILURE = _load(_MODE)  # what loaded, whatever ENGINE is set to later


class Engine:
    """What this process can use, decided once, and the compiled calls that use it.

    ``C`` is the compiled module (``None`` on the pure-Python path); the transfer calls
    (``C.copy``, ``C.cuda_copy_to_host``...) are made on it. ``cuda_engine`` says
    whether GPU transfers may use the compiled CUDA engine: asked on first use (asking
    starts the CUDA driver, which a process that later forks must not do early) and
    False for good in a child forked after that.
    """

    def __init__(self, C: ModuleType | None, fallback_reason: str | None) -> None:
        self.C = C
        self.fallback_reason = fallback_reason
        self._cuda_engine: bool | None = None
        self._forked_after_cuda = False

    @property
    def extension(self) -> bool:
        """The compiled core is live."""
        return self.C is not None

    @property
    def core(self) -> ModuleType:
        """The compiled module, for call sites that already know the extension is live."""
        if self.C is None:
            raise RuntimeError(f"tensorbridge._C is not in use: {self.fallback_reason}")
        return self.C

    @property
    def cuda_engine(self) -> bool:
        """GPU transfers can use the compiled CUDA engine (the answer is cached).

        When it can, the engine is told each device's NUMA node first (on machines with
        more than one), so the staging blocks it pins from then on sit on their GPU's node.
        """
        if self._cuda_engine is None:
            C = self.C
            usable = bool(C is not None and C.cuda_compiled and self.cuda_status()[0])
            if usable and C is not None:
                bus_ids = _cuda_probe()["pci_bus_ids"]
                C.cuda_set_numa_nodes(_numa.placement(bus_ids, _numa.SYSFS))
            self._cuda_engine = usable
        return self._cuda_engine

    def cuda_status(self) -> tuple[bool, int, str | None]:
        """(usable, device count, reason when not usable) for this engine's path."""
        torch_ok = torch.cuda.is_available()
        if not torch_ok and torch.version.cuda is None and torch.version.hip is None:
            # (the first thing to fix, whatever the driver and the build say)
            return (
                False,
                0,
                f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): "
                "install a CUDA build of torch to use a GPU.",
            )
        if self.C is None:
            if torch_ok:
                return True, torch.cuda.device_count(), None
            why = "torch reports no usable CUDA device (torch.cuda.is_available() is False)."
            return False, 0, why
        probe = _cuda_probe()
        if not probe["compiled"]:
            return False, 0, "tensorbridge._C was built without the CUDA toolkit (nvcc not found)."
        if probe["error"] is not None:
            why = probe["error"]
            if probe["driver_version"] == 0:
                return False, 0, f"no NVIDIA driver was found ({why})."
            return False, 0, f"the CUDA runtime reports {why}."
        if probe["device_count"] == 0:
            return False, 0, "the CUDA runtime found no device."
        if not torch_ok:
            return (
                False,
                probe["device_count"],
                (
                    f"torch {torch.__version__} cannot use CUDA (a CPU build?), so GPU tensors "
                    "cannot exist; install a CUDA build of torch."
                ),
            )
        return True, probe["device_count"], None

    @staticmethod
    def host_engine() -> ModuleType | None:
        """``tensorbridge._C_testing`` (the pipeline on a host-only engine), when built.

        For tests and benchmarks only; release builds (``-DTB_TESTING=OFF``) lack it. It
        does not depend on the path that is live: the fallback run tests it too.
        """
        try:
            return importlib.import_module(f"{__package__}._C_testing")
        except ImportError:
            return None

    @property
    def pinned_memory(self) -> bool:
        """Page-locked memory can be had in this process (CUDA is usable and was not
        started by a parent before it forked this process)."""
        return not self._forked_after_cuda and self.cuda_status()[0]

    def after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) never touches the parent's CUDA state."""
        # (torch.cuda.is_initialized() is False in such a child: torch marks it a "bad
        # fork" first, which is what says CUDA was started before the fork)
        bad_fork = getattr(torch.cuda, "_is_in_bad_fork", lambda: False)
        if self._cuda_engine or torch.cuda.is_initialized() or bad_fork():
            # CUDA was initialized before the fork: it cannot be used in this process,
            # and the pool's blocks and events belong to the parent.
            self._cuda_engine = False
            self._forked_after_cuda = True

    def __repr__(self) -> str:
        if self.C is None:
            return f"<tensorbridge engine: pure Python ({self.fallback_reason})>"
        return f"<tensorbridge engine: compiled core ({self.C.__file__})>"


#: The engine every call site asks. Read it as ``_backend.ENGINE`` at call time (tests
#: swap it to force the pure-Python path).
ENGINE = Engine(_LOADED, _LOAD_FAILURE)


def _note_main_thread(ident: int | None) -> None:
    """Tells the compiled core which thread is the main one (the only one that receives
    Ctrl-C), for the finalizers it runs through ``call_through_interrupts``."""
    note = getattr(_LOADED, "set_main_thread", None)
    if note is not None:
        note(threading.main_thread().ident if ident is None else ident)


def _after_fork_in_child() -> None:
    ENGINE.after_fork_in_child()
    _note_main_thread(threading.get_ident())  # (the thread that forked: the child's only)


_note_main_thread(None)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _cuda_probe() -> dict[str, Any]:
    # Asked once and only when needed: initializing the driver in a process that later
    # forks would leave the children unable to use CUDA.
    if _LOADED is None:
        return {
            "compiled": False,
            "device_count": 0,
            "runtime_version": 0,
            "driver_version": 0,
            "error": None,
            "device_names": [],
            "pci_bus_ids": [],
        }
    return dict(_LOADED.cuda_probe())


def _version_str(v: int) -> str | None:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else None


def cuda_status() -> tuple[bool, int, str | None]:
    """(usable, device count, reason when not usable) for the live path."""
    return ENGINE.cuda_status()


_DEVICES: dict[Any, torch.device] = {}  # device argument -> checked torch.device


def resolve_device(device: Any, fn: str) -> torch.device:
    """``device`` as a torch.device this process can use, or a clear error naming the fix.

    Asked by every entry point that takes a device, before anything is read or written,
    so a request torch cannot serve never fails deep inside torch. Answers are cached.

    Raises:
        TypeError: ``device`` is not a str, int or torch.device.
        ValueError: torch does not know the device, or it is a CUDA device and CUDA is
            not usable here (the message says why, as ``info()["cuda_reason"]`` does).
    """
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        hint = (
            f" ({device} is a dtype: pass it as dtype={device})"
            if isinstance(device, torch.dtype)
            else ""
        )
        raise TypeError(
            f"{fn}: device must be a str, int or torch.device, got {type(device).__name__}"
            f"{hint}: pass e.g. 'cpu' or 'cuda'."
        )
    try:  # (after the type check: True == 1 would find cuda:1's entry)
        return _DEVICES[device]
    except KeyError:
        pass
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, ValueError) as exc:
        if isinstance(device, int) and device >= 0 and not torch.cuda.is_available():
            # (torch reads an int as an index of its accelerator, and has none here)
            reason = cuda_status()[2] or "torch.cuda.is_available() is False."
            raise ValueError(
                f"{fn}: device={device!r} is a GPU index, and CUDA is not usable here: "
                f"{reason} Pass device='cpu', or run on a machine with an NVIDIA GPU and "
                "a CUDA build of torch."
            ) from None
        named = getattr(torch, device, None) if isinstance(device, str) else None
        if isinstance(named, torch.dtype):
            # (t.to(torch.float16) takes a dtype first; a string there is a device)
            raise ValueError(
                f"{fn}: device={device!r} is not a device but a dtype's name: pass it as "
                f"dtype={named}."
            ) from None
        raise ValueError(
            f"{fn}: device={device!r} is not a device torch knows ({exc}): pass e.g. 'cpu' "
            "or 'cuda'."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            reason = cuda_status()[2] or "torch.cuda.is_available() is False."
            raise ValueError(
                f"{fn}: device={device!r} asks for CUDA, which is not usable here: {reason} "
                "Pass device='cpu', or run on a machine with an NVIDIA GPU and a CUDA "
                "build of torch."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise ValueError(
                f"{fn}: device={device!r} does not exist: this machine has {count} CUDA "
                f"device(s), cuda:0 to cuda:{count - 1}."
            )
    elif dev.type not in ("cpu", "meta"):
        # Another accelerator (mps, xpu, xla...): ask torch once, and turn whatever it
        # raises into one clear refusal instead of an error from deep inside it.
        try:
            torch.empty(0, device=dev)
        except Exception as exc:
            # (torch's message can run to thousands of characters, its dispatcher's whole
            # table: its first sentence says what is wrong)
            said = str(exc).strip().split("\n", 1)[0]
            said = said.split(". ", 1)[0][:200] if said else type(exc).__name__
            raise ValueError(
                f"{fn}: device={device!r} is not usable here ({type(exc).__name__}: {said}): "
                "pass device='cpu', or a device this torch build supports."
            ) from None
    _DEVICES[device] = dev
    return dev


def int_arg(value: Any, what: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [lo, hi]: the one check of every integer knob.

    Python and NumPy integers are accepted, bools are not.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: it is out of range (``hint`` says what to pass instead).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValueError(
            f"{what} must be an int {bounds}, got {n}" + (f": {hint}" if hint else ".")
        )
    return n


def bool_arg(value: Any, what: str, fix: str = "") -> bool:
    """``value`` as a bool: True or False, NumPy's bools, or the ints 0 and 1; anything
    else is refused, where a truthy string such as ``"no"`` would otherwise mean True.
    ``fix`` ends the message (a sentence that names the fix).

    Raises:
        TypeError: anything else.
    """
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(
        f"{what} must be True or False, got {type(value).__name__}: {value!r}"
        + (f": {fix}" if fix else "")
    )


#: The most copy threads set_num_threads accepts, on every machine and both paths.
MAX_THREADS = 256


def get_num_threads() -> int:
    """Threads the compiled core uses for large host copies (1 on the fallback path)."""
    C = ENGINE.C
    return C.get_num_threads() if C is not None else 1


def set_num_threads(n: int) -> None:
    """Set the threads the compiled core uses for large host copies.

    ``n`` must lie between 1 and 256: host copies are bound by memory bandwidth, which a
    dozen threads saturate, and an unbounded count would start as many OS threads as
    asked. If the OS refuses to start one, the next large copy raises RuntimeError. Both
    paths accept and refuse the same values (the pure-Python path copies on one thread
    whatever is set). It wins over the default, which is divided among the ranks of a
    node under a launcher (``info()["ranks"]``), and over ``TENSORBRIDGE_NUM_THREADS``.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n`` is out of range.
    """
    n = int_arg(
        n,
        "set_num_threads: n",
        1,
        MAX_THREADS,
        "host copies are bound by memory bandwidth, so pass a count near the number of "
        "cores (os.cpu_count()).",
    )
    C = ENGINE.C
    if C is not None:
        C.set_num_threads(n)
    from . import _ranks  # (imported by the package before any call; it imports this module)

    _ranks.note_threads(n)


def _torch_bus_ids() -> list[str | None]:
    # The pure-Python path asks torch, but only once torch has started CUDA itself: asking
    # would start it, and a process that forks DataLoader workers later must not.
    if not torch.cuda.is_initialized():
        return [None] * torch.cuda.device_count()
    ids: list[str | None] = []
    for d in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(d)
        parts = [getattr(p, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
        ok = all(isinstance(v, int) for v in parts)
        ids.append(f"{parts[0]:04x}:{parts[1]:02x}:{parts[2]:02x}.0" if ok else None)
    return ids


def numa_nodes() -> list[int | None]:
    """The NUMA node of each CUDA device (None where sysfs does not say), from the bus
    ids the CUDA runtime gives; empty without CUDA."""
    cuda, devices, _ = cuda_status()
    if not cuda or devices == 0:
        return []
    bus_ids = _cuda_probe()["pci_bus_ids"] if ENGINE.C is not None else _torch_bus_ids()
    return _numa.device_nodes(bus_ids, _numa.SYSFS)


def info() -> dict[str, Any]:
    """Which path is live and why, the CUDA runtime's view, the node, and versions.

    ``version``: tensorbridge's; ``torch``, ``numpy``, ``ml_dtypes`` (None when it is not
    installed) and ``python``: theirs. ``extension``: the compiled core is in use
    (``extension_path`` is its file); else ``fallback_reason`` says why not, and
    ``extension_mode`` is ``TENSORBRIDGE_EXTENSION`` (``auto``, ``on`` or ``off``).
    ``cuda``: GPU transfers go through tensorbridge's CUDA engine (on the pure-Python path:
    torch can use a GPU, whose transfers are then torch's own), ``devices`` how many GPUs it
    sees, and ``cuda_reason`` why not when it cannot (a CPU build of torch, a core built
    without the CUDA toolkit, no driver...). ``cuda_compiled``: the core was built with the
    CUDA toolkit; ``cuda_runtime`` the CUDA runtime it was built against and ``cuda_driver``
    the driver's CUDA version (``"13.0"``; None when unknown or absent): a driver older than
    the runtime cannot serve it. ``device_names``: the GPUs' names. ``threads``: the copy
    threads of large host copies. ``torch_cuda``: the CUDA version torch was built for (None
    for a CPU build).

    ``numa_nodes`` holds each CUDA device's NUMA node (None where unknown; empty without
    a GPU). ``ranks`` is this process's place on the node and its share of it:
    ``local_rank`` and ``local_world_size`` (from ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``;
    None and 1 without a launcher), ``device`` (the rank's GPU, ``"cuda:N"``, or None) and
    its ``numa_node``, ``pinned_budget`` (bytes per device pool) and ``threads`` (the
    compiled core's copy threads; the pure-Python path copies on one whatever is set),
    each with its ``..._source`` (``default``, ``rank share``, an environment variable or
    the setter that decided it), and ``reason`` (why the launcher's values were not used,
    or None). See docs/scaling.md.

    Example:
        >>> import tensorbridge
        >>> tensorbridge.info()["extension"]  # doctest: +SKIP
        True
    """
    from . import _ranks

    cuda, devices, cuda_reason = cuda_status()
    probe = _cuda_probe()
    nodes = numa_nodes()
    try:
        import ml_dtypes

        ml_version: str | None = ml_dtypes.__version__
    except ImportError:
        ml_version = None
    return {
        "version": __version__,
        "extension": ENGINE.extension,
        "extension_mode": _MODE,
        "extension_path": getattr(ENGINE.C, "__file__", None),
        "fallback_reason": ENGINE.fallback_reason,
        "cuda": cuda,
        "devices": devices,
        "cuda_reason": cuda_reason,
        "cuda_compiled": bool(probe["compiled"]),
        "cuda_runtime": _version_str(probe["runtime_version"]),
        "cuda_driver": _version_str(probe["driver_version"]),
        "device_names": list(probe["device_names"]),
        "threads": get_num_threads(),
        "numa_nodes": nodes,
        "ranks": _ranks.ranks_info(cuda, devices, nodes),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "ml_dtypes": ml_version,
        "python": platform.python_version(),
    }
