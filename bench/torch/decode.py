"""The PyTorch peer of bench/infer/decode_bench.cpp: a compiled decode loop as gpt-fast writes it.

A Llama (RMSNorm, RoPE, GQA, SwiGLU) with random weights, a static KV cache of
(B, Hkv, max_len, D) per layer, greedy decoding one token at a time through
torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs). Weights: bf16; int8
weight-only per output channel (gpt-fast's WeightOnlyInt8Linear: the int8 weight cast in the
compiled matmul, times the scales); int4 grouped through aten._weight_int4pack_mm (gpt-fast's
WeightOnlyInt4Linear, tinygemm), when this PyTorch has it. Prints one RESULT line per run, with
the same fields as the C++ benchmark.

Usage: python3 bench/torch/decode.py --shape llama-1b --weights bf16|int8|int4-g32|int4-g128
         [--batch 1] [--prompt 128] [--tokens 256] [--bandwidth-gbs 3350]
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # layers, hidden, heads, kv heads, head dim, ffn, vocab, tied
    "llama-1b": (16, 2048, 32, 8, 64, 8192, 128256, True),
    "llama3-8b": (32, 4096, 32, 8, 128, 14336, 128256, False),
}


class Int8Linear(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        scales = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", (w.float() / scales[:, None]).round().to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales


class Int4Linear(torch.nn.Module):
    """Group-wise asymmetric int4 in tinygemm's packed layout (gpt-fast's recipe)."""

    def __init__(self, w, group):
        super().__init__()
        n, k = w.shape
        wg = w.float().reshape(n, k // group, group)
        lo, hi = wg.amin(dim=2, keepdim=True), wg.amax(dim=2, keepdim=True)
        scales = ((hi - lo).clamp(min=1e-6) / 15.0)
        zeros = lo + scales * 8.0
        q = ((wg - lo) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
        sz = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], dim=2)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(torch.bfloat16))
        self.group = group
        self.out_features = n

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]), self.weight, self.group,
                                              self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features)


def make_linear(n, k, fmt, device):
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    if fmt == "bf16":
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        return lin
    if fmt == "int8":
        return Int8Linear(w)
    return Int4Linear(w, int(fmt.split("-g")[1]))


def rope(x, cos, sin):  # x (B, T, H, D), rotate_half pairing
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, c, fmt, device, batch, max_len):
        super().__init__()
        _, hidden, heads, kv, hd, ffn, _, _ = c
        self.heads, self.kv, self.hd = heads, kv, hd
        self.wq = make_linear(heads * hd, hidden, fmt, device)
        self.wk = make_linear(kv * hd, hidden, fmt, device)
        self.wv = make_linear(kv * hd, hidden, fmt, device)
        self.wo = make_linear(hidden, heads * hd, fmt, device)
        self.gate = make_linear(ffn, hidden, fmt, device)
        self.up = make_linear(ffn, hidden, fmt, device)
        self.down = make_linear(hidden, ffn, fmt, device)
        self.ln1 = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=torch.bfloat16)
        self.ln2 = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=torch.bfloat16)
        shape = (batch, kv, max_len, hd)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=torch.bfloat16))
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=torch.bfloat16))

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        h = self.ln1(x)
        q = rope(self.wq(h).view(b, t, self.heads, self.hd), cos, sin).transpose(1, 2)
        k = rope(self.wk(h).view(b, t, self.kv, self.hd), cos, sin).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                           enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(torch.nn.Module):
    def __init__(self, c, fmt, device, batch, max_len):
        super().__init__()
        layers, hidden, _, _, hd, _, vocab, tied = c
        self.embed = torch.nn.Embedding(vocab, hidden, device=device, dtype=torch.bfloat16)
        self.blocks = torch.nn.ModuleList(
            [Block(c, fmt, device, batch, max_len) for _ in range(layers)])
        self.norm = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=torch.bfloat16)
        self.head = None if tied else make_linear(vocab, hidden, "bf16", device)
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        ang = torch.arange(max_len, device=device).float()[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().to(torch.bfloat16))
        self.register_buffer("sin", ang.sin().to(torch.bfloat16))
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))
        self.register_buffer("causal", causal)

    def forward(self, tokens, pos, key_valid=None):  # tokens (B, T), pos (T), key_valid (B, L)
        x = self.embed(tokens)
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        mask = self.causal[pos][None, None]
        if key_valid is not None:  # left-padded static batches: padding keys are masked out
            mask = mask & key_valid[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, mask)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)


def weight_bytes(model):
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if "cache" not in n and n not in ("cos", "sin", "causal")) + sum(
        p.numel() * p.element_size() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bandwidth-gbs", type=float, default=0.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    c = SHAPES[a.shape]
    max_len = a.prompt + a.tokens
    try:
        with torch.no_grad():
            model = Llama(c, a.weights, "cuda", a.batch, max_len).eval()
    except (RuntimeError, AttributeError) as e:
        print(f"RESULT shape={a.shape} weights={a.weights} batch={a.batch} unavailable: "
              f"{str(e).splitlines()[0]}")
        return 0
    decode = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    tokens = torch.randint(0, c[6], (a.batch, a.prompt), device="cuda")
    times = []
    with torch.no_grad():
        logits = model(tokens, torch.arange(a.prompt, device="cuda"))
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(a.tokens):
            pos = torch.tensor([a.prompt + i], device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = decode(nxt, pos)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            nxt.item()  # the token reaches the host, as a serving loop needs it
            times.append(time.perf_counter() - t0)
    steady = sorted(times[min(16, len(times) // 4):])
    med = steady[len(steady) // 2]
    _, _, _, kv, hd, _, _, _ = c
    kv_bytes = a.batch * (a.prompt + a.tokens / 2) * 2 * c[0] * kv * hd * 2
    roof = (weight_bytes(model) + kv_bytes) / (a.bandwidth_gbs * 1e9) if a.bandwidth_gbs else 0
    print(f"torch decode shape={a.shape} weights={a.weights} batch={a.batch}: "
          f"{weight_bytes(model) / 1e9:.3f} GB weights, step median {med * 1e3:.3f} ms, "
          f"{a.batch / med:.1f} tokens/s" + (f", {100 * roof / med:.1f}% of roofline" if roof else ""))
    print(f"RESULT shape={a.shape} weights={a.weights} batch={a.batch} tokens_per_s={a.batch / med:.2f}"
          f" step_ms={med * 1e3:.4f} roofline_fraction={roof / med if roof else 0:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
