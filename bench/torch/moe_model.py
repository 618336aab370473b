"""The Tessera Mixture-of-Experts Transformer in PyTorch: model.py's blocks with, in the blocks the
recipe's moe section names, an MoE layer in place of the MLP — the same routing rule, losses,
parameter names and weight layout as src/model/moe.cpp (see kernels/ops_moe.h for the op contract).

MoE layer (N tokens, C width, E experts, K top-k, R = N*K rows, Fe expert width):
  router    logits = x W_r^T in FP32 (input and weight widened; W_r (E, C), no bias);
            probs = softmax(logits); the K largest probs, descending, ties to the lower expert; their
            weights renormalised to sum 1 when norm_topk_prob
  dispatch  the N*K slots (slot s = t*K + j) sorted stably by expert; dropless when
            capacity_factor is 0, else slots past ceil(cf * N * K / E) in their expert get weight 0
            (Tessera skips their rows; here they are computed and masked: same values and
            gradients, more work)
  experts   SwiGLU: down(silu(gate x) * up x), gate/up (E, Fe, C), down (E, C, Fe); GELU-tanh:
            proj(gelu(fc x)), fc (E, Fe, C), proj (E, C, Fe); no biases. One grouped GEMM per
            weight (torch._grouped_mm over the expert-sorted rows), or a loop over experts
  combine   y[t] = sum_j w[t,j] * expert_{idx[t,j]}(x[t]), summed in FP32 (index_add)
  shared    shared_experts experts of width shared_ffn_hidden as one Mlp of width S*Fs, added
  losses    aux = aux_loss_coef * E * sum_e f_e P_e, f_e = count_e / (N K) (counts before dropping,
            no gradient), P_e = mean_t probs[t,e]; z = z_loss_coef * mean_t logsumexp(logits_t)^2;
            both returned per forward, summed over the MoE layers, for the caller to add to the loss.
Block i is MoE when i >= first_dense_layers and (i - first_dense_layers) % every == 0.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, Embed, Mlp, make_norm, rope_tables

# torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None) (PyTorch >= 2.8): for a 2-D
# mat_a (R, K') and a 3-D mat_b (G, K', N'), offs (G) int32 holds the cumulative END row of each
# group; rows offs[g-1]..offs[g] of the output (R, N') are mat_a's rows times mat_b[g]. The output
# dtype is mat_a's; bf16 on sm90/sm100 takes the CUTLASS path (no host sync), anything else a loop
# of mm calls. mat_b may be a transposed view (its last two strides (1, K') are accepted).
_GROUPED_MM = getattr(torch, "_grouped_mm", None)


class MoeConfig:
    """The recipe's moe section, defaults and 'auto' resolved as src/config/recipe.cpp does."""

    def __init__(self, d, model_ffn_hidden):
        d = dict(d or {})

        def width(v, default):
            return default if v in (None, 0, "auto") else int(v)

        self.num_experts = int(d.get("num_experts", 0))
        self.topk = int(d.get("topk", 2))
        self.ffn_hidden = width(d.get("ffn_hidden"), int(model_ffn_hidden))
        self.shared_experts = int(d.get("shared_experts", 0))
        self.shared_ffn_hidden = width(d.get("shared_ffn_hidden"), self.ffn_hidden)
        self.norm_topk_prob = bool(d.get("norm_topk_prob", True))
        self.first_dense_layers = int(d.get("first_dense_layers", 0))
        self.every = int(d.get("every", 1))
        self.capacity_factor = float(d.get("capacity_factor", 0.0))
        self.aux_loss_coef = float(d.get("aux_loss_coef", 0.01))
        self.z_loss_coef = float(d.get("z_loss_coef", 0.0))
        if self.enabled() and not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"moe.topk {self.topk} must be in [1, num_experts {self.num_experts}]")

    def enabled(self):
        return self.num_experts > 0

    def is_moe_layer(self, layer):
        return (self.enabled() and layer >= self.first_dense_layers
                and (layer - self.first_dense_layers) % self.every == 0)

    def num_moe_layers(self, num_layers):
        return sum(1 for i in range(num_layers) if self.is_moe_layer(i))

    def capacity(self, tokens):
        """Slots per expert for `tokens` tokens; 0: dropless (src/config/moe_config.cpp)."""
        if self.capacity_factor <= 0 or not self.enabled():
            return 0
        return max(1, int(math.ceil(self.capacity_factor * tokens * self.topk / self.num_experts)))


