// Tests of causal GQA attention, attention_forward / attention_backward (kernels/cpu/attention.cpp;
// on CUDA kernels/cuda/attention.cu over attention_native.cu and attention_cudnn.cu). CPU: forward
// against a dense masked-softmax reference written here, finite differences for dq/dk/dv over a
// grid of head layouts (GQA, MHA, MQA) and sizes, causality, GQA = MHA with repeated k/v, f32 vs
// f64, overwrite semantics, thread-count independence; bf16/f16 against the f32 kernel rounded
// once; bounds. GPU parity, native kernel (AttentionImpl::native): GQA groups 4/2, 8/8, 4/1, T =
// 1, 7, 100, 1000, D = 8, 64, 128 (and 24, 32), f32, bf16, f16, batch 1 and 2, loss-scaled f16
// dout, refused head dims, bitwise repeatable backward. GPU parity, cuDNN's fused SDPA (CUDA
// builds: its bool-returning entry points are internal): bf16/f16 against the f32 reference on
// the same rounded inputs, printing the plan cuDNN chose.
// Shape letters: B batch, T time, Hq query heads, Hkv key/value heads, D head dim.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cstdio>
#include <ostream>
#include <tuple>
#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef TESSERA_CUDA
#include "kernels/cuda/attention_cudnn.h"
#endif

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

struct AttnCase {
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
};
void PrintTo(const AttnCase& c, std::ostream* os) {  // readable names in ctest and failures
  *os << "B=" << c.num_b << " T=" << c.num_t << " Hq=" << c.num_hq << " Hkv=" << c.num_hkv
      << " D=" << c.head_dim;
}

// Inputs and outputs of one attention call, all f64 unless built with another dtype.
struct AttnTensors {
  HostTensor q, k, v;  // (B,T,Hq,D), (B,T,Hkv,D), (B,T,Hkv,D)
  HostTensor out;      // (B,T,Hq,D)
  HostTensor lse;      // (B,Hq,T)

  AttnTensors(const AttnCase& c, DType dtype, DType lse_dtype, std::mt19937_64& rng)
      : q(randn(dtype, {c.num_b, c.num_t, c.num_hq, c.head_dim}, rng)),
        k(randn(dtype, {c.num_b, c.num_t, c.num_hkv, c.head_dim}, rng)),
        v(randn(dtype, {c.num_b, c.num_t, c.num_hkv, c.head_dim}, rng)),
        out(dtype, q.t.shape),
        lse(lse_dtype, {c.num_b, c.num_hq, c.num_t}) {}
  void forward(float scale) { cpu::attention_forward(out, lse, q, k, v, scale); }
};

struct AttnGrads {
  HostTensor dq, dk, dv;
  explicit AttnGrads(const AttnTensors& a)
      : dq(a.q.t.dtype, a.q.t.shape), dk(a.k.t.dtype, a.k.t.shape), dv(a.v.t.dtype, a.v.t.shape) {}
  void backward(const HostTensor& dout, const AttnTensors& a, float scale) {
    cpu::attention_backward(dq, dk, dv, dout, a.q, a.k, a.v, a.out, a.lse, scale);
  }
};

