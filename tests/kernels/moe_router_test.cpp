// Tests of the MoE router ops (kernels/cpu/moe_router.cpp, kernels/cuda/moe_router.cu):
// moe_router_forward / loss / backward. CPU: a hand-computed example (3 tokens, 4 experts, K = 2)
// for the forward, the losses and each term of the backward; tie breaking (equal logits, -0/+0,
// -inf, NaN); K = 1 and K = E; finite differences in f64 of Σ d_topk_w·topk_w + loss[0] + loss[1]
// with and without renormalisation; f32 vs f64; shift invariance; argument checks; bounds and
// thread counts. GPU parity (f32; router tensors are f32 whatever the model's dtype): awkward
// shapes, exact topk_idx, ties, NaN, the wide-row path (E > 1024), an out-of-range index,
// N = 0, and bitwise repeatability at the training shape (N = 16K, E = 128, K = 8).
// Shape letters: N tokens, E experts, K top-k.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/memory.h"
#include "kernels/cpu/moe.h"
#include "kernels/ops_moe.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/errors.h"
#include "tests/common/gpu.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// The outputs of one forward (and the loss) on the CPU, f32 or f64.
struct Routed {
  HostTensor probs, lse, idx, w, loss;  // (N,E), (N), (N,K) i32, (N,K), (2)
  Routed(DType dtype, int64_t n, int64_t e, int64_t k)
      : probs(dtype, {n, e}),
        lse(dtype, {n}),
        idx(DType::i32, {n, k}),
        w(dtype, {n, k}),
        loss(dtype, {2}) {}
  void forward(const HostTensor& logits, bool norm) {
    ops::moe_router_forward(probs, lse, idx, w, logits, norm);
  }
  void losses(const HostTensor& counts, double aux_scale, double z_scale) {
    ops::moe_router_loss(loss, probs, lse, counts, aux_scale, z_scale);
  }
};

HostTensor from_values(DType dtype, Shape s, const std::vector<double>& v) {
  HostTensor h(dtype, s);
  EXPECT_EQ(int64_t(v.size()), h.size());
  for (int64_t i = 0; i < h.size(); ++i) h.set(i, v[i]);
  return h;
}

// ---- hand-computed example --------------------------------------------------------------------
// exp(logits) per row: {1,2,3,4} (sum 10), {3,4,3,1} (sum 11: a tie for second place),
// {1,4,1,4} (sum 10: a tie for first place).
const double kLn2 = std::log(2.0), kLn3 = std::log(3.0), kLn4 = std::log(4.0);
const std::vector<double> kHandLogits = {0.0,  kLn2, kLn3, kLn4,  //
                                         kLn3, kLn4, kLn3, 0.0,   //
                                         0.0,  kLn4, 0.0,  kLn4};
const std::vector<double> kHandProbs = {0.1,        0.2,        0.3,        0.4,         //
                                        3.0 / 11.0, 4.0 / 11.0, 3.0 / 11.0, 1.0 / 11.0,  //
                                        0.1,        0.4,        0.1,        0.4};
// Top-2 in descending order; ties (expert 0 and 2 in row 1, 1 and 3 in row 2) to the lower index.
const std::vector<int> kHandIdx = {3, 2, 1, 0, 1, 3};

TEST(MoeRouter, ForwardHandExample) {
  for (bool norm : {false, true}) {
    Routed r(DType::f64, 3, 4, 2);
    r.forward(from_values(DType::f64, {3, 4}, kHandLogits), norm);
    for (int64_t i = 0; i < 12; ++i) EXPECT_NEAR(r.probs.get(i), kHandProbs[i], 1e-15) << i;
    EXPECT_NEAR(r.lse.get(0), std::log(10.0), 1e-15);
    EXPECT_NEAR(r.lse.get(1), std::log(11.0), 1e-15);
    EXPECT_NEAR(r.lse.get(2), std::log(10.0), 1e-15);
    for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(r.idx.get(i), kHandIdx[i]) << i;
    const std::vector<double> w =
        norm ? std::vector<double>{4.0 / 7, 3.0 / 7, 4.0 / 7, 3.0 / 7, 0.5, 0.5}
             : std::vector<double>{0.4, 0.3, 4.0 / 11, 3.0 / 11, 0.4, 0.4};
    for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(r.w.get(i), w[i], 1e-15) << i << " norm " << norm;
    for (int64_t i = 0; i < 6 && !norm; ++i)  // the contract: equal bit for bit
      EXPECT_EQ(r.w.get(i), r.probs.get(i / 2 * 4 + kHandIdx[i])) << i;
  }
}

