"""PyTorch peer for the MoE training-throughput benchmark: the same model as Tessera
(bench/torch/moe_model.py), built from a Tessera recipe's model and moe sections, trained on random
tokens at the recipe's micro-batch and sequence with bench_train.py's policy (bf16 autocast over
FP32 master weights, fused AdamW, grad clip 1.0) — eager, or with the model under torch.compile.

  python3 bench/torch/bench_moe.py --recipe recipes/moe-16x-top2.yaml --mode eager
  python3 bench/torch/bench_moe.py --recipe recipes/moe-16x-top2.yaml --mode compile
  python3 bench/torch/bench_moe.py recipes/moe-16x-top2.yaml            # both, one process each

Prints one JSON line per mode: tokens/s, step time, MFU (FLOPs/token = 6 * active parameters +
12*L*h*s, against 989 TFLOP/s dense BF16, as src/train/metrics.cpp counts), peak memory. The
routed experts run as torch._grouped_mm when a small self-check (against a loop and a dense FP32
reference) passes, else as a loop over experts; `experts` in the JSON says which.
"""
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from model import Config  # noqa: E402
from moe_model import (MoeConfig, MoeTransformer, num_active_params, num_params,  # noqa: E402
                       self_check)

REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_RECIPE = os.path.join(REPO, "recipes", "moe-16x-top2.yaml")
PEAK_FLOPS = 989e12  # H100/H200 SXM dense BF16 (src/train/metrics.cpp)

# bench_train.py's table: the family defaults of src/config/model_config.cpp.
FAMILY = {
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, position="learned", activation="gelu", bias=True,
                 tied_embeddings=True, qk_norm=False, rope_theta=10000.0),
    "llama": dict(norm="rmsnorm", norm_eps=1e-6, position="rope", activation="swiglu", bias=False,
                  tied_embeddings=False, qk_norm=False, rope_theta=10000.0),
}


def _scalar(s):
    s = s.strip()
    if len(s) >= 2 and s[0] in "'\"" and s[-1] == s[0]:
        return s[1:-1]
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", ""):
        return None
    if s.startswith("[") and s.endswith("]"):
        return [_scalar(p) for p in s[1:-1].split(",") if p.strip()]
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _tiny_yaml(text):
    """Tessera's recipe format only: top-level sections of `key: scalar` lines, comments."""
    out, section = {}, None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(":")
        if not raw[0].isspace():
            if value.strip():
                out[key] = _scalar(value)
                section = None
            else:
                section = out.setdefault(key, {})
        elif section is not None:
            section[key] = _scalar(value)
    return out


def load_recipe(path):
    with open(path) as f:
        text = f.read()
    try:
        import yaml
    except ImportError:
        return _tiny_yaml(text)
    return yaml.safe_load(text)


