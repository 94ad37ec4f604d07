#!/usr/bin/env bash
# Checks what CMake's include paths cannot: RocksDB and FlatBuffers headers
# live in /usr/include, on every target's path, so only storage/ may name
# them (docs/ARCHITECTURE.md, "Layers"). Exit 1 listing offenders.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$(grep -rlE '#include *[<"](rocksdb|flatbuffers)/' --include='*.c' --include='*.cc' --include='*.h' --include='*.cu' \
        include util index gpu query tools capi bench fuzz 2>/dev/null || true)
if [ -n "$bad" ]; then
  echo "check_layering: only storage/ may include RocksDB or FlatBuffers headers; found in:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "check_layering: OK (RocksDB/FlatBuffers headers only in storage/)"