def num_params(cfg):
    """ModelConfig::num_params (src/config/model_config.cpp), term for term."""
    V, C, Fh = cfg.padded_vocab_size, cfg.hidden, cfg.ffn_hidden
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    m = cfg.moe
    norm_params = 2 * C if (cfg.norm == "layernorm" and cfg.bias) else C
    total = V * C
    if cfg.position == "learned":
        total += cfg.max_seq_len * C
    layer = 2 * norm_params + C * Hq * D + 2 * C * Hkv * D + Hq * D * C
    if cfg.bias:
        layer += Hq * D + 2 * Hkv * D + C
    if cfg.qk_norm:
        layer += 2 * D
    mats = 2 if cfg.activation == "gelu" else 3

    def mlp(w):
        return mats * C * w + ((mats - 1) * w + C if cfg.bias else 0)

    for i in range(cfg.num_layers):
        total += layer
        if not m.is_moe_layer(i):
            total += mlp(Fh)
            continue
        E = m.num_experts
        total += E * C + E * mats * C * m.ffn_hidden
        if m.shared_experts > 0:
            total += mlp(m.shared_experts * m.shared_ffn_hidden)
    total += norm_params
    if not cfg.tied_embeddings:
        total += V * C
    return total


def num_active_params(cfg):
    """ModelConfig::num_active_params: num_params less the E-K routed experts a token skips."""
    m = cfg.moe
    if not m.enabled():
        return num_params(cfg)
    mats = 2 if cfg.activation == "gelu" else 3
    idle = (m.num_experts - m.topk) * mats * cfg.hidden * m.ffn_hidden
    return num_params(cfg) - m.num_moe_layers(cfg.num_layers) * idle


def grouped_mm_available():
    return _GROUPED_MM is not None and torch.cuda.is_available()


class _Weight(nn.Module):  # holds `.weight`, so that names read experts.gate.weight as Tessera's
    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


def expert_mm(a, w, offs, counts_list):
    """a (R, in): rows sorted by expert; w (E, out, in). Returns (R, out), row r times w[e]^T for its
    expert e. counts_list None: one torch._grouped_mm (offs = cumulative int32 row counts);
    else a loop over the experts' row blocks (counts_list: Python ints)."""
    wt = w.to(a.dtype).transpose(-2, -1)  # (E, in, out), a view: grouped_mm's (G, K', N')
    if counts_list is None:
        return _GROUPED_MM(a, wt, offs=offs)
    parts = torch.split(a, counts_list, dim=0)
    return torch.cat([p @ wt[e] for e, p in enumerate(parts)], dim=0)


class Experts(nn.Module):
    def __init__(self, cfg, m):
        super().__init__()
        E, Fe, C = m.num_experts, m.ffn_hidden, cfg.hidden
        self.gelu = cfg.activation == "gelu"
        if self.gelu:
            self.fc = _Weight(E, Fe, C)
            self.proj = _Weight(E, C, Fe)
        else:
            self.gate = _Weight(E, Fe, C)
            self.up = _Weight(E, Fe, C)
            self.down = _Weight(E, C, Fe)

    def forward(self, xp, offs, counts_list):
        if self.gelu:
            h = expert_mm(xp, self.fc.weight, offs, counts_list)
            return expert_mm(F.gelu(h, approximate="tanh"), self.proj.weight, offs, counts_list)
        h = expert_mm(xp, self.gate.weight, offs, counts_list)
        u = expert_mm(xp, self.up.weight, offs, counts_list)
        return expert_mm(F.silu(h) * u, self.down.weight, offs, counts_list)