TEST(MoeRouter, LossHandExample) {
  // Column sums of probs: 0.2 + 3/11, 0.6 + 4/11, 0.4 + 3/11, 0.8 + 1/11; counts {1, 2, 1, 2}
  // (the choices above): aux = 0.2 + 1.2 + 0.4 + 1.6 + (3 + 8 + 3 + 2) / 11.
  const double aux = 3.4 + 16.0 / 11.0;
  const double z = 2 * std::pow(std::log(10.0), 2) + std::pow(std::log(11.0), 2);
  const HostTensor counts = from_values(DType::i32, {4}, {1, 2, 1, 2});
  for (DType dtype : {DType::f64, DType::f32}) {
    Routed r(dtype, 3, 4, 2);
    r.forward(from_values(dtype, {3, 4}, kHandLogits), true);
    r.losses(counts, 0.5, 0.25);
    const double tol = dtype == DType::f64 ? 1e-14 : 1e-6;
    EXPECT_NEAR(r.loss.get(0), 0.5 * aux, tol) << dtype_name(dtype);
    EXPECT_NEAR(r.loss.get(1), 0.25 * z, tol) << dtype_name(dtype);
  }
  // An f64 loss from f32 probabilities.
  Routed r(DType::f32, 3, 4, 2);
  r.forward(from_values(DType::f32, {3, 4}, kHandLogits), false);
  HostTensor loss64(DType::f64, {2});
  ops::moe_router_loss(loss64, r.probs, r.lse, counts, 1.0, 1.0);
  EXPECT_NEAR(loss64.get(0), aux, 1e-6);
  EXPECT_NEAR(loss64.get(1), z, 1e-6);
}

// Each term of the backward alone, on row 0 of the example (p = {.1, .2, .3, .4}, lse = ln 10).
TEST(MoeRouter, BackwardHandExample) {
  Routed r(DType::f64, 1, 4, 2);
  const HostTensor logits = from_values(DType::f64, {1, 4}, {0.0, kLn2, kLn3, kLn4});
  r.forward(logits, false);
  const HostTensor counts = from_values(DType::i32, {4}, {5, 0, 2, 1});
  HostTensor dx(DType::f64, {1, 4});
  const auto backward = [&](std::vector<double> g, double aux, double z, bool norm) {
    ops::moe_router_backward(dx, from_values(DType::f64, {1, 2}, g), r.probs, r.lse, r.idx, counts,
                             aux, z, norm);
  };
  const double p[4] = {0.1, 0.2, 0.3, 0.4};
  // d_topk_w = {1, 0} on expert 3: dx_e = p_3 (δ_e3 - p_e).
  backward({1.0, 0.0}, 0.0, 0.0, false);
  const double want_w[4] = {-0.04, -0.08, -0.12, 0.24};
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(dx.get(e), want_w[e], 1e-15) << e;
  // Renormalised over {3, 2} (S = 0.7): w_0 = p_3 / (p_3 + p_2), so with z = x_3 - x_2,
  // w_0 = sigmoid(z): ∂w_0/∂x_3 = -∂w_0/∂x_2 = w_0 (1 - w_0) = 12/49, others 0.
  backward({1.0, 0.0}, 0.0, 0.0, true);
  const double want_norm[4] = {0.0, 0.0, -12.0 / 49, 12.0 / 49};
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(dx.get(e), want_norm[e], 1e-15) << e;
  // Aux only: A p_e (c_e - Σ_f p_f c_f), Σ p c = 0.5 + 0.6 + 0.4 = 1.5.
  backward({0.0, 0.0}, 0.5, 0.0, false);
  for (int e = 0; e < 4; ++e)
    EXPECT_NEAR(dx.get(e), 0.5 * p[e] * (counts.get(e) - 1.5), 1e-15) << e;
  // Z only: 2 Z lse p_e.
  backward({0.0, 0.0}, 0.0, 0.25, true);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(dx.get(e), 0.5 * std::log(10.0) * p[e], 1e-15) << e;
}

// ---- the choice order -------------------------------------------------------------------------

TEST(MoeRouter, TiesNaNAndInfinity) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Row {
    std::vector<double> logits;
    std::vector<int> idx;  // K = 4 of E = 5
  };
  const Row rows[] = {
      {{1.0, 1.0, 1.0, 1.0, 1.0}, {0, 1, 2, 3}},     // all equal
      {{-0.0, 0.0, -1.0, 0.0, -0.0}, {0, 1, 3, 4}},  // -0 == +0
      {{-inf, 1.0, -inf, 0.0, -2.0}, {1, 3, 4, 0}},  // masked experts last, among equals by index
      {{nan, 2.0, 1.0, nan, 3.0}, {4, 1, 2, 0}},     // NaN after every number
      {{0.5, 2.0, 2.0, -1.0, 2.0}, {1, 2, 4, 0}},    // a three-way tie for first
  };
  const int64_t n = std::size(rows);
  for (DType dtype : {DType::f64, DType::f32}) {
    HostTensor logits(dtype, {n, 5});
    for (int64_t t = 0; t < n; ++t)
      for (int64_t e = 0; e < 5; ++e) logits.set(t * 5 + e, rows[t].logits[e]);
    Routed r(dtype, n, 5, 4);
    r.forward(logits, false);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < 4; ++j)
        EXPECT_EQ(r.idx.get(t * 4 + j), rows[t].idx[j]) << dtype_name(dtype) << " row " << t;
    }
    // -inf experts get probability 0; a NaN logit makes its row NaN (lse included).
    EXPECT_EQ(r.probs.get(2 * 5 + 0), 0.0);
    EXPECT_TRUE(std::isnan(r.lse.get(3)));
    for (int64_t e = 0; e < 5; ++e) EXPECT_TRUE(std::isnan(r.probs.get(3 * 5 + e)));
    EXPECT_EQ(r.probs.get(4 * 5 + 1), r.probs.get(4 * 5 + 4));
  }
}

