"""Command line: ``python -m tensorbridge info | bench | bench-gpu | bench-tune``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m tensorbridge {info,bench,bench-gpu,bench-tune} [options]\n"
        "  info       which path is live (extension or fallback) and why, CUDA, versions\n"
        "  bench      the CPU benchmark against the idioms it replaces (--help for options)\n"
        "  bench-gpu  device<->host transfers against torch's idioms (needs a GPU)\n"
        "  bench-tune the sweep of the GPU engine's knobs behind its defaults (needs a GPU)"
    )
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "info":
        from . import info

        as_json = "--json" in rest
        data = info()
        if as_json:
            print(json.dumps(data, indent=2))
        else:
            width = max(len(k) for k in data)
            for k, v in data.items():
                print(f"{k:<{width}}  {v}")
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


if __name__ == "__main__":
    sys.exit(main())
