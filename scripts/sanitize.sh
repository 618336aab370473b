#!/usr/bin/env bash
# The fast CPU unit tests again, built with AddressSanitizer + UndefinedBehaviorSanitizer and
# -Werror in build-asan/ (CPU only, no benchmarks): memory errors, undefined behaviour and new
# compiler warnings fail the suite. The README's test command (scripts/test.sh) runs this before
# the main tests; it prints its own ctest summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${TESSERA_JOBS:-$(nproc)}"
build="$root/build-asan"
# The labelled unit tests: core, config, kernels (CPU), model, train, optim, parallel, infer and
# http (no MPI, no GPU, no end-to-end runs through the binary).
labels="core|config|kernels|model|train|optim|parallel|infer|http|serve"
targets=(test_core test_config test_kernels test_model test_embedding_precision test_golden
         test_train_units test_data_parallel test_loss_scaler test_fp8_scaling test_fp8_linear
         test_topology test_pipeline_schedule test_self_communicator test_watchdog test_infer
         test_http test_serve)
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] && gen=()
# -O0 -g1: compiles about 2.5x faster than -O1 -g on 2 cores (CI's budget; the tests run a few
# seconds longer) and still gives function names and lines in reports. Warnings that need the
# optimizer (-Wmaybe-uninitialized) come from the main build, which is -O3 -Werror in CI.
cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O0 -g1" \
  -DTESSERA_CUDA=OFF -DTESSERA_BENCH=OFF -DTESSERA_SANITIZE=ON -DTESSERA_WERROR=ON \
  ${TESSERA_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
# halt_on_error: the first report fails the test; detect_leaks stays on (LeakSanitizer).
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
ctest --test-dir "$build" -j "$jobs" -L "$labels" -LE "mpi|cuda|integration" --output-on-failure
