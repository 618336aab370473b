"""Summaries for bench/gpu_precision.sh (issue 5, mixed precision): each subcommand reads what one
stage left behind and prints a short fixed-width table last (and JSON where --json is given).
Only reads and compares numbers; the runs are started by gpu_precision.sh.
  tests LOG [--focus REGEX]            ctest -V output: per executable and per test, the error lines
  throughput DIR --drop K              Tessera bf16/fp16/fp8 vs the PyTorch peer: tokens/s, MFU, memory
  curves DIR [--warmup-frac F]         same steps in bf16/fp16/fp8: final losses vs bf16, fp16 overflow
A stage directory holds runs.jsonl (one line per run, appended by the shell; a name run twice
counts with its last line) and the runs' logs and metrics. Shared helpers: bench/parallel_report.py.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parallel_report import failure, print_table, read_jsonl, read_runs, throughput  # noqa: E402

# The targets.
FP8_SPEEDUP = 1.3        # FP8 tokens/s >= 1.3x BF16's
LOSS_REL = 0.01          # FP8 loss within 1% of BF16's after the same tokens
OVERFLOW_RATE = 0.003    # FP16: < 0.3% of steps skipped after warm-up

PRECISIONS = ("bf16", "fp16", "fp8")


def not_built(run):
    """True when the run stopped because its precision is not built yet (exit 2, user error)."""
    log = run.get("log")
    if run.get("rc") != 2 or not log or not os.path.exists(log):
        return False
    with open(log, errors="replace") as f:
        return "not built yet" in f.read()


def run_status(run):
    """'ok', 'not built', 'not run' or 'FAILED', and why (printed above the table)."""
    rc = run.get("rc")
    if rc == 0:
        return "ok", ""
    if rc == "skipped":
        return "not run", run.get("why") or failure(run)
    if not_built(run):
        return "not built", ""
    return "FAILED", failure(run)


def emit(a, title, header, rows):
    """print_table, and the same text into a.table (the shell's closing recap) when given."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(title, header, rows)
    sys.stdout.write(buf.getvalue())
    sys.stdout.flush()
    if a.table:
        with open(a.table, "w") as f:
            f.write(buf.getvalue())


def pct(x, digits=2):
    return "n/a" if x is None else f"{100 * x:+.{digits}f}%"


def ratio(a, b):
    return a / b if a is not None and b else None


# ---- tests ----------------------------------------------------------------------------------

# Lines of `ctest -V` that are ctest's or GoogleTest's own chatter, not what a test printed.
BOILERPLATE = re.compile(r"^(Test command:|Working Directory:|Test timeout computed|Environment "
                         r"variables:|Running main\(\)|Note: Google Test filter|\[[=\- ]+\]|"
                         r"\[ +(RUN|OK|PASSED|SKIPPED|FAILED) +\]|Global test environment|"
                         r"Running \d+ tests?|\d+ tests? from|\s*$)")
# "... 1.234e-03 (bound 2.0e-02)": the error and its bound, to rank lines by error / bound.
ERR_BOUND = re.compile(r"([-+]?\d[\d.]*(?:e[-+]?\d+)?)\s*\(bound\s+([-+]?\d[\d.]*(?:e[-+]?\d+)?)\)")


# "  3/60 Test  #7: Suite.Case/fp16  # GetParam() = 1-byte object <03> .....***Skipped   0.15 sec"
# (the name may hold spaces: the result is what follows the run of dots).
RESULT_LINE = re.compile(r"^\s*\d+/\d+\s+Test\s+#\s*(\d+):\s+(.+?)\s*\.*\s*"
                         r"(Passed|\*{3}\S.*?|Not Run.*?)\s+([\d.]+)\s+sec\s*$", re.M)


def parse_ctest(text):
    """{test number: {"name", "result", "sec", "exe", "lines"}} from `ctest -V` output."""
    tests = {}
    for m in RESULT_LINE.finditer(text):
        num, name, result, secs = m.groups()
        name = name.split("  # GetParam()")[0].strip()  # value-parameterized GoogleTest cases
        result = result.lstrip("*").strip()
        tests[int(num)] = {"name": name, "result": result, "sec": float(secs), "exe": "?",
                           "lines": []}
    for m in re.finditer(r"^(\d+): (.*)$", text, re.M):
        t = tests.get(int(m.group(1)))
        if t is None:
            continue
        line = m.group(2).rstrip()
        cmd = re.match(r"Test command:\s*(\S+)", line)
        if cmd:
            exe = os.path.basename(cmd.group(1).strip('"'))
            # mpirun-launched tests: the executable is the first argument naming a test binary.
            if exe in ("mpirun", "mpiexec"):
                exe = re.sub(r"_np\d+$", "", t["name"])
            t["exe"] = exe
        elif not BOILERPLATE.match(line):
            t["lines"].append(line)
    return tests


def classify(result):
    if result == "Passed":
        return "passed"
    if result.startswith("Skipped") or result.startswith("Not Run (Disabled)"):
        return "skipped"
    return "failed"  # Failed, Timeout, Exception, Not Run (a missing executable)


def err_ratio(line):
    m = ERR_BOUND.search(line)
    if not m:
        return None
    try:
        err, bound = float(m.group(1)), float(m.group(2))
    except ValueError:
        return None
    return err / bound if bound > 0 else None


def cmd_tests(a):
    text = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    tests = parse_ctest(text)
    focus = re.compile(a.focus, re.I)
    groups, failed, focus_tests, measured = {}, [], [], []
    for num, t in sorted(tests.items()):
        key = classify(t["result"])
        g = groups.setdefault(t["exe"], {"passed": 0, "failed": 0, "skipped": 0, "sec": 0.0})
        g[key] += 1
        g["sec"] += t["sec"]
        in_focus = bool(focus.search(t["name"]))
        if key == "failed":
            failed.append(t)
        if in_focus:
            focus_tests.append(t)
        for line in t["lines"]:
            r = err_ratio(line)
            if r is not None and (in_focus or focus.search(line)):
                measured.append((r, line, t["name"]))
    totals = re.findall(r"\d+% tests passed(?:, \d+ tests? failed)? out of \d+", text)

    for i, t in enumerate(failed):
        print(f"FAILED: {t['name']} ({t['result']}, {t['sec']:.1f} s)")
        if i >= a.top // 2:
            continue  # the first few failures in full; every line stays in the log
        telling = [l for l in t["lines"] if re.search(r"Failure|Expected|Which is|worst|bound|"
                                                       r"error|Value of|Actual", l)]
        for line in (telling or t["lines"])[:6]:
            print(f"    {line.strip()[:200]}")
    n = {k: sum(1 for t in focus_tests if classify(t["result"]) == k)
         for k in ("passed", "failed", "skipped")}
    print(f"focus tests (name matches /{a.focus}/): {n['passed']} passed, {n['failed']} failed, "
          f"{n['skipped']} skipped")
    skipped = [t for t in focus_tests if classify(t["result"]) == "skipped"]
    for t in skipped[:a.top]:
        # GoogleTest prints "file:line: Skipped" and then the reason given to GTEST_SKIP.
        why = next((l for l in reversed(t["lines"]) if "Skipped" not in l), "")
        print(f"  SKIPPED {t['name']}: {why.strip()[:120]}")
    if len(skipped) > a.top:
        print(f"  ... {len(skipped) - a.top} more skipped")
    # What the focus tests printed: lines with an error and its bound, worst first; then any
    # other lines they printed (model parity losses, probes), as they came.
    measured.sort(key=lambda x: -x[0])
    if measured:
        print(f"worst error / bound among {len(measured)} measured lines of focus tests or naming "
              f"a focus dtype:")
        for r, line, name in measured[:a.top]:
            print(f"  {r:6.3f}  {' '.join(line.split())[:150]}  [{name}]")
    other = [(t["name"], l) for t in tests.values() for l in t["lines"]
             if err_ratio(l) is None and classify(t["result"]) == "passed"
             and (t in focus_tests or focus.search(l))]
    for name, line in other[:a.top]:
        print(f"  {name}: {' '.join(line.split())[:160]}")
    if len(other) > a.top:
        print(f"  ... {len(other) - a.top} more lines in the log")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": totals[-1] if totals else None,
                       "tests": [{"name": t["name"], "exe": t["exe"], "result": t["result"],
                                  "sec": t["sec"], "output": t["lines"][:40]}
                                 for t in tests.values()]}, f, indent=1)
    rows = [[exe, g["passed"], g["failed"], g["skipped"], f"{g['sec']:.0f}"]
            for exe, g in sorted(groups.items())]
    title = (f"tests ({a.label}): {totals[-1] if totals else 'no ctest summary line (see log)'}; "
             f"focus: {n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped")
    emit(a, title, ["executable", "passed", "failed", "skipped", "sec"], rows)
    return 1 if failed or not tests else 0


