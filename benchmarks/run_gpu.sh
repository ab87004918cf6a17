#!/usr/bin/env bash
# The GPU machine's one command: build tensorbridge in place, run the GPU tests, the GPU
# benchmark and the routing sweep, then the rest of the test suite and the simulated-link
# benchmark (with the contended host copies), inside a time budget, and write the results
# to OUTDIR: the benchmark's table, JSON and plot, the sweep's JSON, the CPU sections'
# table and JSON; the run log and the test reports (junit XML) go to OUTDIR/logs, which
# .gitignore keeps out of commits.
#
#   bash benchmarks/run_gpu.sh [OUTDIR]        # from the repository root; default OUTDIR:
#                                              # benchmarks/results
#   TB_GPU_BUDGET_S=540 bash benchmarks/run_gpu.sh /tmp/results   # the budget, in seconds
#
# The stages run most valuable first, each bounded by what is left of the budget (default
# 540 s, from the script's start); a stage that would start with less than its minimum
# left is skipped and named in the log, and the exit status is then non-zero. The
# benchmark rewrites its files after each of its sections, so a stage cut short keeps what
# it measured. To bring the results back from a machine that returns a few files, wrap it:
#   timeout 570 bash benchmarks/run_gpu.sh /tmp/r; tar czf results.tgz -C /tmp/r .
#
# Needs no network: python3 with torch (CUDA), numpy, pybind11, setuptools, pytest,
# hypothesis, CMake, ninja and nvcc (on PATH, as CUDACXX, or in /usr/local/cuda/bin),
# checked before the build (without pytest the test stages are skipped; without nvcc or
# a working CUDA engine, the GPU stages); matplotlib for the plot, ml_dtypes for the
# bfloat16/float8 tests; CuPy, JAX and Numba for the interop tests (each skipped when
# missing). On an H100 machine (16 cores), an earlier form of this script, GPU and engine
# tests only, ran in 178 and 222 s, and the whole suite alone in 91 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
py="${PYTHON:-python3}"
budget="${TB_GPU_BUDGET_S:-540}"
case "$budget" in '' | *[!0-9]*)
  echo "TB_GPU_BUDGET_S must be a whole number of seconds, not '$budget'" >&2
  exit 2
  ;;
esac
logs="$out/logs"
mkdir -p "$out" "$logs"
stamp="$(date +%Y-%m-%d)"
log="$logs/$stamp-gpu-run.log"
deadline=$(($(date +%s) + budget))
export PYTHONUNBUFFERED=1
failed=()

# stage NAME MIN_SECONDS LEAVE_SECONDS COMMAND...: runs COMMAND under what is left of the
# budget less LEAVE_SECONDS (kept for the stages after it), or skips it when less than
# MIN_SECONDS would be left for it; a failure, a timeout or a skip is recorded.
stage() {
  local name="$1" min="$2" leave="$3"
  shift 3
  local left=$((deadline - $(date +%s) - leave))
  if [ "$left" -lt "$min" ]; then
    echo "== $name: skipped, ${left} s of the budget left for it (it needs ${min} s)"
    failed+=("$name (skipped)")
    return
  fi
  echo "== $name (${left} s of the budget left for it)"
  local began status=0
  began=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$left" "$@" || status=$?
  echo "== $name: exit $status after $(($(date +%s) - began)) s"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    failed+=("$name (out of time)")
  elif [ "$status" -ne 0 ]; then
    failed+=("$name (exit $status)")
  fi
}

# (faulthandler: a test that hangs prints every thread's stack before the stage's timeout)
# stage_if WHY NAME ...: stage NAME ... unless WHY is non-empty, when it is recorded as
# skipped for that reason.
stage_if() {
  local why="$1"
  shift
  if [ -n "$why" ]; then
    echo "== $1: skipped: $why"
    failed+=("$1 (skipped: $why)")
    return
  fi
  stage "$@"
}

pytest=("$py" -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120
  -o addopts="--strict-markers --strict-config -rfE")

