# Sourced (not run) by the GPU-machine scripts bench/gpu.sh and bench/gpu_parallel.sh: the
# environment every GPU run needs and the one CUDA build into build-gpu. Callers cd to the repo
# root, set $OUT and `set -uo pipefail` first. Nothing here starts a GPU job.
# shellcheck shell=bash

# NCCL_NVLS_ENABLE=0 (NVLink SHARP multicast must stay off on the project's shared hosts), and
# ICU: the GPU image lacks it, so the Debian packages carried in .deps/debs (see
# scripts/fetch-gpu-deps.sh) are unpacked under /tmp/icu and named to CMake and the loader.
# Sets the array gpu_icu_args (CMake arguments; empty when the system has ICU).
gpu_setup_env() {
  export NCCL_NVLS_ENABLE=0
  gpu_icu_args=()
  [ -f /usr/include/unicode/uchar.h ] && return 0
  local icu_lib=/tmp/icu/usr/lib/x86_64-linux-gnu debs=(.deps/debs/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    echo "gpu_common.sh: ICU is missing and .deps/debs holds no .deb: run scripts/fetch-gpu-deps.sh" \
         "on the dev machine and carry .deps" >&2
    return 1
  fi
  mkdir -p /tmp/icu
  local f
  for f in "${debs[@]}"; do dpkg -x "$f" /tmp/icu || return 1; done
  # The image's compiler leaves CMake's library architecture empty, so FindICU does not look in
  # the multiarch folder by itself: name it.
  gpu_icu_args=(-DICU_ROOT=/tmp/icu/usr -DCMAKE_LIBRARY_PATH="$icu_lib")
  export CMAKE_LIBRARY_PATH="$icu_lib"
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$icu_lib:"*) ;;
    *) export LD_LIBRARY_PATH="$icu_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
}

# gpu_build JOBS [TARGETS]: configure build-gpu (Release, sm_90a, Ninja, CUDA on) and build
# TARGETS (space-separated; all when empty) with JOBS parallel jobs. Logs: $OUT/cmake.log and
# $OUT/build.log; on failure prints the errors and returns 1. Call gpu_setup_env first.
gpu_build() {
  local jobs="$1" targets="${2:-}"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DTESSERA_CUDA=ON "${gpu_icu_args[@]}" > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; return 1; }
  # shellcheck disable=SC2086  # targets split into words on purpose
  if ! cmake --build build-gpu -j "$jobs" ${targets:+--target $targets} > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    return 1
  fi
}
