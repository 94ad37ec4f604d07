#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), builds, and runs the demo: a
# synthetic sample corpus is generated, indexed into an embedded database,
# and queried; the output compares sparse attention with dense attention.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=${SQZ_BUILD_DIR:-build}
exec "$BUILD_DIR/tools/sqctl" demo "$@"