# ---- throughput -----------------------------------------------------------------------------

def torch_result(run):
    """The PyTorch peer's JSON line (bench/torch/bench_precision.py), or None."""
    recs = [r for r in read_jsonl(run.get("json")) if "tokens_per_s" in r or "error" in r]
    return recs[-1] if recs else None


def skipped_in(run, drop):
    recs = [r for r in read_jsonl(run.get("metrics")) if "loss" in r][drop:]
    return sum(int(r.get("skipped", 0)) for r in recs), len(recs)


def cmd_throughput(a):
    runs = {(r["side"], r["precision"]): r for r in read_runs(a.dir)}
    precs = [p for p in PRECISIONS if any(k[1] == p for k in runs)]
    res, notes, out = {}, [], []
    for (side, prec), r in runs.items():
        entry = {"side": side, "precision": prec, "rc": r.get("rc")}
        status, why = run_status(r)
        t = None
        if status == "ok" and side == "tessera":
            t = throughput(r, a.drop)
            if t is None:
                status, why = "FAILED", f"no steps left after dropping {a.drop}"
            elif prec == "fp16":
                n_skip, n = skipped_in(r, a.drop)
                if n_skip:
                    notes.append(f"tessera fp16: {n_skip} of the {n} timed steps were skipped "
                                 f"(loss-scale overflow: no optimizer step)")
        elif side == "pytorch" and status in ("ok", "FAILED"):
            t = torch_result(r)
            if t and "fp8_check" in t:
                notes.append("pytorch fp8_linear.check() (rel L2 vs float64, bound): " +
                             ", ".join(f"{k} {v['err']:.2e} ({v['bound']:g})"
                                       for k, v in t["fp8_check"].items()))
            if t is None or "error" in t:
                status = "FAILED"
                why = (t or {}).get("error") or why or "no JSON line (see its log)"
                t = None
        if why:
            notes.append(f"{side} {prec}: {status}: {why[:200]}")
        entry.update(status=status, why=why, **(t or {}))
        res[(side, prec)] = (status, t)
        out.append(entry)

    def cell(side, prec):
        st, t = res.get((side, prec), ("-", None))
        return st, t

    rows = []
    base = {s: (cell(s, "bf16")[1] or {}).get("tokens_per_s") for s in ("tessera", "pytorch")}
    summary = {}
    for prec in precs:
        row = [prec]
        tok = {}
        for side in ("tessera", "pytorch"):
            st, t = cell(side, prec)
            if t is None:
                row += [st if st != "-" else "-", "-", "-", "-"]
                tok[side] = None
                continue
            tok[side] = t["tokens_per_s"]
            mem = t.get("device_used_gb")
            row += [f"{t['tokens_per_s']:,.0f}",
                    "n/a" if not base[side] else f"{t['tokens_per_s'] / base[side]:.3f}x",
                    f"{100 * t['mfu']:.1f}%" if "mfu" in t else "n/a",
                    "n/a" if mem is None else f"{mem:.1f}"]
        r = ratio(tok["tessera"], tok["pytorch"])
        row.append("n/a" if r is None else f"{r:.3f}")
        rows.append(row)
        summary[prec] = {"tessera_tokens_per_s": tok["tessera"], "pytorch_tokens_per_s": tok["pytorch"],
                         "tessera_vs_bf16": ratio(tok["tessera"], base["tessera"]),
                         "pytorch_vs_bf16": ratio(tok["pytorch"], base["pytorch"]),
                         "tessera_vs_pytorch": r}
    fp8 = summary.get("fp8", {}).get("tessera_vs_bf16")
    st8 = cell("tessera", "fp8")[0]
    if fp8 is not None:
        target = f"{fp8:.3f}x: {'met' if fp8 >= FP8_SPEEDUP else 'MISSED'}"
    else:
        target = f"no figure (tessera fp8: {st8})"
    for n in notes:
        print(n)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": a.recipe, "dropped_steps": a.drop, "torch_mode": a.torch_mode,
                       "fp8_target": FP8_SPEEDUP, "by_precision": summary, "runs": out}, f,
                      indent=1)
    title = (f"throughput: {a.recipe} on mock data; Tessera steps {a.drop + 1}.. (tokens / time), "
             f"PyTorch {a.torch_mode} (timed steps after its warm-up); MFU against 989 TFLOP/s "
             f"(dense BF16) for every precision; mem = device memory in use (total - free)\n"
             f"target: Tessera FP8 >= {FP8_SPEEDUP}x Tessera BF16 -> {target}")
    emit(a, title, ["precision", "Tessera tok/s", "vs bf16", "MFU", "mem GB",
                        "PyTorch tok/s", "vs bf16", "MFU", "mem GB", "Tessera/PyTorch"], rows)
    return 0 if res and all(s in ("ok", "not built") for s, _ in res.values()) else 1


