#!/usr/bin/env bash
# QAT on one GPU in one call, from the repo root (carry .deps, data/gutenberg and the held-out
# text $HELDOUT): build; the fake-quantization GPU parity cases; then gpt2-124m's shape on the
# Gutenberg corpus (its 4,096-token BPE) trained STEPS steps in BF16, and the same run with QAT
# from step STEPS/2 (before it the runs are bit for bit the BF16 one): int8 per channel, int4
# g32, int4 g128. Each is exported (`tessera export --format tessera`) and scored by `tessera
# perplexity` on the held-out text: BF16, PTQ int8 and int4 g32 (round-to-nearest of the BF16
# run), QAT int8, QAT int4 g32 and g128 (the integers they trained against). Prints the
# perplexity table, the share of the PTQ-INT4 gap QAT recovers, the QAT step time against the
# BF16 step (median of the QAT phase against the same steps of the BF16 run) and the export
# sizes. Logs in $OUT/qat_runs.log; the table in $OUT/qat_table.txt.
# Usage: bash bench/gpu_qat.sh [STEPS]   (default 2000: about 60 s a run on an H100; 300 left PTQ
# int4 within noise of BF16, 2026-12-07)   Knobs: HELDOUT, MICRO_BATCH (16)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
steps="${1:-2000}"
start=$((steps / 2))
heldout="${HELDOUT:-data/heldout.txt}"
mb="${MICRO_BATCH:-16}"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
gpu_setup_env || exit 1
gpu_build 16 "tessera test_kernels" || exit 1
bin=build-gpu/src/cli/tessera
work=/tmp/tessera-qat
rm -rf "$work"
mkdir -p "$work"
log="$OUT/qat_runs.log"
: > "$log"

echo "== fake-quantization GPU parity"
build-gpu/tests/kernels/test_kernels --gtest_filter='*FakeQuant*:*Quantize*:*RowAbsmax*' \
  > "$OUT/qat_parity.log" 2>&1
echo "parity rc $?: $(grep -c '^\[       OK' "$OUT/qat_parity.log") ok," \
  "$(grep -c '^\[  FAILED' "$OUT/qat_parity.log") failed lines"
grep -E "^\[  FAILED" "$OUT/qat_parity.log" | head -5

common=(recipes/gpt2-124m.yaml --set data.path=data/gutenberg/gutenberg.h5
        --set model.vocab_size=auto --set train.steps="$steps" --set data.micro_batch="$mb"
        --set optim.warmup_steps=30 --set train.eval_every=0 --set train.eval_batches=8
        --set train.sample_tokens=0 --set checkpoint.every=0 --set checkpoint.keep=1
        --set logging.every=10)
run() {  # run NAME [--set ...]: one training run into $work/NAME
  local name="$1"
  shift
  echo "== train $name"
  "$bin" train "${common[@]}" "$@" --set train.out_dir="$work/$name" >> "$log" 2>&1 \
    || { echo "$name FAILED"; tail -5 "$log"; return 1; }
}
run bf16
run qat-int8 --set qat.weights=int8 --set qat.start_step="$start"
run qat-int4-g32 --set qat.weights=int4 --set qat.group_size=32 --set qat.start_step="$start"
run qat-int4-g128 --set qat.weights=int4 --set qat.group_size=128 --set qat.start_step="$start"

ppl() {  # ppl RUN QUANT GROUP: the perplexity tessera perplexity prints
  local extra=()
  [ "$3" != 0 ] && extra=(--group-size "$3")
  "$bin" perplexity "$work/$1" --text "$heldout" --quant "$2" "${extra[@]}" --ctx 1024 \
    2>> "$log" | tee -a "$log" | sed -n 's/^perplexity \([0-9.]*\) over \([0-9]*\) tokens.*/\1 \2/p'
}
size() {  # size RUN QUANT GROUP: bytes of the Tessera export
  local extra=() f="$work/$1-$2-$3.h5"
  [ "$3" != 0 ] && extra=(--group-size "$3")
  "$bin" export "$work/$1" --format tessera --quant "$2" "${extra[@]}" --out "$f" >> "$log" 2>&1 \
    && stat -c %s "$f"
}
table="$OUT/qat_table.txt"
{
  echo "| model | perplexity (held-out) | tokens | Tessera export bytes |"
  echo "| --- | ---: | ---: | ---: |"
} > "$table"
declare -A P
for row in "bf16 f32 0 BF16" "bf16 int8 0 PTQ-int8" "bf16 int4 32 PTQ-int4-g32" \
           "qat-int8 int8 0 QAT-int8" "qat-int4-g32 int4 32 QAT-int4-g32" \
           "qat-int4-g128 int4 128 QAT-int4-g128"; do
  read -r r q g label <<< "$row"
  read -r p n <<< "$(ppl "$r" "$q" "$g")"
  P[$label]="$p"
  squant="$q"
  [ "$q" = f32 ] && squant=bf16
  echo "| $label | $p | $n | $(size "$r" "$squant" "$g") |" | tee -a "$table"
done
python3 - "${P[BF16]}" "${P[PTQ-int8]}" "${P[QAT-int8]}" "${P[PTQ-int4-g32]}" \
  "${P[QAT-int4-g32]}" <<'PY' | tee -a "$table"
import sys
bf16, ptq8, qat8, ptq4, qat4 = map(float, sys.argv[1:])
print(f"QAT int8 vs BF16: {100 * (qat8 / bf16 - 1):+.2f}% (target within 1%); "
      f"PTQ int8 {100 * (ptq8 / bf16 - 1):+.2f}%")
gap = ptq4 - bf16
print(f"QAT int4 g32 recovers {100 * (ptq4 - qat4) / gap:.1f}% of the PTQ-int4 gap "
      f"(target >= 70%): PTQ {ptq4:.3f}, QAT {qat4:.3f}, BF16 {bf16:.3f}")
PY
python3 - "$work" "$start" <<'PY' | tee -a "$table"
import json, statistics, sys
work, start = sys.argv[1], int(sys.argv[2])
def steps(run):
    recs = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    return {r["step"]: r["step_s"] for r in recs if "loss" in r and "step_s" in r}
base = steps("bf16")
for run in ("qat-int8", "qat-int4-g32", "qat-int4-g128"):
    s = steps(run)
    late = [k for k in s if k > start + 5 and k in base]
    q, b = statistics.median(s[k] for k in late), statistics.median(base[k] for k in late)
    print(f"{run}: median step {1e3 * q:.2f} ms vs BF16 {1e3 * b:.2f} ms over the same steps: "
          f"{q / b:.3f}x (target <= 1.10x)")
PY
