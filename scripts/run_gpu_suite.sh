#!/usr/bin/env bash
# On a GPU machine: build normfuse with its CUDA kernels, run the test suite (the GPU tests run
# instead of skipping), then the full benchmark and the pytest-benchmark groups.  Everything
# lands in bench/results/<gpu name>/ (report.md, CSV/JSON, PNG plots, test logs).
#
#   scripts/run_gpu_suite.sh                 # build + tests + full benchmark
#   SKIP_BUILD=1 scripts/run_gpu_suite.sh    # normfuse already installed
#   BENCH_ARGS="--quick" scripts/run_gpu_suite.sh
#
# Environment: CUDA_HOME (the toolkit; default /usr/local/cuda), PYTHON (default python).
# The script does not stop at failing tests: it records them and still runs the benchmark;
# its exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_suite.sh: torch sees no GPU; nothing to do" >&2
    exit 2
fi
OUT=$("$PYTHON" -c "from bench import machine; import torch; \
print('bench/results/' + machine.slug(torch.cuda.get_device_name(0)))")
mkdir -p "$OUT"
status=0
step() {  # step NAME LOGFILE CMD...: run, tee the log, remember a failure
    local name=$1 log=$2; shift 2
    echo "=== $name: $*" | tee "$log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step build "$OUT/build.log" "$PYTHON" -m pip install --no-build-isolation -v -e .
fi
"$PYTHON" -c "import normfuse; print('normfuse backends:', normfuse.available_backends())" \
    | tee "$OUT/backends.txt"
step tests "$OUT/tests.log" "$PYTHON" -m pytest tests -q -rs --junitxml="$OUT/tests.xml"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench "$OUT/bench.log" "$PYTHON" -m bench --device cuda --out "$OUT" ${BENCH_ARGS:-}
step pytest-benchmark "$OUT/pytest-benchmark.log" "$PYTHON" -m pytest bench --benchmark-only \
    -q --benchmark-json="$OUT/pytest-benchmark.json"
echo "results in $OUT (status $status)"
exit $status