// Dense reference, independent of the kernel: the full (T, T) score matrix with future entries set
// to -inf, softmax as exp(s) / sum exp(s) without max subtraction (inputs are small), query head h
// reading kv head h * Hkv / Hq.
void naive_attention(HostTensor& out, HostTensor& lse, const HostTensor& q, const HostTensor& k,
                     const HostTensor& v, double scale) {
  const int64_t num_b = q.t.dim(0), num_t = q.t.dim(1), num_hq = q.t.dim(2), dim = q.t.dim(3);
  const int64_t num_hkv = k.t.dim(2);
  auto qi = [&](int64_t b, int64_t t, int64_t h, int64_t d) {
    return ((b * num_t + t) * num_hq + h) * dim + d;
  };
  auto ki = [&](int64_t b, int64_t t, int64_t h, int64_t d) {
    return ((b * num_t + t) * num_hkv + h) * dim + d;
  };
  for (int64_t b = 0; b < num_b; ++b)
    for (int64_t h = 0; h < num_hq; ++h) {
      const int64_t kv_h = h * num_hkv / num_hq;
      std::vector<std::vector<double>> scores(num_t, std::vector<double>(num_t));  // (T, T)
      for (int64_t t = 0; t < num_t; ++t)
        for (int64_t j = 0; j < num_t; ++j) {
          double s = 0.0;
          for (int64_t d = 0; d < dim; ++d) s += q.get(qi(b, t, h, d)) * k.get(ki(b, j, kv_h, d));
          scores[t][j] = j > t ? -std::numeric_limits<double>::infinity() : scale * s;
        }
      for (int64_t t = 0; t < num_t; ++t) {
        double denom = 0.0;
        for (int64_t j = 0; j < num_t; ++j) denom += std::exp(scores[t][j]);
        lse.set((b * num_hq + h) * num_t + t, std::log(denom));
        for (int64_t d = 0; d < dim; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < num_t; ++j)
            o += std::exp(scores[t][j]) / denom * v.get(ki(b, j, kv_h, d));
          out.set(qi(b, t, h, d), o);
        }
      }
    }
}

class AttentionGrid : public ::testing::TestWithParam<AttnCase> {};

TEST_P(AttentionGrid, ForwardMatchesNaiveReference) {
  const AttnCase c = GetParam();
  std::mt19937_64 rng(11);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  a.forward(scale);
  HostTensor ref_out(DType::f64, a.out.t.shape), ref_lse(DType::f64, a.lse.t.shape);
  naive_attention(ref_out, ref_lse, a.q, a.k, a.v, scale);
  // Same math in double with different summation order: a few ulps of O(1) values.
  EXPECT_LE(max_abs_diff(a.out, ref_out), 1e-12);
  EXPECT_LE(max_abs_diff(a.lse, ref_lse), 1e-12);
}

TS_FD_TEST_P(AttentionGrid, BackwardMatchesFiniteDifferences, "attention_forward",
             "attention_backward") {
  const AttnCase c = GetParam();
  std::mt19937_64 rng(12);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  HostTensor dout = randn(DType::f64, a.out.t.shape, rng);
  a.forward(scale);
  AttnGrads g(a);
  g.backward(dout, a, scale);
  AttnTensors probe = a;  // the loss perturbs a's inputs and writes probe's outputs
  auto loss = [&] {
    cpu::attention_forward(probe.out, probe.lse, a.q, a.k, a.v, scale);
    return dot(dout, probe.out);
  };
  // h = 1e-5: truncation error ~ h^2 |L'''| ~ 1e-10 and rounding ~ 1e-16 |L| / h ~ 1e-10, so the
  // absolute error is ~1e-9; against gradients floored at 1e-3 that is ~1e-6 relative, while a
  // missing term (Drow, scale, a wrong kv head) gives O(1) errors.
  const double tol = 1e-5, step = 1e-5, floor = 1e-3;
  expect_grad_matches(a.q, g.dq, loss, tol, "attention dq", step, 4096, floor);
  expect_grad_matches(a.k, g.dk, loss, tol, "attention dk", step, 4096, floor);
  expect_grad_matches(a.v, g.dv, loss, tol, "attention dv", step, 4096, floor);
}

std::vector<AttnCase> grid_cases() {
  std::vector<AttnCase> cases;
  for (auto [hq, hkv] : {std::pair{4, 2}, std::pair{2, 2}, std::pair{4, 1}})
    for (int64_t t : {1, 7})
      for (int64_t d : {2, 8, 6}) cases.push_back({2, t, hq, hkv, d});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Heads, AttentionGrid, ::testing::ValuesIn(grid_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& info) {
                           const AttnCase& c = info.param;
                           return "Hq" + std::to_string(c.num_hq) + "_Hkv" +
                                  std::to_string(c.num_hkv) + "_T" + std::to_string(c.num_t) +
                                  "_D" + std::to_string(c.head_dim);
                         });

