#!/usr/bin/env bash
# Installs Tessera's build and test dependencies from Debian/Ubuntu packages (only what is missing).
# Needs root or sudo. The CUDA toolkit is not installed here: the CUDA backend is built when nvcc
# is already present (see README).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libopenmpi-dev openmpi-bin
  libhdf5-dev
  libyaml-cpp-dev
  libgtest-dev
  libfmt-dev nlohmann-json3-dev libcli11-dev
  libicu-dev
  libcpp-httplib-dev               # logging.prometheus_port's /metrics endpoint (src/http)
  libopenblas-dev
  libbenchmark-dev
  clang-format
  gnuplot-nox                      # bench/distill_plot.sh
  nodejs npm                       # npm fetches the corpus; node >= 20 runs llama.cpp (tests/export)
  slurm-wlm munge                  # a private Slurm cluster for launch/slurm.sbatch (tests/e2e/slurm_test.sh)
  libpmix-dev                      # srun --mpi=pmix dlopens pmix2/lib/libpmix.so, which only -dev ships
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian's node package may be replaced by NodeSource's, which bundles npm: accept any working npm.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/npm}")
  command -v node >/dev/null 2>&1 && missing=("${missing[@]/nodejs}")
fi
read -r -a missing <<<"${missing[*]}"

# node-llama-cpp (scripts/fetch-llama-cpp.sh) needs Node.js >= 20; Debian 12's nodejs is 18, so
# such a machine needs a newer node (e.g. NodeSource's package) for the GGUF checks, which
# otherwise report themselves skipped.
node_too_old() {
  command -v node >/dev/null 2>&1 &&
    [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  if node_too_old; then
    echo "install-deps: warning: node $(node --version) < 20: llama.cpp checks will be skipped"
  fi
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
if node_too_old; then
  echo "install-deps: warning: node $(node --version) < 20: llama.cpp checks will be skipped"
fi