class MoeLayer(nn.Module):
    """impl: 'grouped_mm' (torch._grouped_mm) or 'loop' (one matmul per expert; syncs the host).
    compute_dtype: the experts' GEMM dtype (bf16 for the benchmark; float32 for a CPU reference)."""

    def __init__(self, cfg, impl=None, compute_dtype=torch.bfloat16):
        super().__init__()
        m = cfg.moe
        self.m = m
        self.router = nn.Linear(cfg.hidden, m.num_experts, bias=False)  # weight (E, C)
        self.experts = Experts(cfg, m)
        self.shared = None
        if m.shared_experts > 0:
            sc = copy.copy(cfg)
            sc.ffn_hidden = m.shared_experts * m.shared_ffn_hidden
            self.shared = Mlp(sc)
        self.impl = impl or ("grouped_mm" if grouped_mm_available() else "loop")
        self.compute_dtype = compute_dtype

    def route(self, x):
        """x (N, C) -> logits, probs (N, E), lse (N), topk_idx (N, K) int64, topk_w (N, K); FP32."""
        m = self.m
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
            lse = torch.logsumexp(logits, dim=-1)
            probs = torch.softmax(logits, dim=-1)
            # The K largest, descending, ties to the lower expert (a stable sort: torch.topk does
            # not promise which of equal values it picks). (N, E) rows of E floats: cheap.
            vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
            topk_w, topk_idx = vals[:, : m.topk], idx[:, : m.topk]
            if m.norm_topk_prob:
                topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        return logits, probs, lse, topk_idx, topk_w

    def forward(self, x):
        """x (..., C) -> (y like x, the layer's aux + z loss: a 0-d FP32 tensor)."""
        m = self.m
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        N, C = xf.shape
        E, K = m.num_experts, m.topk
        R = N * K
        _, probs, lse, topk_idx, topk_w = self.route(xf)

        # Dispatch plan: rows sorted by expert (stable: slot order within an expert).
        flat = topk_idx.reshape(-1)                                        # (R) expert of slot s
        order = torch.argsort(flat, stable=True)                           # (R) slot of row r
        token = torch.div(order, K, rounding_mode="floor")                 # (R) token of row r
        counts = torch.zeros(E, dtype=torch.int64, device=xf.device).scatter_add_(
            0, flat, torch.ones_like(flat))                                # (E) before dropping
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)              # (E) row ends
        row_w = topk_w.reshape(-1)[order]                                  # (R) FP32
        cap = m.capacity(N)
        if cap > 0:  # position of each row within its expert; rows past the capacity weigh 0
            starts = offs.to(torch.int64) - counts
            pos = torch.arange(R, device=xf.device) - starts[flat[order]]
            row_w = row_w * (pos < cap).to(row_w.dtype)

        xp = xf.to(self.compute_dtype).index_select(0, token)              # (R, C)
        counts_list = None if self.impl == "grouped_mm" else counts.tolist()
        yp = self.experts(xp, offs, counts_list)                           # (R, C)
        # bf16 * FP32 promotes to FP32 (autograd keeps yp in bf16); FP32 sum over the K slots.
        y = torch.zeros(N, C, dtype=torch.float32, device=xf.device).index_add(
            0, token, yp * row_w.unsqueeze(1))
        y = y.to(x.dtype).reshape(shape)
        if self.shared is not None:
            y = y + self.shared(x)

        # Router losses (src/model/moe.cpp aux_scale, z_scale), FP32.
        loss = probs.new_zeros(())
        if m.aux_loss_coef > 0:
            loss = loss + (m.aux_loss_coef * E / (float(N) * N * K)) * (
                counts.to(probs.dtype) * probs.sum(dim=0)).sum()
        if m.z_loss_coef > 0:
            loss = loss + (m.z_loss_coef / N) * (lse * lse).sum()
        return y, loss


class MoeBlock(nn.Module):
    def __init__(self, cfg, layer, impl=None, compute_dtype=torch.bfloat16):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg, cfg.hidden)
        self.is_moe = cfg.moe.is_moe_layer(layer)
        if self.is_moe:
            self.moe = MoeLayer(cfg, impl, compute_dtype)
        else:
            self.mlp = Mlp(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.ln1(x), rope)
        if self.is_moe:
            y, loss = self.moe(self.ln2(x))
            return x + y, loss
        return x + self.mlp(self.ln2(x)), None


class MoeTransformer(nn.Module):
    """model.py's Transformer with MoE blocks. cfg: model.Config with a `moe` attribute (MoeConfig).
    forward(tokens, targets) -> (logits, cross-entropy loss or None, summed router losses)."""

    def __init__(self, cfg, impl=None, compute_dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.layers = nn.ModuleList([MoeBlock(cfg, i, impl, compute_dtype)
                                     for i in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg, cfg.hidden)
        if not cfg.tied_embeddings:
            self.lm_head = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=False)
        with torch.no_grad():  # model.py's GPT-2-like init
            for p in self.parameters():
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
            for mod in self.modules():
                if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                    nn.init.ones_(mod.weight)

    def set_expert_impl(self, impl):
        for mod in self.modules():
            if isinstance(mod, MoeLayer):
                mod.impl = impl

    def tessera_names(self):
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
        aux = None
        for layer in self.layers:
            x, a = layer(x, rope)
            if a is not None:
                aux = a if aux is None else aux + a
        if aux is None:
            aux = torch.zeros((), device=tokens.device)
        x = self.final_norm(x)
        head = self.embed.wte if cfg.tied_embeddings else self.lm_head.weight
        logits = x @ head.t()
        if targets is None:
            return logits, None, aux
        loss = F.cross_entropy(logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size).float(),
                               targets.reshape(-1), ignore_index=-1)
        return logits, loss, aux


# ---- self-check (run before timing: a wrong grouped GEMM layout must not be benchmarked) ---------

