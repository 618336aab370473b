#!/usr/bin/env bash
# The whole test suite on a fresh machine: install dependencies, fetch the pinned data and
# llama.cpp's CPU build (the GGUF export's external check), build
# (CUDA code too when nvcc is present; GPU tests skip without a GPU; C++ warnings are errors here,
# so code that only the CUDA build compiles is checked too), prepare the CI corpus, run
# the fast unit tests under AddressSanitizer + UBSan with -Werror (scripts/sanitize.sh, its own
# build in build-asan/), then run ctest. Output ends with ctest's summary line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
bash scripts/fetch-data.sh
bash scripts/fetch-llama-cpp.sh
TESSERA_CMAKE_ARGS="-DTESSERA_WERROR=ON ${TESSERA_CMAKE_ARGS:-}" bash scripts/build.sh
bash scripts/prepare-data.sh
bash scripts/sanitize.sh
# ctest lists skipped tests (the GPU tests, without a GPU) after its summary; repeat the summary
# line last so the output ends with it.
set +e
ctest --test-dir build --output-on-failure -j "${TESSERA_JOBS:-$(nproc)}" "$@" 2>&1 | tee build/ctest.log
status=${PIPESTATUS[0]}
echo
grep -E "tests passed, [0-9]+ tests failed out of" build/ctest.log | tail -n 1
exit "$status"
