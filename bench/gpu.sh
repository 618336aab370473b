#!/usr/bin/env bash
# One call on the GPU machine: configure + build with CUDA (sm_90a), run the GPU tests, run the
# benchmarks, print a short table last; full logs go to $OUT. Usage (from the repo root):
#   bash bench/gpu.sh [--targets "t1 t2"] [--tests REGEX] [--bench "cmd; cmd"] [--no-tests]
# ICU is not in the GPU image: when missing, the Debian packages carried in .deps/debs (see
# scripts/fetch-gpu-deps.sh) are unpacked under /tmp/icu.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
targets="" tests="." bench="" run_tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --targets) targets="$2"; shift 2 ;;
    --tests) tests="$2"; shift 2 ;;
    --bench) bench="$2"; shift 2 ;;
    --no-tests) run_tests=0; shift ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export NCCL_NVLS_ENABLE=0
icu_args=()
if [ ! -f /usr/include/unicode/uchar.h ]; then
  mkdir -p /tmp/icu
  for f in .deps/debs/*.deb; do dpkg -x "$f" /tmp/icu; done
  # The image's compiler leaves CMake's library architecture empty, so FindICU does not look in
  # the multiarch folder by itself: name it.
  icu_args=(-DICU_ROOT=/tmp/icu/usr -DCMAKE_LIBRARY_PATH=/tmp/icu/usr/lib/x86_64-linux-gnu)
  export LD_LIBRARY_PATH="/tmp/icu/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
fi
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DTESSERA_CUDA=ON "${icu_args[@]}" > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
# shellcheck disable=SC2086
if ! cmake --build build-gpu -j 16 ${targets:+--target $targets} > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
fi
t1=$(date +%s)
echo "build: $((t1 - t0)) s"
status=0
if [ "$run_tests" = 1 ]; then
  ctest --test-dir build-gpu -L cuda -R "$tests" --output-on-failure -j 4 > "$OUT/tests.log" 2>&1 || status=1
  grep -E "tests passed|tests failed|\*\*\*Failed|Skipped" "$OUT/tests.log" | tail -20
fi
if [ -n "$bench" ]; then
  bash -c "$bench" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
exit $status
