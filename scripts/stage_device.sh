#!/usr/bin/env bash
# Stages what the lent GPU machine needs (DESIGN.md section 5): builds here
# with /usr/local/cuda (sm_90a), then copies the test/bench binaries, sqctl and
# every non-system shared library they load into .device/ (git-ignored).
# The device has CUDA 13 and glibc 2.39 but no RocksDB/FAISS/OpenBLAS/zstd.
#
# On the device (carry .device):
#   mkdir -p /tmp/sqz && tar -C /tmp/sqz -xzf .device/bundle.tar.gz &&
#   export LD_LIBRARY_PATH=/tmp/sqz/lib && /tmp/sqz/bin/sqz_gpu_tests
# and, staged with SQZ_STAGE_PYTHON, the Python tests:
#   PYTHONPATH=/tmp/sqz/py:$(ls /tmp/sqz/py/wheels/*.whl | tr '\n' :) python3 -m pytest /tmp/sqz/py/tests
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
# The allocation-failure shim the tests preload (run them with
# SQZ_ALLOC_SHIM=/tmp/sqz/lib/libsqz_alloc_fail_shim.so there).
cp "$BUILD_DIR"/tests/libsqz_alloc_fail_shim.so .device/lib/ 2>/dev/null || true
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
# The Python package for the device's interpreter (Python 3.12 there; this
# machine's pyenv has one): SQZ_STAGE_PYTHON=/path/to/python3.12 builds the
# extension for it in build-py<ver>/ and adds python/squeeze with _core and
# pytest's wheels (the device image may lack pytest) under py/.
if [ -n "${SQZ_STAGE_PYTHON:-}" ]; then
  ver=$("$SQZ_STAGE_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  venv=build-py$ver/venv
  [ -x "$venv/bin/python" ] || "$SQZ_STAGE_PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check nanobind==3.1.0
  cmake -S . -B "build-py$ver" -G Ninja -DSQZ_CUDA=ON -DSQZ_PYTHON=ON -DSQZ_BUILD_TESTS=OFF -DSQZ_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PWD/$venv/bin/python" >/dev/null
  cmake --build "build-py$ver" -j "$(nproc)" --target _core
  mkdir -p .device/py/wheels
  cp -r python/squeeze .device/py/squeeze
  rm -rf .device/py/squeeze/__pycache__
  cp "build-py$ver"/python/_core*.so .device/py/squeeze/
  strip --strip-unneeded .device/py/squeeze/_core*.so
  cp -r python/tests .device/py/tests
  "$venv/bin/pip" download --quiet --disable-pip-version-check -d .device/py/wheels pytest==9.2.0
  ldd .device/py/squeeze/_core*.so | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|libpython*) ;;
      *) cp -L "$lib" .device/lib/ ;;
    esac
  done
fi
# The libraries alone exceed the 64 MiB a device call may carry: ship one
# compressed tarball instead (unpack there with tar xzf).
tar -C .device -czf .device.tar.gz bin lib $( [ -d .device/py ] && echo py )
rm -rf .device && mkdir -p .device && mv .device.tar.gz .device/bundle.tar.gz
du -sh .device/bundle.tar.gz