TEST(MoeRouter, KOneAndKEqualsE) {
  std::mt19937_64 rng(81);
  const int64_t n = 5, e = 7;
  const HostTensor logits = randn(DType::f64, {n, e}, rng, 2.0);
  // K = E: every expert, in descending order of probability; renormalised weights are probs.
  Routed all(DType::f64, n, e, e);
  all.forward(logits, true);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<bool> seen(e, false);
    for (int64_t j = 0; j < e; ++j) {
      const int c = int(all.idx.get(t * e + j));
      ASSERT_TRUE(c >= 0 && c < e && !seen[c]) << "row " << t;
      seen[c] = true;
      EXPECT_NEAR(all.w.get(t * e + j), all.probs.get(t * e + c), 1e-15);
      if (j > 0) {
        const int64_t prev = int64_t(all.idx.get(t * e + j - 1));
        EXPECT_GT(all.probs.get(t * e + prev), all.probs.get(t * e + c));
      }
    }
  }
  // K = 1 renormalised: the weight is 1 whatever the logits, so d_topk_w has no gradient.
  Routed one(DType::f64, n, e, 1);
  one.forward(logits, true);
  for (int64_t t = 0; t < n; ++t) EXPECT_EQ(one.w.get(t), 1.0);
  HostTensor dx(DType::f64, {n, e});
  ops::moe_router_backward(dx, randn(DType::f64, {n, 1}, rng), one.probs, one.lse, one.idx,
                           filled(DType::i32, {e}, 3), 0.0, 0.0, true);
  for (int64_t i = 0; i < dx.size(); ++i) EXPECT_NEAR(dx.get(i), 0.0, 1e-16) << i;
}

// ---- finite differences -----------------------------------------------------------------------

// Logits whose order no finite-difference step can change: each row a random permutation of
// values `gap` apart, jittered by less than gap / 4 (neighbours stay gap / 2 > 0.06 apart, against
// steps of 3e-5). The row spans at most ~4, so every probability is above ~e^-4 / E and every
// gradient entry well above the rounding noise of the objective; the largest logit is near 0, so
// lse and the z loss stay O(1) (their rounding, ~1e-16 / h, is then ~1e-11 absolute).
HostTensor separated_logits(int64_t n, int64_t e, std::mt19937_64& rng) {
  HostTensor x(DType::f64, {n, e});
  const double gap = std::min(0.37, 4.0 / double(e));
  std::uniform_real_distribution<double> jitter(-gap / 4, gap / 4);
  std::vector<int> perm(e);
  for (int64_t t = 0; t < n; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t c = 0; c < e; ++c) x.set(t * e + c, gap * (perm[c] - (e - 1)) + jitter(rng));
  }
  return x;
}

// The backward against central differences of its defining objective,
//   Σ_{t,j} d_topk_w[t,j] topk_w[t,j] + loss[0] + loss[1],
// computed by forward + loss, with the choice held fixed (checked at every evaluation). Every
// logit is checked. Budget as kFdTol's (tests/common/tensors.h): the objective is smooth at these
// points, with entries of d_logits down to ~1e-4.
TS_FD_TEST(MoeRouter, BackwardMatchesFiniteDifferences, "moe_router_forward", "moe_router_loss",
           "moe_router_backward") {
  std::mt19937_64 rng(82);
  struct Case {
    int64_t n, e, k;
  };
  for (const Case& c : {Case{3, 8, 2}, Case{2, 5, 5}, Case{4, 16, 1}, Case{2, 33, 8}}) {
    for (bool norm : {false, true}) {
      const std::string what = "N=" + std::to_string(c.n) + " E=" + std::to_string(c.e) +
                               " K=" + std::to_string(c.k) + (norm ? " renormalised" : "");
      HostTensor logits = separated_logits(c.n, c.e, rng);
      const HostTensor g = randn(DType::f64, {c.n, c.k}, rng);
      const HostTensor counts = randint({c.e}, 0, 11, rng);
      const double aux_scale = 0.3, z_scale = 0.2;
      Routed base(DType::f64, c.n, c.e, c.k);
      base.forward(logits, norm);
      base.losses(counts, aux_scale, z_scale);
      HostTensor dx = filled(DType::f64, {c.n, c.e}, kNaN);  // must be overwritten
      ops::moe_router_backward(dx, g, base.probs, base.lse, base.idx, counts, aux_scale, z_scale,
                               norm);

      Routed probe(DType::f64, c.n, c.e, c.k);
      bool choice_changed = false;
      const auto objective = [&] {
        probe.forward(logits, norm);
        probe.losses(counts, aux_scale, z_scale);
        for (int64_t i = 0; i < probe.idx.size(); ++i)
          choice_changed = choice_changed || probe.idx.get(i) != base.idx.get(i);
        // Differences from the base point: exact zeros for what a step does not touch.
        double sum = 0.0;
        for (int64_t i = 0; i < g.size(); ++i) sum += g.get(i) * (probe.w.get(i) - base.w.get(i));
        return sum + (probe.loss.get(0) - base.loss.get(0)) +
               (probe.loss.get(1) - base.loss.get(1));
      };
      expect_grad_matches(logits, dx, objective, kFdTol, what.c_str(), kFdStep, 1 << 20);
      EXPECT_FALSE(choice_changed) << what << ": a step changed the top-k choice";
    }
  }
}

