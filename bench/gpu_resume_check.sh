#!/usr/bin/env bash
# On the GPU machine: recipes/gpt2-124m.yaml end to end on the real (GPT-2-tokenized) corpus —
# evaluation, checkpoints, samples — then resume from its step-10 checkpoint and compare losses.
# Uses the deterministic native attention so the resumed losses can be compared bit for bit.
# Needs data/gutenberg-gpt2/gutenberg.h5 (tessera prepare --tokenizer gpt2 ...), carried along.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/tessera-out}"
bin=build-gpu/src/cli/tessera
common=(--set train.steps=20 --set train.eval_every=10 --set train.eval_batches=4
        --set checkpoint.every=10 --set optim.warmup_steps=5 --set train.attention=native
        --set logging.every=5 --set train.sample_tokens=32)
rm -rf /tmp/r-full /tmp/r-resumed
$bin train recipes/gpt2-124m.yaml "${common[@]}" --set train.out_dir=/tmp/r-full > "$OUT/resume-full.log" 2>&1 || { tail -5 "$OUT/resume-full.log"; exit 1; }
$bin train recipes/gpt2-124m.yaml "${common[@]}" --set train.out_dir=/tmp/r-resumed \
  --set checkpoint.resume=/tmp/r-full/checkpoints/step_10 > "$OUT/resume-resumed.log" 2>&1 || { tail -5 "$OUT/resume-resumed.log"; exit 1; }
grep -E "step +(5|10|15|20)/|eval step|sample|arena|warn" "$OUT/resume-full.log" | cut -c1-160
python3 - <<'PY'
import json
def losses(p):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, open(p)) if "loss" in r}
a, b = losses("/tmp/r-full/metrics.jsonl"), losses("/tmp/r-resumed/metrics.jsonl")
same = [s for s in range(11, 21) if a.get(s) == b.get(s)]
print(f"resume on GPU: steps 11-20 bitwise equal for {len(same)}/10 steps",
      "" if len(same) == 10 else f"(first diff at {min(set(range(11,21)) - set(same))}: {a.get(min(set(range(11,21)) - set(same)))} vs {b.get(min(set(range(11,21)) - set(same)))})")
PY
