// Tests of the CPU causal GQA attention (kernels/cpu/attention.cpp): forward against a dense
// masked-softmax reference written here, finite differences for dq/dk/dv over a grid of head
// layouts (GQA, MHA, MQA) and sizes, causality, GQA = MHA with repeated k/v, f32 vs f64,
// overwrite semantics and thread-count independence.
// Shape letters: B batch, T time, Hq query heads, Hkv key/value heads, D head dim.
#include <cmath>
#include <limits>
#include <ostream>
#include <random>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_b/kernels_b_util.h"

namespace tessera::testing {
namespace {

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

TEST_P(AttentionGrid, BackwardMatchesFiniteDifferences) {
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

TEST(Attention, LongSequenceMatchesReferenceAndGradients) {
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
  EXPECT_TRUE(exactly_equal(a.out, m.out));  // same values, same order of operations
  EXPECT_TRUE(exactly_equal(a.lse, m.lse));

  HostTensor dout = randn(DType::f64, a.out.t.shape, rng);
  AttnGrads ga(a), gm(m);
  ga.backward(dout, a, 0.5f);
  gm.backward(dout, m, 0.5f);
  EXPECT_TRUE(exactly_equal(ga.dq, gm.dq));
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
  a64.q = cast_copy(a32.q, DType::f64);  // identical input values in both dtypes
  a64.k = cast_copy(a32.k, DType::f64);
  a64.v = cast_copy(a32.v, DType::f64);
  HostTensor dout32 = randn(DType::f32, a32.out.t.shape, rng);
  HostTensor dout64 = cast_copy(dout32, DType::f64);
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
  EXPECT_TRUE(exactly_equal(mixed.out, exact.out));
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
  EXPECT_TRUE(exactly_equal(dirty.dq, clean.dq));
  EXPECT_TRUE(exactly_equal(dirty.dk, clean.dk));
  EXPECT_TRUE(exactly_equal(dirty.dv, clean.dv));
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
  EXPECT_TRUE(exactly_equal(a.out, one.out));
  EXPECT_TRUE(exactly_equal(a.lse, one.lse));
  EXPECT_TRUE(exactly_equal(g3.dq, g1.dq));
  EXPECT_TRUE(exactly_equal(g3.dk, g1.dk));
  EXPECT_TRUE(exactly_equal(g3.dv, g1.dv));
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

}  // namespace
}  // namespace tessera::testing