TS_FD_TEST(Attention, LongSequenceMatchesReferenceAndGradients, "attention_forward",
           "attention_backward") {
  const AttnCase c{1, 160, 2, 1, 16};
  std::mt19937_64 rng(13);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  const float scale = 0.25f;
  a.forward(scale);
  HostTensor ref_out(DType::f64, a.out.t.shape), ref_lse(DType::f64, a.lse.t.shape);
  naive_attention(ref_out, ref_lse, a.q, a.k, a.v, scale);
  EXPECT_LE(max_abs_diff(a.out, ref_out), 1e-12);
  EXPECT_LE(max_abs_diff(a.lse, ref_lse), 1e-12);

  HostTensor dout = randn(DType::f64, a.out.t.shape, rng);
  AttnGrads g(a);
  g.backward(dout, a, scale);
  AttnTensors probe = a;
  auto loss = [&] {
    cpu::attention_forward(probe.out, probe.lse, a.q, a.k, a.v, scale);
    return dot(dout, probe.out);
  };
  // Same error budget as the grid test; a sample of elements keeps this fast.
  expect_grad_matches(a.q, g.dq, loss, 1e-5, "long dq", 1e-5, 8, 1e-3);
  expect_grad_matches(a.k, g.dk, loss, 1e-5, "long dk", 1e-5, 8, 1e-3);
  expect_grad_matches(a.v, g.dv, loss, 1e-5, "long dv", 1e-5, 8, 1e-3);
}

TEST(Attention, FutureKeysDoNotChangeThePast) {
  const AttnCase c{2, 9, 4, 2, 8};
  const int64_t t0 = 4;
  std::mt19937_64 rng(14);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  a.forward(0.35f);
  AttnTensors changed = a;
  const int64_t row = c.num_hkv * c.head_dim;  // elements per (b, t) of k and v
  for (int64_t b = 0; b < c.num_b; ++b)
    for (int64_t t = t0 + 1; t < c.num_t; ++t)
      for (int64_t i = 0; i < row; ++i) {
        const int64_t idx = (b * c.num_t + t) * row + i;
        changed.k.set(idx, changed.k.get(idx) + 3.0);
        changed.v.set(idx, -changed.v.get(idx));
      }
  changed.forward(0.35f);
  const int64_t q_row = c.num_hq * c.head_dim;
  int64_t num_future_changed = 0;
  for (int64_t b = 0; b < c.num_b; ++b)
    for (int64_t t = 0; t < c.num_t; ++t)
      for (int64_t i = 0; i < q_row; ++i) {
        const int64_t idx = (b * c.num_t + t) * q_row + i;
        if (t <= t0) {
          EXPECT_EQ(changed.out.get(idx), a.out.get(idx)) << "b " << b << " t " << t;
        } else if (changed.out.get(idx) != a.out.get(idx)) {
          ++num_future_changed;
        }
      }
  EXPECT_GT(num_future_changed, 0);  // the perturbation is visible where it should be
}

TEST(Attention, GqaEqualsMhaWithRepeatedKeysAndValues) {
  const AttnCase gqa{2, 6, 6, 2, 4};
  const AttnCase mha{2, 6, 6, 6, 4};
  const int64_t group = gqa.num_hq / gqa.num_hkv;
  std::mt19937_64 rng(15);
  AttnTensors a(gqa, DType::f64, DType::f64, rng);
  AttnTensors m(mha, DType::f64, DType::f64, rng);
  m.q = a.q;
  for (int64_t bt = 0; bt < gqa.num_b * gqa.num_t; ++bt)
    for (int64_t h = 0; h < mha.num_hq; ++h)
      for (int64_t d = 0; d < gqa.head_dim; ++d) {
        const int64_t src = (bt * gqa.num_hkv + h / group) * gqa.head_dim + d;
        const int64_t dst = (bt * mha.num_hkv + h) * mha.head_dim + d;
        m.k.set(dst, a.k.get(src));
        m.v.set(dst, a.v.get(src));
      }
  a.forward(0.5f);
  m.forward(0.5f);
  expect_identical_no_nan(a.out, m.out, "a.out vs m.out");  // same values, same order of operations
  expect_identical_no_nan(a.lse, m.lse, "a.lse vs m.lse");

  HostTensor dout = randn(DType::f64, a.out.t.shape, rng);
  AttnGrads ga(a), gm(m);
  ga.backward(dout, a, 0.5f);
  gm.backward(dout, m, 0.5f);
  expect_identical_no_nan(ga.dq, gm.dq, "ga.dq vs gm.dq");
  // dk of a shared head is the sum of the repeated heads' dk (rounded differently: tolerance).
  HostTensor dk_sum(DType::f64, a.k.t.shape), dv_sum(DType::f64, a.v.t.shape);
  for (int64_t bt = 0; bt < gqa.num_b * gqa.num_t; ++bt)
    for (int64_t h = 0; h < mha.num_hq; ++h)
      for (int64_t d = 0; d < gqa.head_dim; ++d) {
        const int64_t dst = (bt * gqa.num_hkv + h / group) * gqa.head_dim + d;
        const int64_t src = (bt * mha.num_hkv + h) * mha.head_dim + d;
        dk_sum.set(dst, dk_sum.get(dst) + gm.dk.get(src));
        dv_sum.set(dst, dv_sum.get(dst) + gm.dv.get(src));
      }
  EXPECT_LE(max_abs_diff(ga.dk, dk_sum), 1e-13);
  EXPECT_LE(max_abs_diff(ga.dv, dv_sum), 1e-13);
}

