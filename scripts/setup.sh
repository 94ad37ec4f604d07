#!/usr/bin/env bash
# Installs everything squeeze needs on Debian 12 (idempotent; clang, libFuzzer
# and clang's OpenMP are for scripts/fuzz.sh), then configures
# and builds the project into build/ (or $SQZ_BUILD_DIR) with warnings as
# errors (-DSQZ_WERROR=ON; SQZ_CMAKE_ARGS is passed after it).
#
#   scripts/setup.sh            # install + build everything
#   SQZ_SKIP_BUILD=1 scripts/setup.sh   # install only
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  build-essential cmake ninja-build pkg-config git
  librocksdb-dev libzstd-dev zstd
  libfaiss-dev libopenblas-dev liblapack-dev
  libflatbuffers-dev flatbuffers-compiler
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev clang-format
  clang libclang-rt-14-dev libomp-dev
  python3 python3-venv python3-pip time
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# FAISS links the generic libblas/liblapack: make sure they resolve to
# OpenBLAS (15x faster k-means than the reference BLAS on these machines).
arch_dir=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
for lib in blas lapack; do
  alt="lib${lib}.so.3-$(basename "$arch_dir")"
  target="$arch_dir/openblas-pthread/lib${lib}.so.3"
  if [ -e "$target" ] && update-alternatives --query "$alt" >/dev/null 2>&1; then
    current=$(update-alternatives --query "$alt" | awk '/^Value:/ {print $2}')
    if [ "$current" != "$target" ]; then $SUDO update-alternatives --set "$alt" "$target" >/dev/null; fi
  fi
done

# Python: a project-local venv (.venv or $SQZ_VENV) with the cross-check
# tools (scripts/requirements.txt) and the Python package's build tools, Hugging
# Face stack and test tools (python/requirements.txt); nothing system-wide.
# Reinstalled when a requirements file changes.
VENV=${SQZ_VENV:-.venv}
req_stamp="$VENV/.sqz-requirements"
if [ ! -x "$VENV/bin/python" ] || ! cat scripts/requirements.txt python/requirements.txt | cmp -s - "$req_stamp"; then
  echo "setup: installing Python requirements into $VENV (torch, transformers, ...; first time ~2 min)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt -r python/requirements.txt
  cat scripts/requirements.txt python/requirements.txt >"$req_stamp"
fi

if [ "${SQZ_SKIP_BUILD:-0}" = "1" ]; then exit 0; fi

BUILD_DIR=${SQZ_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSQZ_WERROR=ON ${SQZ_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"

# The Python package (pyproject.toml): the extension builds in
# build/python/<tag> (incremental) and installs into the venv.
if [ "${SQZ_SKIP_PYTHON:-0}" != "1" ]; then
  echo "setup: pip install . (the squeeze Python package) into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation . ${SQZ_PIP_ARGS:-}
fi
