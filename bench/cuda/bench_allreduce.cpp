// All-reduce bandwidth through tessera::Communicator on NCCL: an MPI program (one rank per GPU,
// `mpirun -np N bench_allreduce [--json FILE]`) that builds a ParallelContext with dp = world and
// times the dp communicator's in-place sum all_reduce on bf16 and f32 buffers of 1 MiB .. 1 GiB.
// Bandwidths follow nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n (GB = 1e9 bytes).
// PyTorch peer with the same sweep and output: bench/torch/bench_allreduce.py. Benchmark only.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/memory.h"
#include "parallel/mpi_runtime.h"
#include "parallel/nccl/nccl_check.h"
#include "parallel/parallel_context.h"

using namespace tessera;

namespace {

constexpr int kPatternPeriod = 7;  // check values (i % 7) + rank: small integers, exact in bf16

struct Options {
  std::string json_path;
  std::vector<DType> dtypes{DType::bf16, DType::f32};
  int64_t min_bytes = int64_t(1) << 20;
  int64_t max_bytes = int64_t(1) << 30;
  int factor = 2;
  int warmup = 5;
  int iters = 20;
  bool check = true;
};

int64_t parse_int(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v < 1)
    TS_USER_ERROR("bench_allreduce: {} needs a positive integer, got '{}'", flag, value);
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::printf(
          "usage: mpirun -np N bench_allreduce [--json FILE] [--dtypes bf16,f32] "
          "[--min-bytes B] [--max-bytes B] [--factor 2|4] [--warmup N] [--iters N] "
          "[--no-check]\n");
      std::exit(0);
    }
    if (a == "--no-check") {
      o.check = false;
      continue;
    }
    if (i + 1 >= argc) TS_USER_ERROR("bench_allreduce: {} needs a value", a);
    const std::string v = argv[++i];
    if (a == "--json") {
      o.json_path = v;
    } else if (a == "--min-bytes") {
      o.min_bytes = parse_int(a, v);
    } else if (a == "--max-bytes") {
      o.max_bytes = parse_int(a, v);
    } else if (a == "--factor") {
      o.factor = static_cast<int>(parse_int(a, v));
      if (o.factor < 2) TS_USER_ERROR("bench_allreduce: --factor must be >= 2, got {}", v);
    } else if (a == "--warmup") {
      o.warmup = static_cast<int>(parse_int(a, v));
    } else if (a == "--iters") {
      o.iters = static_cast<int>(parse_int(a, v));
    } else if (a == "--dtypes") {
      o.dtypes.clear();
      size_t start = 0;
      while (start <= v.size()) {
        const size_t comma = v.find(',', start);
        const std::string name =
            v.substr(start, comma == std::string::npos ? comma : comma - start);
        DType t{};
        if (!parse_dtype(name, &t) || (t != DType::bf16 && t != DType::f32))
          TS_USER_ERROR("bench_allreduce: --dtypes takes bf16 and/or f32, got '{}'", name);
        o.dtypes.push_back(t);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    } else {
      TS_USER_ERROR("bench_allreduce: unknown option '{}' (see --help)", a);
    }
  }
  if (o.min_bytes > o.max_bytes)
    TS_USER_ERROR("bench_allreduce: --min-bytes {} > --max-bytes {}", o.min_bytes, o.max_bytes);
  return o;
}

// The storage word of a small integer v: bf16 bits (W = uint16_t) or the f32 itself.
template <class W>
W word_of(float v) {
  if constexpr (sizeof(W) == 2) {
    return f32_to_bf16_bits(v);
  } else {
    return v;
  }
}

// Fills host[0, n) with pattern[i % 7] and counts the elements that differ from expect[i % 7]
// (words compared exactly: every value is a small integer, exact in bf16 and f32).
template <class W>
void fill_pattern(W* host, int64_t n, const W* pattern) {
  for (int64_t i = 0, k = 0; i < n; ++i, k = k + 1 == kPatternPeriod ? 0 : k + 1)
    host[i] = pattern[k];
}
template <class W>
int64_t count_wrong(const W* host, int64_t n, const W* expect) {
  int64_t wrong = 0;
  for (int64_t i = 0, k = 0; i < n; ++i, k = k + 1 == kPatternPeriod ? 0 : k + 1)
    wrong += host[i] != expect[k];
  return wrong;
}

