// Parity of the CUDA bias_add and bias_grad (kernels/cuda/bias.cu) with the CPU reference
// (kernels/cpu/bias.cpp, through ops) on random inputs: f32/bf16/f16 with same-dtype and f32
// vectors, awkward and random sizes, misaligned views (the scalar load path), accumulation (+=),
// NaN/Inf, untouched guard bytes, and bitwise run-to-run determinism of the column sums.
// Shape letters: M rows, N columns.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera::testing {
namespace {

struct Dims {
  int64_t m, n;
};

// Odd N (scalar loads), N a multiple of 8 but not of a strip, single rows and columns, one row
// chunk (M <= 128) and many (M = 4097 splits into chunks of 128+ rows; N = 16384 is the model
// width the FP8 layer meets), plus random sizes.
std::vector<Dims> test_sizes(std::mt19937_64& rng) {
  std::vector<Dims> sizes = {{1, 1},    {1, 4097},   {1025, 3},   {3, 1025},   {129, 520},
                             {4097, 8}, {300, 1000}, {257, 4104}, {16, 16384}, {2049, 2056}};
  std::uniform_int_distribution<int64_t> dim(1, 3000);
  for (int i = 0; i < 6; ++i) sizes.push_back({dim(rng), dim(rng)});
  return sizes;
}

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

// Host storage of one tensor in any float dtype, converted from and to f32.
struct HostBuf {
  std::vector<char> bytes;
  Tensor t;
  HostBuf(DType dtype, Shape shape, const std::vector<float>& values)
      : bytes(dtype_storage_bytes(dtype, shape.numel())) {
    t = Tensor(bytes.data(), dtype, Device::cpu, shape);
    convert_buffer(values.data(), DType::f32, bytes.data(), dtype, shape.numel());
  }
  std::vector<float> values() const {
    std::vector<float> out(t.numel());
    convert_buffer(bytes.data(), t.dtype, out.data(), DType::f32, t.numel());
    return out;
  }
};

// A device tensor starting `offset` elements into a guarded allocation: an odd offset leaves
// the pointer 2- or 4-byte aligned, which forces the kernels' scalar path.
struct OffsetTensor {
  DeviceTensor storage;
  int64_t offset;
  Shape shape;
  DType dtype;
  OffsetTensor(DType dt, Shape s, int64_t off)
      : storage(dt, Shape{s.numel() + off}), offset(off), shape(s), dtype(dt) {}
  Tensor t() const {
    return Tensor(static_cast<char*>(storage.t().data) + offset * dtype_storage_bytes(dtype, 1),
                  dtype, Device::cuda, shape);
  }
  void upload(const std::vector<float>& v) {
    std::vector<float> padded(offset, 0.0f);
    padded.insert(padded.end(), v.begin(), v.end());
    storage.upload(padded);
  }
  std::vector<float> download() const {
    const std::vector<float> all = storage.download();
    return std::vector<float>(all.begin() + offset, all.end());
  }
};

bool same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// First element where two results differ bitwise (NaN matches NaN), or -1.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return int64_t(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i]) || std::signbit(a[i]) != std::signbit(b[i])) return int64_t(i);
  return -1;
}

// bias_add is one f32 add rounded once to out's dtype on both sides, so GPU and CPU agree
// bit for bit, whatever the load path.
TEST(CudaBias, AddBitEqualToCpu) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  for (const Dims& d : test_sizes(rng)) {
    for (DType dtype : kDtypes) {
      for (DType vec_dtype : {dtype, DType::f32}) {
        for (int64_t offset : {0, 1}) {
          SCOPED_TRACE(::testing::Message()
                       << dtype_name(dtype) << " out, " << dtype_name(vec_dtype)
                       << " bias, M=" << d.m << " N=" << d.n << " offset " << offset);
          const auto out0 = round_to(dtype, random_vector(d.m * d.n, rng));
          const auto bias = round_to(vec_dtype, random_vector(d.n, rng, 3.0f));
          OffsetTensor out(dtype, {d.m, d.n}, offset);
          DeviceTensor bias_dev(vec_dtype, {d.n});
          out.upload(out0);
          bias_dev.upload(bias);
          ops::bias_add(out.t(), bias_dev);
          HostBuf want(dtype, {d.m, d.n}, out0);
          HostBuf bias_host(vec_dtype, {d.n}, bias);
          ops::bias_add(want.t, bias_host.t);
          const int64_t bad = first_difference(out.download(), want.values());
          EXPECT_EQ(bad, -1) << "out differs from the CPU at element " << bad;
          EXPECT_EQ(first_difference(bias_dev.download(), bias), -1) << "bias was written";
          EXPECT_TRUE(out.storage.guards_intact() && bias_dev.guards_intact());
        }
      }
    }
  }
}

