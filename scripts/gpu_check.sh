#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over the bundle that
# scripts/stage_device.sh made here (carried as .device/): the GPU tests
# (default, and under each switch that selects another kernel path), the
# library's allocation-failure test, compute-sanitizer memcheck and racecheck,
# and the benchmark against PyTorch SDPA and FlexAttention (decode, and prefill
# with T = 2048). Writes everything
# to one results file and prints its summary.
#
#   scripts/gpu_check.sh [RESULTS_FILE] [--quick | --sanitize | --bench | --profile]
#     --quick: the tests only (~8 minutes on an H100: eight runs of the GPU
#     tests); --sanitize: memcheck and racecheck (~5 minutes); --bench: the
#     benchmark (~5 minutes); none: all three (~18 minutes: longer than one
#     device command may run, so with the device tool run the three modes as
#     three commands, carry .device, e.g. "scripts/gpu_check.sh
#     $OUT/tests.txt --quick"); --profile (not part of "all"): ncu's
#     per-kernel times at N = 131072, both decode attention kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu_check.txt}
MODE=${2:-all}
ROOT=$PWD
mkdir -p /tmp/sqz && tar -C /tmp/sqz -xzf .device/bundle.tar.gz || { echo "no .device/bundle.tar.gz" >&2; exit 1; }
export LD_LIBRARY_PATH=/tmp/sqz/lib SQZ_SQCTL=/tmp/sqz/bin/sqctl SQZ_ALLOC_SHIM=/tmp/sqz/lib/libsqz_alloc_fail_shim.so
# The device's virtual CPU reports a generic model that OpenBLAS takes for a
# Prescott (SSE3 kernels); its AVX2 kernels build the benchmark indexes 25%
# faster there (docs/results/2026-11-25-cluster-select.txt, section 9).
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -q avx2 /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
T=/tmp/sqz/bin/sqz_query_tests
fail=0
: > "$RESULTS"
step() {  # step NAME COMMAND...: runs it in /tmp, its output appended to the results file
  local name=$1
  shift
  echo "== $name" >> "$RESULTS"
  (cd /tmp && "$@") >> "$RESULTS" 2>&1
  local rc=$?
  echo "== $name: rc=$rc" >> "$RESULTS"
  echo "$name: rc=$rc"
  [ $rc -eq 0 ] || fail=1
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$RESULTS" 2>&1
if [ "$MODE" = all ] || [ "$MODE" = --quick ]; then
step "GPU tests" $T --gtest_filter='Gpu*:LibraryAllocationFailure*'
step "GPU tests, SQZ_GPU_SELECT_RADIX=1" env SQZ_GPU_SELECT_RADIX=1 $T --gtest_filter='Gpu*'
step "GPU tests, SQZ_GPU_SELECT_CANDIDATES=0" env SQZ_GPU_SELECT_CANDIDATES=0 $T --gtest_filter='Gpu*'
step "GPU tests, SQZ_GPU_SELECT_UNSTAGED=1" env SQZ_GPU_SELECT_UNSTAGED=1 $T --gtest_filter='Gpu*'
step "GPU tests, SQZ_GPU_SELECT_CLUSTER=1" env SQZ_GPU_SELECT_CLUSTER=1 $T --gtest_filter='GpuEngine*'
step "GPU tests, SQZ_GPU_PDL=0" env SQZ_GPU_PDL=0 $T --gtest_filter='Gpu*'
step "GPU tests, SQZ_GPU_SEGMENTS_UNSTAGED=1" env SQZ_GPU_SEGMENTS_UNSTAGED=1 $T --gtest_filter='Gpu*'
step "GPU tests, SQZ_GPU_DECODE_SIMT=1" env SQZ_GPU_DECODE_SIMT=1 $T --gtest_filter='Gpu*'
grep -h "differ from the CPU" "$RESULTS" | sort | uniq -c | sed 's/^/  /'
fi
if [ "$MODE" = all ] || [ "$MODE" = --sanitize ]; then
  step "memcheck" compute-sanitizer --tool memcheck --error-exitcode 1 $T --gtest_filter='Gpu*'
  step "racecheck" compute-sanitizer --tool racecheck --error-exitcode 1 $T \
    --gtest_filter='GpuEngineTest.LlamaShapesBF16:GpuEngineTest.TinyAndHugeClusters:GpuEngineTest.MhaOddPagesEmptySelection'
fi
if [ "$MODE" = all ] || [ "$MODE" = --bench ]; then
  step "benchmark" python3 "$ROOT/bench/gpu_compare.py" --sqctl /tmp/sqz/bin/sqctl --gpu-bench /tmp/sqz/bin/gpu_bench \
    --tokens 32768,131072 --iters 2 --prefill-T 2048 --variant-env SQZ_GPU_DECODE_SIMT=1
  sed -n '/^# summary/,$p' "$RESULTS"
fi
if [ "$MODE" = --profile ]; then
  # Per-kernel times and rates at N = 131072, budget 1/8 (dense, flat and
  # hierarchical calls of one gpu_bench run; ncu locks the clocks, so times
  # are ~1.25x the unprofiled ones).
  DB=/tmp/sqz-bench/d131072
  if [ ! -d $DB ]; then
    mkdir -p /tmp/sqz-bench
    /tmp/sqz/bin/sqctl synth --out /tmp/sqz-bench/c131072 --contexts 1 --tokens 131072 --layers 1 --kv-heads 8 \
      --q-heads 32 --head-dim 128 --dtype BF16 --window 64 --queries 1 > /dev/null &&
      /tmp/sqz/bin/sqctl build-index --db $DB --corpus /tmp/sqz-bench/c131072 --iters 2 --quiet
  fi
  for simt in 0 1; do
    csv=/tmp/sqz-ncu-simt$simt.csv
    (cd /tmp && env SQZ_GPU_DECODE_SIMT=$simt ncu --csv --page raw --metrics \
      gpu__time_duration.sum,launch__grid_size,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active \
      /tmp/sqz/bin/gpu_bench --db $DB --context ctx_000 --budgets 0.125 --iters 1 > $csv 2> /dev/null)
    step "ncu per kernel, SQZ_GPU_DECODE_SIMT=$simt" python3 "$ROOT/bench/ncu_kernels.py" $csv
  done
fi
echo "results: $RESULTS"
exit $fail
