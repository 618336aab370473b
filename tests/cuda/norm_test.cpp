// Parity of the CUDA LayerNorm and RMSNorm (kernels/cuda/layernorm.cu, rmsnorm.cu) with the CPU
// references, forward and backward, f32, bf16 and f16. Shapes cover every kernel layout: one warp
// per row with 1..6 packs per lane, several warps per row up to 1024 threads (C = 20000), scalar
// rows (C = 1, 7, 1025, 4097), the streaming kernels for rows wider than the register layouts (C =
// 40000), QK-norm widths (C = 128), and more rows than backward blocks (N = 1000, 9000) so blocks
// loop over rows. Parameter gradients are pre-filled, checking +=; a NaN input row must give a NaN
// output row; extreme eps values agree too. The fused residual + LayerNorm
// (cuda::add_layernorm_forward, kernels/cuda/layernorm.cu) must equal add_forward +
// layernorm_forward bit for bit.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

// f32: the GPU sums rows of up to 20000 values in f32 (pairwise across threads) where the CPU
// uses double: ~sqrt(C) * 6e-8 relative, under 1e-5; 2e-5 leaves margin. bf16: outputs are
// rounded to bf16 (at most 2^-9 relative per element, ~1.1e-3 of the L2 norm); 8e-3 covers it
// plus the f32 accumulation. f16 rounds to 2^-11 (~2.8e-4 in L2): 2e-3 is the same 7x margin.
// The largest values (dweight, dbias summed over 9000 rows, ~1e2) are far inside f16's range.
// Statistics (mean, rstd) are f32 for every dtype.
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 8e-3, 2e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}
constexpr double kStatTolerance = 2e-5;

struct NormShape {
  int64_t rows, cols;
};
const NormShape kShapes[] = {{1, 1},    {3, 7},     {64, 768},  {40, 128},  {5, 1025}, {4, 2048},
                             {3, 4097}, {2, 20000}, {2, 40000}, {9000, 64}, {300, 96}, {1000, 768}};

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

void expect_close(const DeviceTensor& gpu, const std::vector<float>& cpu, double tol,
                  const std::string& what) {
  const auto got = gpu.download();
  EXPECT_LE(testing::rel_l2(got, cpu), tol) << what;
  testing::expect_same_nonfinite(got, cpu, what.c_str());
  EXPECT_TRUE(gpu.guards_intact()) << what;
}

std::string label(const char* op, DType dtype, const NormShape& s) {
  return std::string(op) + " " + std::string(dtype_name(dtype)) + " (" + std::to_string(s.rows) +
         ", " + std::to_string(s.cols) + ")";
}

class NormTest : public ::testing::TestWithParam<DType> {};

TEST_P(NormTest, LayerNormForwardMatchesCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(11);
  for (const NormShape& s : kShapes) {
    for (bool with_bias : {true, false}) {
      const int64_t n = s.rows, c = s.cols;
      auto x = testing::random_vector(n * c, rng, 2.0f);
      for (auto& v : x) v += 0.5f;                                // a non-zero mean
      if (n > 1) x[c] = std::numeric_limits<float>::quiet_NaN();  // row 1 must come out NaN
      x = testing::round_to(dtype, x);
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto b = testing::round_to(dtype, testing::random_vector(c, rng));
      std::vector<float> out(n * c), mean(n), rstd(n);
      cpu::layernorm_forward(host(out, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                             host(w, {c}), with_bias ? host(b, {c}) : Tensor(), 1e-5f);
      DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), db(dtype, {c}), dout(dtype, {n, c});
      DeviceTensor dmean(DType::f32, {n}), drstd(DType::f32, {n});
      dx.upload(x);
      dw.upload(w);
      db.upload(b);
      settle();
      cuda::layernorm_forward(dout, dmean, drstd, dx, dw, with_bias ? db.t() : Tensor(), 1e-5f);
      const std::string what = label("layernorm_forward", dtype, s) + (with_bias ? "" : " no bias");
      expect_close(dout, out, tolerance(dtype), what + " out");
      expect_close(dmean, mean, kStatTolerance, what + " mean");
      expect_close(drstd, rstd, kStatTolerance, what + " rstd");
    }
  }
}

