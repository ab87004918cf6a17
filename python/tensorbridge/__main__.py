"""Command line: ``python -m tensorbridge info | bench | bench-gpu | bench-tune``."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Sequence

INFO_USAGE = """usage: python -m tensorbridge info [--json] [--check]
  --json   print the report as JSON (the keys of tensorbridge.info())
  --check  exit with status 1 when the compiled core is not in use, or when torch can
           use a GPU and tensorbridge's CUDA engine cannot (for CI scripts)"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m tensorbridge [--version] {info,bench,bench-gpu,bench-tune} [options]\n"
        "  info       which path is live (extension or fallback) and why, CUDA, versions\n"
        "             (--json, --check: exit 1 on the fallback path or without the CUDA\n"
        "             engine where torch has a GPU)\n"
        "  bench      the CPU benchmark against the idioms it replaces (--help for options)\n"
        "  bench-gpu  device<->host transfers against torch's idioms (needs a GPU)\n"
        "  bench-tune the sweep of the GPU engine's knobs behind its defaults (needs a GPU)"
    )
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__, info

        data = info()
        path = "compiled core" if data["extension"] else "pure-Python path"
        print(f"tensorbridge {__version__} ({path}; torch {data['torch']})")
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "info":
        if "-h" in rest or "--help" in rest:
            print(INFO_USAGE)
            return 0
        from . import info

        unknown = [a for a in rest if a not in ("--json", "--check")]
        if unknown:
            print(f"info: unknown option {unknown[0]!r}\n{INFO_USAGE}", file=sys.stderr)
            return 2
        data = info()
        if "--json" in rest:
            print(json.dumps(data, indent=2))
        else:
            width = max(len(k) for k in data)
            for k, v in data.items():
                print(f"{k:<{width}}  {v}")
        if "--check" in rest:
            if not data["extension"]:
                print(
                    f"info --check: the compiled core is not in use: {data['fallback_reason']}",
                    file=sys.stderr,
                )
                return 1
            if not data["cuda"] and _torch_has_a_gpu():
                # (a core built without nvcc on a GPU machine: transfers would be torch's)
                print(
                    "info --check: torch can use a GPU but tensorbridge's CUDA engine "
                    f"cannot: {data['cuda_reason']}",
                    file=sys.stderr,
                )
                return 1
        return 0
    if cmd == "bench":
        from .bench import cpu

        return cpu.main(rest)
    if cmd == "bench-gpu":
        from .bench import gpu

        return gpu.main(rest)
    if cmd == "bench-tune":
        from .bench import tune

        return tune.main(rest)
    print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


def _torch_has_a_gpu() -> bool:
    """torch can use an NVIDIA GPU (a ROCm build's GPUs are not the CUDA engine's)."""
    import torch

    return bool(torch.cuda.is_available() and torch.version.cuda is not None)


def _stdout_gone() -> bool:
    """Whether the reader of stdout has gone (a pipe whose other end is closed)."""
    try:
        import select

        poll = select.poll()  # (not on Windows: there the error is raised as it came)
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = select.POLLERR | select.POLLHUP  # (a pipe: ERR; a socket's peer: HUP)
        return any(events & gone for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def run() -> int:
    """main(), quiet when the reader of its output goes away (``info | head -1``): the
    ``tensorbridge`` command and ``python -m tensorbridge``."""
    try:
        try:
            status = main()
        except SystemExit:  # (--help exits: its text reaches its reader, or the error says so)
            _flush()
            raise
        _flush()  # (not after another error: that one is the error to show)
        return status
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # (another pipe: a benchmark's worker, say)
        # (the reader is gone: nothing more can be printed)
        _silence_stdout()
        return 1
    except OSError as exc:
        if exc.errno not in _NOWHERE:
            raise
        # A full disk (`info > /dev/full`), a file size limit: one line, as other
        # command-line tools say it, not a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tensorbridge: write error{where}: {exc.strerror}", file=sys.stderr)
        _silence_stdout()
        return 1


def _flush() -> None:
    if sys.stdout is not None:  # (None: started with stdout closed, `info >&-`)
        sys.stdout.flush()


#: Write errors that say the output has nowhere to go: no space, over quota, over the
#: file size limit (`ulimit -f`), no buffer space, an I/O error.
_NOWHERE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOBUFS, errno.EIO}


def _silence_stdout() -> None:
    """Points stdout at /dev/null: Python's own flush at exit would fail again on what
    is left in its buffer, with an 'Exception ignored' message."""
    if sys.stdout is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(run())
