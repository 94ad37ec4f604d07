#!/usr/bin/env bash
# Formats every tracked C/C++/CUDA source with the checked-in .clang-format,
# using clang-format 14 (Debian 12's clang-format package; scripts/setup.sh
# installs it). Other clang-format versions format differently, so they are
# refused; $CLANG_FORMAT names the binary to use.
#
#   scripts/format.sh           # reformat the files in place; lists the ones it changed
#   scripts/format.sh --check   # change nothing; list the files that differ and exit 1 if any
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  -h | --help)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: scripts/format.sh [--check]" >&2
    exit 2
    ;;
esac
[ $# -le 1 ] || { echo "usage: scripts/format.sh [--check]" >&2; exit 2; }

CLANG_FORMAT=${CLANG_FORMAT:-}
if [ -z "$CLANG_FORMAT" ]; then
  for c in clang-format-14 clang-format; do
    if command -v "$c" >/dev/null 2>&1; then
      CLANG_FORMAT=$c
      break
    fi
  done
fi
if [ -z "$CLANG_FORMAT" ]; then
  echo "format: clang-format not found (scripts/setup.sh installs Debian's clang-format package)" >&2
  exit 2
fi
version=$({ "$CLANG_FORMAT" --version 2>/dev/null || true; } | sed -n 's/.*clang-format version \([0-9][0-9]*\)\..*/\1/p')
if [ "$version" != 14 ]; then
  echo "format: $CLANG_FORMAT is version ${version:-unknown}, this project is formatted with clang-format 14" >&2
  exit 2
fi

# Tracked sources (git pathspec '*' also matches '/': every directory).
files=()
while IFS= read -r -d '' f; do
  [ -f "$f" ] && files+=("$f")  # skip files deleted in the work tree
done < <(git ls-files -z -- '*.c' '*.cc' '*.cpp' '*.cxx' '*.h' '*.hh' '*.hpp' '*.cu' '*.cuh')

differ=()
for f in "${files[@]}"; do
  if ! "$CLANG_FORMAT" --style=file "$f" | cmp -s - "$f"; then
    differ+=("$f")
  fi
done

if [ "$check" = 1 ]; then
  if [ ${#differ[@]} -gt 0 ]; then
    printf '%s\n' "${differ[@]}"
    echo "format: ${#differ[@]} of ${#files[@]} files are not formatted (run scripts/format.sh)" >&2
    exit 1
  fi
  echo "format: ${#files[@]} files OK"
  exit 0
fi

if [ ${#differ[@]} -gt 0 ]; then
  "$CLANG_FORMAT" --style=file -i "${differ[@]}"
  printf 'formatted %s\n' "${differ[@]}"
fi
echo "format: ${#differ[@]} of ${#files[@]} files changed"
