#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/: the safetensors reader and KV source,
# the storage record decoders, the queries-file reader) with clang, ASan and
# UBSan into build-fuzz/ (or $SQZ_FUZZ_BUILD_DIR) and runs each one over a
# copy of its seed corpus (fuzz/corpus/<target>/, never changed here) and
# the reproducers of past findings (fuzz/regressions/<target>/).
# Exits non-zero on any crash, leak, timeout or oversized allocation, naming
# the reproducer. CI runs the short form (scripts/test.sh). From a fresh
# build directory on the 2-core development machine: build ~2 min, runs 3 min.
#
#   scripts/fuzz.sh                  # CI: each target SQZ_FUZZ_SECONDS (default 60)
#   scripts/fuzz.sh --long SECONDS   # each target SECONDS, growing build-fuzz/long/<target>/corpus
#                                    # across runs; prints the figures docs/RELIABILITY.md records
#   scripts/fuzz.sh --build-only     # build the targets and fuzz_seed_writer (fuzz/make_seeds.sh)
#   SQZ_FUZZ_TARGETS="fuzz_records" scripts/fuzz.sh   # some targets only
#
# Reproduce a finding: build-fuzz/fuzz/<target> <reproducer file>.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '11,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
mode=ci
seconds=${SQZ_FUZZ_SECONDS:-60}
case "${1:-}" in
  "") ;;
  -h | --help)
    sed -n '11,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  --long)
    mode=long
    seconds=${2:-}
    [[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage
    shift
    ;;
  --build-only) mode=build ;;
  *) usage ;;
esac
[ $# -le 1 ] || usage

BUILD_DIR=${SQZ_FUZZ_BUILD_DIR:-build-fuzz}
read -r -a TARGETS <<<"${SQZ_FUZZ_TARGETS:-fuzz_safetensors fuzz_records fuzz_queries}"

# clang (Debian's clang 14) and libFuzzer (libclang-rt-14-dev): scripts/setup.sh.
SQZ_SKIP_BUILD=1 scripts/setup.sh
# Only what the targets need: no CUDA, tests, benchmarks, sqctl or C API.
# Warnings are errors here too: this is the project's clang build.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DSQZ_FUZZ=ON \
  -DSQZ_CUDA=OFF -DSQZ_BUILD_TESTS=OFF -DSQZ_BUILD_BENCH=OFF -DSQZ_WERROR=ON >/dev/null
cmake --build "$BUILD_DIR" -j "${SQZ_FUZZ_JOBS:-2}" --target sqz_fuzz
[ "$mode" = build ] && exit 0

# A leak, a UBSan report or an allocation over -malloc_limit_mb is a crash
# (the build aborts on every sanitizer report); so is an input running
# longer than -timeout seconds.
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -max_len=16384)
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1

run_root=$BUILD_DIR/$mode
[ "$mode" = ci ] && rm -rf "$run_root"
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  dir=$run_root/$t
  mkdir -p "$dir/corpus" "$dir/artifacts"
  # The checked-in seeds are copied, never fuzzed in place (a long run keeps
  # what it found before).
  for f in fuzz/corpus/"$t"/*; do
    [ -e "$dir/corpus/$(basename "$f")" ] || cp "$f" "$dir/corpus/"
  done
  extra=()
  # Reproducers of past findings: read, never written to.
  if [ -d "fuzz/regressions/$t" ]; then extra+=("fuzz/regressions/$t"); fi
  case "$t" in
    fuzz_safetensors | fuzz_queries) dict=(-dict=fuzz/safetensors.dict) ;;
    *) dict=() ;;
  esac
  log=$dir/log.txt
  echo "== $t: ${seconds}s over $(find "$dir/corpus" -type f | wc -l) inputs (log: $log)"
  start=$(date +%s)
  rc=0
  "$BUILD_DIR/fuzz/$t" -max_total_time="$seconds" "${LIMITS[@]}" -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/" "${dict[@]}" "$dir/corpus" "${extra[@]}" >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  corpus=$(find "$dir/corpus" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "FAILED: $t (exit $rc after ${took}s)"
    grep -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|fuzz invariant failed|SUMMARY:' "$log" | head -5 || true
    for f in "$dir"/artifacts/*; do
      [ -e "$f" ] || continue
      echo "  reproducer: $f"
      echo "  reproduce:  $BUILD_DIR/fuzz/$t $f"
    done
    echo "  last lines of $log:"
    tail -n 40 "$log" | sed 's/^/    /'
  else
    echo "   ok in ${took}s: ${execs:-?} executions (${rate:-?}/s), corpus $corpus inputs; ${done_line:-no DONE line}"
  fi
  summary+=("$t|${seconds}|${execs:-?}|${rate:-?}|$(echo "$done_line" | grep -oE 'cov: [0-9]+' || true)|$(echo "$done_line" | grep -oE 'ft: [0-9]+' || true)|$corpus|$([ "$rc" -eq 0 ] && echo none || echo "exit $rc")")
done

echo
echo "| target | seconds | executions | exec/s | coverage | features | corpus | findings |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for row in "${summary[@]}"; do echo "| ${row//|/ | } |"; done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} target(s) clean"
