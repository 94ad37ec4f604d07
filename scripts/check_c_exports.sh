#!/usr/bin/env bash
# Checks that a libsqz.so exports exactly the functions include/sqz/c.h
# declares: nothing missing (a declared function not built), nothing more
# (C++ symbols of the static libraries inside it leaking out, where they
# would clash with another copy of RocksDB, FAISS or squeeze in a process).
#   scripts/check_c_exports.sh build/capi/libsqz.so
set -euo pipefail
cd "$(dirname "$0")/.."
lib=${1:?usage: scripts/check_c_exports.sh path/to/libsqz.so}
declared=$(grep -oE '\bsqz_[a-z0-9_]+\(' include/sqz/c.h | tr -d '(' | sort -u)
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[A-Z]$/ { print $3 }' | sort -u)
if [ "$declared" != "$exported" ]; then
  echo "check_c_exports: $lib does not export exactly the functions of include/sqz/c.h" >&2
  diff <(echo "$declared") <(echo "$exported") | sed -n 's/^</  declared, not exported:/p; s/^>/  exported, not declared:/p' >&2
  exit 1
fi
echo "check_c_exports: OK ($(echo "$declared" | wc -l) functions)"
