#!/usr/bin/env bash
# Stages what the lent GPU machine needs (DESIGN.md section 5): builds here
# with /usr/local/cuda (sm_90a), then copies the test/bench binaries, sqctl and
# every non-system shared library they load into .device/ (git-ignored).
# The device has CUDA 13 and glibc 2.39 but no RocksDB/FAISS/OpenBLAS/zstd.
#
# On the device (carry .device):
#   mkdir -p /tmp/sqz && tar -C /tmp/sqz -xzf .device/bundle.tar.gz &&
#   export LD_LIBRARY_PATH=/tmp/sqz/lib && /tmp/sqz/bin/sqz_gpu_tests
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${SQZ_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DSQZ_CUDA=ON >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
rm -rf .device && mkdir -p .device/bin .device/lib
for b in "$BUILD_DIR"/tests/sqz_*_tests "$BUILD_DIR"/tools/sqctl "$BUILD_DIR"/bench/*; do
  [ -x "$b" ] && [ -f "$b" ] && cp "$b" .device/bin/
done
strip --strip-unneeded .device/bin/* 2>/dev/null || true
# Shared libraries: everything ldd resolves outside glibc's core set.
for b in .device/bin/*; do
  ldd "$b" | awk '/=> \// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
    *) cp -L "$lib" .device/lib/ ;;
  esac
done
# libstdc++ of Debian 12 is older than the device's: the device's own works.
# The libraries alone exceed the 64 MiB a device call may carry: ship one
# compressed tarball instead (unpack there with tar xzf).
tar -C .device -czf .device.tar.gz bin lib
rm -rf .device && mkdir -p .device && mv .device.tar.gz .device/bundle.tar.gz
du -sh .device/bundle.tar.gz