run() {
  echo "== machine (budget ${budget} s)"
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total \
    --format=csv || true
  lscpu 2>/dev/null | grep -E "^(Model name|Socket|NUMA node\(s\)|CPU\(s\))" || true
  df -h /dev/shm || true # DataLoader workers hand batches over in shared memory
  "$py" -c "import torch, numpy; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'numpy', numpy.__version__)"

  # What the stages need, checked before the budget goes to a build that cannot serve:
  # the build and benchmarks need numpy, torch with a CUDA device and pybind11; the test
  # stages pytest and hypothesis too; the GPU stages a build whose CUDA engine works.
  if ! "$py" -c "import numpy, torch, pybind11"; then
    echo "== not clean: needs numpy, torch and pybind11 (see above)"
    return 1
  fi
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== not clean: torch sees no CUDA device (torch.cuda.is_available() is False)"
    return 1
  fi
  no_tests="" no_gpu=""
  if ! "$py" -c "import pytest, hypothesis"; then
    no_tests="pytest or hypothesis is missing (see above)"
    echo "== warning: $no_tests: the test stages will be skipped"
  fi
  if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
      export CUDACXX=/usr/local/cuda/bin/nvcc # (CMake compiles the CUDA sources only with nvcc)
    else
      no_gpu="no nvcc on PATH, as CUDACXX or in /usr/local/cuda/bin: the build has no CUDA engine"
      echo "== warning: $no_gpu; the GPU stages will be skipped"
    fi
  fi
  stage "build in place (csrc -> python/tensorbridge/_C)" 30 0 \
    env TENSORBRIDGE_EXTENSION=on "$py" setup.py -q build_ext --inplace -j "$(nproc)"
  [ "${#failed[@]}" -eq 0 ] || return 1
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -m tensorbridge info
  # Without a working CUDA engine every GPU row would time torch's fallback. (=on: a
  # build that fails to import is an error here, not the pure-Python path.)
  if [ -z "$no_gpu" ] && ! why="$(TENSORBRIDGE_EXTENSION=on "$py" -c "
import tensorbridge as tb
from tensorbridge import _backend
i = tb.info()
if not _backend.ENGINE.cuda_engine:
    print('the build has no CUDA sources (nvcc was not found when it was configured)'
          if not i['cuda_compiled'] else f\"the CUDA engine does not work: {i['cuda_reason']}\")
    raise SystemExit(1)
" 2>&1)"; then
    no_gpu="${why:-the compiled core does not import}"
    echo "== warning: $no_gpu; the GPU stages will be skipped"
  fi

  stage_if "${no_gpu:-$no_tests}" "GPU tests (-m gpu)" 30 300 \
    "${pytest[@]}" --junitxml="$logs/$stamp-gpu-tests.xml" -m gpu tests
  # Engine transfers first (the limits P and H are measured at its start), then batches,
  # images and the epoch, then both directions and the registration cache.
  local plot=()  # (the plot can be drawn later from the JSON where matplotlib is missing)
  if "$py" -c "import matplotlib" 2>/dev/null; then plot=(--plot "$out/$stamp-gpu-bench.png"); fi
  stage_if "$no_gpu" "GPU benchmark" 60 120 env TENSORBRIDGE_EXTENSION=on \
    "$py" -m tensorbridge bench-gpu --save "$out" "${plot[@]}" \
    --sections d2h h2d batch both registered
  stage_if "$no_gpu" "routing sweep (bench-tune)" 30 60 env TENSORBRIDGE_EXTENSION=on \
    "$py" -m tensorbridge bench-tune --save "$out"
  stage_if "$no_tests" "the rest of the test suite (-m 'not gpu')" 60 0 \
    "${pytest[@]}" --junitxml="$logs/$stamp-cpu-tests.xml" -m "not gpu" tests
  # (and out= copies beside busy processes: the host-copy routing on this host's cores)
  stage "the pipeline over a simulated link on this host's cores; contended copies" 30 0 \
    "$py" -m tensorbridge bench --sections link contended --quiet --save "$out"

  if [ "${#failed[@]}" -ne 0 ]; then
    printf '== not clean: %s\n' "${failed[@]}"
    return 1
  fi
  echo "== every stage passed"
}

run 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "results in $out; run log and test reports in $logs"
exit "$status"