// ---- precision, checks, bounds, threads -------------------------------------------------------

double value_at(const HostTensor& h, int64_t i) { return h.get(i); }
template <class V>
double value_at(const std::vector<V>& v, int64_t i) {
  return double(v[size_t(i)]);
}

// The size of the terms that make up token t's d_logits entries, per unit of p_e: |dp_e| is at
// most A max_e c_e + max_j |g_j| (2 max_j |g_j| / S renormalised), beside |2 Z lse|. An entry is
// p_e (dp_e - Σ_f p_f dp_f + 2 Z lse), so rounding errs by a few ulp of p_e times this.
template <class P, class G, class I, class C>
double term_scale(const P& probs, const P& lse, const G& g, const I& idx, const C& counts,
                  double aux_scale, double z_scale, bool norm, int64_t t, int64_t e, int64_t k) {
  double max_g = 0.0, s = 0.0, max_c = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    max_g = std::max(max_g, std::fabs(value_at(g, t * k + j)));
    s += value_at(probs, t * e + int64_t(value_at(idx, t * k + j)));
  }
  for (int64_t c = 0; c < e; ++c) max_c = std::max(max_c, std::fabs(value_at(counts, c)));
  return aux_scale * max_c + (norm ? 2.0 * max_g / s : max_g) +
         std::fabs(2.0 * z_scale * value_at(lse, t));
}

TEST(MoeRouter, F32AgreesWithF64) {
  std::mt19937_64 rng(83);
  const int64_t n = 9, e = 60, k = 8;
  const HostTensor logits32 = randn(DType::f32, {n, e}, rng, 2.0);
  const HostTensor logits64 = to_dtype(logits32, DType::f64);  // identical values
  const HostTensor counts = randint({e}, 0, 20, rng);
  const HostTensor g32 = randn(DType::f32, {n, k}, rng);
  for (bool norm : {false, true}) {
    Routed r32(DType::f32, n, e, k), r64(DType::f64, n, e, k);
    r32.forward(logits32, norm);
    r64.forward(logits64, norm);
    expect_identical(r32.idx, r64.idx, "topk_idx");  // the same choice on the same values
    // Double arithmetic in both, f32 rounds each output once (2^-24 relative).
    expect_close(r32.probs, r64.probs, 1.2e-7, 0.0, "probs");
    expect_close(r32.w, r64.w, 1.2e-7, 0.0, "topk_w");
    expect_close(r32.lse, r64.lse, 1.2e-7, 0.0, "lse");
    r32.losses(counts, 0.01, 0.1);
    r64.losses(counts, 0.01, 0.1);
    // From the rounded probs and lse: a few 1e-7 relative.
    expect_close(r32.loss, r64.loss, 1e-6, 0.0, "loss");
    HostTensor d32(DType::f32, {n, e}), d64(DType::f64, {n, e});
    ops::moe_router_backward(d32, g32, r32.probs, r32.lse, r32.idx, counts, 0.01, 0.1, norm);
    ops::moe_router_backward(d64, to_dtype(g32, DType::f64), r64.probs, r64.lse, r64.idx, counts,
                             0.01, 0.1, norm);
    // probs, lse (and through them S and ḡ) carry 2^-24 relative each: a few ulp of p_e M_t.
    for (int64_t t = 0; t < n; ++t) {
      const double scale =
          term_scale(r64.probs, r64.lse, g32, r64.idx, counts, 0.01, 0.1, norm, t, e, k);
      for (int64_t c = 0; c < e; ++c) {
        const int64_t i = t * e + c;
        EXPECT_NEAR(d32.get(i), d64.get(i), 1e-6 * r64.probs.get(i) * scale) << t << ", " << c;
      }
    }
  }
}

TEST(MoeRouter, ShiftInvariantAndStableForLargeLogits) {
  std::mt19937_64 rng(84);
  const int64_t n = 4, e = 16, k = 2;
  const HostTensor logits = randn(DType::f64, {n, e}, rng, 3.0);
  HostTensor shifted = logits;
  for (int64_t i = 0; i < shifted.size(); ++i) shifted.set(i, logits.get(i) + 1000.0);
  Routed r(DType::f64, n, e, k), s(DType::f64, n, e, k);
  r.forward(logits, false);
  s.forward(shifted, false);  // exp(1000) overflows unless the row max is subtracted
  expect_identical(s.idx, r.idx, "topk_idx");
  expect_close(s.probs, r.probs, 1e-10, 1e-15, "probs");  // adding 1000 costs ~1e-13 per logit
  for (int64_t t = 0; t < n; ++t) EXPECT_NEAR(s.lse.get(t), r.lse.get(t) + 1000.0, 1e-10);
}

