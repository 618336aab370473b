#!/usr/bin/env bash
# The distillation benchmark's plot: validation loss against training tokens for every run in
# the curves file bench/gpu_distill.sh writes ($OUT/distill_curves.jsonl), one PNG, with gnuplot
# (Debian package gnuplot-nox). Usage: bash bench/distill_plot.sh CURVES.jsonl OUT.png [TITLE]
set -euo pipefail
curves="$1"; png="$2"; title="${3:-Distillation on the Gutenberg corpus}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 - "$curves" "$tmp" <<'PY'
import json, sys
curves, tmp = sys.argv[1], sys.argv[2]
names = {"teacher": "teacher (41.6M)", "ce": "student, CE only", "const": "student, alpha 0.5",
         "seed": "student, seed curriculum", "offline": "student, seed curriculum, top-32 cache"}
rows, per_step = {}, {}
records = [json.loads(line) for line in open(curves)]
for r in records:  # a step record's tokens count the run's tokens so far
    if "loss" in r and r["run"] not in per_step:
        per_step[r["run"]] = r["tokens"] / r["step"]
for r in records:
    if "val_loss" in r:
        rows.setdefault(r["run"], []).append((r["step"] * per_step[r["run"]], r["val_loss"]))
for run, pts in rows.items():
    with open(f"{tmp}/{run}.dat", "w") as f:
        f.write(f"# {names.get(run, run)}\n")
        for x, y in pts:
            f.write(f"{x / 1e6} {y}\n")
with open(f"{tmp}/runs.txt", "w") as f:
    for run in ("teacher", "ce", "const", "seed", "offline"):
        if run in rows:
            f.write(f"{run}\t{names[run]}\n")
PY
plot=""
while IFS=$'\t' read -r run label; do
  plot+="${plot:+, }'$tmp/$run.dat' using 1:2 with linespoints pt 7 ps 0.4 title '$label'"
done < "$tmp/runs.txt"
gnuplot <<GP
set terminal pngcairo size 1000,620 font ",11"
set output '$png'
set title '$title'
set xlabel 'training tokens (millions)'
set ylabel 'validation loss (held-out split)'
set yrange [3.0:5.0]
set grid
set key top right
plot $plot
GP
echo "wrote $png"
