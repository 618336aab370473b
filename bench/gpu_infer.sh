#!/usr/bin/env bash
# The inference engine on one GPU, from the repo root (carry .deps and data/gutenberg), in stages
# that fit one device call each:
#   tests   build; the engine's GPU tests: kernel parity (infer linear, paged attention, KV cache,
#           rope rows; tests/kernels, suites *Gpu), the engine against the CPU engine and its
#           batch invariance (tests/infer/engine_gpu_test.cpp);
#   decode  decode tokens/s at batch $BATCH for $SHAPES x $WEIGHTS on random weights
#           (infer_decode_bench) against the HBM roofline, beside the compiled PyTorch decode loop
#           (bench/torch/decode.py, gpt-fast style), same shapes and formats;
#   serve   a llama-1b-shaped model (one training step on the carried corpus: random weights,
#           the corpus's 4,096-token vocabulary) exported BF16 and INT8, served, and loaded by
#           serve_load with $REQUESTS ShareGPT-like requests at each rate in $RATES: output
#           tokens/s, TTFT and ITL p50/p99; beside the static-batch PyTorch peer
#           (bench/torch/serve_static.py: same load, batches of 32, bf16).
# Prints a table last; logs in $OUT. Usage: bash bench/gpu_infer.sh [tests|decode|serve|all]
# (default all: tests + decode of llama-1b; llama3-8b's decode and the serve stage each take a
# call of their own). Knobs: SHAPES ("llama-1b"), WEIGHTS ("bf16 int8 int4-g32 int4-g128"),
# BATCH (1), PROMPT (128), TOKENS (256), RATES ("4 16 64"), REQUESTS (1000), TORCH (1: run the
# peer), BANDWIDTH_GBS (default from the GPU's name: H100 3350, H200 4800).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
stage="${1:-all}"
SHAPES="${SHAPES:-llama-1b}"
WEIGHTS="${WEIGHTS:-bf16 int8 int4-g32 int4-g128}"
BATCH="${BATCH:-1}"
PROMPT="${PROMPT:-128}"
TOKENS="${TOKENS:-256}"
RATES="${RATES:-4 16 64}"
REQUESTS="${REQUESTS:-1000}"
TORCH="${TORCH:-1}"
gpu_setup_env || exit 1
gpu_build 16 "tessera test_kernels test_engine_gpu infer_decode_bench serve_load" || exit 1
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in
  *H200*) bw_default=4800 ;;
  *H100*) bw_default=3350 ;;
  *) bw_default=0 ;;
esac
BW="${BANDWIDTH_GBS:-$bw_default}"
table="$OUT/infer_table.txt"
: > "$table"
echo "# $name, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), roofline at $BW GB/s" | tee -a "$table"

run_tests() {
  echo "== GPU tests"
  # rope.cu's rope_forward now shares rope_rows' device functions: its cases run too.
  build-gpu/tests/kernels/test_kernels --gtest_filter='*InferLinearGpu*:*PagedAttentionGpu*:*KvCacheGpu*:*RopeRowsGpu*:*RopeGpu*' \
    > "$OUT/infer_kernel_tests.log" 2>&1
  echo "kernels rc $?: $(grep -c '^\[       OK' "$OUT/infer_kernel_tests.log") ok, $(grep -c '^\[  FAILED' "$OUT/infer_kernel_tests.log") failed lines" | tee -a "$table"
  grep '^\[  FAILED' "$OUT/infer_kernel_tests.log" | head -10
  build-gpu/tests/infer/test_engine_gpu > "$OUT/engine_gpu_tests.log" 2>&1
  echo "engine rc $?: $(grep -c '^\[       OK' "$OUT/engine_gpu_tests.log") ok, $(grep -c '^\[  FAILED' "$OUT/engine_gpu_tests.log") failed lines" | tee -a "$table"
  grep -B3 '^\[  FAILED' "$OUT/engine_gpu_tests.log" | head -20
}

