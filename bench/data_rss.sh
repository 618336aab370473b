#!/usr/bin/env bash
# Peak resident memory of training against a corpus far larger than the CI one: writes a synthetic
# token dataset of NUM_TOKENS (default 2^31, ~2.1 G) uniform random ids as uint16 (~4 GB on disk,
# through the dataset writer, with the CI tokenizer), runs `tessera train recipes/ci-tiny.yaml` for
# STEPS steps (default 20) against it and against the Gutenberg set (data/gutenberg/gutenberg.h5),
# and prints each run's peak RSS (/usr/bin/time -v) and their ratio. The synthetic file is deleted
# afterwards. Not part of CI (minutes of CPU and 4 GB of disk).
# Usage: bash bench/data_rss.sh [BUILD_DIR] [NUM_TOKENS] [STEPS]   (BUILD_DIR default build-cpu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${1:-build-cpu}"; num_tokens="${2:-2147483648}"; steps="${3:-20}"
work="${TMPDIR:-/tmp}/tessera-data-rss-$$"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
small=data/gutenberg/gutenberg.h5
[ -f "$small" ] || { echo "data_rss: $small is missing: run scripts/prepare-data.sh" >&2; exit 2; }

cmake -S . -B "$build" -DTESSERA_BENCH=ON > "$work/cmake.log"
cmake --build "$build" --target tessera make_token_dataset -j 2 > "$work/build.log"
"$build/bench/data/make_token_dataset" "$work/synthetic.h5" "$num_tokens" \
  data/gutenberg/tokenizer.json
ls -l "$work/synthetic.h5"

# Peak RSS in KiB of one training run against dataset $1.
peak_rss() {
  /usr/bin/time -v "$build/src/cli/tessera" train recipes/ci-tiny.yaml --set data.path="$1" \
    --set train.steps="$steps" --set optim.warmup_steps=2 --set train.eval_every=0 \
    --set train.eval_batches=4 \
    --set checkpoint.every=0 --set checkpoint.save_final=false --set train.sample_tokens=0 \
    --set train.out_dir="$work/run" > "$work/train.log" 2>&1 || { tail -20 "$work/train.log" >&2; exit 1; }
  sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/train.log"
}
big_kb=$(peak_rss "$work/synthetic.h5")
small_kb=$(peak_rss "$small")
echo "corpus                 train tokens     peak RSS"
printf "synthetic (uint16)  %15d  %8.1f MiB\n" "$num_tokens" "$(echo "$big_kb / 1024" | bc -l)"
small_tokens=$("$build/src/cli/tessera" inspect "$small" | sed -n 's|^/train/tokens .*(\([0-9]*\) elements)$|\1|p')
printf "gutenberg           %15d  %8.1f MiB\n" "$small_tokens" "$(echo "$small_kb / 1024" | bc -l)"
printf "ratio big/small: %.3f\n" "$(echo "$big_kb / $small_kb" | bc -l)"