def _rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _check_grouped_mm(device):
    """torch._grouped_mm (bf16, transposed 3-D weight view, empty groups) against an FP32 loop,
    forward and both gradients. Returns the worst relative error."""
    g = torch.Generator(device=device).manual_seed(1)
    E, Cin, Cout = 4, 64, 96
    counts = [5, 0, 19, 8]
    R = sum(counts)
    a = torch.randn(R, Cin, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    w = (0.1 * torch.randn(E, Cout, Cin, device=device, generator=g)).requires_grad_()
    dy = torch.randn(R, Cout, device=device, generator=g)
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    y = expert_mm(a, w, offs, None)
    (y.float() * dy).sum().backward()
    a32 = a.detach().float().requires_grad_()
    w32 = w.detach().to(torch.bfloat16).float().requires_grad_()
    y32 = expert_mm(a32, w32, None, counts)
    (y32 * dy).sum().backward()
    return max(_rel_err(y, y32), _rel_err(a.grad, a32.grad), _rel_err(w.grad, w32.grad))


def _check_layer(device, impl):
    """A small MoE layer (impl, bf16 experts under autocast) against a dense FP32 reference: every
    expert on every token, gathered by the layer's own routing. Forward and gradients."""
    from model import Config
    d = dict(family="llama", vocab_size=32, padded_vocab_size=32, num_layers=1, hidden=64,
             num_heads=4, num_kv_heads=4, head_dim=16, ffn_hidden=96, max_seq_len=16,
             norm="rmsnorm", norm_eps=1e-6, position="rope", rope_theta=10000.0,
             activation="swiglu", bias=False, tied_embeddings=False, qk_norm=False)
    cfg = Config(d)
    cfg.moe = MoeConfig(dict(num_experts=4, topk=2, norm_topk_prob=True, aux_loss_coef=0.01,
                             z_loss_coef=0.001), cfg.ffn_hidden)
    torch.manual_seed(2)
    layer = MoeLayer(cfg, impl=impl).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.1)
    x = torch.randn(2, 24, 64, device=device, requires_grad=True)
    dy = torch.randn(2, 24, 64, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y, loss = layer(x)
    ((y.float() * dy).sum() + loss).backward()
    got = [y, x.grad] + [p.grad for p in layer.parameters()]

    x.grad = None
    for p in layer.parameters():
        p.grad = None
    xf = x.reshape(-1, 64)
    _, probs, lse, idx, w = layer.route(xf)
    ex = layer.experts
    # Weights rounded to bf16 as the layer's GEMMs see them; the rest in FP32.
    gw, uw, dw = (t.weight.to(torch.bfloat16).float() for t in (ex.gate, ex.up, ex.down))
    xb = xf.to(torch.bfloat16).float()
    h = torch.einsum("nc,efc->enf", xb, gw)
    u = torch.einsum("nc,efc->enf", xb, uw)
    yall = torch.einsum("enf,ecf->enc", F.silu(h) * u, dw)                  # (E, N, C)
    rows = torch.arange(xf.shape[0], device=device)
    yref = sum(w[:, j:j + 1] * yall[idx[:, j], rows] for j in range(idx.shape[1]))
    N, E, K = xf.shape[0], 4, 2
    counts = torch.bincount(idx.reshape(-1), minlength=E).float()
    lref = 0.01 * E / (N * N * K) * (counts * probs.sum(0)).sum() + 0.001 / N * (lse * lse).sum()
    ((yref.reshape(2, 24, 64) * dy).sum() + lref).backward()
    # Gradients of bf16-rounded weights flow to the FP32 parameters through .to(): same grads.
    want = [yref.reshape(2, 24, 64), x.grad] + [p.grad for p in layer.parameters()]
    errs = [_rel_err(a, b) for a, b in zip(got, want)]
    errs.append(abs(loss.item() - lref.item()) / max(abs(lref.item()), 1e-12))
    return max(errs)


def self_check(device="cuda", tol=5e-2):
    """Chooses the expert implementation: 'grouped_mm' when torch._grouped_mm exists, runs and
    matches the references, else 'loop' (checked too). Returns (impl, {name: result})."""
    info = {}
    impl = "loop"
    if _GROUPED_MM is None:
        info["grouped_mm"] = "torch._grouped_mm missing"
    else:
        try:
            e1 = _check_grouped_mm(device)
            e2 = _check_layer(device, "grouped_mm")
            info["grouped_mm"] = f"gemm rel err {e1:.2e}, layer rel err {e2:.2e}"
            if max(e1, e2) <= tol:
                impl = "grouped_mm"
            else:
                info["grouped_mm"] += " (MISMATCH: using the loop)"
        except Exception as e:  # noqa: BLE001 - any failure means: do not use it
            info["grouped_mm"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    if impl == "loop":
        try:
            e3 = _check_layer(device, "loop")
            info["loop"] = f"layer rel err {e3:.2e}" + ("" if e3 <= tol else " (MISMATCH)")
        except Exception as e:  # noqa: BLE001
            info["loop"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return impl, info
