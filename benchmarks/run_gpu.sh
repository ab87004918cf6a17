#!/usr/bin/env bash
# The GPU machine's one command: build tensorbridge in place, run the whole test suite (GPU
# tests included), then the GPU benchmark, and write the table, its JSON and a plot to
# OUTDIR; the run log and the test report (junit XML) go to OUTDIR/logs, which
# .gitignore keeps out of commits (the results are the .txt, .json and .png).
#
#   bash benchmarks/run_gpu.sh [OUTDIR]        # from the repository root; default OUTDIR:
#                                              # benchmarks/results
# Needs no network: python3 with torch (CUDA), numpy, pybind11, setuptools, CMake and
# ninja; matplotlib for the plot, ml_dtypes for the bfloat16/float8 tests; CuPy, JAX and
# Numba for the interop tests (each skipped when missing). On an H100 machine, the previous
# form of this script (GPU and engine tests only) ran in 178 and 222 s, and the whole suite
# alone in 91 s: well inside a ten-minute command limit.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
py="${PYTHON:-python3}"
logs="$out/logs"
mkdir -p "$out" "$logs"
stamp="$(date +%Y-%m-%d)"
log="$logs/$stamp-gpu-run.log"
export PYTHONUNBUFFERED=1

run() {
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total \
    --format=csv || true
  "$py" -c "import torch, numpy; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'numpy', numpy.__version__)"

  echo "== build in place (csrc -> python/tensorbridge/_C)"
  TENSORBRIDGE_EXTENSION=on "$py" setup.py -q build_ext --inplace -j "$(nproc)" || return 1
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -m tensorbridge info

  echo "== the whole test suite, GPU tests included"
  "$py" -m pytest -q -p no:cacheprovider -o addopts="--strict-markers --strict-config -rfE" \
    --junitxml="$logs/$stamp-gpu-tests.xml" tests
  local tests=$?

  echo "== GPU benchmark (P and H measured in the same run)"
  "$py" -m tensorbridge bench-gpu --save "$out" --plot "$out/$stamp-gpu-bench.png"
  local bench=$?

  echo "== the pipeline over a simulated link on this host's cores"
  "$py" -m tensorbridge bench --sections link --quiet --save "$out" || bench=1

  echo "== exit codes: tests $tests, benchmark $bench"
  [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
}

run 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "results in $out; run log and test report in $logs"
exit "$status"