// One all-reduce of x[i] = (i % 7) + rank, checked against its exact sum n * (i % 7) + n(n-1)/2
// (integers up to 256 for n <= 16: exact in bf16 and f32 whatever the order of additions).
// Returns the number of wrong elements on this rank.
template <class W>
int64_t check_once_as(Communicator& comm, const Tensor& dev, std::vector<uint8_t>& host) {
  const int64_t n = dev.numel();
  const int size = comm.size();
  W pattern[kPatternPeriod], expect[kPatternPeriod];
  for (int k = 0; k < kPatternPeriod; ++k) {
    pattern[k] = word_of<W>(float(k + comm.rank()));
    expect[k] = word_of<W>(float(size * k) + float(size) * float(size - 1) / 2.0f);
  }
  W* words = reinterpret_cast<W*>(host.data());
  fill_pattern(words, n, pattern);
  const size_t bytes = dtype_storage_bytes(dev.dtype, n);
  copy_bytes(dev.data, Device::cuda, host.data(), Device::cpu, bytes);
  comm.all_reduce(dev, ReduceOp::sum);
  // The legacy-stream copy below starts after the compute stream's wait on the all-reduce.
  copy_bytes(host.data(), Device::cpu, dev.data, Device::cuda, bytes);
  return count_wrong(words, n, expect);
}

int64_t check_once(Communicator& comm, const Tensor& dev, std::vector<uint8_t>& host) {
  return dev.dtype == DType::bf16 ? check_once_as<uint16_t>(comm, dev, host)
                                  : check_once_as<float>(comm, dev, host);
}

// Mean microseconds per call of `iters` back-to-back all-reduces after `warmup` untimed ones,
// timed with CUDA events on the compute stream (each call's wait() orders that stream after the
// NCCL stream, so the stop event follows the last all-reduce). Zeros keep the in-place sums
// finite however many times they are repeated; NCCL's speed does not depend on the values.
double time_us(Communicator& comm, Communicator& host_world, const Tensor& dev, int warmup,
               int iters) {
  TS_PAR_CUDA_CHECK(cudaMemset(dev.data, 0, dtype_storage_bytes(dev.dtype, dev.numel())),
                    "clearing the all-reduce buffer");
  for (int i = 0; i < warmup; ++i) comm.all_reduce(dev, ReduceOp::sum);
  TS_PAR_CUDA_CHECK(cudaDeviceSynchronize(), "finishing the warm-up all-reduces");
  host_world.barrier();  // every rank starts its clock together
  cudaEvent_t start = nullptr, stop = nullptr;
  TS_PAR_CUDA_CHECK(cudaEventCreate(&start), "creating a timing event");
  TS_PAR_CUDA_CHECK(cudaEventCreate(&stop), "creating a timing event");
  const cudaStream_t compute = nullptr;  // kernels/cuda/context.h: the legacy default stream
  TS_PAR_CUDA_CHECK(cudaEventRecord(start, compute), "recording the start event");
  for (int i = 0; i < iters; ++i) comm.all_reduce(dev, ReduceOp::sum);
  TS_PAR_CUDA_CHECK(cudaEventRecord(stop, compute), "recording the stop event");
  TS_PAR_CUDA_CHECK(cudaEventSynchronize(stop), "waiting for the timed all-reduces");
  float ms = 0.0f;
  TS_PAR_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop), "reading the timing events");
  TS_PAR_CUDA_CHECK(cudaEventDestroy(start), "destroying a timing event");
  TS_PAR_CUDA_CHECK(cudaEventDestroy(stop), "destroying a timing event");
  // The slowest rank's time: the collective is done only when every rank is done.
  return host_world.all_reduce_scalar(double(ms) * 1e3 / iters, ReduceOp::max);
}