// Bound on |gpu - cpu| for one bias_grad call, per column j, with S_j = |dbias_j| + sum_i
// |dout_ij| and v_j the CPU result:
//   GPU: an f32 sum of M+1 terms in any order errs by at most about M 2^-24 S_j (Higham 3.1);
//   CPU: the double sum (error ~M 2^-53 S_j, negligible) rounded to f32, at most 2^-24 |v_j|;
//   both are then rounded to dbias's dtype (16-bit only), together at most one ulp there,
//   ulp <= 2^(1-p) |v| for p significand bits (bf16 8, f16 11), v the larger of the two
//   results, plus f16's subnormal spacing 2^-24 for values below 2^-14.
// The factor 1.01 covers the (1 - M u)^-1 of the exact bound. A wrong index or a dropped row
// errs by O(1) and fails it; sums of unit normals are ~sqrt(M), so the bound is ~M/sqrt(M)
// = sqrt(M) 2^-24 relative in f32: far tighter than any bug.
double bias_grad_bound(DType dtype, int64_t m, double abs_sum, double value) {
  const double accumulate = 1.01 * double(m) * std::ldexp(1.0, -24) * abs_sum;
  const double to_f32 = std::ldexp(1.0, -24) * std::fabs(value);
  double storage = 0.0;
  if (dtype == DType::bf16) storage = std::ldexp(1.0, -7) * std::fabs(value);
  if (dtype == DType::f16) storage = std::ldexp(1.0, -10) * std::fabs(value) + std::ldexp(1.0, -24);
  return accumulate + to_f32 + storage;
}

// Checks one bias_grad call on dbias (starting at dbias0) against the CPU reference run on the
// same values; returns the GPU result.
std::vector<float> expect_grad_call(OffsetTensor& dbias, const std::vector<float>& dbias0,
                                    const OffsetTensor& dout, const std::vector<float>& dout_host,
                                    Dims d, DType vec_dtype) {
  ops::bias_grad(dbias.t(), dout.t());
  const std::vector<float> gpu = dbias.download();
  HostBuf want(vec_dtype, {d.n}, dbias0);
  HostBuf dout_buf(dout.dtype, {d.m, d.n}, dout_host);
  ops::bias_grad(want.t, dout_buf.t);
  const std::vector<float> cpu = want.values();
  expect_same_nonfinite(gpu, cpu, "dbias");
  std::vector<double> abs_sum(dbias0.begin(), dbias0.end());
  for (double& s : abs_sum) s = std::fabs(s);
  for (int64_t i = 0; i < d.m; ++i)
    for (int64_t j = 0; j < d.n; ++j) abs_sum[j] += std::fabs(dout_host[i * d.n + j]);
  double worst = 0.0;  // largest error / bound
  for (int64_t j = 0; j < d.n; ++j) {
    if (!std::isfinite(cpu[j])) continue;
    const double err = std::fabs(double(gpu[j]) - cpu[j]);
    const double larger = std::max(std::fabs(double(gpu[j])), std::fabs(double(cpu[j])));
    const double bound = bias_grad_bound(vec_dtype, d.m, abs_sum[j], larger);
    worst = std::max(worst, err / bound);
    if (!(err <= bound)) {
      ADD_FAILURE() << "dbias[" << j << "]: gpu " << gpu[j] << ", cpu " << cpu[j] << ", error "
                    << err << " > bound " << bound;
      break;
    }
  }
  std::printf("measured bias_grad %s/%s M=%lld N=%lld: worst error %.3g of the bound\n",
              std::string(dtype_name(dout.dtype)).c_str(),
              std::string(dtype_name(vec_dtype)).c_str(), (long long)d.m, (long long)d.n, worst);
  return gpu;
}

