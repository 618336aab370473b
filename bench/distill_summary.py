"""The distillation benchmark's table (bench/gpu_distill.sh): reads the metrics.jsonl of the runs
teacher, ce, const and seed under the directory given, writes every record tagged with its run
to the file given second (the curves for the plot), and prints each run's final validation loss,
the share of the CE student's gap to the teacher that the curriculum closes, the tokens the
curriculum needs to reach the CE student's final validation loss, and the median step time with
the teacher (constant alpha) over the plain step (CE only)."""
import json
import statistics
import sys


def load(path):
    steps, evals = [], []
    for line in open(path):
        r = json.loads(line)
        (steps if "loss" in r else evals).append(r)
    return steps, evals


def main(d, curves):
    names = ("teacher", "ce", "const", "seed")
    runs = {n: load(f"{d}/{n}/metrics.jsonl") for n in names}
    with open(curves, "w") as out:
        for n in names:
            for r in runs[n][0] + runs[n][1]:
                out.write(json.dumps({"run": n, **r}) + "\n")
    tokens_per_step = runs["ce"][0][0]["tokens"] / runs["ce"][0][0]["step"]
    final = {n: r[1][-1]["val_loss"] for n, r in runs.items()}
    for n in runs:
        print(f"{n:8s} final val_loss {final[n]:.4f}")
    gap = final["ce"] - final["teacher"]
    if gap > 0:
        print(f"curriculum closes {100 * (final['ce'] - final['seed']) / gap:.1f}% of the "
              f"CE-student-to-teacher gap (target >= 50%); constant alpha 0.5 closes "
              f"{100 * (final['ce'] - final['const']) / gap:.1f}%")
    else:
        print("the teacher's val_loss is not below the CE student's: no gap to close")
    reach = next((e["step"] for e in runs["seed"][1] if e["val_loss"] <= final["ce"]), None)
    total = runs["ce"][1][-1]["step"]
    if reach is None:
        print("curriculum never reaches the CE student's final val_loss (target: <= 60% of its tokens)")
    else:
        print(f"curriculum reaches the CE student's final val_loss at step {reach} of {total}: "
              f"{100 * reach / total:.0f}% of its tokens ({reach * tokens_per_step:.3g}; target <= 60%)")
    med = {n: statistics.median(s["step_s"] for s in runs[n][0][5:]) for n in ("ce", "const")}
    print(f"step time: CE only {1e3 * med['ce']:.2f} ms, with the online teacher (alpha 0.5) "
          f"{1e3 * med['const']:.2f} ms: {med['const'] / med['ce']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
