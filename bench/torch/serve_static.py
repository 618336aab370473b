"""The static-batch PyTorch peer of bench/infer/serve_load.cpp + `tessera serve`.

The same load (N requests, log-normal prompt and output lengths with serve_load's medians and
sigma, Poisson arrivals at --rate) served the way a plain PyTorch loop serves it: requests wait
until the model is free, then up to --batch of them run as one static batch - prompts left-padded
to the longest, prefilled together, then decoded together (one compiled step with CUDA graphs, as
bench/torch/decode.py) until the batch's longest output is done; no request joins or leaves a
running batch. The model is decode.py's Llama (random weights, bf16, the llama-1b shape by
default; the vocabulary is --vocab, as the served model's). Reports what serve_load reports:
output tokens/s, TTFT and ITL p50/p99 (one RESULT line).

Usage: python3 bench/torch/serve_static.py --rate 16 [--requests 1000] [--batch 32]
         [--shape llama-1b] [--vocab 4096] [--max-context 2048]
"""
import argparse
import math
import random
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode import SHAPES, Llama  # noqa: E402


def requests(a):
    rng = random.Random(a.seed)
    t, out = 0.0, []
    for _ in range(a.requests):
        p = min(max(int(rng.lognormvariate(math.log(a.prompt_median), a.sigma)), 4),
                a.max_context // 2)
        o = min(max(int(rng.lognormvariate(math.log(a.output_median), a.sigma)), 1),
                a.max_context - p)
        out.append((t, [rng.randrange(a.vocab) for _ in range(p)], o))
        if a.rate > 0:
            t += rng.expovariate(a.rate)
    return out


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))] if v else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--prompt-median", type=float, default=220)
    ap.add_argument("--output-median", type=float, default=180)
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    shape = list(SHAPES[a.shape])
    shape[6] = a.vocab
    L, B = a.max_context, a.batch
    with torch.no_grad():
        model = Llama(tuple(shape), "bf16", "cuda", B, L).eval()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    reqs = requests(a)
    ttft, itl, out_tokens = [], [], 0
    start = time.perf_counter()
    i = 0
    with torch.no_grad():
        while i < len(reqs):
            now = time.perf_counter() - start
            if reqs[i][0] > now:
                time.sleep(reqs[i][0] - now)
                continue
            batch = []
            while i < len(reqs) and len(batch) < B and reqs[i][0] <= time.perf_counter() - start:
                batch.append(reqs[i])
                i += 1
            plen = max(len(r[1]) for r in batch)
            olen = max(r[2] for r in batch)
            tokens = torch.zeros(B, plen, dtype=torch.long)
            valid = torch.zeros(B, L, dtype=torch.bool)
            for b, (_, p, _) in enumerate(batch):
                tokens[b, plen - len(p):] = torch.tensor(p)
                valid[b, plen - len(p):] = True
            valid[len(batch):, plen - 1:] = True  # idle rows attend to something
            valid[:, plen:] = True
            tokens, valid = tokens.cuda(), valid.cuda()
            logits = model(tokens, torch.arange(plen, device="cuda"), valid)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            nxt.cpu()
            t_prev = time.perf_counter() - start
            for arrival, _, _ in batch:
                ttft.append(t_prev - arrival)
            for s in range(1, olen):
                logits = step(nxt, torch.tensor([plen + s - 1], device="cuda"), valid)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                nxt.cpu()
                t = time.perf_counter() - start
                itl.extend([t - t_prev] * sum(1 for r in batch if r[2] > s))
                t_prev = t
            out_tokens += sum(r[2] for r in batch)
    wall = time.perf_counter() - start
    print(f"torch static batch {B}: {len(reqs)} requests, rate {a.rate}, {out_tokens} output tokens "
          f"in {wall:.2f} s: {out_tokens / wall:.1f} tokens/s; TTFT p50 {pct(ttft, .5) * 1e3:.0f} ms "
          f"p99 {pct(ttft, .99) * 1e3:.0f} ms; ITL p50 {pct(itl, .5) * 1e3:.2f} ms "
          f"p99 {pct(itl, .99) * 1e3:.2f} ms")
    print(f"RESULT rate={a.rate} ok={len(reqs)} output_tokens_per_s={out_tokens / wall:.2f} "
          f"ttft_p50_ms={pct(ttft, .5) * 1e3:.2f} ttft_p99_ms={pct(ttft, .99) * 1e3:.2f} "
          f"itl_p50_ms={pct(itl, .5) * 1e3:.3f} itl_p99_ms={pct(itl, .99) * 1e3:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
