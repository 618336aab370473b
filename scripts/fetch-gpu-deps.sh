#!/usr/bin/env bash
# Downloads the Debian packages that the GPU machine's image lacks (ICU, CLI11) into .deps/debs, to be
# carried to it (device `carry: [".deps"]`) and unpacked by bench/gpu.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/.deps/debs"
cd "$root/.deps/debs"
apt-get download libicu72 libicu-dev libcli11-dev
