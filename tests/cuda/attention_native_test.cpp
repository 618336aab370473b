// Parity of the native CUDA attention (kernels/cuda/attention_native.cu) with the CPU reference
// (kernels/cpu/attention.cpp): forward out and lse, backward dq, dk, dv, for GQA groups 4/2, 8/8,
// 4/1, T = 1, 7, 100, 1000 (not multiples of the tiles), D = 8, 64, 128 (and 24, 32), f32 (FMA
// kernels), bf16 and f16 (tensor-core kernels at D = 64, 128; FMA otherwise), batch 1 and 2.
// Also: f16 with a loss-scaled dout, unsupported head dims are refused, and backward is bitwise
// repeatable.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/attention_native.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera::testing {
namespace {

// Error bounds (relative L2 against the CPU's double-precision result on the same inputs; the
// "measured" figures are the largest over this file's cases on an H200):
//  f32 (FMA kernels, f32 accumulation, expf): sums of up to T = 1000 keys (G*T queries for dk,
//      dv) in f32 give ~sqrt(n) * 2^-24 ~ 2e-6; measured 1.4e-6; bound 1e-5, far under the
//      TF32 (~3e-4) or bf16 error that a wrong path would show.
//  bf16 out: P is rounded to bf16 before P*V (2^-9 relative per weight, averaging over keys)
//      and out is rounded to bf16 (RMS 1.1e-3): measured 2.0e-3; bound 4e-3.
//  bf16 gradients: P and dS = P*(dP - Drow) are rounded to bf16 before their second GEMM, and
//      dq's terms cancel (sum_j dS_ij = 0): measured 2.8e-3; bound 6e-3.
//  f16 (not yet measured on a GPU): the same roundings with 10 mantissa bits instead of 7, each
//      8x smaller (2^-11 relative); bf16's measured errors were 1.0x (out) and 1.4x (gradients)
//      its unit roundoff 2^-9, so f16 should give ~5e-4 and ~7e-4: bounds 1e-3 and 1.5e-3 keep
//      bf16's 2x margin. Unit-variance inputs stay far inside f16's range (max 65504).
//  lse is f32 in every path, from f32 scores of exact bf16/f16 products (11-bit significands
//      multiply exactly in f32): measured 2.7e-7 (f32, bf16); bound 2e-6.
// Gradients can cancel to ~0 (at T = 1, dq = dk = 0 exactly), so their error is measured against
// max(||ref||, 0.25 sqrt(n)): the elements of these gradients are of order 1 for unit inputs.
constexpr double kOutBound[3] = {1e-5, 4e-3, 1e-3};     // f32, bf16, f16
constexpr double kGradBound[3] = {1e-5, 6e-3, 1.5e-3};  // f32, bf16, f16
constexpr double kLseBound = 2e-6;
constexpr double kGradFloor = 0.25;

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }

double grad_error(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  const double floor = kGradFloor * kGradFloor * double(got.size());
  return std::sqrt(num / std::max(den, floor));
}

struct Case {
  int64_t b, t, hq, hkv, d;
  std::string str(DType dtype) const {
    return fmt::format("{} B{} T{} Hq{} Hkv{} D{}", dtype_name(dtype), b, t, hq, hkv, d);
  }
};

void check(const std::vector<float>& got, const std::vector<float>& ref, double err, double limit,
           const std::string& what) {
  expect_same_nonfinite(got, ref, what.c_str());
  std::printf("measured %-52s err %.3e (bound %.1e)\n", what.c_str(), err, limit);
  EXPECT_LE(err, limit) << what;
}