TEST(MoeRouter, RejectsBadArguments) {
  const int64_t n = 2, e = 4;
  HostTensor logits(DType::f32, {n, e}), probs(DType::f32, {n, e}), lse(DType::f32, {n});
  HostTensor idx(DType::i32, {n, 2}), w(DType::f32, {n, 2}), counts(DType::i32, {e});
  HostTensor wide_idx(DType::i32, {n, 5}), wide_w(DType::f32, {n, 5});
  HostTensor lse64(DType::f64, {n}), idx_f32(DType::f32, {n, 2});
  EXPECT_THROW(cpu::moe_router_forward(probs, lse, wide_idx, wide_w, logits, false),
               Error);  // K > E
  EXPECT_THROW(cpu::moe_router_forward(probs, lse64, idx, w, logits, false), Error);
  EXPECT_THROW(cpu::moe_router_forward(probs, lse, idx_f32, w, logits, false), Error);
  EXPECT_THROW(cpu::moe_router_forward(logits, lse, idx, w, logits, false), Error);  // aliasing
  std::vector<uint16_t> bf16(n * e);
  const Tensor logits_bf16(bf16.data(), DType::bf16, Device::cpu, Shape{n, e});
  EXPECT_THROW(cpu::moe_router_forward(probs, lse, idx, w, logits_bf16, false), Error);
  HostTensor loss(DType::f32, {2}), loss3(DType::f32, {3}), counts5(DType::i32, {5});
  EXPECT_THROW(cpu::moe_router_loss(loss3, probs, lse, counts, 1.0, 1.0), Error);
  EXPECT_THROW(cpu::moe_router_loss(loss, probs, lse, counts5, 1.0, 1.0), Error);
  HostTensor dx(DType::f32, {n, e}), g(DType::f32, {n, 2});
  idx.set(3, 4);  // outside [0, E)
  expect_error([&] { cpu::moe_router_backward(dx, g, probs, lse, idx, counts, 1.0, 1.0, false); },
               ErrorKind::bug, {"topk_idx[3] = 4"});
  idx.set(3, 1);
  EXPECT_THROW(cpu::moe_router_backward(probs, g, probs, lse, idx, counts, 1.0, 1.0, false), Error);
}

TEST(MoeRouter, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(85);
  const int64_t n = 11, e = 23, k = 3;
  const HostTensor logits = randn(DType::f32, {n, e}, rng);
  Guarded probs({n, e}), lse({n}), idx({n, k}, DType::i32), w({n, k}), loss({2}), dx({n, e});
  cpu::moe_router_forward(probs, lse, idx, w, logits, true);
  const HostTensor counts = randint({e}, 0, 9, rng);
  cpu::moe_router_loss(loss, probs, lse, counts, 0.1, 0.1);
  cpu::moe_router_backward(dx, randn(DType::f32, {n, k}, rng), probs, lse, idx, counts, 0.1, 0.1,
                           true);
  expect_guards_intact({&probs, &lse, &idx, &w, &loss, &dx}, "moe_router");
}

TEST(MoeRouter, ThreadCountDoesNotMatter) {
  std::mt19937_64 rng(86);
  const int64_t n = 700, e = 64, k = 4;  // N E above the parallel threshold
  const HostTensor logits = randn(DType::f32, {n, e}, rng, 2.0);
  const HostTensor counts = randint({e}, 0, 100, rng), g = randn(DType::f32, {n, k}, rng);
  Routed r(DType::f32, n, e, k);
  expect_thread_independent("moe_router_forward", {&r.probs, &r.lse, &r.idx, &r.w},
                            [&] { r.forward(logits, true); });
  expect_thread_independent("moe_router_loss", {&r.loss}, [&] { r.losses(counts, 0.1, 0.2); });
  HostTensor dx(DType::f32, {n, e});
  expect_thread_independent("moe_router_backward", {&dx}, [&] {
    ops::moe_router_backward(dx, g, r.probs, r.lse, r.idx, counts, 0.1, 0.2, true);
  });
}

// ---- GPU parity (kernels/cuda/moe_router.cu) --------------------------------------------------

using testing::DeviceTensor;
using testing::host;
using testing::settle;

Tensor host_i32(std::vector<int32_t>& v, Shape s) {
  return Tensor(v.data(), DType::i32, Device::cpu, s);
}

std::vector<int32_t> download_i32(const DeviceTensor& t, int64_t n) {
  const auto bytes = t.download_bytes();
  std::vector<int32_t> v(n);
  std::memcpy(v.data(), bytes.data(), n * sizeof(int32_t));
  return v;
}

// The slots routed to each expert (what moe_dispatch_plan counts).
std::vector<int32_t> count_choices(const std::vector<int32_t>& idx, int64_t e) {
  std::vector<int32_t> counts(e, 0);
  for (int32_t c : idx) ++counts[c];
  return counts;
}

// One token's router inputs and the CPU's outputs (f32), uploaded; the GPU outputs beside them.
struct RouterCase {
  int64_t n, e, k;
  bool norm;
  double aux_scale, z_scale;
  std::vector<float> logits, probs, lse, w, g, dx;
  std::vector<int32_t> idx, counts;
  float loss[2];

