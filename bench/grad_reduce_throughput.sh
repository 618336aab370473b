#!/usr/bin/env bash
# Training throughput of one recipe in BF16 with FP32 gradients (precision.grad_reduce: fp32, the
# default) and with BF16 gradients (grad_reduce: compute, what every run used before), then the
# PyTorch peer (torch.compile) on the same model, batch and sequence, in the same call. Random
# tokens on both sides. Usage: bash bench/grad_reduce_throughput.sh RECIPE [STEPS]
set -uo pipefail
recipe="$1"; steps="${2:-30}"
OUT="${OUT:-/tmp/tessera-out}"
for mode in compute fp32; do
  mkdir -p "$OUT/$mode"
  OUT="$OUT/$mode" bash bench/train_throughput.sh "$recipe" "$steps" --set precision.compute=bf16 \
    --set precision.grad_reduce="$mode" --no-peer 2>&1 | sed "s/\"peer\": \"tessera\"/\"peer\": \"tessera grad_reduce=$mode\"/"
done
python3 bench/torch/bench_train.py "$recipe" --mode compile --steps 20 --warmup 5 \
  2> "$OUT/torch-compile.err" || { echo "torch compile: FAILED"; tail -3 "$OUT/torch-compile.err"; }
