"""PyTorch's grouped GEMM, torch._grouped_mm (bf16, CUTLASS on sm_90), at the shapes and routings
of bench/grouped_gemm_bench.cpp: the peer of our ops::grouped_gemm_forward / _backward. Each pass
as PyTorch's own autograd formula for _grouped_mm runs it, beside a dense torch.matmul (cuBLAS)
of the same FLOPs:
  forward  y  = _grouped_mm(x, w^T, offs)      x (R,K'), w (G,N',K')
  dgrad    dx = _grouped_mm(dy, w, offs)       dy (R,N')
  wgrad    dw = _grouped_mm(x^T, dy, offs)     (G,K',N'): ragged K, PyTorch's mat2 gradient
FLOPs = 2 R N' K'. Median of CUDA-event-timed reps after warm-up, random bf16 data.
Usage: python3 bench/torch/grouped_gemm.py --counts FILE   (FILE written by grouped_gemm_bench)
"""
import argparse

import torch


def median_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def run(model, gemm, routing, kk, nn, counts):
    dev, bf16 = "cuda", torch.bfloat16
    groups, rows = len(counts), sum(counts)
    offs = torch.cumsum(torch.tensor(counts, device=dev, dtype=torch.int64), 0).to(torch.int32)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, kk, device=dev, dtype=bf16, generator=gen)
    w = torch.randn(groups, nn, kk, device=dev, dtype=bf16, generator=gen) / kk**0.5
    dy = torch.randn(rows, nn, device=dev, dtype=bf16, generator=gen)
    passes = [
        ("forward", lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
         lambda: torch.matmul(x, w[0].t())),
        ("dgrad", lambda: torch._grouped_mm(dy, w, offs=offs), lambda: torch.matmul(dy, w[0])),
        ("wgrad", lambda: torch._grouped_mm(x.t(), dy, offs=offs), lambda: torch.matmul(x.t(), dy)),
    ]
    flops = 2.0 * rows * nn * kk
    # The grouped product against a per-group loop once (first and last group), before timing.
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    for g in (0, groups - 1):
        lo, hi = int(offs[g].item()) - counts[g], int(offs[g].item())
        if hi > lo:
            ref = x[lo:hi].float() @ w[g].float().t()
            err = ((y[lo:hi].float() - ref).norm() / ref.norm()).item()
            print(f"check {model} {gemm} {routing} forward group {g} rel_l2 {err:.2e}")
    for name, grouped, dense in passes:
        try:
            ms = median_ms(grouped)
        except RuntimeError as e:  # an orientation this PyTorch build does not take
            print(f"{model:14s} {gemm:8s} {routing:10s} {name:12s} torch._grouped_mm failed: {e}")
            continue
        dense_ms = median_ms(dense)
        print(f"{model:14s} {gemm:8s} {routing:10s} {name:12s} R={rows:<6d} N'={nn:<5d} "
              f"K'={kk:<5d} | torch._grouped_mm {ms:7.3f} ms {flops / ms * 1e-9:6.1f} TFLOP/s | "
              f"torch.matmul {dense_ms:7.3f} ms {flops / dense_ms * 1e-9:6.1f} TFLOP/s | "
              f"{100.0 * dense_ms / ms:5.1f}% of dense")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", required=True)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with open(args.counts) as f:
        for line in f:
            model, gemm, routing, kk, nn, *counts = line.split()
            run(model, gemm, routing, int(kk), int(nn), [int(c) for c in counts])


if __name__ == "__main__":
    main()