run_decode() {
  echo "| shape | weights | batch | Tessera tokens/s | % roofline | PyTorch compiled tokens/s | % roofline | Tessera / PyTorch |" | tee -a "$table"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" | tee -a "$table"
  local s w ours peer ot of pt pf
  for s in $SHAPES; do
    for w in $WEIGHTS; do
      ours=$(build-gpu/bench/infer/infer_decode_bench --shape "$s" --weights "$w" --batch "$BATCH" \
               --prompt "$PROMPT" --tokens "$TOKENS" --bandwidth-gbs "$BW" 2>&1 | tee -a "$OUT/decode.log" | grep '^RESULT')
      ot=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<< "$ours")
      of=$(sed -n 's/.*roofline_fraction=\([0-9.]*\).*/\1/p' <<< "$ours")
      pt="-" pf="0"
      if [ "$TORCH" = 1 ]; then
        peer=$(timeout 300 python3 bench/torch/decode.py --shape "$s" --weights "$w" --batch "$BATCH" \
                 --prompt "$PROMPT" --tokens "$TOKENS" --bandwidth-gbs "$BW" 2>&1 | tee -a "$OUT/decode_torch.log" | grep '^RESULT')
        pt=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<< "$peer")
        pf=$(sed -n 's/.*roofline_fraction=\([0-9.]*\).*/\1/p' <<< "$peer")
        [ -n "$pt" ] || pt="-"
      fi
      python3 - "$s" "$w" "$BATCH" "${ot:-0}" "${of:-0}" "$pt" "${pf:-0}" <<'PY' | tee -a "$table"
import sys
s, w, b, ot, of, pt, pf = sys.argv[1:]
ratio = f"{float(ot) / float(pt):.2f}x" if pt not in ("-", "") and float(pt) > 0 else "-"
peer = f"{float(pt):.1f} | {100 * float(pf):.1f}%" if pt not in ("-", "") else "- | -"
print(f"| {s} | {w} | {b} | {float(ot):.1f} | {100 * float(of):.1f}% | {peer} | {ratio} |")
PY
    done
  done
}

# serve_row LABEL RATE RESULT_LINE: one row of the serving table from a RESULT line.
serve_row() {
  python3 - "$@" <<'PY' | tee -a "$table"
import re, sys
q, r, res = sys.argv[1:]
f = dict(re.findall(r"(\w+)=([0-9.]+)", res))
g = lambda k: float(f.get(k, 0))
print(f"| {q} | {r} | {int(g('ok'))} | {g('output_tokens_per_s'):.0f} | "
      f"{g('ttft_p50_ms'):.0f} / {g('ttft_p99_ms'):.0f} | {g('itl_p50_ms'):.1f} / {g('itl_p99_ms'):.1f} |")
PY
}

run_serve() {
  local work=/tmp/tessera-serve bin=build-gpu/src/cli/tessera
  rm -rf "$work" && mkdir -p "$work"
  "$bin" train recipes/llama-1b.yaml --set data.path=data/gutenberg/gutenberg.h5 \
    --set model.vocab_size=auto --set train.steps=1 --set data.micro_batch=1 \
    --set data.seq_len=256 --set train.eval_every=0 --set train.sample_tokens=0 \
    --set train.out_dir="$work/run" > "$OUT/serve_train.log" 2>&1 || { tail -5 "$OUT/serve_train.log"; return 1; }
  echo "| weights | rate (req/s) | requests ok | output tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |" | tee -a "$table"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |" | tee -a "$table"
  local q r port pid res
  for q in bf16 int8; do
    "$bin" export "$work/run" --format tessera --quant "$q" --out "$work/m-$q.h5" >> "$OUT/serve_train.log" 2>&1 || return 1
    "$bin" serve "$work/m-$q.h5" --port 0 --served-model-name m --ignore-eos --max-num-seqs 256 \
      > "$OUT/serve-$q.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
      port=$(grep -o 'http://127.0.0.1:[0-9]*' "$OUT/serve-$q.log" | cut -d: -f3)
      [ -n "$port" ] && break
      sleep 1
    done
    for r in $RATES; do
      res=$(build-gpu/bench/infer/serve_load --port "$port" --model m --requests "$REQUESTS" \
              --rate "$r" --vocab 4096 --max-context 2048 2>&1 | tee -a "$OUT/serve_load.log" | grep '^RESULT')
      serve_row "$q" "$r" "$res"
    done
    kill "$pid"; wait "$pid"
  done
  [ "$TORCH" = 1 ] || return 0
  for r in $RATES; do  # the static-batch PyTorch peer, same load and shape, bf16
    res=$(timeout 900 python3 bench/torch/serve_static.py --rate "$r" --requests "$REQUESTS" \
            --vocab 4096 --max-context 2048 2>&1 | tee -a "$OUT/serve_torch.log" | grep '^RESULT')
    serve_row torch-static-bf16 "$r" "$res"
  done
}

case "$stage" in
  tests) run_tests ;;
  decode) run_decode ;;
  serve) run_serve ;;
  all) run_tests; run_decode ;;
  *) echo "gpu_infer.sh: unknown stage '$stage' (tests, decode, serve, all)"; exit 2 ;;
esac
echo
cat "$table"
