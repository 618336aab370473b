#!/usr/bin/env bash
# One call on the GPU machine: configure + build with CUDA (sm_90a), run the GPU tests, run the
# benchmarks, print a short table last; full logs go to $OUT. Usage (from the repo root):
#   bash bench/gpu.sh [--targets "t1 t2"] [--tests REGEX] [--bench "cmd; cmd"] [--no-tests]
# ICU, CLI11 and cpp-httplib are not in the GPU image: when missing, the Debian packages carried
# in .deps/debs (see scripts/fetch-gpu-deps.sh) are unpacked under /tmp/icu (bench/gpu_common.sh,
# shared with bench/gpu_parallel.sh).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
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
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
gpu_setup_env || exit 1
t0=$(date +%s)
gpu_build 16 "$targets" || exit 1
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
