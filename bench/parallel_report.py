"""Summaries for bench/gpu_parallel.sh: each subcommand reads the logs and metrics.jsonl files one
stage left behind and prints a short fixed-width table as its last output (also JSON where noted).
Only reads and compares numbers; the runs themselves are started by gpu_parallel.sh.
  tests LOG                        ctest -L mpi output: passed / failed / skipped per executable
  equiv DIR                        parallel-equals-serial: per-step losses and final val loss
  bench DIR --drop K --json FILE   llama-1b throughput per layout, scaling vs 1 GPU, MFU
  bubble DIR --drop K --json FILE  pipeline bubble, measured (pipeline_busy_s) vs (p-1)/(m+p-1)
  allreduce TESSERA.jsonl TORCH.jsonl --json FILE   busbw side by side
A stage directory holds runs.jsonl (one line per run, appended by the shell: name, layout, rc,
log, metrics) and the runs' logs; a name run twice counts with its last line.
"""
import argparse
import json
import math
import os
import re
import sys

REL_TOL = 1e-5  # parallel vs serial, per-step loss and final val loss (tests/e2e/parallel_train_test.cpp)


def read_jsonl(path):
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a killed run
    return out


def read_runs(stage_dir):
    """runs.jsonl of a stage, the last line per name, in first-seen order."""
    runs = {}
    for r in read_jsonl(os.path.join(stage_dir, "runs.jsonl")):
        runs[r["name"]] = r
    return list(runs.values())


def train_records(run):
    return [r for r in read_jsonl(run.get("metrics")) if "loss" in r]


def val_loss(run):
    vals = [r["val_loss"] for r in read_jsonl(run.get("metrics")) if "val_loss" in r]
    return vals[-1] if vals else None


def failure(run):
    """Why a run did not finish: its exit status and the log's most telling line."""
    rc = run.get("rc")
    if rc == "skipped":
        return "not run (time budget): rerun this stage or layout"
    why = ""
    log = run.get("log")
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
        errs = [l for l in lines if re.search(r"error|out of memory|GB of GPU memory", l, re.I)]
        why = (errs or lines or [""])[-1]
    what = "timed out" if rc in (124, 137) else f"rc {rc}"
    return f"{what}: {why[:160]}"


def rel(a, b):
    return abs(a - b) / max(1e-12, abs(b))


