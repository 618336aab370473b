// Parity of causal GQA attention through cuDNN's fused SDPA (kernels/cuda/attention_cudnn.cu) with
// the CPU reference (kernels/cpu/attention.cpp) run in f32 on the same bf16- or f16-rounded inputs:
// out, lse, dq, dk, dv by relative L2, every output NaN-poisoned and guarded. Each case prints the
// plan cuDNN chose, or every failure cuDNN reported, so a GPU run doubles as a probe.
// Shape letters: B batch, T time, Hq query heads, Hkv key/value heads, D head dim.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/attention_cudnn.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera::testing {
namespace {

struct AttnCase {
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
};
void PrintTo(const AttnCase& c, std::ostream* os) {
  *os << "B=" << c.num_b << " T=" << c.num_t << " Hq=" << c.num_hq << " Hkv=" << c.num_hkv
      << " D=" << c.head_dim;
}

// Error bounds for bf16 (relative L2 against the f32 reference on identical bf16 inputs):
// - out: bf16 storage rounds each element by up to 2^-9 relative (RMS ~1.1e-3), and cuDNN feeds
//   the probabilities to the P·V GEMM in bf16, another ~2^-9 per term that averages down over the
//   keys; together ~2e-3, so 1e-2 leaves a 4-5x margin.
// - dq, dk, dv: bf16 outputs again, plus bf16 rounding of P and dS as GEMM operands and of the
//   saved out in rowsum(dO * O); dS = P * (dP - rowsum) loses relative accuracy where dP and the
//   rowsum nearly cancel, and T up to 1000 terms enter each sum: ~3-6e-3 expected, bound 2e-2.
// - lse: f32 throughout (exact bf16 products, f32 sums over D, f32 exp/log or exp2/log2), so
//   ~1e-6 relative of |lse| ~ 1..10; the 2e-3 absolute bound only excuses approximate exp/log.
// f16 has 10 mantissa bits to bf16's 7: every rounding above is 8x smaller (2^-11 relative,
// RMS ~2.8e-4 for out), so the expected errors are ~4-8x smaller; the bounds are 1/3 of bf16's,
// still 4x or more above the expected ~5e-4 (out) and ~1-1.5e-3 (gradients). Inputs ~N(0, 1)
// keep scores, P, dS and the gradients far inside f16's range (max 65504). lse is f32 either way.
constexpr double kOutTol[2] = {1e-2, 3e-3};   // bf16, f16
constexpr double kGradTol[2] = {2e-2, 6e-3};  // bf16, f16
constexpr double kLseAbsTol = 2e-3;

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

Tensor host_view(std::vector<float>& v, Shape s) {
  return Tensor(v.data(), DType::f32, Device::cpu, s);
}

class AttentionCudnnTest : public ::testing::TestWithParam<std::tuple<AttnCase, DType>> {};

TEST_P(AttentionCudnnTest, MatchesCpuReference) {
  TESSERA_REQUIRE_GPU();
  const AttnCase c = std::get<0>(GetParam());
  const DType dtype = std::get<1>(GetParam());
  const int di = dtype == DType::f16;
  const Shape q_shape{c.num_b, c.num_t, c.num_hq, c.head_dim};
  const Shape kv_shape{c.num_b, c.num_t, c.num_hkv, c.head_dim};
  const Shape lse_shape{c.num_b, c.num_hq, c.num_t};
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  std::mt19937_64 rng(1000 * c.num_t + 10 * c.num_hq + c.num_hkv);
  std::vector<float> q = round_to(dtype, random_vector(q_shape.numel(), rng));
  std::vector<float> k = round_to(dtype, random_vector(kv_shape.numel(), rng));
  std::vector<float> v = round_to(dtype, random_vector(kv_shape.numel(), rng));
  std::vector<float> dout = round_to(dtype, random_vector(q_shape.numel(), rng));

  // CPU reference in f32 on the rounded inputs (it accumulates in double).
  std::vector<float> out_ref(q.size()), lse_ref(lse_shape.numel());
  std::vector<float> dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
  cpu::attention_forward(host_view(out_ref, q_shape), host_view(lse_ref, lse_shape),
                         host_view(q, q_shape), host_view(k, kv_shape), host_view(v, kv_shape),
                         scale);
  cpu::attention_backward(host_view(dq_ref, q_shape), host_view(dk_ref, kv_shape),
                          host_view(dv_ref, kv_shape), host_view(dout, q_shape),
                          host_view(q, q_shape), host_view(k, kv_shape), host_view(v, kv_shape),
                          host_view(out_ref, q_shape), host_view(lse_ref, lse_shape), scale);

  const std::string fwd_plan = cuda::attention_cudnn_describe(c.num_b, c.num_t, c.num_hq, c.num_hkv,
                                                              c.head_dim, false, dtype);
  const std::string bwd_plan = cuda::attention_cudnn_describe(c.num_b, c.num_t, c.num_hq, c.num_hkv,
                                                              c.head_dim, true, dtype);
  std::printf("[probe] %s\n[probe] %s\n", fwd_plan.c_str(), bwd_plan.c_str());

  DeviceTensor q_d(dtype, q_shape), k_d(dtype, kv_shape), v_d(dtype, kv_shape);
  DeviceTensor dout_d(dtype, q_shape);
  DeviceTensor out_d(dtype, q_shape), lse_d(DType::f32, lse_shape);
  DeviceTensor dq_d(dtype, q_shape), dk_d(dtype, kv_shape);
  DeviceTensor dv_d(dtype, kv_shape);
  q_d.upload(q);
  k_d.upload(k);
  v_d.upload(v);
  dout_d.upload(dout);

  ASSERT_TRUE(cuda::attention_cudnn_forward(out_d, lse_d, q_d, k_d, v_d, scale)) << fwd_plan;
  const std::vector<float> out = out_d.download(), lse = lse_d.download();
  expect_same_nonfinite(out, out_ref, "out");
  expect_same_nonfinite(lse, lse_ref, "lse");
  const double out_err = rel_l2(out, out_ref);
  const double lse_err = max_abs_diff(lse, lse_ref);
  EXPECT_LT(out_err, kOutTol[di]) << "out";
  EXPECT_LT(lse_err, kLseAbsTol) << "lse (max abs)";

  // Backward from the GPU's own out and lse, as the trainer runs it; dq/dk/dv start as NaN, so
  // accumulating instead of overwriting would fail the finiteness checks.
  ASSERT_TRUE(
      cuda::attention_cudnn_backward(dq_d, dk_d, dv_d, dout_d, q_d, k_d, v_d, out_d, lse_d, scale))
      << bwd_plan;
  const std::vector<float> dq = dq_d.download(), dk = dk_d.download(), dv = dv_d.download();
  expect_same_nonfinite(dq, dq_ref, "dq");
  expect_same_nonfinite(dk, dk_ref, "dk");
  expect_same_nonfinite(dv, dv_ref, "dv");
  const double dq_err = rel_l2(dq, dq_ref), dk_err = rel_l2(dk, dk_ref);
  const double dv_err = rel_l2(dv, dv_ref);
  EXPECT_LT(dq_err, kGradTol[di]) << "dq";
  EXPECT_LT(dk_err, kGradTol[di]) << "dk";
  EXPECT_LT(dv_err, kGradTol[di]) << "dv";
  std::printf(
      "[parity] %s B=%ld T=%ld Hq=%ld Hkv=%ld D=%ld: out %.2e, lse max abs %.2e, "
      "dq %.2e, dk %.2e, dv %.2e (rel L2)\n",
      std::string(dtype_name(dtype)).c_str(), long(c.num_b), long(c.num_t), long(c.num_hq),
      long(c.num_hkv), long(c.head_dim), out_err, lse_err, dq_err, dk_err, dv_err);

  for (const DeviceTensor* t : {&out_d, &lse_d, &dq_d, &dk_d, &dv_d})
    EXPECT_TRUE(t->guards_intact()) << "an output wrote outside its bounds";

  // Second calls reuse the cached plans: forward must repeat bit for bit, and backward must
  // overwrite (an accumulating dk/dv would come out doubled).
  ASSERT_TRUE(cuda::attention_cudnn_forward(out_d, lse_d, q_d, k_d, v_d, scale));
  EXPECT_EQ(out_d.download(), out);
  EXPECT_EQ(lse_d.download(), lse);
  ASSERT_TRUE(
      cuda::attention_cudnn_backward(dq_d, dk_d, dv_d, dout_d, q_d, k_d, v_d, out_d, lse_d, scale));
  EXPECT_LT(rel_l2(dq_d.download(), dq), 1e-2) << "dq, second call";
  EXPECT_LT(rel_l2(dk_d.download(), dk), 1e-2) << "dk, second call";
  EXPECT_LT(rel_l2(dv_d.download(), dv), 1e-2) << "dv, second call";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionCudnnTest,
    ::testing::Combine(::testing::Values(AttnCase{2, 128, 8, 2, 64},    // GQA, G = 4
                                         AttnCase{1, 1000, 4, 4, 128},  // MHA, T % 128 != 0
                                         AttnCase{3, 37, 4, 1, 64}),    // MQA, short odd T
                       ::testing::Values(DType::bf16, DType::f16)),
    [](const auto& info) {
      const AttnCase& c = std::get<0>(info.param);
      return fmt::format("B{}_T{}_Hq{}_Hkv{}_D{}_{}", c.num_b, c.num_t, c.num_hq, c.num_hkv,
                         c.head_dim, dtype_name(std::get<1>(info.param)));
    });

// cuDNN's SDPA takes 16-bit inputs only; f32 is the native kernel's (attention.cu dispatches).
TEST(AttentionCudnn, RejectsF32) {
  TESSERA_REQUIRE_GPU();
  const Shape s{1, 8, 2, 64}, lse_shape{1, 2, 8};
  DeviceTensor q(DType::f32, s), k(DType::f32, s), v(DType::f32, s), out(DType::f32, s);
  DeviceTensor lse(DType::f32, lse_shape);
  EXPECT_THROW(cuda::attention_cudnn_forward(out, lse, q, k, v, 0.125f), Error);
}

// One dtype per call: f16 q with bf16 k/v/out is a bug in the caller, not a conversion.
TEST(AttentionCudnn, RejectsMixedSixteenBitTypes) {
  TESSERA_REQUIRE_GPU();
  const Shape s{1, 8, 2, 64}, lse_shape{1, 2, 8};
  DeviceTensor q(DType::f16, s), k(DType::bf16, s), v(DType::bf16, s), out(DType::bf16, s);
  DeviceTensor lse(DType::f32, lse_shape);
  EXPECT_THROW(cuda::attention_cudnn_forward(out, lse, q, k, v, 0.125f), Error);
}

}  // namespace
}  // namespace tessera::testing