  RouterCase(int64_t n_, int64_t e_, int64_t k_, bool norm_, std::vector<float> x,
             std::mt19937_64& rng)
      : n(n_),
        e(e_),
        k(k_),
        norm(norm_),
        logits(std::move(x)),
        probs(n * e),
        lse(n),
        w(n * k),
        dx(n * e),
        idx(n * k) {
    cpu::moe_router_forward(host(probs, {n, e}), host(lse, {n}), host_i32(idx, {n, k}),
                            host(w, {n, k}), host(logits, {n, e}), norm);
    counts = count_choices(idx, e);
    g = testing::random_vector(n * k, rng);
    // Scales that keep each term of d_logits O(1): A c_e ~ 1 on average.
    aux_scale = double(e) / double(std::max<int64_t>(1, n * k));
    z_scale = 0.5;
    cpu::moe_router_loss(Tensor(loss, DType::f32, Device::cpu, Shape{2}), host(probs, {n, e}),
                         host(lse, {n}), host_i32(counts, {e}), aux_scale, z_scale);
    cpu::moe_router_backward(host(dx, {n, e}), host(g, {n, k}), host(probs, {n, e}), host(lse, {n}),
                             host_i32(idx, {n, k}), host_i32(counts, {e}), aux_scale, z_scale,
                             norm);
  }
  std::string what() const {
    return "N=" + std::to_string(n) + " E=" + std::to_string(e) + " K=" + std::to_string(k) +
           (norm ? " renormalised" : "");
  }
  double term_scale(int64_t t) const {
    return testing::term_scale(probs, lse, g, idx, counts, aux_scale, z_scale, norm, t, e, k);
  }
};

// f32 against the CPU's double arithmetic rounded once:
//  probs: x - m rounds (|x - m| < ~20: 1.2e-6 relative), expf 2 ulp, the row sum ~13 adds deep
//    (8 per lane, 5 across lanes), one division: ~2e-6 relative, bound 1e-5;
//  lse: m + logf(s), ~2e-6 absolute for these rows, bound 5e-6 (1 + |lse|);
//  topk_w: probs, renormalised by a K-term f32 sum: bound 1e-5 relative;
//  loss: both backends sum exact double products in double from the same f32 probs, then round
//    to f32: within an ulp, bound 1e-6 relative;
//  d_logits (from the CPU's probs and lse): p_e (dp_e - dot + 2 Z lse) with dot a p-weighted f32
//    sum up to ~40 adds deep (E = 1100): error <~ 3e-6 p_e M_t, M_t = term_scale(t); bound 1e-5.
constexpr double kProbTol = 1e-5, kLseTol = 5e-6, kLossTol = 1e-6, kGradTol = 1e-5;

void expect_rel(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(double(got[i]) - want[i]) <= rtol * std::fabs(double(want[i])) + 1e-30)) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i];
      return;
    }
  }
}

// Runs the three ops on the GPU and compares them with the CPU's.
void expect_gpu_matches(const RouterCase& c) {
  const int64_t n = c.n, e = c.e, k = c.k;
  const std::string what = c.what();
  DeviceTensor glogits(DType::f32, {n, e}), gprobs(DType::f32, {n, e}), glse(DType::f32, {n});
  DeviceTensor gidx(DType::i32, {n, k}), gw(DType::f32, {n, k}), gcounts(DType::i32, {e});
  DeviceTensor gloss(DType::f32, {2}), gloss64(DType::f64, {2}), gg(DType::f32, {n, k});
  DeviceTensor gdx(DType::f32, {n, e});
  glogits.upload(c.logits);
  gcounts.upload_i32(c.counts);
  gg.upload(c.g);
  settle();

  ops::moe_router_forward(gprobs, glse, gidx, gw, glogits, c.norm);
  const auto idx = download_i32(gidx, n * k);
  EXPECT_EQ(idx, c.idx) << "topk_idx " << what;
  const auto probs = gprobs.download(), w = gw.download(), lse = glse.download();
  expect_rel(probs, c.probs, kProbTol, "probs " + what);
  expect_rel(w, c.w, kProbTol, "topk_w " + what);
  for (int64_t t = 0; t < n; ++t) {
    EXPECT_NEAR(lse[t], c.lse[t], kLseTol * (1.0 + std::fabs(c.lse[t]))) << "lse " << what;
    for (int64_t j = 0; j < k && !c.norm; ++j) {  // the one formula: equal bit for bit
      const int64_t at = t * e + idx[t * k + j];
      EXPECT_EQ(w[t * k + j], probs[at]) << "topk_w vs probs, token " << t << " " << what;
    }
  }
  EXPECT_TRUE(gprobs.guards_intact() && glse.guards_intact() && gidx.guards_intact() &&
              gw.guards_intact())
      << what;

  // Loss and backward from the CPU's probs and lse: each comparison isolates one kernel.
  gprobs.upload(c.probs);
  glse.upload(c.lse);
  gidx.upload_i32(c.idx);
  settle();
  ops::moe_router_loss(gloss, gprobs, glse, gcounts, c.aux_scale, c.z_scale);
  ops::moe_router_loss(gloss64, gprobs, glse, gcounts, c.aux_scale, c.z_scale);
  const auto loss = gloss.download();
  const auto loss64_bytes = gloss64.download_bytes();
  double loss64[2];
  std::memcpy(loss64, loss64_bytes.data(), sizeof loss64);
  for (int i = 0; i < 2; ++i) {
    EXPECT_NEAR(loss[i], c.loss[i], kLossTol * std::fabs(c.loss[i])) << "loss " << i << " " << what;
    EXPECT_NEAR(loss64[i], c.loss[i], kLossTol * std::fabs(c.loss[i])) << "f64 loss " << what;
  }
  EXPECT_TRUE(gloss.guards_intact() && gloss64.guards_intact()) << what;

  ops::moe_router_backward(gdx, gg, gprobs, glse, gidx, gcounts, c.aux_scale, c.z_scale, c.norm);
  const auto dx = gdx.download();
  int64_t failures = 0;
  for (int64_t t = 0; t < n; ++t) {
    const double scale = c.term_scale(t);
    for (int64_t col = 0; col < e; ++col) {
      const int64_t i = t * e + col;
      const double bound = kGradTol * c.probs[i] * scale + 1e-30;
      if (!(std::fabs(double(dx[i]) - c.dx[i]) <= bound) && failures++ < 3) {
        ADD_FAILURE() << "d_logits[" << t << ", " << col << "] " << what << ": gpu " << dx[i]
                      << ", cpu " << c.dx[i] << ", bound " << bound;
      }
    }
  }
  EXPECT_TRUE(gdx.guards_intact()) << what;
}