// dout_scale multiplies dout (an FP16 run's loss scale): gradients scale with it exactly.
void run_case(DType dtype, const Case& c, uint64_t seed, float dout_scale = 1.0f) {
  std::mt19937_64 rng(seed);
  const Shape sq{c.b, c.t, c.hq, c.d}, skv{c.b, c.t, c.hkv, c.d}, sl{c.b, c.hq, c.t};
  const float scale = 1.0f / std::sqrt(float(c.d));
  std::vector<float> q = round_to(dtype, random_vector(sq.numel(), rng));
  std::vector<float> k = round_to(dtype, random_vector(skv.numel(), rng));
  std::vector<float> v = round_to(dtype, random_vector(skv.numel(), rng));
  std::vector<float> dout = round_to(dtype, random_vector(sq.numel(), rng, dout_scale));
  const int di = dtype_index(dtype);
  const std::string name =
      c.str(dtype) + (dout_scale != 1.0f ? fmt::format(" dout x{}", dout_scale) : "");

  DeviceTensor gq(dtype, sq), gk(dtype, skv), gv(dtype, skv), gout(dtype, sq), glse(DType::f32, sl);
  gq.upload(q);
  gk.upload(k);
  gv.upload(v);
  cuda::attention_native_forward(gout, glse, gq, gk, gv, scale);
  std::vector<float> out = gout.download(), lse = glse.download();
  std::vector<float> ref_out(sq.numel()), ref_lse(sl.numel());
  cpu::attention_forward(host(ref_out, sq), host(ref_lse, sl), host(q, sq), host(k, skv),
                         host(v, skv), scale);
  check(out, ref_out, rel_l2(out, ref_out), kOutBound[di], name + " out");
  check(lse, ref_lse, rel_l2(lse, ref_lse), kLseBound, name + " lse");
  EXPECT_TRUE(gout.guards_intact() && glse.guards_intact()) << name;

  // Backward from the GPU's own out and lse (what the trainer saves), on both sides.
  DeviceTensor gdout(dtype, sq), gdq(dtype, sq), gdk(dtype, skv), gdv(dtype, skv);
  gdout.upload(dout);
  cuda::attention_native_backward(gdq, gdk, gdv, gdout, gq, gk, gv, gout, glse, scale);
  std::vector<float> dq = gdq.download(), dk = gdk.download(), dv = gdv.download();
  std::vector<float> ref_dq(sq.numel()), ref_dk(skv.numel()), ref_dv(skv.numel());
  cpu::attention_backward(host(ref_dq, sq), host(ref_dk, skv), host(ref_dv, skv), host(dout, sq),
                          host(q, sq), host(k, skv), host(v, skv), host(out, sq), host(lse, sl),
                          scale);
  check(dq, ref_dq, grad_error(dq, ref_dq), kGradBound[di], name + " dq");
  check(dk, ref_dk, grad_error(dk, ref_dk), kGradBound[di], name + " dk");
  check(dv, ref_dv, grad_error(dv, ref_dv), kGradBound[di], name + " dv");
  EXPECT_TRUE(gdq.guards_intact() && gdk.guards_intact() && gdv.guards_intact()) << name;
}

void sweep(DType dtype, std::initializer_list<int64_t> ts, std::initializer_list<int64_t> ds) {
  const int64_t groups[3][2] = {{4, 2}, {8, 8}, {4, 1}};
  uint64_t seed = 100;
  for (int64_t t : ts)
    for (int64_t d : ds)
      for (const auto& g : groups) run_case(dtype, Case{1, t, g[0], g[1], d}, ++seed);
}

TEST(CudaAttentionNative, ShortSequencesF32) {
  TESSERA_REQUIRE_GPU();
  sweep(DType::f32, {1, 7, 100}, {8, 64, 128});
}

TEST(CudaAttentionNative, ShortSequencesBf16) {
  TESSERA_REQUIRE_GPU();
  sweep(DType::bf16, {1, 7, 100}, {8, 64, 128});
}

TEST(CudaAttentionNative, ShortSequencesF16) {
  TESSERA_REQUIRE_GPU();
  sweep(DType::f16, {1, 7, 100}, {8, 64, 128});
}