TEST(Attention, F32MatchesF64) {
  const AttnCase c{2, 11, 4, 2, 6};
  std::mt19937_64 rng(16);
  AttnTensors a32(c, DType::f32, DType::f32, rng);
  AttnTensors a64(c, DType::f64, DType::f64, rng);
  a64.q = to_dtype(a32.q, DType::f64);  // identical input values in both dtypes
  a64.k = to_dtype(a32.k, DType::f64);
  a64.v = to_dtype(a32.v, DType::f64);
  HostTensor dout32 = randn(DType::f32, a32.out.t.shape, rng);
  HostTensor dout64 = to_dtype(dout32, DType::f64);
  a32.forward(0.4f);
  a64.forward(0.4f);
  // Both accumulate in double; f32 adds one rounding of each O(1) output (6e-8 relative), and
  // backward also reads the f32-rounded out and lse, which moves P by ~1e-7 relative.
  EXPECT_LE(max_abs_diff(a32.out, a64.out), 1e-6);
  EXPECT_LE(max_abs_diff(a32.lse, a64.lse), 1e-6);
  AttnGrads g32(a32), g64(a64);
  g32.backward(dout32, a32, 0.4f);
  g64.backward(dout64, a64, 0.4f);
  EXPECT_LE(max_abs_diff(g32.dq, g64.dq), 1e-5);
  EXPECT_LE(max_abs_diff(g32.dk, g64.dk), 1e-5);
  EXPECT_LE(max_abs_diff(g32.dv, g64.dv), 1e-5);
}

TEST(Attention, F64InputsAcceptF32Lse) {
  const AttnCase c{1, 8, 2, 1, 8};
  std::mt19937_64 rng(17);
  AttnTensors exact(c, DType::f64, DType::f64, rng);
  AttnTensors mixed = exact;
  mixed.lse = HostTensor(DType::f32, exact.lse.t.shape);
  exact.forward(0.3f);
  mixed.forward(0.3f);
  expect_identical_no_nan(mixed.out, exact.out, "mixed.out vs exact.out");
  EXPECT_LE(max_abs_diff(mixed.lse, exact.lse), 1e-6);
  HostTensor dout = randn(DType::f64, exact.out.t.shape, rng);
  AttnGrads ge(exact), gm(mixed);
  ge.backward(dout, exact, 0.3f);
  gm.backward(dout, mixed, 0.3f);
  // The f32 lse perturbs P by ~1e-7 relative.
  EXPECT_LE(max_abs_diff(gm.dq, ge.dq), 1e-5);
  EXPECT_LE(max_abs_diff(gm.dk, ge.dk), 1e-5);
  EXPECT_LE(max_abs_diff(gm.dv, ge.dv), 1e-5);
}

