#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), builds, and runs the test suite:
# every GoogleTest suite except those labelled "slow", plus the Python
# cross-check of the safetensors files. This is what CI (.ci/run) runs.
#
#   scripts/test.sh          # default suite
#   SQZ_SLOW=1 scripts/test.sh   # also the slow (large-context) tests
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=${SQZ_BUILD_DIR:-build}
label_args=(-LE slow)
if [ "${SQZ_SLOW:-0}" = "1" ]; then label_args=(); fi
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 900 "${label_args[@]}"
