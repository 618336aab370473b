#!/usr/bin/env bash
# Downloads the Debian packages that the GPU machine's image lacks into .deps/debs, to be carried
# to it (device `carry: [".deps"]`) and unpacked by bench/gpu.sh (gpu_setup_env in
# bench/gpu_common.sh, which skips any the image turns out to have): ICU, CLI11, and cpp-httplib
# (logging.prometheus_port) with what its header includes and its library loads (Brotli, OpenSSL
# 3, zlib's header).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/.deps/debs"
cd "$root/.deps/debs"
apt-get download libicu72 libicu-dev libcli11-dev \
  libcpp-httplib0.11 libcpp-httplib-dev libbrotli1 libbrotli-dev libssl3 libssl-dev zlib1g-dev