TEST(CudaBias, GradMatchesCpuAccumulatesAndIsDeterministic) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  for (const Dims& d : test_sizes(rng)) {
    for (DType dtype : kDtypes) {
      for (DType vec_dtype : {dtype, DType::f32}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " dout, " << dtype_name(vec_dtype)
                                          << " dbias, M=" << d.m << " N=" << d.n);
        auto dout_host = round_to(dtype, random_vector(d.m * d.n, rng));
        if (d.m >= 3 && d.n >= 3) {  // NaN, +Inf, -Inf in columns 0, 1, 2
          dout_host[0] = kNaN;
          dout_host[d.n + 1] = kInf;
          dout_host[2 * d.n + 2] = -kInf;
        }
        const auto dbias0 = round_to(vec_dtype, random_vector(d.n, rng));
        OffsetTensor dout(dtype, {d.m, d.n}, 0), dout_odd(dtype, {d.m, d.n}, 1);
        dout.upload(dout_host);
        dout_odd.upload(dout_host);
        OffsetTensor dbias(vec_dtype, {d.n}, 0);
        dbias.upload(dbias0);

        // One call, then a second one accumulating onto the GPU's own first result (so each
        // call is held to its own bound).
        const auto first = expect_grad_call(dbias, dbias0, dout, dout_host, d, vec_dtype);
        const auto second = expect_grad_call(dbias, first, dout, dout_host, d, vec_dtype);

        // Run to run, and aligned vs misaligned dout (vector vs scalar loads): the summation
        // order depends on (M, N) only, so every bit must repeat.
        for (const OffsetTensor* src : {&dout, &dout_odd}) {
          OffsetTensor again(vec_dtype, {d.n}, 1);
          again.upload(dbias0);
          ops::bias_grad(again.t(), src->t());
          const auto repeat_first = again.download();
          ops::bias_grad(again.t(), src->t());
          const int64_t bad1 = first_difference(repeat_first, first);
          const int64_t bad2 = first_difference(again.download(), second);
          EXPECT_EQ(bad1, -1) << (src == &dout ? "rerun" : "misaligned dout")
                              << " differs at element " << bad1;
          EXPECT_EQ(bad2, -1) << (src == &dout ? "rerun" : "misaligned dout")
                              << " differs after two calls at element " << bad2;
          EXPECT_TRUE(again.storage.guards_intact());
        }
        EXPECT_EQ(first_difference(dout.download(), dout_host), -1) << "dout was written";
        EXPECT_TRUE(dout.storage.guards_intact() && dbias.storage.guards_intact());
      }
    }
  }
}

// The shape the FP8 layer meets at scale (M = 16384 tokens, N = 4096 features, bf16): parity,
// determinism, and the achieved bandwidth printed for reference (not asserted: shared GPUs).
TEST(CudaBias, LargeGradAndBandwidth) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(13);
  const Dims d{16384, 4096};
  const DType dtype = DType::bf16;
  const auto dout_host = round_to(dtype, random_vector(d.m * d.n, rng));
  const auto dbias0 = round_to(DType::f32, random_vector(d.n, rng));
  OffsetTensor dout(dtype, {d.m, d.n}, 0);
  dout.upload(dout_host);
  OffsetTensor dbias(DType::f32, {d.n}, 0);
  dbias.upload(dbias0);
  const auto first = expect_grad_call(dbias, dbias0, dout, dout_host, d, DType::f32);
  dbias.upload(dbias0);
  ops::bias_grad(dbias.t(), dout.t());
  EXPECT_EQ(first_difference(dbias.download(), first), -1) << "rerun differs";

  constexpr int kReps = 20;
  ops::synchronize(Device::cuda);
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) ops::bias_grad(dbias.t(), dout.t());
  ops::synchronize(Device::cuda);
  const double grad_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / kReps;
  const auto start_add = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) ops::bias_add(dout.t(), dbias.t());
  ops::synchronize(Device::cuda);
  const double add_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_add).count() / kReps;
  const double bytes = double(d.m) * d.n * 2;
  std::printf("measured bias_grad bf16 %lldx%lld: %.1f us, %.0f GB/s read\n", (long long)d.m,
              (long long)d.n, grad_s * 1e6, bytes / grad_s / 1e9);
  std::printf("measured bias_add bf16 %lldx%lld: %.1f us, %.0f GB/s read+write\n", (long long)d.m,
              (long long)d.n, add_s * 1e6, 2 * bytes / add_s / 1e9);
}

TEST(CudaBias, RejectsBadOperands) {
  TESSERA_REQUIRE_GPU();
  DeviceTensor out(DType::bf16, {4, 5}), bias_f16(DType::f16, {5}), bias_short(DType::bf16, {4});
  EXPECT_THROW(ops::bias_add(out, bias_f16), Error);
  EXPECT_THROW(ops::bias_add(out, bias_short), Error);
  EXPECT_THROW(ops::bias_grad(bias_f16, out), Error);
  const Tensor inside(out.t().data, DType::bf16, Device::cuda, {5});
  EXPECT_THROW(ops::bias_add(out, inside), Error);
  EXPECT_THROW(ops::bias_grad(inside, out), Error);
}

}  // namespace
}  // namespace tessera::testing