# ---- curves ---------------------------------------------------------------------------------

def fp16_overflow(recs, warmup_frac):
    """Skipped-step statistics of an fp16 run. Warm-up = the larger of the first
    ceil(warmup_frac * steps) steps and the loss scaler's initial search (every step up to the
    first one that was not skipped); the rate counts the steps after it."""
    steps = [r for r in recs if "skipped" in r]
    if not steps:
        return None
    n = len(steps)
    first_clean = next((i for i, r in enumerate(steps) if not r["skipped"]), n)
    w = min(n, max(math.ceil(warmup_frac * n), first_clean))
    after = steps[w:]
    skipped_after = sum(int(r["skipped"]) for r in after)
    return {"steps": n, "skipped_total": sum(int(r["skipped"]) for r in steps),
            "initial_search": first_clean, "warmup_steps": w, "steps_after_warmup": len(after),
            "skipped_after_warmup": skipped_after,
            "overflow_rate": skipped_after / len(after) if after else None,
            "final_scale": steps[-1].get("loss_scale")}


def cmd_curves(a):
    runs = read_runs(a.dir)
    data, rows, notes, out = {}, [], [], []
    for r in runs:
        status, why = run_status(r)
        recs = read_jsonl(r.get("metrics"))
        train = sorted((x for x in recs if "loss" in x), key=lambda x: x["step"])
        val = {x["step"]: x["val_loss"] for x in recs if "val_loss" in x}
        if status == "FAILED" and train:
            why += f" (metrics up to step {train[-1]['step']} are used)"
        if why:
            notes.append(f"{r['precision']}: {status}: {why}")
        data[r["precision"]] = {"status": status, "train": train, "val": val, "run": r}
    # Compare after the same number of tokens: the last step every run with steps reached, and
    # the last evaluation every such run made at or before it.
    with_steps = {p: d for p, d in data.items() if d["train"]}
    common = min((d["train"][-1]["step"] for d in with_steps.values()), default=None)
    val_steps = [set(s for s in d["val"] if s <= common) for d in with_steps.values()]
    common_val = max(set.intersection(*val_steps), default=None) if val_steps else None
    window = a.smooth or max(1, min(50, round(0.05 * (common or 0))))

    def smoothed(d):
        xs = [x["loss"] for x in d["train"] if common - window < x["step"] <= common]
        return sum(xs) / len(xs) if xs else None

    ref = with_steps.get("bf16")
    ref_train = smoothed(ref) if ref else None
    ref_val = ref["val"].get(common_val) if ref and common_val is not None else None
    tokens_per_step = None
    for p in [p for p in PRECISIONS if p in data] + [p for p in data if p not in PRECISIONS]:
        d = data[p]
        entry = {"precision": p, "status": d["status"]}
        if not d["train"]:
            rows.append([p, d["status"], "-", "-", "-", "-", "-", "-", "-", "-"])
            out.append(entry)
            continue
        last = d["train"][-1]
        if tokens_per_step is None and last.get("tokens"):
            tokens_per_step = last["tokens"] / last["step"]
        tr = smoothed(d)
        va = d["val"].get(common_val) if common_val is not None else None
        tr_rel = (tr - ref_train) / ref_train if ref_train and tr is not None else None
        va_rel = (va - ref_val) / ref_val if ref_val and va is not None else None
        ov = fp16_overflow(d["train"], a.warmup_frac) if p == "fp16" else None
        target = "-"
        if p == "fp8":
            target = ("n/a" if va_rel is None else
                      f"val {'met' if abs(va_rel) <= LOSS_REL else 'MISSED'}")
        if ov:
            rate = ov["overflow_rate"]
            target = ("n/a" if rate is None else
                      f"overflow {'met' if rate < OVERFLOW_RATE else 'MISSED'}")
        rows.append([p, d["status"], last["step"], "n/a" if tr is None else f"{tr:.4f}",
                     pct(tr_rel) if p != "bf16" else "-",
                     "n/a" if va is None else f"{va:.4f}", pct(va_rel) if p != "bf16" else "-",
                     f"{ov['skipped_total']}" if ov else "-",
                     (f"{ov['skipped_after_warmup']}/{ov['steps_after_warmup']} "
                      f"({pct(ov['overflow_rate'], 2).lstrip('+')})"
                      if ov and ov["overflow_rate"] is not None else "-"), target])
        entry.update({"steps": last["step"], "tokens": last.get("tokens"),
                      "train_loss_smoothed": tr, "train_rel_vs_bf16": tr_rel,
                      "val_loss": va, "val_rel_vs_bf16": va_rel, "fp16_overflow": ov,
                      "val_curve": sorted(d["val"].items())})
        if ov:
            notes.append(f"fp16: warm-up = first {ov['warmup_steps']} steps (max of "
                         f"{a.warmup_frac:g} x {ov['steps']} steps and the scaler's initial "
                         f"search of {ov['initial_search']} skipped steps); final loss scale "
                         f"{ov['final_scale']}")
        out.append(entry)
    for n in notes:
        print(n)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": a.recipe, "common_step": common, "common_val_step": common_val,
                       "tokens_per_step": tokens_per_step, "smooth_window": window,
                       "targets": {"fp8_val_rel": LOSS_REL, "fp16_overflow_rate": OVERFLOW_RATE},
                       "runs": out}, f, indent=1)
    tok = (f"{common * tokens_per_step:,.0f} tokens" if common and tokens_per_step else "n/a")
    title = (f"curves: {a.recipe}, same seed and data; compared at step {common} ({tok}): train "
             f"loss = mean of steps {max(1, (common or 0) - window + 1)}..{common}, val loss at "
             f"step {common_val}; targets: fp8 |val vs bf16| <= {100 * LOSS_REL:g}%, fp16 "
             f"overflow after warm-up < {100 * OVERFLOW_RATE:g}% of steps")
    emit(a, title, ["precision", "status", "steps", "train loss", "vs bf16", "val loss",
                        "vs bf16", "skipped", "after warm-up", "target"], rows)
    return 0 if data and all(d["status"] in ("ok", "not built") for d in data.values()) else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tests")
    s.add_argument("log")
    s.add_argument("--focus", default=r"(?<!b)f16|fp16|half|fp8|e4m3|e5m2")
    s.add_argument("--label", default="ctest -L cuda")
    s.add_argument("--top", type=int, default=12, help="lines of test output to show")
    s.add_argument("--json", default="")
    s = sub.add_parser("throughput")
    s.add_argument("dir")
    s.add_argument("--drop", type=int, default=3)
    s.add_argument("--recipe", default="recipes/llama-1b.yaml")
    s.add_argument("--torch-mode", default="compile")
    s.add_argument("--json", default="")
    s = sub.add_parser("curves")
    s.add_argument("dir")
    s.add_argument("--recipe", default="recipes/gpt2-124m.yaml")
    s.add_argument("--warmup-frac", type=float, default=0.1)
    s.add_argument("--smooth", type=int, default=0, help="train-loss window (0: 5%% of the steps)")
    s.add_argument("--json", default="")
    for s in sub.choices.values():
        s.add_argument("--table", default="", help="also write the table to this file")
    a = p.parse_args()
    return {"tests": cmd_tests, "throughput": cmd_throughput, "curves": cmd_curves}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