TEST_P(NormTest, LayerNormBackwardMatchesCpuAndAccumulates) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(12);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
    // Statistics from the CPU forward, given to both backwards.
    std::vector<float> scratch(n * c), mean(n), rstd(n);
    cpu::layernorm_forward(host(scratch, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                           host(w, {c}), Tensor(), 1e-5f);
    // Pre-filled parameter gradients: the backward must add to them.
    auto dweight = testing::round_to(dtype, testing::random_vector(c, rng));
    auto dbias = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> dinp(n * c);
    std::vector<float> dweight_ref = dweight, dbias_ref = dbias;
    cpu::layernorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(dbias_ref, {c}),
                            host(d, {n, c}), host(x, {n, c}), host(w, {c}), host(mean, {n}),
                            host(rstd, {n}));
    DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
    DeviceTensor gdw(dtype, {c}), gdb(dtype, {c}), gmean(DType::f32, {n}), grstd(DType::f32, {n});
    gx.upload(x);
    gw.upload(w);
    gd.upload(d);
    gdw.upload(dweight);
    gdb.upload(dbias);
    gmean.upload(mean);
    grstd.upload(rstd);
    settle();
    cuda::layernorm_backward(gdinp, gdw, gdb, gd, gx, gw, gmean, grstd);
    const std::string what = label("layernorm_backward", dtype, s);
    expect_close(gdinp, dinp, tolerance(dtype), what + " dinp");
    expect_close(gdw, dweight_ref, tolerance(dtype), what + " dweight");
    expect_close(gdb, dbias_ref, tolerance(dtype), what + " dbias");
    // Deterministic: the same call from the same state gives the same bits.
    const auto dw_first = gdw.download();
    gdw.upload(dweight);
    settle();
    cuda::layernorm_backward(gdinp, gdw, Tensor(), gd, gx, gw, gmean, grstd);
    EXPECT_EQ(gdw.download(), dw_first) << what << " (rerun without dbias)";
  }
}

TEST_P(NormTest, RmsNormForwardMatchesCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(13);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::random_vector(n * c, rng, 2.0f);
    if (n > 1) x[c + c / 2] = std::numeric_limits<float>::quiet_NaN();
    x = testing::round_to(dtype, x);
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> out(n * c), rstd(n);
    cpu::rmsnorm_forward(host(out, {n, c}), host(rstd, {n}), host(x, {n, c}), host(w, {c}), 1e-6f);
    DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), dout(dtype, {n, c}), drstd(DType::f32, {n});
    dx.upload(x);
    dw.upload(w);
    settle();
    cuda::rmsnorm_forward(dout, drstd, dx, dw, 1e-6f);
    const std::string what = label("rmsnorm_forward", dtype, s);
    expect_close(dout, out, tolerance(dtype), what + " out");
    expect_close(drstd, rstd, kStatTolerance, what + " rstd");
  }
}

