#!/usr/bin/env bash
# CPU benchmarks behind docs/PERFORMANCE.md, with Llama-3-8B head shapes
# (GQA 32 query / 8 KV heads, head_dim 128, fp16):
#   1. floors: BLAS rate (k-means floor), memory read and disk write rates;
#   2. build throughput and peak memory at N = 32K (2 layers x 8 KV heads)
#      and N = 128K (1 layer x 2 KV heads: the per-head rate; 8 heads take 4x);
#   3. query latency per layer at N = 32K and 128K (8 KV heads; the 128K
#      context for this part is built with --iters 2 to save time: latency does
#      not depend on the iteration count), decode and prefill, cold and warm,
#      against dense attention measured in the same run.
# Output: stdout and $WORK/cpu_bench.txt. Takes about 15 minutes on 2 cores.
#
#   bench/run_cpu_bench.sh [BUILD_DIR] [WORK_DIR]
set -euo pipefail
BUILD=${1:-build}
WORK=${2:-/tmp/sqz-cpu-bench}
SQCTL=$BUILD/tools/sqctl
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$WORK/cpu_bench.txt") 2>&1

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(date -u)"
"$BUILD/bench/floors" --dir "$WORK"

synth() {  # name tokens layers kv_heads q_heads
  "$SQCTL" synth --out "$WORK/$1" --tokens "$2" --layers "$3" --kv-heads "$4" --q-heads "$5" \
    --head-dim 128 --queries 256 --window 100 >/dev/null
}
build() {  # name [extra build-index flags]
  local name=$1
  shift
  local file=$WORK/$name/ctx_000.safetensors
  echo "== build $name ($(du -h "$file" | cut -f1) fp16 file) $*"
  /usr/bin/time -v "$SQCTL" build-index --db "$WORK/db" --kv "$file" --name "$name" --json --quiet "$@" \
    2> "$WORK/$name.time"
  grep -E 'Maximum resident|Elapsed' "$WORK/$name.time"
}

synth n32k 32768 2 8 32
build n32k
synth n128k 131072 1 2 8
build n128k
synth q128k 131072 1 8 32
build q128k --iters 2
du -sh "$WORK/db"

for name in n32k q128k; do
  echo "== query $name"
  "$BUILD/bench/query_bench" --db "$WORK/db" --context "$name" --kv "$WORK/$name/ctx_000.safetensors" \
    --queries "$WORK/$name/queries/ctx_000.safetensors" --reps 5 --prefill 256
done
