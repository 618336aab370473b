# Sourced (not run) by the GPU-machine scripts bench/gpu.sh, gpu_parallel.sh and
# gpu_precision.sh: the environment every GPU run needs, the one CUDA build into build-gpu, and
# the run/record helpers of the staged scripts. Callers cd to the repo root, set $OUT and
# `set -uo pipefail` first. Nothing here starts a GPU job.
# shellcheck shell=bash
# shellcheck disable=SC2034  # run_rc, run_secs, MPI_ENV, MPIRUN are read by the callers

# NCCL_NVLS_ENABLE=0 (NVLink SHARP multicast must stay off on the project's shared hosts), and
# ICU, CLI11 and cpp-httplib: the GPU image lacks them, so the Debian packages carried in
# .deps/debs (see scripts/fetch-gpu-deps.sh) are unpacked under /tmp/icu and named to CMake and
# the loader. Sets the array gpu_icu_args (CMake arguments; empty when the system has all three).
gpu_setup_env() {
  export NCCL_NVLS_ENABLE=0
  gpu_icu_args=()
  [ -f /usr/include/unicode/uchar.h ] && [ -f /usr/include/CLI/CLI.hpp ] &&
    [ -f /usr/include/httplib.h ] && return 0
  local icu_lib=/tmp/icu/usr/lib/x86_64-linux-gnu debs=(.deps/debs/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    echo "gpu_common.sh: ICU is missing and .deps/debs holds no .deb: run scripts/fetch-gpu-deps.sh" \
         "on the dev machine and carry .deps" >&2
    return 1
  fi
  mkdir -p /tmp/icu
  local f
  for f in "${debs[@]}"; do
    gpu_image_has "$f" && continue
    dpkg -x "$f" /tmp/icu || return 1
  done
  # The image's compiler leaves CMake's library architecture empty, so FindICU does not look in
  # the multiarch folder by itself: name it. httplib_ROOT: cmake/Findhttplib.cmake looks there
  # first for cpp-httplib and for the OpenSSL, zlib and Brotli headers its header includes.
  gpu_icu_args=(-DICU_ROOT=/tmp/icu/usr -DCMAKE_LIBRARY_PATH="$icu_lib"
                -DCLI11_DIR=/tmp/icu/usr/share/cmake/CLI11 -Dhttplib_ROOT=/tmp/icu/usr)
  export CMAKE_LIBRARY_PATH="$icu_lib"
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$icu_lib:"*) ;;
    *) export LD_LIBRARY_PATH="$icu_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
}

# gpu_image_has DEB: whether the image already has that package: installed by dpkg, or (a runtime
# library packaged under another name, e.g. Ubuntu's libssl3t64) every soname file it holds
# (lib*.so.N) at the same path. Unpacking such a package anyway would put a second copy of the
# image's own library (OpenSSL) first on LD_LIBRARY_PATH, ahead of it for every program.
gpu_image_has() {
  local deb=$1 pkg sonames s
  pkg=$(dpkg-deb -f "$deb" Package) || return 1
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && return 0
  sonames=$(dpkg-deb -c "$deb" | awk '{print substr($6, 2)}' | grep -E '/lib[^/]*\.so\.[0-9]+$')
  [ -n "$sonames" ] || return 1
  for s in $sonames; do [ -e "$s" ] || return 1; done
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

# ---- shared by the staged scripts (gpu_parallel.sh, gpu_precision.sh), which set BIN (the
# tessera binary), BUDGET (seconds this call may use) and START (its start, date +%s) ----------

# Open MPI as root in a container: allowed explicitly; CMA single-copy needs ptrace rights that
# containers lack. One rank per GPU; no core binding (each rank's NCCL proxy and loader threads).
MPI_ENV=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
         OMPI_MCA_btl_vader_single_copy_mechanism=none)
MPIRUN=(mpirun --oversubscribe --bind-to none)

left() { echo $((BUDGET - ($(date +%s) - START))); }

need() {
  local f
  for f in "$@"; do
    [ -x "$f" ] || { echo "missing $f: run the build stage first (bash $0 build)"; return 1; }
  done
}

# run_tessera DIR NAME NP LIMIT RECIPE [--set ...]: one training run, under mpirun when NP > 1,
# killed after LIMIT seconds, into DIR/NAME.run with its output in DIR/NAME.log. Sets run_rc
# (124 or 137: timed out) and run_secs.
run_tessera() {
  local dir=$1 name=$2 np=$3 limit=$4
  shift 4
  local run_dir="$dir/$name.run" t0 threads
  t0=$(date +%s)
  threads=$(($(nproc) / np))
  [ "$threads" -ge 1 ] || threads=1
  rm -rf "$run_dir"
  local cmd=("$BIN" train "$@" --set train.out_dir="$run_dir")
  if [ "$np" -gt 1 ]; then cmd=("${MPI_ENV[@]}" "${MPIRUN[@]}" -np "$np" "${cmd[@]}"); fi
  OMP_NUM_THREADS=$threads timeout -k 15 "$limit" "${cmd[@]}" < /dev/null > "$dir/$name.log" 2>&1
  run_rc=$?
  run_secs=$(($(date +%s) - t0))
}

# record DIR NAME RC FIELDS: appends {"name", "rc", "log", "metrics", FIELDS} to DIR/runs.jsonl.
record() {
  local dir=$1 name=$2 rc=$3 fields=$4
  [ "$rc" = skipped ] && rc='"skipped"'
  printf '{"name": "%s", "rc": %s, "log": "%s", "metrics": "%s", %s}\n' "$name" "$rc" \
    "$dir/$name.log" "$dir/$name.run/metrics.jsonl" "$fields" >> "$dir/runs.jsonl"
}
