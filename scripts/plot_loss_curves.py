#!/usr/bin/env python3
"""Loss curves of several training runs (metrics.jsonl files) in one PNG: train loss smoothed with
a centred moving average (raw losses faint behind it), val losses as points, one colour per run;
a lower panel shows each run's smoothed train loss and val loss relative to the first run's (the
reference, e.g. bf16) with a +-1% band. FP16 steps skipped by the loss scaler are marked with x.

  python3 scripts/plot_loss_curves.py --out docs/precision-loss-curves.png \\
      --title "gpt2-124m on Gutenberg" --device "H100 80GB" --date 2026-11-21 --commit abc1234 \\
      bf16=out/curves/bf16.metrics.jsonl fp16=out/curves/fp16.metrics.jsonl fp8=...

A dev-machine tool, not part of CI: it needs matplotlib, which scripts/install-deps.sh does not
install (Debian: apt-get install python3-matplotlib, then run it with /usr/bin/python3 if
python3 on the PATH is another interpreter). The metrics files come from bench/gpu_precision.sh's
curves stage ($OUT/curves/<precision>.metrics.jsonl); any Tessera metrics.jsonl works.
"""
import argparse
import json
import sys


def read_metrics(path):
    """(train records sorted by step, {step: val_loss}); lines cut short by a killed run skipped."""
    train, val = [], {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r and "step" in r:
                train.append(r)
            elif "val_loss" in r and "step" in r:
                val[r["step"]] = r["val_loss"]
    train.sort(key=lambda r: r["step"])
    return train, val


def moving_average(xs, window):
    """Centred mean over `window` values (a trailing one would lag a falling loss by window / 2
    steps and draw it above the raw points); narrower at both ends."""
    half = window // 2
    prefix = [0.0]
    for x in xs:
        prefix.append(prefix[-1] + x)
    out = []
    for i in range(len(xs)):
        lo, hi = max(0, i - half), min(len(xs), i + window - half)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def parse_run(spec):
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"'{spec}': expected LABEL=PATH")
    return label, path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=parse_run, help="LABEL=metrics.jsonl, reference first")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="loss curves")
    ap.add_argument("--device", default="", help="e.g. 'NVIDIA H100 80GB'")
    ap.add_argument("--date", default="")
    ap.add_argument("--commit", default="")
    ap.add_argument("--x", choices=["tokens", "steps"], default="tokens")
    ap.add_argument("--smooth", type=int, default=20, help="moving-average window in steps")
    ap.add_argument("--band", type=float, default=1.0, help="+- band of the lower panel, in %%")
    a = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_loss_curves.py: matplotlib is missing: apt-get install python3-matplotlib "
                 f"(and run this with the interpreter that sees it; this is {sys.executable})")

    runs = []
    for label, path in a.runs:
        train, val = read_metrics(path)
        if not train:
            sys.exit(f"plot_loss_curves.py: {path} holds no train records (\"loss\")")
        runs.append((label, train, val))

    def x_of(r):  # millions of tokens, or the step
        return r["tokens"] / 1e6 if a.x == "tokens" and "tokens" in r else r["step"]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = None
    for i, (label, train, val) in enumerate(runs):
        c = colours[i % len(colours)]
        by_step = {r["step"]: r for r in train}
        xs = [x_of(r) for r in train]
        losses = [r["loss"] for r in train]
        smooth = moving_average(losses, max(1, a.smooth))
        top.plot(xs, losses, color=c, alpha=0.15, linewidth=0.7)
        top.plot(xs, smooth, color=c, linewidth=1.6, label=f"{label} train (mean of {a.smooth})")
        vsteps = sorted(s for s in val if s in by_step)
        if vsteps:
            top.plot([x_of(by_step[s]) for s in vsteps], [val[s] for s in vsteps], "o", color=c,
                     markersize=5, markeredgecolor="black", markeredgewidth=0.5,
                     label=f"{label} val")
        skipped = [r for r in train if r.get("skipped")]
        if skipped:
            top.plot([x_of(r) for r in skipped], [r["loss"] for r in skipped], "x", color=c,
                     markersize=6, label=f"{label} skipped steps ({len(skipped)})")
        cur = {"smooth": dict(zip((r["step"] for r in train), smooth)), "val": val}
        if ref is None:
            ref = cur
            bottom.axhline(0.0, color=c, linewidth=1.2, label=f"{label} (reference)")
            continue
        common = [r for r in train if r["step"] in ref["smooth"]]
        bottom.plot([x_of(r) for r in common],
                    [100 * (cur["smooth"][r["step"]] / ref["smooth"][r["step"]] - 1)
                     for r in common], color=c, linewidth=1.2, label=f"{label} train")
        vcommon = [s for s in vsteps if s in ref["val"]]
        if vcommon:
            bottom.plot([x_of(by_step[s]) for s in vcommon],
                        [100 * (val[s] / ref["val"][s] - 1) for s in vcommon], "o", color=c,
                        markersize=5, markeredgecolor="black", markeredgewidth=0.5,
                        label=f"{label} val")
    bottom.axhspan(-a.band, a.band, color="grey", alpha=0.15, label=f"+-{a.band:g}%")
    top.set_ylabel("loss (nats / token)")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8, ncol=2)
    bottom.set_ylabel(f"vs {runs[0][0]} (%)")
    bottom.set_xlabel("tokens (millions)" if a.x == "tokens" else "step")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7, ncol=3, loc="upper right")
    # Relative differences early in training are large and uninformative: show +-5 x band unless
    # the curves stay inside a narrower range.
    lo, hi = bottom.get_ylim()
    lim = 5 * a.band
    bottom.set_ylim(max(lo, -lim), min(hi, lim))
    sub = " | ".join(s for s in (a.device, a.date, f"commit {a.commit}" if a.commit else "") if s)
    fig.suptitle(a.title + (f"\n{sub}" if sub else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
