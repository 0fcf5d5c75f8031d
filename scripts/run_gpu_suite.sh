#!/usr/bin/env bash
# On a GPU machine: build normfuse for the visible GPU with every core, run the GPU-relevant tests
# in parallel, then the benchmark; everything lands in bench/results/<gpu name>/ (report.md,
# CSV/JSON, plots, logs), then the GPU probes (l2probe, steps_probe, single read) and an ncu
# profile of the four generic kernels. Budget: 8 minutes on an H200 with 16 cores (build ~35 s,
# tests ~1-2 min, quick bench ~1-3 min, probes and ncu ~1 min each); each step has its own time
# limit so a hang cannot eat the rest.
#
#   scripts/run_gpu_suite.sh                 # build + GPU tests + quick benchmark
#   SKIP_BUILD=1 scripts/run_gpu_suite.sh    # normfuse._C already built for this torch
#   BENCH_ARGS="" scripts/run_gpu_suite.sh   # the full benchmark instead of --quick (longer)
#   TESTS=all scripts/run_gpu_suite.sh       # the whole suite, not only the GPU-relevant tests
#   RESULTS_TAR=$OUT/results.tgz ...         # also pack the results folder (a device tool's $OUT)
#
# Environment: CUDA_HOME (default /usr/local/cuda), PYTHON (default python3). Nothing is
# installed: the build is in place (setup.py build_ext --inplace) against the machine's torch.
# The script does not stop at a failing step: it records it and goes on; its exit status is
# non-zero if any step failed, a test failed or errored, or a pytest worker crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
CORES=$(nproc)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_suite.sh: torch sees no GPU; nothing to do" >&2
    exit 2
fi
OUT=$("$PYTHON" -c "from bench import machine; import torch; \
print('bench/results/' + machine.slug(torch.cuda.get_device_name(0)))")
ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
mkdir -p "$OUT"
status=0
step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a time limit, tee the log, remember a failure
    local name=$1 limit=$2 log=$3; shift 3
    echo "=== $name (limit ${limit}s): $*" | tee "$log"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
    [ "$rc" -eq 0 ] || status=1
}
: > "$OUT/steps.txt"

{ nvidia-smi; "$PYTHON" -c "import torch, triton, sys; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'arch', '$ARCH', 'cores', $CORES)"; } \
    > "$OUT/machine.txt" 2>&1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step build 300 "$OUT/build.log" env MAX_JOBS="$CORES" TORCH_CUDA_ARCH_LIST="$ARCH" \
        "$PYTHON" setup.py build_ext --inplace
fi
"$PYTHON" -c "import normfuse; print('normfuse backends:', normfuse.available_backends())" \
    2>&1 | tee "$OUT/backends.txt"
"$PYTHON" -m normfuse >> "$OUT/machine.txt" 2>&1  # versions, build, GPUs, backends and why not
for b in cuda triton; do
    grep -q "'$b'" "$OUT/backends.txt" || { echo "backend $b is not available" | tee -a "$OUT/backends.txt"; status=1; }
done

# The GPU-relevant tests: every cuda / triton parametrization and the GPU-only files. The CPU
# shim, sanitizer, AOT-compile and build-check tests need no GPU (CI runs them).
if [ "${TESTS:-gpu}" = all ]; then SELECT=(); else
    SELECT=(-k "(cuda or triton or gpu) and not shim and not planted and not asan and not aot and not build")
fi
XDIST=()
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n "$CORES")
step tests 360 "$OUT/tests.log" "$PYTHON" -m pytest tests -q -rfEs -p no:cacheprovider \
    "${XDIST[@]}" "${SELECT[@]}" --junitxml="$OUT/tests.xml"
if grep -qiE "worker '?gw[0-9]+'? crashed|node down|Segmentation fault" "$OUT/tests.log"; then
    echo "=== tests: a pytest worker crashed (see tests.log)" | tee -a "$OUT/tests.log"
    status=1
fi

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench 420 "$OUT/bench.log" "$PYTHON" -m bench --device cuda --out "$OUT" ${BENCH_ARGS---quick}
# Issue 14's single-read question: how much of a layer's second pass L2 already serves.
step l2probe 120 "$OUT/l2probe.log" "$PYTHON" -m bench.l2probe --out "$OUT"
# Issue 13's fused layer steps: where computing the coefficients in the reduction's launch pays.
step steps_probe 120 "$OUT/steps_probe.log" "$PYTHON" -m bench.steps_probe --out "$OUT"
# Issue 14's single read: one cooperative launch per direction vs the generic launches.
step single_read_probe 120 "$OUT/single_read_probe.log" "$PYTHON" -m bench.steps_probe --single-read --out "$OUT"
# Issue 13's reductions at copy speed: why a pass runs below a copy (DRAM share of peak,
# occupancy, warp stall reasons) for the four generic kernels, one launch each (ncu.csv).
NCU=${NCU:-$(command -v ncu || echo "$CUDA_HOME/bin/ncu")}
if [ -x "$NCU" ]; then
    step ncu 150 "$OUT/ncu.log" "$NCU" --clock-control none \
        --kernel-name regex:'(cl|contig)_(reduce|apply)_kernel' --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --csv --page details --log-file "$OUT/ncu.csv" \
        "$PYTHON" -m bench.ncu_target
else
    echo "ncu not found ($NCU): no kernel profile" | tee "$OUT/ncu.log"
fi
echo "status $status" >> "$OUT/steps.txt"
if [ -n "${RESULTS_TAR:-}" ]; then
    tar -czf "$RESULTS_TAR" "$OUT"
fi
echo "results in $OUT (status $status)"
exit $status