int run(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  MpiRuntime mpi(&argc, &argv);
  select_local_gpu();
  ParallelContext ctx(ParallelSizes{/*tp=*/1, /*dp=*/mpi.size(), /*pp=*/1}, Device::cuda);
  Communicator& dp = ctx.comm(Group::dp);
  Communicator& host_world = ctx.host_comm(Group::world);
  const int n = dp.size();
  const bool rank0 = ctx.rank() == 0;
  const double bus_factor = 2.0 * (n - 1) / n;  // nccl-tests' all-reduce convention
  // The check's largest sum, 6n + n(n-1)/2, stays an exact bf16 integer (<= 256) up to 16 ranks.
  const bool checked = opt.check && n <= 16;

  FILE* json = nullptr;
  if (rank0 && !opt.json_path.empty()) {
    json = std::fopen(opt.json_path.c_str(), "w");
    if (!json) TS_USER_ERROR("bench_allreduce: cannot write --json '{}'", opt.json_path);
  }
  int nccl_code = 0;
  TS_NCCL_CHECK(ncclGetVersion(&nccl_code), nullptr, "querying the NCCL version");
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  const std::string nccl =
      fmt::format("{}.{}.{}", nccl_code / 10000, nccl_code % 10000 / 100, nccl_code % 100);
  if (rank0) {
    std::printf(
        "all_reduce (sum, in place) through tessera::Communicator on NCCL %s: %d ranks "
        "(dp group), %d warm-up + %d timed calls per size; time = slowest rank's mean "
        "per call; algbw = bytes/time, busbw = algbw*2(n-1)/n, GB = 1e9 bytes%s\n",
        nccl.c_str(), n, opt.warmup, opt.iters, n == 1 ? " (one rank: busbw is 0)" : "");
    std::printf("%-6s %12s %11s %11s %11s %11s  %s\n", "dtype", "bytes", "count", "time_us",
                "algbw_GB/s", "busbw_GB/s", "check");
  }

  // One device buffer of the largest size serves every size as a prefix view.
  void* dev_ptr = nullptr;
  TS_PAR_CUDA_CHECK(cudaMalloc(&dev_ptr, size_t(opt.max_bytes)), "allocating {} bytes",
                    opt.max_bytes);
  std::vector<uint8_t> host(checked ? size_t(opt.max_bytes) : 0);
  int64_t total_wrong = 0;
  for (DType t : opt.dtypes) {
    for (int64_t bytes = opt.min_bytes; bytes <= opt.max_bytes; bytes *= opt.factor) {
      const int64_t count = bytes / int64_t(dtype_size(t));
      const Tensor dev(dev_ptr, t, Device::cuda, Shape{count});
      std::string check = "skipped";  // table column; the JSON says ok / skipped / FAILED
      bool check_failed = false;
      if (checked) {
        const int64_t wrong = static_cast<int64_t>(
            host_world.all_reduce_scalar(double(check_once(dp, dev, host)), ReduceOp::sum));
        total_wrong += wrong;
        check_failed = wrong > 0;
        check = wrong == 0 ? "ok" : fmt::format("FAILED ({} wrong)", wrong);
      }
      const double us = time_us(dp, host_world, dev, opt.warmup, opt.iters);
      const double algbw = double(count) * double(dtype_size(t)) / (us * 1e-6) / 1e9;
      const double busbw = algbw * bus_factor;
      if (rank0) {
        const std::string name(dtype_name(t));
        std::printf("%-6s %12lld %11lld %11.1f %11.2f %11.2f  %s\n", name.c_str(),
                    static_cast<long long>(count * int64_t(dtype_size(t))),
                    static_cast<long long>(count), us, algbw, busbw, check.c_str());
        std::fflush(stdout);
        if (json) {
          std::fprintf(
              json,
              "{\"impl\": \"tessera\", \"op\": \"all_reduce\", \"dtype\": \"%s\", "
              "\"bytes\": %lld, \"count\": %lld, \"ranks\": %d, \"time_us\": %.3f, "
              "\"algbw_gbs\": %.3f, \"busbw_gbs\": %.3f, \"check\": \"%s\", \"nccl\": \"%s\"}\n",
              name.c_str(), static_cast<long long>(count * int64_t(dtype_size(t))),
              static_cast<long long>(count), n, us, algbw, busbw,
              check_failed ? "FAILED" : check.c_str(), nccl.c_str());
        }
      }
    }
  }
  if (json) std::fclose(json);
  TS_PAR_CUDA_CHECK(cudaFree(dev_ptr), "freeing the all-reduce buffer");
  if (total_wrong > 0) {
    if (rank0)
      std::printf("bench_allreduce: %lld wrong elements in total: the sums are wrong\n",
                  static_cast<long long>(total_wrong));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    abort_job(e.exit_code());  // a lone failing rank must not leave its peers in a collective
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    abort_job(1);
  }
}
