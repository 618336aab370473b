"""The distillation benchmark's table (bench/gpu_distill.sh): reads the metrics.jsonl of the runs
teacher, ce, const, seed and offline under the directory given, writes every record tagged with its run
to the file given second (the curves for the plot), and prints each run's final validation loss,
the share of the CE student's gap to the teacher that the curriculum closes, the tokens the
curricula need to reach the CE student's final validation loss, and the median step time with
the online teacher (constant alpha) and with the cache (the offline curriculum's steps with
alpha > 0) over the plain step (CE only)."""
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
    names = ("teacher", "ce", "const", "seed", "offline")
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
    total = runs["ce"][1][-1]["step"]
    for n in ("seed", "offline", "const"):
        if gap > 0:
            print(f"{n:8s} closes {100 * (final['ce'] - final[n]) / gap:.1f}% of the "
                  f"CE-student-to-teacher gap (target >= 50% for the curriculum)")
        reach = next((e["step"] for e in runs[n][1] if e["val_loss"] <= final["ce"]), None)
        if reach is None:
            print(f"{n:8s} never reaches the CE student's final val_loss (target: <= 60% of its tokens)")
        else:
            print(f"{n:8s} reaches the CE student's final val_loss at step {reach} of {total}: "
                  f"{100 * reach / total:.0f}% of its tokens ({reach * tokens_per_step:.3g}; target <= 60%)")
    def med(n, kd_only=False):
        return statistics.median(s["step_s"] for s in runs[n][0][5:]
                                 if not kd_only or (s.get("alpha") or 0) > 0)
    ce, online, offline = med("ce"), med("const"), med("offline", True)
    print(f"step time: CE only {1e3 * ce:.2f} ms, online teacher (alpha 0.5) {1e3 * online:.2f} ms: "
          f"{online / ce:.2f}x (target <= 1.3x); from the top-32 cache {1e3 * offline:.2f} ms: "
          f"{offline / ce:.2f}x (target <= 1.05x)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
