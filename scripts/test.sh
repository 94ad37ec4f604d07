#!/usr/bin/env bash
# The README's test command, and exactly what CI (.ci/run) runs: sets
# everything up (scripts/setup.sh), builds, runs the test suite (every
# GoogleTest suite except those labelled "slow", the layering checks and the
# Python cross-check of the safetensors files), the Python package's tests
# (pytest, real model included), checks formatting against the
# checked-in .clang-format, then runs the suite again under ASan + UBSan
# (scripts/sanitize.sh), then the libFuzzer targets for a minute each
# (scripts/fuzz.sh). About 40 minutes from a fresh clone on 2 cores.
#
#   scripts/test.sh                 # all of the above (what CI runs)
#   SQZ_SLOW=1 scripts/test.sh      # also the slow (large-context) tests
#   SQZ_QUICK=1 scripts/test.sh     # the suite and pytest only: no format check, no sanitizers, no fuzzing
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=${SQZ_BUILD_DIR:-build}
label_args=(-LE slow)
if [ "${SQZ_SLOW:-0}" = "1" ]; then label_args=(); fi
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 900 "${label_args[@]}"
echo
echo "== Python: pytest python/tests (the binding, and squeeze.hf on SmolLM2-135M on the CPU)"
# SQZ_REQUIRE_HF=1: a missing torch/transformers fails instead of skipping.
SQZ_REQUIRE_HF=1 "${SQZ_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=5 python/tests
if [ "${SQZ_QUICK:-0}" = "1" ]; then exit 0; fi
echo
echo "== formatting: scripts/format.sh --check"
scripts/format.sh --check
echo
echo "== ASan + UBSan: scripts/sanitize.sh"
scripts/sanitize.sh
echo
echo "== libFuzzer: scripts/fuzz.sh (each target ${SQZ_FUZZ_SECONDS:-60} s)"
scripts/fuzz.sh