TS_GPU_PARITY_TEST(MoeRouter, MatchesCpu, "moe_router_forward", "moe_router_loss",
                   "moe_router_backward") {
  std::mt19937_64 rng(91);
  for (int64_t n : {1, 7, 1000}) {
    for (int64_t e : {4, 16, 60, 128, 256}) {
      for (int64_t k : {1, 2, 8}) {
        if (k > e) continue;
        for (bool norm : {false, true}) {
          const RouterCase c(n, e, k, norm, testing::random_vector(n * e, rng, 2.0f), rng);
          expect_gpu_matches(c);
        }
      }
    }
  }
  // Register-cache boundaries (E = 32, 33, 1024), K > 32 (stored by several lanes), K = E, and
  // the wide-row path that re-reads memory (E > 1024).
  struct Shape3 {
    int64_t n, e, k;
  };
  for (const Shape3& s : {Shape3{9, 32, 32}, Shape3{9, 33, 33}, Shape3{5, 512, 40},
                          Shape3{6, 1024, 8}, Shape3{7, 1100, 8}, Shape3{3, 1500, 70}}) {
    for (bool norm : {false, true}) {
      const RouterCase c(s.n, s.e, s.k, norm, testing::random_vector(s.n * s.e, rng, 2.0f), rng);
      expect_gpu_matches(c);
    }
  }
}

// Logits on a coarse grid (many exact ties), -0 beside +0, -inf, and a NaN row: the GPU must make
// exactly the CPU's choice, and agree on which outputs are NaN.
TS_GPU_TEST(MoeRouter, TiesInfinityAndNaNChooseLikeCpu) {
  std::mt19937_64 rng(92);
  for (int64_t e : {5, 60, 300, 1100}) {
    const int64_t n = 9, k = std::min<int64_t>(e, 8);
    auto x = testing::random_vector(n * e, rng, 1.0f);
    for (auto& v : x) v = std::round(v * 2.0f) / 2.0f;  // ties everywhere
    for (int64_t c = 0; c < e; ++c) x[c] = 1.0f;        // row 0: all equal
    x[e] = -0.0f;                                       // row 1: -0 and +0 on top
    x[e + 1] = 0.0f;
    for (int64_t c = 2; c < e; ++c) x[e + c] = -1.0f - float(c % 3);
    for (int64_t c = 0; c < e; c += 2) x[2 * e + c] = -INFINITY;  // row 2: masked experts
    x[3 * e + e / 2] = std::numeric_limits<float>::quiet_NaN();   // row 3: NaN
    for (int64_t c = 0; c < e; ++c) x[4 * e + c] = -INFINITY;     // row 4: all masked (NaN row)
    std::vector<float> probs(n * e), lse(n), w(n * k);
    std::vector<int32_t> idx(n * k);
    cpu::moe_router_forward(host(probs, {n, e}), host(lse, {n}), host_i32(idx, {n, k}),
                            host(w, {n, k}), host(x, {n, e}), true);
    DeviceTensor gx(DType::f32, {n, e}), gprobs(DType::f32, {n, e}), glse(DType::f32, {n});
    DeviceTensor gidx(DType::i32, {n, k}), gw(DType::f32, {n, k});
    gx.upload(x);
    settle();
    ops::moe_router_forward(gprobs, glse, gidx, gw, gx, true);
    const std::string what = "E=" + std::to_string(e);
    EXPECT_EQ(download_i32(gidx, n * k), idx) << what;
    testing::expect_same_nonfinite(gprobs.download(), probs, "probs " + what);
    testing::expect_same_nonfinite(glse.download(), lse, "lse " + what);
    testing::expect_same_nonfinite(gw.download(), w, "topk_w " + what);
  }
}

