#!/usr/bin/env python
"""GPU benchmark: device<->host transfers beside torch's idioms, measured in the same run.

Same as ``python -m tensorbridge bench-gpu``; e.g.

    python benchmarks/bench_gpu.py --save benchmarks/results --plot gpu.png
"""

import sys

from tensorbridge.benchmark_gpu import main

if __name__ == "__main__":
    sys.exit(main())
