#!/usr/bin/env bash
# The MoE benchmarks in one GPU-machine call (from the repo root): build tessera and the grouped
# GEMM benchmark, then (1) our grouped GEMM beside dense cuBLASLt of the same FLOPs and beside
# torch._grouped_mm at the same shapes and routings, (2) recipes/moe-16x-top2.yaml training beside
# the PyTorch MoE peer (eager and torch.compile). Usage: bash bench/gpu_moe.sh [STEPS]
# Logs under $OUT; a short table last.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
steps="${1:-20}"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
gpu_setup_env || exit 1
gpu_build 16 "tessera grouped_gemm_bench" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
echo "== grouped GEMM: tessera (then dense cuBLASLt of the same FLOPs)"
build-gpu/bench/grouped_gemm_bench --counts "$OUT/grouped_gemm_counts.txt" \
  > "$OUT/grouped_gemm_bench.log" 2>&1 || echo "grouped_gemm_bench FAILED"
echo "== grouped GEMM: torch._grouped_mm"
python3 bench/torch/grouped_gemm.py --counts "$OUT/grouped_gemm_counts.txt" \
  > "$OUT/grouped_gemm_torch.log" 2>&1 || echo "torch grouped_gemm FAILED"
echo "== moe-16x-top2 training: tessera, PyTorch eager, PyTorch compile"
TESSERA_BIN=build-gpu/src/cli/tessera bash bench/train_throughput.sh recipes/moe-16x-top2.yaml \
  "$steps" > "$OUT/moe_train.log" 2>&1
tail -40 "$OUT/grouped_gemm_bench.log"
tail -20 "$OUT/grouped_gemm_torch.log"
cat "$OUT/moe_train.log"