// FP16 training multiplies the loss, hence dout, by a loss scale so small gradients stay above
// f16's underflow; the kernels must then carry dout of order 1e3 (dP up to ~3e4 at D = 128, dS
// and the gradients rounded to f16 along the way) without overflow or lost accuracy.
TEST(CudaAttentionNative, LossScaledDoutF16) {
  TESSERA_REQUIRE_GPU();
  run_case(DType::f16, Case{1, 200, 4, 2, 64}, 41, 512.0f);
  run_case(DType::f16, Case{2, 77, 4, 1, 128}, 42, 512.0f);
  run_case(DType::f16, Case{1, 100, 2, 2, 24}, 43, 512.0f);
}

// T = 1000 spans many key and query tiles (and their tails); one head layout per head dim keeps
// the double-precision reference to a few seconds.
TEST(CudaAttentionNative, LongSequence) {
  TESSERA_REQUIRE_GPU();
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    run_case(dtype, Case{1, 1000, 4, 2, 64}, 11);
    run_case(dtype, Case{1, 1000, 4, 1, 128}, 12);
    run_case(dtype, Case{1, 1000, 8, 8, 8}, 13);
  }
}

TEST(CudaAttentionNative, BatchAndOtherHeadDims) {
  TESSERA_REQUIRE_GPU();
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    run_case(dtype, Case{2, 130, 4, 2, 64}, 21);
    run_case(dtype, Case{2, 130, 4, 2, 128}, 22);
    run_case(dtype, Case{2, 77, 6, 3, 24}, 23);
    run_case(dtype, Case{1, 65, 2, 1, 32}, 24);
  }
}

TEST(CudaAttentionNative, RejectsUnsupportedShapes) {
  TESSERA_REQUIRE_GPU();
  for (int64_t d : {12, 136}) {
    DeviceTensor q(DType::f32, {1, 5, 2, d}), k(DType::f32, {1, 5, 1, d}),
        v(DType::f32, {1, 5, 1, d}), out(DType::f32, {1, 5, 2, d}), lse(DType::f32, {1, 2, 5});
    EXPECT_THROW(cuda::attention_native_forward(out, lse, q, k, v, 1.0f), Error) << "D " << d;
  }
  DeviceTensor q(DType::f32, {1, 5, 3, 8}), k(DType::f32, {1, 5, 2, 8}),
      v(DType::f32, {1, 5, 2, 8}), out(DType::f32, {1, 5, 3, 8}), lse(DType::f32, {1, 3, 5});
  EXPECT_THROW(cuda::attention_native_forward(out, lse, q, k, v, 1.0f), Error) << "Hq 3, Hkv 2";
}

TEST(CudaAttentionNative, BackwardIsBitwiseRepeatable) {
  TESSERA_REQUIRE_GPU();
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    std::mt19937_64 rng(31);
    const Shape sq{1, 300, 8, 128}, skv{1, 300, 2, 128}, sl{1, 8, 300};
    DeviceTensor q(dtype, sq), k(dtype, skv), v(dtype, skv), out(dtype, sq), lse(DType::f32, sl),
        dout(dtype, sq);
    q.upload(random_vector(sq.numel(), rng));
    k.upload(random_vector(skv.numel(), rng));
    v.upload(random_vector(skv.numel(), rng));
    dout.upload(random_vector(sq.numel(), rng));
    cuda::attention_native_forward(out, lse, q, k, v, 0.088f);
    std::vector<std::vector<float>> grads[2];
    for (int rep = 0; rep < 2; ++rep) {
      DeviceTensor dq(dtype, sq), dk(dtype, skv), dv(dtype, skv);
      cuda::attention_native_backward(dq, dk, dv, dout, q, k, v, out, lse, 0.088f);
      grads[rep] = {dq.download(), dk.download(), dv.download()};
    }
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(grads[0][i], grads[1][i]) << dtype_name(dtype) << " gradient " << i;
  }
}

}  // namespace
}  // namespace tessera::testing