TEST(Attention, BackwardOverwritesGradients) {
  const AttnCase c{2, 5, 4, 2, 4};
  std::mt19937_64 rng(18);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  a.forward(0.5f);
  HostTensor dout = randn(DType::f64, a.out.t.shape, rng);
  AttnGrads clean(a), dirty(a);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (HostTensor* t : {&dirty.dq, &dirty.dk, &dirty.dv})
    for (int64_t i = 0; i < t->size(); ++i) t->set(i, nan);
  clean.backward(dout, a, 0.5f);
  dirty.backward(dout, a, 0.5f);
  expect_identical_no_nan(dirty.dq, clean.dq, "dirty.dq vs clean.dq");
  expect_identical_no_nan(dirty.dk, clean.dk, "dirty.dk vs clean.dk");
  expect_identical_no_nan(dirty.dv, clean.dv, "dirty.dv vs clean.dv");
}

TEST(Attention, LargeScoresStayFinite) {
  // Scores of several hundred would overflow exp() without the max subtraction.
  const AttnCase c{1, 6, 2, 2, 4};
  std::mt19937_64 rng(19);
  AttnTensors a(c, DType::f64, DType::f64, rng);
  a.forward(300.0f);
  double v_min = a.v.get(0), v_max = a.v.get(0);
  for (int64_t i = 0; i < a.v.size(); ++i) {
    v_min = std::min(v_min, a.v.get(i));
    v_max = std::max(v_max, a.v.get(i));
  }
  for (int64_t i = 0; i < a.out.size(); ++i) {  // each output is a convex mix of value rows
    ASSERT_TRUE(std::isfinite(a.out.get(i))) << "element " << i;
    EXPECT_GE(a.out.get(i), v_min - 1e-12);
    EXPECT_LE(a.out.get(i), v_max + 1e-12);
  }
  for (int64_t i = 0; i < a.lse.size(); ++i) EXPECT_TRUE(std::isfinite(a.lse.get(i)));
}

TEST(Attention, ResultsDoNotDependOnThreadCount) {
#ifdef _OPENMP
  const AttnCase c{2, 33, 4, 2, 8};
  std::mt19937_64 rng(20);
  AttnTensors a(c, DType::f32, DType::f32, rng);
  HostTensor dout = randn(DType::f32, a.out.t.shape, rng);
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  a.forward(0.3f);
  AttnTensors one = a;
  AttnGrads g1(a);
  g1.backward(dout, a, 0.3f);
  omp_set_num_threads(3);
  a.forward(0.3f);
  AttnGrads g3(a);
  g3.backward(dout, a, 0.3f);
  omp_set_num_threads(saved_threads);
  expect_identical_no_nan(a.out, one.out, "a.out vs one.out");
  expect_identical_no_nan(a.lse, one.lse, "a.lse vs one.lse");
  expect_identical_no_nan(g3.dq, g1.dq, "g3.dq vs g1.dq");
  expect_identical_no_nan(g3.dk, g1.dk, "g3.dk vs g1.dk");
  expect_identical_no_nan(g3.dv, g1.dv, "g3.dv vs g1.dv");
#else
  GTEST_SKIP() << "built without OpenMP: the kernels are single-threaded";
#endif
}

