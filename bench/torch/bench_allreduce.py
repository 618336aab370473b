"""The all-reduce sweep of bench/cuda/bench_allreduce.cpp through torch.distributed (backend nccl):
NCCL's own figure as PyTorch drives it, the peer for Tessera's Communicator. Same sizes, dtypes,
warm-up, timed calls, checks, table and JSON lines (impl "torch"). One process per GPU:
  torchrun --standalone --nproc_per_node N bench/torch/bench_allreduce.py [--json FILE]
In-place sum; time = the slowest rank's mean per call over back-to-back calls timed with CUDA
events; algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests), GB = 1e9 bytes.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
PERIOD = 7  # check values (i % 7) + rank: small integers, exact in bf16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="", help="write one JSON object per size here (rank 0)")
    p.add_argument("--dtypes", default="bf16,f32")
    p.add_argument("--min-bytes", type=int, default=1 << 20)
    p.add_argument("--max-bytes", type=int, default=1 << 30)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-check", action="store_true")
    a = p.parse_args()
    names = a.dtypes.split(",")
    bad = [n for n in names if n not in DTYPES]
    if bad:
        p.error(f"--dtypes takes bf16 and/or f32, got {bad}")
    if a.factor < 2 or a.min_bytes < 1 or a.min_bytes > a.max_bytes or a.warmup < 1 or a.iters < 1:
        p.error("need factor >= 2, 1 <= min-bytes <= max-bytes, warmup >= 1, iters >= 1")
    a.dtypes = names
    return a


def check_once(buf, rank, size):
    """One all-reduce of x[i] = (i % 7) + rank against its exact sum; wrong elements (all ranks)."""
    k = torch.arange(buf.numel(), device=buf.device, dtype=torch.int32) % PERIOD
    buf.copy_(k + rank)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    expect = (k * size + size * (size - 1) // 2).to(buf.dtype)
    wrong = (buf != expect).sum().to(torch.int64)
    dist.all_reduce(wrong, op=dist.ReduceOp.SUM)
    return int(wrong.item())


def time_us(buf, warmup, iters):
    """Slowest rank's mean microseconds per call; zeros keep the repeated in-place sums finite."""
    buf.zero_()
    for _ in range(warmup):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    torch.cuda.synchronize()
    dist.barrier()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    stop.record()
    stop.synchronize()
    us = torch.tensor([start.elapsed_time(stop) * 1e3 / iters], device=buf.device,
                      dtype=torch.float64)
    dist.all_reduce(us, op=dist.ReduceOp.MAX)
    return float(us.item())


def main():
    a = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before NCCL initializes (as bench/gpu.sh does)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, n = dist.get_rank(), dist.get_world_size()
    bus_factor = 2.0 * (n - 1) / n
    v = torch.cuda.nccl.version()  # a tuple in current PyTorch, an int (e.g. 22803) in old ones
    nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    out = open(a.json, "w") if a.json and rank == 0 else None
    if rank == 0:
        print(f"all_reduce (sum, in place) through torch.distributed {torch.__version__} on NCCL "
              f"{nccl}: {n} ranks, {a.warmup} warm-up + {a.iters} timed calls per size; time = "
              f"slowest rank's mean per call; algbw = bytes/time, busbw = algbw*2(n-1)/n, "
              f"GB = 1e9 bytes" + (" (one rank: busbw is 0)" if n == 1 else ""), flush=True)
        print(f"{'dtype':<6} {'bytes':>12} {'count':>11} {'time_us':>11} {'algbw_GB/s':>11} "
              f"{'busbw_GB/s':>11}  check", flush=True)
    # One buffer of the largest size; every size is a prefix view of it.
    storage = torch.empty(a.max_bytes, dtype=torch.uint8, device="cuda")
    total_wrong = 0
    for name in a.dtypes:
        dtype = DTYPES[name]
        elem = torch.tensor([], dtype=dtype).element_size()
        full = storage[: a.max_bytes // elem * elem].view(dtype)
        nbytes = a.min_bytes
        while nbytes <= a.max_bytes:
            count = nbytes // elem
            buf = full[:count]
            check = "skipped"
            if not a.no_check:
                wrong = check_once(buf, rank, n)
                total_wrong += wrong
                check = "ok" if wrong == 0 else f"FAILED ({wrong} wrong)"
            us = time_us(buf, a.warmup, a.iters)
            algbw = count * elem / (us * 1e-6) / 1e9
            busbw = algbw * bus_factor
            if rank == 0:
                print(f"{name:<6} {count * elem:>12} {count:>11} {us:>11.1f} {algbw:>11.2f} "
                      f"{busbw:>11.2f}  {check}", flush=True)
                if out:
                    out.write(json.dumps({
                        "impl": "torch", "op": "all_reduce", "dtype": name,
                        "bytes": count * elem, "count": count, "ranks": n,
                        "time_us": round(us, 3), "algbw_gbs": round(algbw, 3),
                        "busbw_gbs": round(busbw, 3),
                        "check": "FAILED" if check.startswith("FAILED") else check,
                        "torch": torch.__version__, "nccl": nccl}) + "\n")
            nbytes *= a.factor
    if out:
        out.close()
    dist.destroy_process_group()
    if total_wrong:
        if rank == 0:
            print(f"bench_allreduce.py: {total_wrong} wrong elements in total: the sums are wrong")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
