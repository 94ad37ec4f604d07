#!/usr/bin/env bash
# Builds the project with AddressSanitizer + UndefinedBehaviorSanitizer
# (Debug, CUDA off) into build-asan/ and runs the default test suite there:
# any sanitizer report fails its test (UBSan halts on error, ASan checks leaks).
# Not part of CI (it takes ~10 minutes on 2 cores); run it before a release
# or after touching memory-sensitive code.
set -euo pipefail
cd "$(dirname "$0")/.."
SQZ_SKIP_BUILD=1 scripts/setup.sh
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSQZ_CUDA=OFF -DSQZ_BUILD_BENCH=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build build-asan -j "$(nproc)"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j 2 --timeout 1200 -LE "slow|python"
