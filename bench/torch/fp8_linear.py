"""FP8 linear layers for the PyTorch peer of the mixed-precision benchmark (bench_precision.py), on
torch._scaled_mm alone (no TransformerEngine, no torchao): per-tensor *current* scaling (each
tensor's scale from its own amax in the same step), E4M3 for activations and weights, E5M2 for
output gradients, FP32 master weights and weight gradients. Not a training recipe of its own:
only what the benchmark needs, checked against float64 by check() before it is timed.

Shapes: M rows (batch x time), K in features, N out features. torch._scaled_mm(a, b) wants `a`
row-major and `b` column-major, every dimension a multiple of 16, FP32 scalar scales that
*dequantize* (a_true = a_codes * scale_a), and never E5M2 on both sides.
"""
import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def quantize(x, dtype):
    """x (any shape) -> (codes in `dtype`, FP32 dequantization scale amax / fp8_max): the largest
    |x| maps to the format's largest finite value; the clamp only catches rounding at the top
    (a bare cast to e4m3fn would turn an out-of-range value into NaN)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)  # an all-zero tensor stays zero
    codes = (x.float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return codes, amax / fmax


class Fp8Matmul(torch.autograd.Function):
    """y (M, N) = x (M, K) @ w (N, K)^T with both operands in E4M3; backward in E5M2 x E4M3."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        xq, xs = quantize(x, E4M3)
        wq, ws = quantize(w, E4M3)
        # wq (N, K) row-major, so wq.t() (K, N) is the column-major `b` _scaled_mm wants.
        # Fast accumulation (no periodic promotion to FP32 in the tensor cores) in forward only,
        # as TransformerEngine does; the gradients accumulate carefully.
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype,
                             use_fast_accum=True)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wq, ws = ctx.saved_tensors
        gq, gs = quantize(gy, E5M2)
        # dx (M, K) = gy (M, N) @ w (N, K): `b` = w as column-major (N, K), a transposed copy.
        gx = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=gs, scale_b=ws,
                              out_dtype=ctx.x_dtype)
        # dw (N, K) = gy^T (N, M) @ x (M, K): `a` row-major (N, M), `b` column-major (M, K).
        gw = torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=gs,
                              scale_b=xs, out_dtype=torch.float32)
        return gx, gw, None


class Fp8Linear(nn.Module):
    """Wraps an nn.Linear (same weight and bias parameters) to run its GEMMs in FP8. Output and
    bias in `out_dtype`, the autocast dtype of the run (fixed here rather than asked of autocast
    at each call, which torch.compile might not trace through)."""

    def __init__(self, linear, out_dtype):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.out_dtype = out_dtype

    def forward(self, x):  # x (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.out_dtype)
        y = Fp8Matmul.apply(x2, self.weight, self.out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(self.out_dtype)
        return y.reshape(*lead, y.shape[-1])


def convert(model, out_dtype=torch.bfloat16):
    """Swaps every nn.Linear inside the Transformer blocks for an Fp8Linear (embedding, final norm
    and LM head stay in the autocast dtype, as TransformerEngine's and torchao's recipes leave
    them). Returns how many were swapped."""
    # Collected first: swapping children while modules() walks the tree would visit the new ones.
    targets = [(parent, name, child) for block in model.layers for parent in block.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Fp8Linear(child, out_dtype))
    return len(targets)


# Bounds on ||fp8 - f64|| / ||f64|| for normal random operands. E4M3 keeps 3 mantissa bits
# (round-off up to 2^-4 of a value, ~2.7% RMS), E5M2 2 bits (2^-3, ~5.4% RMS). A dot product
# of K independent terms carries the terms' RMS relative error: ~3.8% forward (two E4M3
# operands), ~6% for dx and dw (E5M2 x E4M3). The bounds give 2x margin; a wrong layout or
# scale errs by ~100% or more.
CHECK_BOUNDS = {"y": 0.08, "dx": 0.12, "dw": 0.12}


def check(device="cuda", shapes=((272, 528, 400), (1024, 2048, 512))):
    """Fp8Matmul against float64 on random inputs at the given (M, K, N): returns
    {"y"|"dx"|"dw": {"err": worst rel L2 over the shapes, "bound"}} and whether all pass."""
    g = torch.Generator(device=device).manual_seed(7)
    worst = {k: 0.0 for k in CHECK_BOUNDS}
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, generator=g)
        w = 0.02 * torch.randn(n, k, device=device, generator=g)
        gy = torch.randn(m, n, device=device, generator=g)
        xr = x.double().requires_grad_()
        wr = w.double().requires_grad_()
        (xr @ wr.t()).backward(gy.double())
        yr = (xr @ wr.t()).detach()
        x8 = x.bfloat16().requires_grad_()
        w8 = w.clone().requires_grad_()
        y8 = Fp8Matmul.apply(x8, w8, torch.bfloat16)
        y8.backward(gy.bfloat16())
        for key, got, ref in (("y", y8, yr), ("dx", x8.grad, xr.grad), ("dw", w8.grad, wr.grad)):
            got = got.double()
            err = ((got - ref).norm() / ref.norm()).item()
            if not torch.isfinite(got).all():
                err = float("inf")
            worst[key] = max(worst[key], err)
    res = {k: {"err": worst[k], "bound": CHECK_BOUNDS[k]} for k in worst}
    return res, all(v["err"] <= v["bound"] for v in res.values())
