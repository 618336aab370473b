#!/usr/bin/env bash
# Training throughput of one recipe on the GPU: Tessera, then the PyTorch peer (eager and
# torch.compile) on the same model, batch and sequence, in the same call. Random tokens
# (data.path: mock) on both sides. Usage: bash bench/train_throughput.sh RECIPE [STEPS]
# Prints one line per contender; Tessera's full metrics go to $OUT/<recipe>-metrics.jsonl.
# Extra arguments are --set overrides for Tessera; --no-peer (anywhere among them) skips PyTorch.
set -uo pipefail
recipe="$1"; steps="${2:-30}"
name="$(basename "$recipe" .yaml)"
peer=1
sets=()
for a in "${@:3}"; do
  if [ "$a" = --no-peer ]; then peer=0; else sets+=("$a"); fi
done
OUT="${OUT:-/tmp/tessera-out}"
bin="${TESSERA_BIN:-build-gpu/src/cli/tessera}"
run_dir="/tmp/tessera-bench-$name"
rm -rf "$run_dir"
"$bin" train "$recipe" --set data.path=mock --set train.device=cuda --set train.steps="$steps" \
  --set optim.warmup_steps=1 --set train.eval_every=0 --set train.eval_batches=1 \
  --set checkpoint.every=0 --set checkpoint.save_final=false --set train.out_dir="$run_dir" \
  --set logging.every=10 "${sets[@]}" > "$OUT/$name-tessera.log" 2>&1
rc=$?
cp "$run_dir/metrics.jsonl" "$OUT/$name-metrics.jsonl" 2>/dev/null
if [ $rc -ne 0 ]; then echo "tessera $name: FAILED (rc $rc)"; tail -5 "$OUT/$name-tessera.log"; fi
# Median over the steps after the first 5 (warm-up: cuBLASLt heuristics, cuDNN plans).
python3 - "$run_dir/metrics.jsonl" "$name" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
recs = recs[5:] or recs
tok = statistics.median(r["tokens_per_s"] for r in recs)
mfu = statistics.median(r.get("mfu", 0) for r in recs)
mem = max(r.get("device_used_gb", 0) for r in recs)
print(json.dumps({"peer": "tessera", "recipe": sys.argv[2], "tokens_per_s": round(tok),
                  "mfu": round(mfu, 4), "device_used_gb": round(mem, 2), "steps": len(recs),
                  "last_loss": round(recs[-1]["loss"], 4)}))
PY
[ "$peer" = 1 ] || exit 0
# MoE recipes (a `moe:` section) race the MoE peer (bench/torch/bench_moe.py, same routing).
peer_script=bench/torch/bench_train.py
grep -q '^moe:' "$recipe" && peer_script=bench/torch/bench_moe.py
for mode in eager compile; do
  python3 "$peer_script" "$recipe" --mode "$mode" --steps 20 --warmup 5 \
    2> "$OUT/$name-torch-$mode.err" || { echo "torch $mode: FAILED"; tail -3 "$OUT/$name-torch-$mode.err"; }
done
