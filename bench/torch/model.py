"""The Tessera Transformer in PyTorch: the golden reference for the CPU tests and the peer that the
GPU benchmarks race. Same architecture, parameter names and weight layout as src/model, loading
Tessera's HDF5 checkpoints (shard files with /tensors/<global name>, see src/io/checkpoint.h).

Families: gpt2 (LayerNorm, learned positions, GELU-tanh, biases, tied head) and llama (RMSNorm,
RoPE rotate-half, SwiGLU, no biases, GQA, optional QK-norm, untied head).
Shapes: B batch, T time, C width, V padded vocab, Hq/Hkv heads, D head dim.
"""
import glob
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    def __init__(self, d):
        self.family = d["family"]
        self.vocab_size = d["vocab_size"]
        self.padded_vocab_size = d["padded_vocab_size"]
        self.num_layers = d["num_layers"]
        self.hidden = d["hidden"]
        self.num_heads = d["num_heads"]
        self.num_kv_heads = d["num_kv_heads"]
        self.head_dim = d.get("head_dim") or d["hidden"] // d["num_heads"]
        self.ffn_hidden = d["ffn_hidden"]
        self.max_seq_len = d["max_seq_len"]
        self.norm = d["norm"]
        # float(): a recipe's YAML writes 1e-05, which YAML 1.1 (PyYAML) reads as a string.
        self.norm_eps = float(d["norm_eps"])
        self.position = d["position"]
        self.rope_theta = float(d["rope_theta"])
        self.activation = d["activation"]
        self.bias = d["bias"]
        self.tied_embeddings = d["tied_embeddings"]
        self.qk_norm = d["qk_norm"]


def make_norm(cfg, width):
    if cfg.norm == "layernorm":
        return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(width, eps=cfg.norm_eps)


def rope_tables(cfg, T, device):
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, D/2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x, cos, sin):  # x (B, T, H, D): pair i with i + D/2 (rotate_half)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, D, Hq, Hkv = cfg.hidden, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.wq = nn.Linear(C, Hq * D, bias=cfg.bias)
        self.wk = nn.Linear(C, Hkv * D, bias=cfg.bias)
        self.wv = nn.Linear(C, Hkv * D, bias=cfg.bias)
        self.wo = nn.Linear(Hq * D, C, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(D, eps=cfg.norm_eps)

    def forward(self, x, rope):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = self.wk(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.wv(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Query head h uses KV head h // (Hq / Hkv), as Tessera does.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True,
                                           enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim))


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gelu = cfg.activation == "gelu"
        C, Fh = cfg.hidden, cfg.ffn_hidden
        if self.gelu:
            self.fc = nn.Linear(C, Fh, bias=cfg.bias)
            self.proj = nn.Linear(Fh, C, bias=cfg.bias)
        else:
            self.gate = nn.Linear(C, Fh, bias=cfg.bias)
            self.up = nn.Linear(C, Fh, bias=cfg.bias)
            self.down = nn.Linear(Fh, C, bias=cfg.bias)

    def forward(self, x):
        if self.gelu:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg, cfg.hidden)
        self.mlp = Mlp(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Parameter(torch.empty(cfg.padded_vocab_size, cfg.hidden))
        if cfg.position == "learned":
            self.wpe = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg, cfg.hidden)
        if not cfg.tied_embeddings:
            self.lm_head = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=False)
        for p in self.parameters():  # the benchmark starts from a GPT-2-like init
            nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(m.weight)

    def tessera_names(self):
        """Maps Tessera's global parameter names to this module's parameters."""
        # The module tree mirrors src/model, so PyTorch's names are Tessera's names.
        return dict(self.named_parameters())

    def forward(self, tokens, targets=None):
        cfg = self.cfg
        B, T = tokens.shape
        x = self.embed.wte[tokens]
        rope = None
        if cfg.position == "learned":
            x = x + self.embed.wpe[:T][None]
        else:
            rope = rope_tables(cfg, T, tokens.device)
        for layer in self.layers:
            x = layer(x, rope)
        x = self.final_norm(x)
        head = self.embed.wte if cfg.tied_embeddings else self.lm_head.weight
        logits = x @ head.t()  # (B, T, V)
        if targets is None:
            return logits, None
        # Padding columns (>= vocab_size) never enter the softmax; target -1 is ignored.
        loss = F.cross_entropy(logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size).float(),
                               targets.reshape(-1), ignore_index=-1)
        return logits, loss


def read_checkpoint(step_dir):
    """Returns ({name: tensor}, {meta key: str}) from a single- or multi-shard Tessera checkpoint
    (whole tensors only: shards are assembled by offset)."""
    import h5py
    import numpy as np

    tensors, meta = {}, {}
    for path in sorted(glob.glob(os.path.join(step_dir, "shard_*_of_*.h5"))):
        with h5py.File(path, "r") as f:
            for name, ds in f["tensors"].items():
                shape = tuple(ds.attrs["global_shape"])
                off = tuple(ds.attrs["offset"])
                if name not in tensors:
                    tensors[name] = np.zeros(shape, dtype=ds.dtype)
                box = tuple(slice(o, o + s) for o, s in zip(off, ds.shape))
                tensors[name][box] = ds[...]
            if "meta" in f:
                for k, ds in f["meta"].items():
                    v = ds[()]
                    meta[k] = v.decode() if isinstance(v, bytes) else str(v)
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, meta


def load_tessera_weights(model, tensors):
    names = model.tessera_names()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"checkpoint lacks {missing}")
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(tensors[n].to(p.dtype))
