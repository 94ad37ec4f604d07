#!/usr/bin/env bash
# layering_case.sh BUILD_DIR TARGET HEADER EXPECT
# Builds TARGET (a tests/layering/ object library). EXPECT=fail: passes only
# if the build fails because HEADER is not found (not for any other reason);
# EXPECT=ok: passes only if the build succeeds.
set -uo pipefail
out=$(cmake --build "$1" --target "$2" 2>&1); rc=$?
if [ "$4" = ok ]; then
  [ $rc -eq 0 ] && { echo "$2 compiles, as it must"; exit 0; }
  echo "$out"; echo "FAIL: $2 should compile"; exit 1
fi
if [ $rc -ne 0 ] && grep -q "$3: No such file or directory" <<<"$out"; then
  echo "$2 fails to compile ($3 not on its include path), as it must"; exit 0
fi
echo "$out"; echo "FAIL: $2 must fail to compile because '$3' is not on its include path"; exit 1
