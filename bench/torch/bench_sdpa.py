"""PyTorch's F.scaled_dot_product_attention at the shapes of bench/cuda/bench_attention_cudnn.cu:
the peer for our cuDNN attention. Causal, bf16, q/k/v stored (B, T, H, D) and viewed (B, H, T, D)
as ours are; each SDPA backend PyTorch has (flash, cuDNN, memory-efficient) timed alone, with GQA
through enable_gqa or, where a backend refuses that, k/v expanded to Hq heads (labelled "+rep").
Also times an 8192^3 bf16 matmul: the device's matrix ceiling in the same run.
FLOP convention as the C++ benchmark: causal fwd = 4*B*Hq*T^2*D/2, bwd = 2.5 x fwd.
Median of 30 timed reps after 5 warm-ups, CUDA events. Usage: python3 bench/torch/bench_sdpa.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = [  # name, B, T, Hq, Hkv, D (same as bench_attention_cudnn.cu)
    ("gpt2", 32, 1024, 12, 12, 64),
    ("llama1b", 8, 2048, 32, 8, 128),
    ("llama_t4096", 8, 4096, 16, 4, 128),
]
BACKENDS = [
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
]


def median_ms(fn, warmup=5, reps=30):
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


def run_backend(label, backend, name, b, t, hq, hkv, d, expand):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def leaf(heads):  # (B, T, H, D) storage, like Tessera's activations
        return torch.randn(b, t, heads, d, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_()

    qm, km, vm = leaf(hq), leaf(hkv), leaf(hkv)
    dout = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    def forward():
        q, k, v = qm.transpose(1, 2), km.transpose(1, 2), vm.transpose(1, 2)
        if expand and hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)

    with sdpa_kernel([backend]):
        out = forward()
        fwd_ms = median_ms(forward)
        bwd_ms = median_ms(
            lambda: torch.autograd.grad(out, (qm, km, vm), dout, retain_graph=True))
    fwd_flop = 4.0 * b * hq * t * t * d / 2
    tag = f"torch-{label}{'+rep' if expand and hq != hkv else ''}"
    print(f"{tag:<16} {name:<12} B={b} T={t} Hq={hq} Hkv={hkv} D={d}"
          f"  fwd {fwd_ms:.3f} ms {fwd_flop / fwd_ms * 1e-9:6.1f} TFLOP/s"
          f"  bwd {bwd_ms:.3f} ms {2.5 * fwd_flop / bwd_ms * 1e-9:6.1f} TFLOP/s", flush=True)


def main():
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    print(f"torch-matmul     8192^3 bf16  {ms:.3f} ms {2 * 8192**3 / ms * 1e-9:6.1f} TFLOP/s",
          flush=True)
    del a, b
    for case in CASES:
        for label, backend in BACKENDS:
            for expand in ((False, True) if case[3] != case[4] else (False,)):
                try:
                    run_backend(label, backend, *case, expand)
                    break
                except RuntimeError as e:  # backend refuses the shape (or GQA): say so
                    if expand or case[3] == case[4]:  # the last attempt
                        print(f"torch-{label:<10} {case[0]:<12} n/a: {str(e).splitlines()[0]}",
                              flush=True)
                finally:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