TEST(Attention, RejectsBadArguments) {
  std::mt19937_64 rng(21);
  AttnTensors bad_heads(AttnCase{1, 3, 3, 2, 4}, DType::f64, DType::f64, rng);  // 3 % 2 != 0
  EXPECT_THROW(bad_heads.forward(1.0f), Error);
  AttnTensors a(AttnCase{1, 3, 2, 1, 4}, DType::f64, DType::f64, rng);
  AttnTensors wrong_lse = a;
  wrong_lse.lse = HostTensor(DType::f64, {1, 3, 2});  // (B, T, Hq) instead of (B, Hq, T)
  EXPECT_THROW(wrong_lse.forward(1.0f), Error);
  AttnTensors f32(AttnCase{1, 3, 2, 1, 4}, DType::f32, DType::f64, rng);  // f64 lse, f32 inputs
  EXPECT_THROW(f32.forward(1.0f), Error);
  AttnTensors short_kv = a;
  short_kv.k = HostTensor(DType::f64, {1, 2, 1, 4});
  EXPECT_THROW(short_kv.forward(1.0f), Error);
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Attention) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_b = 2, num_t = 5, num_hq = 4, num_hkv = 2, head_dim = 8;
    const Shape qs{num_b, num_t, num_hq, head_dim}, kvs{num_b, num_t, num_hkv, head_dim};
    const float scale = 1.0f / std::sqrt(float(head_dim));
    expect_contract(
        "attention_forward", dt,
        {narrow(qs), f32({num_b, num_hq, num_t}), narrow(qs, 2.0), narrow(kvs, 2.0), narrow(kvs)},
        [=](const auto& t) {
          ops::attention_forward(t[0], t[1], t[2], t[3], t[4], scale, ops::AttentionImpl::cudnn);
        },
        60);
    // Backward on the forward's own out and lse, as in training.
    const std::vector<Operand> bwd{narrow(qs),  narrow(kvs), narrow(kvs),
                                   narrow(qs),  narrow(qs),  narrow(kvs),
                                   narrow(kvs), narrow(qs),  f32({num_b, num_hq, num_t})};
    const OpFn backward = [=](const auto& t) {
      ops::attention_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], scale,
                              ops::AttentionImpl::cudnn);
    };
    expect_steps("attention_forward then backward", dt, bwd,
                 {[=](const auto& t) {
                    ops::attention_forward(t[7], t[8], t[4], t[5], t[6], scale,
                                           ops::AttentionImpl::cudnn);
                  },
                  backward},
                 61);
    expect_contract("attention_backward on random out and lse", dt, bwd, backward, 62);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Attention, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(99);
  const Shape sq{2, 5, 4, 8}, skv{2, 5, 2, 8};
  const HostTensor q = randn(DType::f32, sq, rng), k = randn(DType::f32, skv, rng);
  const HostTensor v = randn(DType::f32, skv, rng), dout = randn(DType::f32, sq, rng);
  Guarded out(sq), lse({2, 4, 5}), dq(sq), dk(skv), dv(skv);
  cpu::attention_forward(out, lse, q, k, v, 0.35f);
  cpu::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, 0.35f);
  expect_guards_intact({&out, &lse, &dq, &dk, &dv}, "attention");
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/attention_native.cu)
// ----------------------------------------------------------------

namespace tessera::testing::gpu_native {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

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
  ops::attention_forward(gout, glse, gq, gk, gv, scale, ops::AttentionImpl::native);
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
  ops::attention_backward(gdq, gdk, gdv, gdout, gq, gk, gv, gout, glse, scale,
                          ops::AttentionImpl::native);
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

TS_GPU_PARITY_TEST(AttentionNative, ShortSequencesF32, "attention_forward", "attention_backward") {
  sweep(DType::f32, {1, 7, 100}, {8, 64, 128});
}

TS_GPU_TEST(AttentionNative, ShortSequencesBf16) { sweep(DType::bf16, {1, 7, 100}, {8, 64, 128}); }

TS_GPU_TEST(AttentionNative, ShortSequencesF16) { sweep(DType::f16, {1, 7, 100}, {8, 64, 128}); }

// FP16 training multiplies the loss, hence dout, by a loss scale so small gradients stay above
// f16's underflow; the kernels must then carry dout of order 1e3 (dP up to ~3e4 at D = 128, dS
// and the gradients rounded to f16 along the way) without overflow or lost accuracy.
TS_GPU_TEST(AttentionNative, LossScaledDoutF16) {
  run_case(DType::f16, Case{1, 200, 4, 2, 64}, 41, 512.0f);
  run_case(DType::f16, Case{2, 77, 4, 1, 128}, 42, 512.0f);
  run_case(DType::f16, Case{1, 100, 2, 2, 24}, 43, 512.0f);
}

// T = 1000 spans many key and query tiles (and their tails); one head layout per head dim keeps
// the double-precision reference to a few seconds.
TS_GPU_TEST(AttentionNative, LongSequence) {
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    run_case(dtype, Case{1, 1000, 4, 2, 64}, 11);
    run_case(dtype, Case{1, 1000, 4, 1, 128}, 12);
    run_case(dtype, Case{1, 1000, 8, 8, 8}, 13);
  }
}

TS_GPU_TEST(AttentionNative, BatchAndOtherHeadDims) {
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    run_case(dtype, Case{2, 130, 4, 2, 64}, 21);
    run_case(dtype, Case{2, 130, 4, 2, 128}, 22);
    run_case(dtype, Case{2, 77, 6, 3, 24}, 23);
    run_case(dtype, Case{1, 65, 2, 1, 32}, 24);
  }
}

