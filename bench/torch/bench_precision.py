"""PyTorch peer for the mixed-precision throughput benchmark (bench/gpu_precision.sh): the model of
bench/torch/model.py, built from a Tessera recipe's model section, trained on random tokens over
FP32 master weights with fused AdamW at the recipe's micro-batch and sequence, in one precision:
  bf16  torch.autocast(bfloat16)
  fp16  torch.autocast(float16) + torch.amp.GradScaler (initial scale 2^16, growth every 1000
        clean steps, backoff 0.5: Tessera's loss-scaler defaults)
  fp8   bf16 autocast, and every Linear of the blocks through bench/torch/fp8_linear.py
        (torch._scaled_mm, per-tensor current scaling), after fp8_linear.check() passes
--mode compile wraps the model in torch.compile (the optimizer step stays eager: GradScaler's
skip logic lives there), --mode eager does not.

  python3 bench/torch/bench_precision.py recipes/llama-1b.yaml --precision fp8 --steps 10

Prints one JSON line (and appends it to --json): tokens/s, MFU (6N + 12*L*h*s FLOPs per token
against 989 TFLOP/s dense BF16, for every precision: the same convention as Tessera's
metrics.jsonl), peak allocated memory and device memory in use. A failure prints a JSON line with
"error" and exits 1. bench_train.py stays the bf16 peer of the plain throughput benchmark.
"""
import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp8_linear  # noqa: E402
from bench_train import config_from_recipe, time_training_steps  # noqa: E402
from model import Transformer  # noqa: E402

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def emit(rec, path):
    line = json.dumps(rec)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def run(args, rec):
    import yaml

    with open(args.recipe) as f:
        data = yaml.safe_load(f)["data"]
    B = args.batch or data["micro_batch"]
    T = args.seq or data["seq_len"]
    cfg = config_from_recipe(args.recipe)
    torch.backends.cuda.matmul.allow_tf32 = True
    rec.update(gpu=torch.cuda.get_device_name(), batch=B, seq=T)
    if args.precision == "fp8":
        res, ok = fp8_linear.check()
        rec["fp8_check"] = res
        if not ok:
            raise RuntimeError(f"fp8_linear.check() failed (rel L2 vs f64 above bound): {res}")
    model = Transformer(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    if args.precision == "fp8":
        rec["fp8_linears"] = fp8_linear.convert(model, AUTOCAST["fp8"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    scaler = (torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_factor=2.0,
                                   backoff_factor=0.5, growth_interval=1000)
              if args.precision == "fp16" else None)
    fwd = torch.compile(model) if args.mode == "compile" else model
    dtype = AUTOCAST[args.precision]

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=dtype):
            _, loss = fwd(tokens, targets)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)  # skipped when a gradient overflowed
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    warm_s, sec, loss = time_training_steps(step, cfg.vocab_size, B, T, args.warmup, args.steps)
    free, total = torch.cuda.mem_get_info()
    tok_s = B * T / sec
    flops_tok = 6 * n_params + 12 * cfg.num_layers * cfg.hidden * T
    rec.update(params=n_params, step_ms=round(sec * 1e3, 2), tokens_per_s=round(tok_s),
               mfu=round(flops_tok * tok_s / 989e12, 4),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
               device_used_gb=round((total - free) / 1e9, 2), warmup_s=round(warm_s, 1),
               loss=round(loss.item(), 4))
    if scaler is not None:
        rec["loss_scale"] = scaler.get_scale()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--precision", choices=sorted(AUTOCAST), default="bf16")
    ap.add_argument("--mode", choices=["eager", "compile"], default="compile")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--json", default="", help="also append the JSON line to this file")
    args = ap.parse_args()
    rec = {"peer": f"pytorch-{args.mode}", "precision": args.precision, "torch": torch.__version__,
           "recipe": args.recipe}
    try:
        run(args, rec)
    except Exception as e:  # reported as data: the shell's table shows the error
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        emit(rec, args.json)
        return 1
    emit(rec, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
