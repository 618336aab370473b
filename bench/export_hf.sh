#!/usr/bin/env bash
# Hugging Face export check on the GPU machine (PyTorch, transformers, safetensors, h5py, PyYAML),
# in one call from the repo root: build the tessera binary, train three models briefly on the
# Gutenberg corpus — gpt2-124m (GPT2LMHeadModel), a 4-layer cut of llama-1b (LlamaForCausalLM)
# and the same with QK-norm (Qwen3ForCausalLM) — export each as safetensors in f32 and bf16, and
# run bench/torch/check_hf_export.py on each export: transformers loads it and its logits are
# compared with Tessera's forward of the checkpoint (bench/torch/model.py, the golden-tested twin
# of src/model), f32 at 1e-4 of the largest logit, bf16 within BF16 tolerance (the script's
# header). Prints one PASS/FAIL line per export and a table at the end; exit status 1 if any fails.
# It is about the export, not quality: EXPORT_STEPS steps (default 30) of each model.
# Knobs (environment): EXPORT_STEPS, EXPORT_DATA (default data/gutenberg/gutenberg.h5, carried;
# its tokenizer sets the vocabulary), EXPORT_WORK (/tmp/tessera-export), MODELS ("gpt2 llama
# qwen3"), PYTHON (python3), TESSERA_BIN (skip the build), TRAIN_DEVICE (cuda).
# Device call (nvidia-h100-x1 or nvidia-h200; carry .deps and data/gutenberg):
#   bash bench/export_hf.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
STEPS="${EXPORT_STEPS:-30}"
DATA="${EXPORT_DATA:-data/gutenberg/gutenberg.h5}"
WORK="${EXPORT_WORK:-/tmp/tessera-export}"
MODELS="${MODELS:-gpt2 llama qwen3}"
PY="${PYTHON:-python3}"
BIN="${TESSERA_BIN:-build-gpu/src/cli/tessera}"
gpu_setup_env || exit 1  # also with TESSERA_BIN: the binary loads the carried ICU
[ -n "${TESSERA_BIN:-}" ] || gpu_build 16 tessera || exit 1
rm -rf "$WORK"
mkdir -p "$WORK"
log="$OUT/export_hf.log"
: > "$log"

# The recipe and overrides of each model: brief runs on the carried corpus (its vocabulary).
model_args() {
  local common=(--set data.path="$DATA" --set model.vocab_size=auto --set train.steps="$STEPS"
                --set optim.warmup_steps=5 --set train.eval_every=0 --set train.eval_batches=2
                --set train.sample_tokens=0 --set checkpoint.keep=1
                --set train.device="${TRAIN_DEVICE:-cuda}")
  case "$1" in
    gpt2) echo recipes/gpt2-124m.yaml "${common[@]}" --set data.micro_batch=8 ;;
    llama) echo recipes/llama-1b.yaml "${common[@]}" --set model.num_layers=4 \
                --set data.seq_len=512 --set data.micro_batch=8 ;;
    qwen3) echo recipes/llama-1b.yaml "${common[@]}" --set model.num_layers=4 \
                --set model.qk_norm=true --set model.tied_embeddings=false \
                --set data.seq_len=512 --set data.micro_batch=8 ;;
  esac
}

results=()
fail=0
for m in $MODELS; do
  echo "== $m: train $STEPS steps"
  # shellcheck disable=SC2046  # model_args prints words on purpose
  if ! "$BIN" train $(model_args "$m") --set train.out_dir="$WORK/$m" >> "$log" 2>&1; then
    echo "$m: training FAILED (see $log)"; tail -5 "$log"; results+=("$m train FAILED"); fail=1
    continue
  fi
  ckpts=("$WORK/$m"/checkpoints/step_*)
  ckpt="${ckpts[-1]}"  # checkpoint.keep 1: the only one
  for q in f32 bf16; do
    dir="$WORK/$m-$q"
    if ! "$BIN" export "$WORK/$m" --format safetensors --quant "$q" --out "$dir" >> "$log" 2>&1; then
      echo "$m $q: export FAILED"; tail -3 "$log"; results+=("$m $q export FAILED"); fail=1
      continue
    fi
    echo "-- $m $q ($(du -sh "$dir" | cut -f1))"
    "$PY" bench/torch/check_hf_export.py --checkpoint "$ckpt" --hf "$dir" --seq-len 256 \
      2>&1 | grep -vi warn | tee "$WORK/$m-$q.check"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || fail=1
    results+=("$m $q: $(grep -E '^(PASS|FAIL)' "$WORK/$m-$q.check" | head -1) $(grep 'max |dlogit|' "$WORK/$m-$q.check" | head -1)")
  done
done
echo
echo "== summary (steps $STEPS, data $DATA)"
printf '%s\n' "${results[@]}" | tee "$OUT/export_hf_summary.txt"
exit "$fail"
