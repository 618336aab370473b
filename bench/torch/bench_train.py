"""PyTorch peer for the training-throughput benchmark: the same model as Tessera (bench/torch/model.py),
built from a Tessera recipe's model section, trained on random tokens with bf16 autocast over FP32
master weights and fused AdamW — eager or torch.compile — at the recipe's micro-batch and sequence.

  python3 bench/torch/bench_train.py recipes/gpt2-124m.yaml --mode compile --steps 30

Prints one JSON line: tokens/s, MFU (FLOPs/token = 6N + 12*L*h*s against 989 TFLOP/s dense BF16),
peak memory. Same FLOP convention as Tessera's metrics.jsonl.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, Transformer  # noqa: E402

FAMILY = {
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, position="learned", activation="gelu", bias=True,
                 tied_embeddings=True, qk_norm=False, rope_theta=10000.0),
    "llama": dict(norm="rmsnorm", norm_eps=1e-6, position="rope", activation="swiglu", bias=False,
                  tied_embeddings=False, qk_norm=False, rope_theta=10000.0),
}


def config_from_recipe(path):
    with open(path) as f:
        m = yaml.safe_load(f)["model"]
    d = dict(FAMILY[m.get("family", "gpt2")])
    d.update({k: v for k, v in m.items() if k in d})
    V = int(m["vocab_size"])
    mult = int(m.get("vocab_pad_multiple", 1))
    d.update(family=m.get("family", "gpt2"), vocab_size=V,
             padded_vocab_size=int(m.get("padded_vocab_size", (V + mult - 1) // mult * mult)),
             num_layers=m["num_layers"], hidden=m["hidden"], num_heads=m["num_heads"],
             num_kv_heads=m.get("num_kv_heads", m["num_heads"]),
             head_dim=m.get("head_dim", m["hidden"] // m["num_heads"]),
             ffn_hidden=m.get("ffn_hidden", 4 * m["hidden"]), max_seq_len=m["max_seq_len"])
    return Config(d)


def time_training_steps(step, vocab_size, B, T, warmup, steps):
    """Runs `step(inputs, targets)` on 4 fixed random batches: warmup steps (compilation, caches;
    wall time returned), then `steps` timed with CUDA events after a peak-memory reset.
    Returns (warm-up seconds, seconds per timed step, the last step's loss)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab_size, (B, T + 1), device="cuda", generator=g)
               for _ in range(4)]
    t0 = time.time()
    for i in range(warmup):
        b = batches[i % 4]
        step(b[:, :-1], b[:, 1:]).item()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = None
    for i in range(steps):
        b = batches[i % 4]
        loss = step(b[:, :-1], b[:, 1:])
    end.record()
    torch.cuda.synchronize()
    return warm_s, start.elapsed_time(end) / 1e3 / steps, loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--mode", choices=["eager", "compile"], default="compile")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    args = ap.parse_args()
    with open(args.recipe) as f:
        data = yaml.safe_load(f)["data"]
    B = args.batch or data["micro_batch"]
    T = args.seq or data["seq_len"]
    cfg = config_from_recipe(args.recipe)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = Transformer(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = torch.compile(step) if args.mode == "compile" else step
    warm_s, sec, loss = time_training_steps(fn, cfg.vocab_size, B, T, args.warmup, args.steps)
    tok_s = B * T / sec
    flops_tok = 6 * n_params + 12 * cfg.num_layers * cfg.hidden * T
    print(json.dumps({"peer": f"pytorch-{args.mode}", "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(), "recipe": args.recipe, "batch": B,
                      "seq": T, "params": n_params, "step_ms": round(sec * 1e3, 2),
                      "tokens_per_s": round(tok_s), "mfu": round(flops_tok * tok_s / 989e12, 4),
                      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                      "warmup_s": round(warm_s, 1), "loss": round(loss.item(), 4)}), flush=True)


if __name__ == "__main__":
    main()