TEST_P(NormTest, RmsNormBackwardMatchesCpuAndAccumulates) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(14);
  for (const NormShape& s : kShapes) {
    const int64_t n = s.rows, c = s.cols;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng, 1.5f));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n * c, rng));
    std::vector<float> scratch(n * c), rstd(n);
    cpu::rmsnorm_forward(host(scratch, {n, c}), host(rstd, {n}), host(x, {n, c}), host(w, {c}),
                         1e-6f);
    auto dweight = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> dinp(n * c), dweight_ref = dweight;
    cpu::rmsnorm_backward(host(dinp, {n, c}), host(dweight_ref, {c}), host(d, {n, c}),
                          host(x, {n, c}), host(w, {c}), host(rstd, {n}));
    DeviceTensor gx(dtype, {n, c}), gw(dtype, {c}), gd(dtype, {n, c}), gdinp(dtype, {n, c});
    DeviceTensor gdw(dtype, {c}), grstd(DType::f32, {n});
    gx.upload(x);
    gw.upload(w);
    gd.upload(d);
    gdw.upload(dweight);
    grstd.upload(rstd);
    settle();
    cuda::rmsnorm_backward(gdinp, gdw, gd, gx, gw, grstd);
    const std::string what = label("rmsnorm_backward", dtype, s);
    // dinp = rstd * (dnorm - norm * mean(dnorm * norm)) is a difference of terms of size
    // |rstd * dout * weight|; at C = 1 they cancel to ~eps / x^2 of their size, so the error is
    // measured against the terms (the same bound as the L2-relative one whenever they do not
    // cancel).
    double terms_sq = 0.0, ref_sq = 0.0, err_sq = 0.0;
    const auto got_dinp = gdinp.download();
    for (int64_t i = 0; i < n * c; ++i) {
      const double term = double(rstd[i / c]) * d[i] * w[i % c];
      terms_sq += term * term;
      ref_sq += double(dinp[i]) * dinp[i];
      err_sq += (double(got_dinp[i]) - dinp[i]) * (double(got_dinp[i]) - dinp[i]);
    }
    EXPECT_LE(std::sqrt(err_sq / std::max({terms_sq, ref_sq, 1e-30})), tolerance(dtype))
        << what << " dinp";
    testing::expect_same_nonfinite(got_dinp, dinp, (what + " dinp").c_str());
    EXPECT_TRUE(gdinp.guards_intact()) << what;
    expect_close(gdw, dweight_ref, tolerance(dtype), what + " dweight");
  }
}

// eps = 0 on one column: the variance is 0, rstd = Inf and the output NaN on both backends;
// a huge eps shrinks the output towards the bias.
TEST_P(NormTest, ExtremeEpsAgrees) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(15);
  for (auto [c, eps] : {std::pair<int64_t, float>{1, 0.0f}, {768, 1e4f}, {7, 0.0f}}) {
    const int64_t n = 4;
    auto x = testing::round_to(dtype, testing::random_vector(n * c, rng));
    auto w = testing::round_to(dtype, testing::random_vector(c, rng));
    auto b = testing::round_to(dtype, testing::random_vector(c, rng));
    std::vector<float> out(n * c), mean(n), rstd(n), rms_out(n * c), rms_rstd(n);
    cpu::layernorm_forward(host(out, {n, c}), host(mean, {n}), host(rstd, {n}), host(x, {n, c}),
                           host(w, {c}), host(b, {c}), eps);
    cpu::rmsnorm_forward(host(rms_out, {n, c}), host(rms_rstd, {n}), host(x, {n, c}), host(w, {c}),
                         eps);
    DeviceTensor dx(dtype, {n, c}), dw(dtype, {c}), db(dtype, {c}), dout(dtype, {n, c});
    DeviceTensor dmean(DType::f32, {n}), drstd(DType::f32, {n});
    dx.upload(x);
    dw.upload(w);
    db.upload(b);
    settle();
    const std::string what = "C=" + std::to_string(c) + " eps=" + std::to_string(eps);
    cuda::layernorm_forward(dout, dmean, drstd, dx, dw, db, eps);
    expect_close(dout, out, tolerance(dtype), "layernorm " + what);
    expect_close(drstd, rstd, kStatTolerance, "layernorm rstd " + what);
    cuda::rmsnorm_forward(dout, drstd, dx, dw, eps);
    expect_close(dout, rms_out, tolerance(dtype), "rmsnorm " + what);
    expect_close(drstd, rms_rstd, kStatTolerance, "rmsnorm rstd " + what);
  }
}

// Bitwise equality of two device tensors' contents.
void expect_same_bits(const DeviceTensor& a, const DeviceTensor& b, const std::string& what) {
  const auto x = a.download(), y = b.download();
  ASSERT_EQ(x.size(), y.size()) << what;
  EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float))) << what;
}

