#!/usr/bin/env bash
# Configures and builds Tessera into build/ (Release). CUDA is built when nvcc is found;
# TESSERA_CMAKE_ARGS adds options, e.g. TESSERA_CMAKE_ARGS="-DTESSERA_CUDA=OFF".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${TESSERA_JOBS:-$(nproc)}"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
if [ -f "$root/build/CMakeCache.txt" ]; then gen=(); fi
# shellcheck disable=SC2086
cmake -S "$root" -B "$root/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release ${TESSERA_CMAKE_ARGS:-}
cmake --build "$root/build" -j "$jobs"
