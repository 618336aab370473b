#!/usr/bin/env bash
# Every C++/CUDA source of the repository is formatted by its .clang-format (clang-format
# --dry-run --Werror); lists the files that are not. Skips (exit 77) where clang-format is absent.
set -uo pipefail
root="$1"
cd "$root" || exit 1
command -v clang-format >/dev/null 2>&1 || { echo "clang-format not installed: skipped"; exit 77; }
bad=()
while IFS= read -r f; do
  clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' 2>/dev/null)
if [ ${#bad[@]} -gt 0 ]; then
  printf 'not formatted (run clang-format -i on them):\n'
  printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "every source is formatted"
