#!/usr/bin/env bash
# The distillation benchmark in one GPU-machine call (from the repo root): build, the KD-loss GPU
# parity cases, then recipes/gutenberg-teacher.yaml trained on the Gutenberg corpus for twice the
# students' steps (a teacher is trained longer than the students it teaches), and
# recipes/gutenberg-student.yaml (7.6x smaller) trained four ways at equal tokens: CE only
# (alpha 0), constant alpha 0.5, the seed curriculum (1.0 -> 0.7 -> 0.0) with the online
# teacher, and the seed curriculum from the teacher's top-32 cache (tessera distill-cache, timed).
# Prints the teacher's and each student's validation loss, the share of the CE-student-to-teacher
# gap the curricula close, the tokens they need to reach the CE student's final loss, and the step
# time with the online teacher and with the cache against the plain step. Every curve in
# $OUT/distill_curves.jsonl (one record per line, tagged with its run), every log in
# $OUT/distill_runs.log; a short table last, then the PyTorch peer's (bench/torch/distill.py).
# Usage: bash bench/gpu_distill.sh [STEPS [TEACHER_STEPS]]   (default: the recipes' 800, 1600)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
steps="${1:-800}"
teacher_steps="${2:-$((2 * steps))}"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
gpu_setup_env || exit 1
gpu_build 16 "tessera test_kernels" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
bin=build-gpu/src/cli/tessera
runs=/tmp/tessera-distill
rm -rf "$runs"

echo "== KD loss GPU parity"
build-gpu/tests/kernels/test_kernels --gtest_filter='*KdLoss*:*KdSparse*:*TopK*' \
  > "$OUT/kd_parity.log" 2>&1
echo "kd parity rc $?: $(grep -cE '^\[       OK' "$OUT/kd_parity.log") ok, $(grep -cE '^\[  FAILED' "$OUT/kd_parity.log") failed lines"
grep -E "^\[  FAILED|Failure" "$OUT/kd_parity.log" | head -10

common=(--set train.eval_every=50 --set train.sample_tokens=0)
# Few files come back from the GPU machine: one log for every run, one file of every curve.
log="$OUT/distill_runs.log"
echo "== teacher"
"$bin" train recipes/gutenberg-teacher.yaml "${common[@]}" --set train.steps="$teacher_steps" \
  --set train.out_dir="$runs/teacher" \
  >> "$log" 2>&1 || { echo "teacher FAILED"; tail -5 "$log"; exit 1; }
common+=(--set train.steps="$steps")
echo "== teacher cache (top 32 of the seed curriculum's windows)"
t0=$(date +%s)
"$bin" distill-cache --teacher "$runs/teacher" --data data/gutenberg/gutenberg.h5 --top-k 32 \
  --out "$runs/top32.h5" --micro-batch 16 --windows-of recipes/gutenberg-student.yaml \
  "${common[@]}" >> "$log" 2>&1 || { echo "distill-cache FAILED"; tail -5 "$log"; exit 1; }
echo "distill-cache took $(( $(date +%s) - t0 )) s, $(du -h "$runs/top32.h5" | cut -f1)"
grep "distill-cache: wrote" "$log" | tail -1
for s in ce:'[{alpha: 0}]' const:'[{alpha: 0.5}]' seed:'' offline:''; do
  name="${s%%:*}"; curriculum="${s#*:}"
  extra=(--set distill.teacher="$runs/teacher" --set train.out_dir="$runs/$name")
  [ "$name" = offline ] && extra=(--set distill.teacher= --set distill.teacher_cache="$runs/top32.h5"
                                  --set train.out_dir="$runs/$name")
  [ -n "$curriculum" ] && extra+=(--set "distill.curriculum=$curriculum")
  echo "== student $name"
  "$bin" train recipes/gutenberg-student.yaml "${common[@]}" "${extra[@]}" >> "$log" 2>&1 \
    || { echo "student $name FAILED"; tail -5 "$log"; }
done
python3 bench/distill_summary.py "$runs" "$OUT/distill_curves.jsonl"
# The PyTorch peer (bench/torch/distill.py): the same plain and online-teacher steps, eager and
# torch.compile, for its step-time ratio beside Tessera's.
if python3 -c "import torch" > /dev/null 2>&1; then
  echo "== PyTorch peer"
  timeout -k 10 150 python3 bench/torch/distill.py > "$OUT/torch_distill.log" 2>&1 \
    || echo "torch peer rc $? (see torch_distill.log)"
  grep -E '^torch-' "$OUT/torch_distill.log"
fi
