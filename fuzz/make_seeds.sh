#!/usr/bin/env bash
# Regenerates the seed corpora fuzz/corpus/<target>/ with fuzz_seed_writer
# (fuzz/make_seeds.cc; built by scripts/fuzz.sh --build-only in build-fuzz/).
# Replaces everything under fuzz/corpus/; fuzz/regressions/<target>/ (the
# reproducers of past findings, replayed by every scripts/fuzz.sh run) is
# left alone. The writer is deterministic: rerun it after a format change
# and commit the difference.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fuzz.sh --build-only
rm -rf fuzz/corpus
mkdir -p fuzz/corpus
"${SQZ_FUZZ_BUILD_DIR:-build-fuzz}/fuzz/fuzz_seed_writer" fuzz/corpus
for d in fuzz/corpus/*/; do
  echo "make_seeds: $d $(find "$d" -type f | wc -l) files, $(du -sb "$d" | cut -f1) bytes"
done