// An index outside [0, E) cannot be checked on the host without a synchronization: its token's
// gradient row must be NaN, never a plausible number; the other rows are unaffected.
TS_GPU_TEST(MoeRouter, OutOfRangeIndexGivesNaNRow) {
  std::mt19937_64 rng(93);
  const int64_t n = 3, e = 16, k = 2;
  auto x = testing::random_vector(n * e, rng);
  std::vector<float> probs(n * e), lse(n), w(n * k), g = testing::random_vector(n * k, rng);
  std::vector<int32_t> idx(n * k), counts(e, 1);
  cpu::moe_router_forward(host(probs, {n, e}), host(lse, {n}), host_i32(idx, {n, k}),
                          host(w, {n, k}), host(x, {n, e}), false);
  for (bool norm : {false, true}) {
    std::vector<int32_t> bad = idx;
    bad[1 * k + 1] = int32_t(e);  // token 1
    DeviceTensor gprobs(DType::f32, {n, e}), glse(DType::f32, {n}), gidx(DType::i32, {n, k});
    DeviceTensor gg(DType::f32, {n, k}), gcounts(DType::i32, {e}), gdx(DType::f32, {n, e});
    gprobs.upload(probs);
    glse.upload(lse);
    gidx.upload_i32(bad);
    gg.upload(g);
    gcounts.upload_i32(counts);
    settle();
    ops::moe_router_backward(gdx, gg, gprobs, glse, gidx, gcounts, 0.1, 0.1, norm);
    const auto dx = gdx.download();
    for (int64_t col = 0; col < e; ++col) {
      EXPECT_TRUE(std::isnan(dx[1 * e + col])) << col;
      EXPECT_TRUE(std::isfinite(dx[col]) && std::isfinite(dx[2 * e + col])) << col;
    }
  }
}

// N = 0: nothing to do, but the loss is written (zeros).
TS_GPU_TEST(MoeRouter, NoTokens) {
  const int64_t e = 8, k = 2;
  DeviceTensor gx(DType::f32, {0, e}), gprobs(DType::f32, {0, e}), glse(DType::f32, {0});
  DeviceTensor gidx(DType::i32, {0, k}), gw(DType::f32, {0, k}), gcounts(DType::i32, {e});
  DeviceTensor gloss(DType::f32, {2}), gdx(DType::f32, {0, e}), gg(DType::f32, {0, k});
  gcounts.upload_i32(std::vector<int32_t>(e, 0));
  settle();
  ops::moe_router_forward(gprobs, glse, gidx, gw, gx, true);
  ops::moe_router_loss(gloss, gprobs, glse, gcounts, 1.0, 1.0);
  ops::moe_router_backward(gdx, gg, gprobs, glse, gidx, gcounts, 1.0, 1.0, true);
  EXPECT_EQ(gloss.download(), (std::vector<float>{0.0f, 0.0f}));
  EXPECT_TRUE(gloss.guards_intact() && gprobs.guards_intact() && gdx.guards_intact());
}

// The training shape (Qwen3: E = 128, K = 8, N = 16K tokens): every output repeats bit for bit
// (no float atomics), and the choice is the CPU's.
TS_GPU_TEST(MoeRouter, RepeatsBitForBitAtTrainingShape) {
  std::mt19937_64 rng(94);
  const int64_t n = 16384, e = 128, k = 8;
  auto x = testing::random_vector(n * e, rng, 1.0f);
  std::vector<float> probs(n * e), lse(n), w(n * k);
  std::vector<int32_t> idx(n * k);
  cpu::moe_router_forward(host(probs, {n, e}), host(lse, {n}), host_i32(idx, {n, k}),
                          host(w, {n, k}), host(x, {n, e}), true);
  const auto counts = count_choices(idx, e);
  const auto g = testing::random_vector(n * k, rng);
  DeviceTensor gx(DType::f32, {n, e}), gprobs(DType::f32, {n, e}), glse(DType::f32, {n});
  DeviceTensor gidx(DType::i32, {n, k}), gw(DType::f32, {n, k}), gcounts(DType::i32, {e});
  DeviceTensor gloss(DType::f32, {2}), gdx(DType::f32, {n, e}), gg(DType::f32, {n, k});
  gx.upload(x);
  gcounts.upload_i32(counts);
  gg.upload(g);
  settle();
  std::vector<unsigned char> first[6];
  for (int run = 0; run < 2; ++run) {
    ops::moe_router_forward(gprobs, glse, gidx, gw, gx, true);
    ops::moe_router_loss(gloss, gprobs, glse, gcounts, 1e-2 * e / (double(n) * n * k), 1e-3 / n);
    ops::moe_router_backward(gdx, gg, gprobs, glse, gidx, gcounts, 1e-2 * e / (double(n) * n * k),
                             1e-3 / n, true);
    const DeviceTensor* outs[6] = {&gprobs, &glse, &gidx, &gw, &gloss, &gdx};
    for (int i = 0; i < 6; ++i) {
      auto bytes = outs[i]->download_bytes();
      if (run == 0)
        first[i] = std::move(bytes);
      else
        EXPECT_TRUE(bytes == first[i]) << "output " << i << " differs between runs";
    }
  }
  EXPECT_EQ(download_i32(gidx, n * k), idx);
}

}  // namespace
}  // namespace tessera::testing