TS_GPU_TEST(AttentionNative, RejectsUnsupportedShapes) {
  for (int64_t d : {12, 136}) {
    DeviceTensor q(DType::f32, {1, 5, 2, d}), k(DType::f32, {1, 5, 1, d}),
        v(DType::f32, {1, 5, 1, d}), out(DType::f32, {1, 5, 2, d}), lse(DType::f32, {1, 2, 5});
    EXPECT_THROW(ops::attention_forward(out, lse, q, k, v, 1.0f, ops::AttentionImpl::native), Error)
        << "D " << d;
  }
  DeviceTensor q(DType::f32, {1, 5, 3, 8}), k(DType::f32, {1, 5, 2, 8}),
      v(DType::f32, {1, 5, 2, 8}), out(DType::f32, {1, 5, 3, 8}), lse(DType::f32, {1, 3, 5});
  EXPECT_THROW(ops::attention_forward(out, lse, q, k, v, 1.0f, ops::AttentionImpl::native), Error)
      << "Hq 3, Hkv 2";
}

TS_GPU_TEST(AttentionNative, BackwardIsBitwiseRepeatable) {
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    std::mt19937_64 rng(31);
    const Shape sq{1, 300, 8, 128}, skv{1, 300, 2, 128}, sl{1, 8, 300};
    DeviceTensor q(dtype, sq), k(dtype, skv), v(dtype, skv), out(dtype, sq), lse(DType::f32, sl),
        dout(dtype, sq);
    q.upload(random_vector(sq.numel(), rng));
    k.upload(random_vector(skv.numel(), rng));
    v.upload(random_vector(skv.numel(), rng));
    dout.upload(random_vector(sq.numel(), rng));
    ops::attention_forward(out, lse, q, k, v, 0.088f, ops::AttentionImpl::native);
    std::vector<std::vector<float>> grads[2];
    for (int rep = 0; rep < 2; ++rep) {
      DeviceTensor dq(dtype, sq), dk(dtype, skv), dv(dtype, skv);
      ops::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, 0.088f,
                              ops::AttentionImpl::native);
      grads[rep] = {dq.download(), dk.download(), dv.download()};
    }
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(grads[0][i], grads[1][i]) << dtype_name(dtype) << " gradient " << i;
  }
}

}  // namespace
}  // namespace tessera::testing::gpu_native

// ---- GPU parity (kernels/cuda/attention_cudnn.cu) ----------------------------------------------

#ifdef TESSERA_CUDA
namespace tessera::testing::gpu_cudnn {
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

class AttentionCudnnGpu : public GpuCaseP<std::tuple<AttnCase, DType>> {};

TS_GPU_PARITY_TEST_P(AttentionCudnnGpu, MatchesCpuReference, "attention_forward",
                     "attention_backward") {
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
    Shapes, AttentionCudnnGpu,
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
TS_GPU_TEST(AttentionCudnnChecks, RejectsF32) {
  const Shape s{1, 8, 2, 64}, lse_shape{1, 2, 8};
  DeviceTensor q(DType::f32, s), k(DType::f32, s), v(DType::f32, s), out(DType::f32, s);
  DeviceTensor lse(DType::f32, lse_shape);
  EXPECT_THROW(cuda::attention_cudnn_forward(out, lse, q, k, v, 0.125f), Error);
}

// One dtype per call: f16 q with bf16 k/v/out is a bug in the caller, not a conversion.
TS_GPU_TEST(AttentionCudnnChecks, RejectsMixedSixteenBitTypes) {
  const Shape s{1, 8, 2, 64}, lse_shape{1, 2, 8};
  DeviceTensor q(DType::f16, s), k(DType::bf16, s), v(DType::bf16, s), out(DType::bf16, s);
  DeviceTensor lse(DType::f32, lse_shape);
  EXPECT_THROW(cuda::attention_cudnn_forward(out, lse, q, k, v, 0.125f), Error);
}

}  // namespace
}  // namespace tessera::testing::gpu_cudnn
#endif  // TESSERA_CUDA
