#!/usr/bin/env bash
# Build throughput and peak memory with Llama-3-8B head shapes (32 query
# heads, 8 KV heads, head_dim 128, fp16) at N = 32K and 128K tokens, plus the
# machine's floors (BLAS rate, disk write rate). Results go to stdout and
# $WORK/build_bench.txt. See docs/PERFORMANCE.md.
#
#   bench/run_build_bench.sh [BUILD_DIR] [WORK_DIR]
set -euo pipefail
BUILD=${1:-build}
WORK=${2:-/tmp/sqz-build-bench}
SQCTL=$BUILD/tools/sqctl
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$WORK/build_bench.txt") 2>&1

echo "== machine"; nproc; grep -m1 'model name' /proc/cpuinfo || true
"$BUILD/bench/floors" --dir "$WORK"

run() {  # name tokens layers
  local name=$1 tokens=$2 layers=$3
  "$SQCTL" synth --out "$WORK/$name" --tokens "$tokens" --layers "$layers" --kv-heads 8 --q-heads 32 \
    --head-dim 128 --queries 16 --window 100 >/dev/null
  local file=$WORK/$name/ctx_000.safetensors
  echo "== $name: $tokens tokens x $layers layers x 8 KV heads x 128 dims, $(du -h "$file" | cut -f1) fp16"
  /usr/bin/time -v "$SQCTL" build-index --db "$WORK/db" --kv "$file" --name "$name" --json --quiet \
    2> "$WORK/$name.time" | tee "$WORK/$name.json"
  grep -E 'Maximum resident|Elapsed' "$WORK/$name.time"
  du -sh "$WORK/db"
}
run n32k 32768 2
run n128k 131072 1
"$SQCTL" info --db "$WORK/db" --context n128k
