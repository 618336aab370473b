#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, fetch the pinned corpus and tokenizers,
# build, prepare the data, train recipes/ci-tiny.yaml on the CPU (samples and the validation loss
# at the end), then the whole path to deployment: export the trained model as INT8 (Tessera's
# format), and generate a few lines from it with the inference engine. Extra arguments go to
# `tessera train` (e.g. --set train.steps=100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
bash scripts/fetch-data.sh
bash scripts/build.sh
bash scripts/prepare-data.sh
./build/src/cli/tessera train recipes/ci-tiny.yaml "$@"
run_dir=runs/ci-tiny
for arg in "$@"; do
  case "$arg" in train.out_dir=*) run_dir="${arg#train.out_dir=}" ;; esac
done
echo "== export $run_dir as INT8 (per output channel) for the inference engine"
./build/src/cli/tessera export "$run_dir" --format tessera --quant int8 --out "$run_dir/model-int8.h5" --force
echo "== generate with the engine (tessera generate; tessera serve serves the same file)"
./build/src/cli/tessera generate "$run_dir/model-int8.h5" --device cpu --prompt "It was a dark and stormy night" \
  --max-tokens 60 --temperature 0.8 --seed 1
