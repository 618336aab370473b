#!/usr/bin/env bash
# The whole GPU record in one device call: GPU parity tests, kernel benchmarks (memory-bound ops vs
# copy bandwidth, GEMMs vs cuBLAS, FP8 GEMMs vs bf16 and quantization, attention cuDNN/native vs
# PyTorch SDPA), then training throughput of gpt2-124m and llama-1b against PyTorch eager and
# torch.compile, and a per-op profile of each.
# Usage on the GPU machine: bash bench/gpu_all.sh   (logs in $OUT)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/tessera-out}"
# NVLink SHARP multicast stays off on the project's shared GPU hosts (as in bench/gpu_common.sh):
# Tessera itself sets no NCCL variable.
export NCCL_NVLS_ENABLE=0
export CMAKE_LIBRARY_PATH=/tmp/icu/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH="/tmp/icu/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
b=build-gpu
bash bench/gpu.sh --no-tests || exit 1
ctest --test-dir $b -L cuda -j 4 > "$OUT/cuda-tests.log" 2>&1
grep -E "tests passed|tests failed" "$OUT/cuda-tests.log"
$b/tests/model/test_model_parity_gpu 2>&1 | grep -E "cpu .*->" > "$OUT/model-parity.log"
{
  echo "== memory-bound ops"; $b/bench/cuda/bench_memory_ops
  echo "== gemm"; $b/bench/cuda/bench_gemm
  echo "== fp8 gemms and quantization"; $b/bench/cuda/bench_fp8
  echo "== attention cudnn"; $b/bench/cuda/bench_attention_cudnn
  echo "== attention native"; $b/bench/cuda/bench_attention
  echo "== torch sdpa"; python3 bench/torch/bench_sdpa.py
} > "$OUT/kernels.log" 2>&1
for r in gpt2-124m llama-1b; do
  bash bench/train_throughput.sh recipes/$r.yaml 30 >> "$OUT/throughput.log" 2>&1
  TESSERA_BIN=$b/src/cli/tessera bash -c "$b/src/cli/tessera train recipes/$r.yaml --set data.path=mock \
    --set train.steps=8 --set optim.warmup_steps=1 --set train.eval_every=0 --set train.eval_batches=1 \
    --set checkpoint.save_final=false --set logging.profile_ops=true --set train.out_dir=/tmp/prof-$r" \
    2>&1 | sed -n '/op profile/,/^$/p' > "$OUT/profile-$r.log"
done
echo "== model parity (GPU vs CPU, 10 steps)"; cat "$OUT/model-parity.log"
echo "== training throughput"; cat "$OUT/throughput.log"
echo "== profiles"; head -14 "$OUT/profile-gpt2-124m.log"; head -14 "$OUT/profile-llama-1b.log"