def config_from_recipe(recipe):
    """bench_train.config_from_recipe plus the moe section (cfg.moe)."""
    m = recipe["model"]
    family = m.get("family", "gpt2")
    d = dict(FAMILY[family])
    d.update({k: v for k, v in m.items() if k in d})
    V = int(m["vocab_size"])
    mult = int(m.get("vocab_pad_multiple", 1))
    d.update(family=family, vocab_size=V,
             padded_vocab_size=int(m.get("padded_vocab_size", (V + mult - 1) // mult * mult)),
             num_layers=int(m["num_layers"]), hidden=int(m["hidden"]),
             num_heads=int(m["num_heads"]),
             num_kv_heads=int(m.get("num_kv_heads", m["num_heads"])),
             head_dim=int(m.get("head_dim", int(m["hidden"]) // int(m["num_heads"]))),
             ffn_hidden=int(m.get("ffn_hidden", 4 * int(m["hidden"]))),
             max_seq_len=int(m["max_seq_len"]))
    d["rope_theta"] = float(d["rope_theta"])
    d["norm_eps"] = float(d["norm_eps"])
    cfg = Config(d)
    cfg.moe = MoeConfig(recipe.get("moe") or {}, cfg.ffn_hidden)
    return cfg


def child_args(args, mode):
    a = [sys.executable, os.path.abspath(__file__), "--recipe", args.recipe, "--mode", mode,
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--compile-scope", args.compile_scope, "--experts", args.experts]
    for flag, v in (("--batch", args.batch), ("--seq", args.seq)):
        if v:
            a += [flag, str(v)]
    return a


def run(args):
    recipe = load_recipe(args.recipe)
    data = recipe.get("data") or {}
    B = args.batch or int(data["micro_batch"])
    T = args.seq or int(data["seq_len"])
    cfg = config_from_recipe(recipe)
    if not cfg.moe.enabled():
        raise SystemExit(f"{args.recipe}: no moe section (moe.num_experts is 0)")
    dev = "cuda"

    # Choose (and check) the expert GEMMs before any TF32 setting, on tiny shapes.
    if args.experts == "auto":
        impl, check = self_check(dev)
    else:
        impl, check = args.experts, {"forced": args.experts}
    print(f"bench_moe: experts={impl} check={check}", file=sys.stderr, flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True  # as bench_train.py (FP32 GEMMs: the router)
    torch.manual_seed(0)
    with torch.device(dev):  # build and initialise on the GPU (2.4B FP32 parameters)
        model = MoeTransformer(cfg, impl=impl, compute_dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    n_expected = num_params(cfg)
    n_active = num_active_params(cfg)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    fwd = model
    if args.mode == "compile":
        if args.compile_scope == "blocks":  # regional: each block compiled, the rest eager
            from torch._dynamo import config as dynamo_config  # (binds no local `torch`)
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
            for layer in model.layers:
                layer.compile()
        else:
            fwd = torch.compile(model)

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss, aux = fwd(tokens, targets)
            total = loss + aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), aux.detach()

    g = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev, generator=g)
               for _ in range(4)]
    t0 = time.time()
    for i in range(args.warmup):
        b = batches[i % 4]
        step(b[:, :-1], b[:, 1:])[0].item()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = aux = None
    for i in range(args.steps):
        b = batches[i % 4]
        loss, aux = step(b[:, :-1], b[:, 1:])
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / args.steps
    tok_s = B * T / sec
    flops_tok = 6 * n_active + 12 * cfg.num_layers * cfg.hidden * T
    m = cfg.moe
    return {"peer": f"pytorch-{args.mode}", "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(), "recipe": args.recipe, "batch": B, "seq": T,
            "experts": impl, "compile_scope": args.compile_scope if args.mode == "compile" else None,
            "num_experts": m.num_experts, "topk": m.topk, "params": n_params,
            "params_match_tessera": n_params == n_expected, "active_params": n_active,
            "step_ms": round(sec * 1e3, 2), "tokens_per_s": round(tok_s),
            "mfu": round(flops_tok * tok_s / PEAK_FLOPS, 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "warmup_s": round(warm_s, 1), "steps": args.steps, "loss": round(loss.item(), 4),
            "router_loss": round(aux.item(), 6), "check": check}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe_pos", nargs="?", metavar="recipe")
    ap.add_argument("--recipe")
    ap.add_argument("--mode", choices=["eager", "compile", "both"], default="both",
                    help="both: eager then compile, each in its own process")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                    help="torch.compile the whole model, or each block (faster to compile)")
    ap.add_argument("--experts", choices=["auto", "grouped_mm", "loop"], default="auto",
                    help="auto: torch._grouped_mm if its self-check passes, else the loop")
    args = ap.parse_args()
    args.recipe = args.recipe or args.recipe_pos or DEFAULT_RECIPE

    if args.mode == "both":
        rc = 0
        for mode in ("eager", "compile"):
            r = subprocess.run(child_args(args, mode))
            rc = rc or r.returncode
        sys.exit(rc)

    try:
        rec = run(args)
    except Exception as e:  # noqa: BLE001 - one JSON line whatever happens
        traceback.print_exc()
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        try:
            peak = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        except Exception:  # noqa: BLE001
            peak = None
        print(json.dumps({"peer": f"pytorch-{args.mode}", "recipe": args.recipe,
                          "error": ("OOM: " if oom else "") + f"{type(e).__name__}: {str(e)[:400]}",
                          "peak_mem_gb": peak}), flush=True)
        sys.exit(1)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
