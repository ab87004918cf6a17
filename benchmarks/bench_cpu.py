#!/usr/bin/env python
"""CPU benchmark: tensorbridge beside the idioms it replaces, measured in the same run.

Same as ``python -m tensorbridge bench``; run with --help for the options, e.g.

    python benchmarks/bench_cpu.py --save benchmarks/results
"""

import sys

from tensorbridge.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
