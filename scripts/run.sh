#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, fetch the pinned corpus and tokenizers,
# build, prepare the data, train recipes/ci-tiny.yaml on the CPU, then print samples and the
# validation loss. Extra arguments go to `tessera train` (e.g. --set train.steps=100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
bash scripts/fetch-data.sh
bash scripts/build.sh
bash scripts/prepare-data.sh
exec ./build/src/cli/tessera train recipes/ci-tiny.yaml "$@"