def print_table(title, header, rows):
    """Fixed-width table: column widths from the contents, numbers right-aligned."""
    cols = list(zip(*([header] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]

    def fmt(row):
        cells = []
        for i, c in enumerate(row):
            s = str(c)
            is_num = bool(re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?%?x?|n/a|-", s))
            cells.append(s.rjust(widths[i]) if is_num and i > 0 else s.ljust(widths[i]))
        return "  ".join(cells).rstrip()

    print(title)
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    sys.stdout.flush()


# ---- tests ----------------------------------------------------------------------------------

# "  3/60 Test  #7: test_comm_nccl_np2 ..........   Passed    4.21 sec", or ***Failed, ***Skipped,
# ***Not Run (Disabled), ***Timeout, ***Exception: SegFault, ***Failed  Required regular ...
# A value-parameterized gtest adds "  # GetParam() = ..." after its name: skipped, not part of it.
CTEST_LINE = re.compile(r"^\s*\d+/\d+\s+Test\s+#\s*\d+:\s+(\S+)(?:\s+#\s.*?)?\s+\.+\s*(.*?)\s+"
                        r"([\d.]+)\s+sec\s*$", re.M)


def cmd_tests(a):
    groups, failed = {}, []
    text = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    for name, result, secs in CTEST_LINE.findall(text):
        # One row per MPI executable and rank count, or per gtest suite of a discovered test.
        group = name if re.fullmatch(r"\w+_np\d+", name) else name.split(".")[0]
        g = groups.setdefault(group, {"passed": 0, "failed": 0, "skipped": 0, "sec": 0.0})
        result = result.lstrip("*").strip()
        if result == "Passed":
            key = "passed"
        elif result.startswith("Skipped") or result.startswith("Not Run (Disabled)"):
            key = "skipped"
        else:  # Failed, Timeout, Exception, Not Run (a missing executable: a build problem)
            key = "failed"
            failed.append(f"{name} ({result})")
        g[key] += 1
        g["sec"] += float(secs)
    totals = re.findall(r"\d+% tests passed(?:, \d+ tests? failed)? out of \d+", text)
    for f in failed[:15]:
        print("FAILED:", f)
    rows = [[g, v["passed"], v["failed"], v["skipped"], f"{v['sec']:.0f}"]
            for g, v in sorted(groups.items())]
    title = f"tests (ctest -L mpi): {totals[-1] if totals else 'no ctest summary line (see log)'}"
    print_table(title, ["executable / suite", "passed", "failed", "skipped", "sec"], rows)
    return 1 if failed or not groups else 0


# ---- equiv ----------------------------------------------------------------------------------

def cmd_equiv(a):
    runs = read_runs(a.dir)
    serial = {r["family"]: r for r in runs if r["np"] == 1}
    rows, summary, n_pass, n_total, n_skipped = [], [], 0, 0, 0
    for r in runs:
        if r["np"] == 1:
            continue
        n_total += 1
        ref = serial.get(r["family"])
        verdict, max_rel, vrel = "FAIL", None, None
        note = ""
        if r.get("rc") == "skipped":
            verdict, note = "NOT RUN", failure(r)
            n_skipped += 1
        elif ref is None or ref.get("rc") != 0:
            note = "serial reference failed: " + (failure(ref) if ref else "missing")
        elif r.get("rc") != 0:
            note = failure(r)
        else:
            want = {x["step"]: x["loss"] for x in train_records(ref)}
            got = {x["step"]: x["loss"] for x in train_records(r)}
            if not want or set(got) != set(want):
                note = f"steps {sorted(got)} vs serial {sorted(want)}"
            else:
                max_rel = max(rel(got[s], want[s]) for s in want)
                v_got, v_want = val_loss(r), val_loss(ref)
                if v_got is None or v_want is None:
                    note = "no final val_loss"
                else:
                    vrel = rel(v_got, v_want)
                    if max_rel <= REL_TOL and vrel <= REL_TOL:
                        verdict = "PASS"
                    else:
                        note = f"tolerance {REL_TOL:g} exceeded"
        n_pass += verdict == "PASS"
        layout = f"dp{r['dp']} tp{r['tp']} pp{r['pp']}"
        rows.append([r["family"], layout, r["zero"], r["schedule"] if r["pp"] > 1 else "-",
                     "n/a" if max_rel is None else f"{max_rel:.1e}",
                     "n/a" if vrel is None else f"{vrel:.1e}", verdict])
        summary.append({"family": r["family"], "dp": r["dp"], "tp": r["tp"], "pp": r["pp"],
                        "zero": r["zero"], "schedule": r["schedule"], "result": verdict,
                        "max_rel_loss": max_rel, "val_rel": vrel, "note": note})
        if note:
            print(f"{r['name']}: {note}")
    for fam, ref in sorted(serial.items()):
        recs = train_records(ref)
        if recs:
            print(f"serial {fam} (1 GPU): losses " + " ".join(f"{x['loss']:.6f}" for x in recs) +
                  f", val {val_loss(ref)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tolerance": REL_TOL, "passed": n_pass, "total": n_total,
                       "layouts": summary}, f, indent=1)
    title = (f"equiv: parallel vs 1 GPU, fp32, native attention, 5 steps: {n_pass}/{n_total} "
             f"PASS{f', {n_skipped} not run' if n_skipped else ''} (rel diff <= {REL_TOL:g} on "
             f"every step's loss and the final val loss)")
    print_table(title, ["family", "layout", "zero", "sched", "max rel loss", "val rel", "result"],
                rows)
    return 0 if n_total and n_pass == n_total else 1


# ---- bench ----------------------------------------------------------------------------------

def throughput(run, drop):
    """Totals over the steps after the first `drop`: tokens/s = tokens / time (not a mean of
    rates), MFU likewise time-weighted, peak memory; None when the run left no usable steps."""
    recs = train_records(run)
    kept = recs[drop:] if len(recs) > drop else []
    if not kept:
        return None
    secs = sum(x["step_s"] for x in kept)
    tokens = sum(x["tokens_per_s"] * x["step_s"] for x in kept)
    out = {"steps": len(kept), "step_s": secs / len(kept), "tokens_per_s": tokens / secs,
           "step_s_min": min(x["step_s"] for x in kept),
           "step_s_max": max(x["step_s"] for x in kept)}
    if all("mfu" in x for x in kept):
        out["mfu"] = sum(x["mfu"] * x["step_s"] for x in kept) / secs
    mem = [x[k] for x in kept for k in ("device_used_gb",) if k in x]
    if mem:
        out["device_used_gb"] = max(mem)
    if all("pipeline_busy_s" in x for x in kept):
        busy = sum(x["pipeline_busy_s"] for x in kept)
        out["busy_s"] = busy / len(kept)
        # The forward/backward phase (pipeline_s) excludes grad norm and AdamW; older trainers
        # wrote only the whole step, whose optimizer time then counts as idle.
        if all("pipeline_s" in x for x in kept):
            phase = sum(x["pipeline_s"] for x in kept)
            out["pipeline_s"] = phase / len(kept)
            out["bubble_basis"] = "pipeline_s"
        else:
            phase = secs
            out["bubble_basis"] = "step_s"
        out["bubble"] = 1.0 - busy / phase
    return out


def cmd_bench(a):
    runs = read_runs(a.dir)
    base = next((r for r in runs if r["np"] == 1), None)
    base_t = throughput(base, a.drop) if base and base.get("rc") == 0 else None
    rows, out = [], []
    for r in runs:
        t = throughput(r, a.drop) if r.get("rc") == 0 else None
        entry = {k: r[k] for k in ("name", "np", "dp", "tp", "pp", "schedule", "microbatches",
                                   "micro_batch", "global_batch") if k in r}
        sched = f"{r['schedule']} m={r['microbatches']}" if r["pp"] > 1 else "-"
        if t is None:
            entry["error"] = failure(r) if r.get("rc") != 0 else "no steps left after --drop"
            rows.append([r["name"], sched, f"{r['micro_batch']}", r["global_batch"], "-", "-",
                         "-", "-", "-", "NOT RUN" if r.get("rc") == "skipped" else "FAILED"])
            print(f"{r['name']}: {entry['error']}")
        else:
            per_gpu = t["tokens_per_s"] / r["np"]
            eff = per_gpu / base_t["tokens_per_s"] if base_t else None
            entry.update(t)
            entry["tokens_per_s_per_gpu"] = per_gpu
            entry["scaling_efficiency"] = eff
            rows.append([r["name"], sched, f"{r['micro_batch']}", r["global_batch"],
                         f"{t['tokens_per_s']:,.0f}", f"{per_gpu:,.0f}",
                         "n/a" if eff is None else f"{100 * eff:.1f}%",
                         f"{100 * t['mfu']:.1f}%" if "mfu" in t else "n/a",
                         f"{t['device_used_gb']:.1f}" if "device_used_gb" in t else "n/a", "ok"])
        out.append(entry)
    convention = (f"every layout trains {a.mb}*dp sequences per step: a dp rank runs micro-batch "
                  f"{a.mb} like the 1-GPU run; tp ranks share their replica's {a.mb} sequences; pp "
                  f"splits them into m micro-batches of {a.mb}/m. efficiency = (tokens/s per GPU) "
                  f"/ (1-GPU tokens/s); MFU = model FLOPs / (989 TFLOP/s x GPUs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": a.recipe, "convention": convention, "dropped_steps": a.drop,
                       "layouts": out}, f, indent=1)
    title = (f"bench: {a.recipe} on mock data, steps {a.drop + 1}.. of each run (tokens / time)\n"
             f"convention: {convention}")
    print_table(title, ["layout", "schedule", "B", "global", "tok/s", "tok/s/GPU", "eff",
                        "MFU", "mem GB", "status"], rows)
    return 0 if runs and all(r.get("rc") == 0 for r in runs) else 1


# ---- bubble ---------------------------------------------------------------------------------

def cmd_bubble(a):
    runs = read_runs(a.dir)
    rows, out, basis = [], [], set()
    for r in runs:
        p, m = r["pp"], r["microbatches"]
        theory = (p - 1) / (m + p - 1)
        t = throughput(r, a.drop) if r.get("rc") == 0 else None
        entry = {k: r[k] for k in ("name", "pp", "microbatches", "micro_batch", "schedule",
                                   "split", "stage_layers") if k in r}
        entry["theory"] = theory
        if t is None or "bubble" not in t:
            entry["error"] = (failure(r) if r.get("rc") != 0 else
                              "no pipeline_busy_s in metrics.jsonl (needs logging.profile_ops "
                              "and a trainer that writes it)" if t else "no steps left")
            print(f"{r['name']}: {entry['error']}")
            rows.append([r["name"], m, r["split"], "-", "-", "-", "n/a", f"{100 * theory:.1f}%",
                         "-"])
        else:
            entry.update(t)
            basis.add(t["bubble_basis"])
            rows.append([r["name"], m, r["split"], f"{1e3 * t['step_s']:.1f}",
                         f"{1e3 * t.get('pipeline_s', t['step_s']):.1f}",
                         f"{1e3 * t['busy_s']:.1f}", f"{100 * t['bubble']:.1f}%",
                         f"{100 * theory:.1f}%", f"{100 * (t['bubble'] - theory):+.1f}"])
        out.append(entry)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": a.recipe, "dropped_steps": a.drop, "runs": out}, f, indent=1)
    phase = ("pipe ms = pipeline_s, the forward/backward phase" if "step_s" not in basis else
             "step ms (no pipeline_s in metrics: grad norm + AdamW count as idle)")
    title = (f"bubble: stage 0's idle fraction = 1 - busy / phase; busy = its forward+backward "
             f"compute (pipeline_busy_s), phase = {phase}; theory (p-1)/(m+p-1) assumes equal "
             f"stages")
    print_table(title, ["run", "m", "split", "step ms", "pipe ms", "busy ms", "measured",
                        "theory", "diff pts"], rows)
    return 0 if runs and all(r.get("rc") == 0 for r in runs) else 1


# ---- allreduce ------------------------------------------------------------------------------

def cmd_allreduce(a):
    mine = {(r["dtype"], r["bytes"]): r for r in read_jsonl(a.tessera)}
    peer = {(r["dtype"], r["bytes"]): r for r in read_jsonl(a.torch)}
    keys = sorted(set(mine) | set(peer), key=lambda k: (k[0] != "bf16", k[0], k[1]))
    rows, bad = [], False
    ranks = next(iter(mine.values() or peer.values()), {}).get("ranks", "?")
    for k in keys:
        t, p = mine.get(k), peer.get(k)
        checks = [x["check"] for x in (t, p) if x]
        bad |= "FAILED" in checks
        size = k[1] / 2**20
        rows.append([k[0], f"{size:g} MiB" if size < 1024 else f"{size / 1024:g} GiB",
                     f"{t['time_us']:.1f}" if t else "-", f"{t['busbw_gbs']:.1f}" if t else "-",
                     f"{p['time_us']:.1f}" if p else "-", f"{p['busbw_gbs']:.1f}" if p else "-",
                     f"{t['busbw_gbs'] / p['busbw_gbs']:.3f}" if t and p and p["busbw_gbs"] else "n/a",
                     "/".join(checks)])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ranks": ranks, "tessera": list(mine.values()), "torch": list(peer.values())},
                      f, indent=1)
    mine_nccl = next((r.get("nccl", "?") for r in mine.values()), "?")
    peer_nccl = next((r.get("nccl", "?") for r in peer.values()), "?")
    title = (f"allreduce: {ranks} GPUs, in-place sum; busbw = algbw*2(n-1)/n GB/s; Tessera "
             f"(Communicator, NCCL {mine_nccl}) vs torch.distributed (its NCCL {peer_nccl}); "
             f"ratio = Tessera busbw / torch busbw")
    print_table(title, ["dtype", "size", "tessera us", "tessera busbw", "torch us", "torch busbw",
                        "ratio", "check"], rows)
    return 1 if bad or not mine or not peer else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tests")
    s.add_argument("log")
    s = sub.add_parser("equiv")
    s.add_argument("dir")
    s.add_argument("--json", default="")
    for name in ("bench", "bubble"):
        s = sub.add_parser(name)
        s.add_argument("dir")
        s.add_argument("--drop", type=int, default=3)
        s.add_argument("--json", default="")
        s.add_argument("--recipe", default="recipes/llama-1b.yaml")
        s.add_argument("--mb", type=int, default=8, help="the 1-GPU run's micro-batch (bench)")
    s = sub.add_parser("allreduce")
    s.add_argument("tessera")
    s.add_argument("torch")
    s.add_argument("--json", default="")
    a = p.parse_args()
    return {"tests": cmd_tests, "equiv": cmd_equiv, "bench": cmd_bench, "bubble": cmd_bubble,
            "allreduce": cmd_allreduce}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