TEST_P(NormTest, FusedResidualLayerNormEqualsUnfusedBitwise) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(16);
  for (const NormShape& s : kShapes) {
    for (bool in_place : {false, true}) {
      const int64_t n = s.rows, c = s.cols;
      auto a = testing::round_to(dtype, testing::random_vector(n * c, rng, 2.0f));
      auto b = testing::round_to(dtype, testing::random_vector(n * c, rng));
      auto w = testing::round_to(dtype, testing::random_vector(c, rng));
      auto bias = testing::round_to(dtype, testing::random_vector(c, rng));
      DeviceTensor ga(dtype, {n, c}), gb(dtype, {n, c}), gw(dtype, {c}), gbias(dtype, {c});
      DeviceTensor res1(dtype, {n, c}), out1(dtype, {n, c}), mean1(DType::f32, {n});
      DeviceTensor rstd1(DType::f32, {n}), res2(dtype, {n, c}), out2(dtype, {n, c});
      DeviceTensor mean2(DType::f32, {n}), rstd2(DType::f32, {n});
      ga.upload(a);
      gb.upload(b);
      gw.upload(w);
      gbias.upload(bias);
      settle();
      cuda::add_forward(res1, ga, gb);
      cuda::layernorm_forward(out1, mean1, rstd1, res1, gw, gbias, 1e-5f);
      if (in_place) {  // residual stream updated in place: residual is a
        res2.upload(a);
        settle();
        cuda::add_layernorm_forward(res2, out2, mean2, rstd2, res2, gb, gw, gbias, 1e-5f);
      } else {
        cuda::add_layernorm_forward(res2, out2, mean2, rstd2, ga, gb, gw, gbias, 1e-5f);
      }
      const std::string what =
          label("fused_residual_layernorm", dtype, s) + (in_place ? " in place" : "");
      expect_same_bits(res2, res1, what + " residual");
      expect_same_bits(out2, out1, what + " out");
      expect_same_bits(mean2, mean1, what + " mean");
      expect_same_bits(rstd2, rstd1, what + " rstd");
      EXPECT_TRUE(res2.guards_intact() && out2.guards_intact() && mean2.guards_intact() &&
                  rstd2.guards_intact())
          << what;
    }
  }
}

// a one element into its buffer (not 16-byte aligned) while the norm's layout reads packs: the
// fused op must still equal the unfused pair.
TEST_P(NormTest, FusedResidualLayerNormWithMisalignedInput) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(17);
  const int64_t n = 33, c = 768;
  DeviceTensor abuf(dtype, {n * c + 1}), gb(dtype, {n, c}), gw(dtype, {c});
  abuf.upload(testing::round_to(dtype, testing::random_vector(n * c + 1, rng)));
  gb.upload(testing::round_to(dtype, testing::random_vector(n * c, rng)));
  gw.upload(testing::round_to(dtype, testing::random_vector(c, rng)));
  DeviceTensor res1(dtype, {n, c}), out1(dtype, {n, c}), mean1(DType::f32, {n});
  DeviceTensor rstd1(DType::f32, {n}), res2(dtype, {n, c}), out2(dtype, {n, c});
  DeviceTensor mean2(DType::f32, {n}), rstd2(DType::f32, {n});
  settle();
  const Tensor a(static_cast<char*>(abuf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{n, c});
  cuda::add_forward(res1, a, gb);
  cuda::layernorm_forward(out1, mean1, rstd1, res1, gw, Tensor(), 1e-5f);
  cuda::add_layernorm_forward(res2, out2, mean2, rstd2, a, gb, gw, Tensor(), 1e-5f);
  expect_same_bits(res2, res1, "residual");
  expect_same_bits(out2, out1, "out");
  expect_same_bits(rstd2, rstd1, "rstd");
}

TEST_P(NormTest, RejectsAliasedGradient) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  DeviceTensor x(dtype, {4, 8}), w(dtype, {8}), dw(dtype, {8}), rstd(DType::f32, {4});
  settle();
  EXPECT_THROW(cuda::rmsnorm_backward(x, dw, x, x, w, rstd), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, NormTest, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
