#!/usr/bin/env bash
# Cross-checks our safetensors reader/writer against the reference Python
# implementation (PyPI: safetensors, numpy), in both directions:
#   C++ writes files + dumps of what it reads  -> Python reads and compares,
#   Python writes files + its expected values -> C++ reads and compares.
# See tests/python/test_safetensors_compat.py for the protocol.
#
#   scripts/pycheck.sh BUILD_DIR     # needs BUILD_DIR/tests/sqz_tools_tests
#
# The Python packages live in a virtual environment (.venv, or $SQZ_VENV),
# created on first use; nothing is installed system-wide. Exits non-zero on
# any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${1:?usage: scripts/pycheck.sh BUILD_DIR}
BIN=${SQZ_PYCHECK_BIN:-$BUILD_DIR/tests/sqz_tools_tests}
if [ ! -x "$BIN" ]; then
  echo "pycheck: $BIN is not built (ninja -C $BUILD_DIR sqz_tools_tests)" >&2
  exit 2
fi

VENV=${SQZ_VENV:-.venv}
if ! "$VENV/bin/python" -c 'import numpy, safetensors' >/dev/null 2>&1; then
  echo "pycheck: setting up $VENV (numpy, safetensors)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sqz-pycheck.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export SQZ_PYCHECK_DIR=$WORK

# gtest exits 0 when a filter matches nothing, so require the test to have
# run and passed by name.
run_gtest() {
  local out
  if ! out=$("$BIN" --gtest_filter="$1" 2>&1); then
    echo "$out"
    echo "pycheck: $1 failed" >&2
    return 1
  fi
  if ! grep -q "^\[       OK \] $1 " <<<"$out"; then
    echo "$out"
    echo "pycheck: $1 did not run" >&2
    return 1
  fi
  echo "[ OK ] $1"
}

run_gtest PyCheck.WriteCppFiles
"$VENV/bin/python" tests/python/test_safetensors_compat.py
run_gtest PyCheck.ReadPythonFiles
echo "pycheck: OK"
