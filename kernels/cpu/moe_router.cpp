// CPU reference of the MoE router (kernels/ops_moe.h): softmax, top-k choice and weights
// (moe_router_forward), the load-balancing and z losses (moe_router_loss), and their gradient with
// respect to the logits (moe_router_backward). One token (row) at a time in double; float tensors
// are all f32 or all f64 (f64 for finite differences; the loss may be either), indices i32.
// Shape letters: N tokens, E experts, K top-k.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/moe.h"

namespace tessera::cpu {
namespace {

// The order of the top-k choice: larger logit first (softmax is strictly increasing, so this is
// larger probability first), NaN after every number, equal logits (-0 == +0 included) to the lower
// expert index. It reads the logits, which both backends see identically, never the rounded
// probabilities, so the CUDA kernel (which encodes the same order as an integer key) chooses the
// very same experts. A strict total order on (logit, index) pairs of one row.
bool ranks_before(double xa, int a, double xb, int b) {
  if (std::isnan(xa) || std::isnan(xb)) return !std::isnan(xa) || (std::isnan(xb) && a < b);
  return xa > xb || (xa == xb && a < b);
}

// logits or probs: (N, E).
void check_rows(const Tensor& t, const char* op, const char* name) {
  TS_CHECK(t.ndim() == 2, "{}: {} must be (N, E), got {}", op, name, t.str());
}

// topk_idx (N, K) i32 with 1 <= K <= E; returns K.
int64_t check_topk_idx(const Tensor& topk_idx, int64_t num_tokens, int64_t num_experts,
                       const char* op) {
  check_host(topk_idx, op, "topk_idx");
  TS_CHECK(topk_idx.dtype == DType::i32, "{}: topk_idx is {}, expected i32", op, topk_idx.str());
  TS_CHECK(topk_idx.ndim() == 2 && topk_idx.dim(0) == num_tokens,
           "{}: topk_idx must be (N = {}, K), got {}", op, num_tokens, topk_idx.str());
  const int64_t topk = topk_idx.dim(1);
  TS_CHECK(topk >= 1 && topk <= num_experts, "{}: K = {} outside [1, E = {}]", op, topk,
           num_experts);
  return topk;
}

// tokens_per_expert (E) i32.
void check_counts(const Tensor& counts, int64_t num_experts, const char* op) {
  check_host(counts, op, "tokens_per_expert");
  TS_CHECK(counts.dtype == DType::i32, "{}: tokens_per_expert is {}, expected i32", op,
           counts.str());
  check_shape(counts, Shape{num_experts}, op, "tokens_per_expert");
}

template <class T>
void forward_impl(T* probs, T* lse, int32_t* topk_idx, T* topk_w, const T* logits,
                  int64_t num_tokens, int64_t num_experts, int64_t topk, bool norm_topk_prob) {
#pragma omp parallel for schedule(static) if (num_tokens * num_experts > kMinParallelWork)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* x = logits + t * num_experts;
    // The max is subtracted so exp() cannot overflow; std::max skips NaN, which then poisons the
    // sum (a NaN logit makes the whole row NaN, as on the GPU).
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < num_experts; ++e) m = std::max(m, double(x[e]));
    double s = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) s += std::exp(double(x[e]) - m);
    lse[t] = T(m + std::log(s));
    for (int64_t e = 0; e < num_experts; ++e)
      probs[t * num_experts + e] = T(std::exp(double(x[e]) - m) / s);

    std::vector<int> order(static_cast<size_t>(num_experts));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + topk, order.end(),
                      [&](int a, int b) { return ranks_before(double(x[a]), a, double(x[b]), b); });
    std::vector<double> w(static_cast<size_t>(topk));
    double sum = 0.0;
    for (int64_t j = 0; j < topk; ++j) {
      w[j] = std::exp(double(x[order[j]]) - m) / s;  // probs[t, order[j]] before rounding
      sum += w[j];
    }
    for (int64_t j = 0; j < topk; ++j) {
      topk_idx[t * topk + j] = order[j];
      topk_w[t * topk + j] = T(norm_topk_prob ? w[j] / sum : w[j]);
    }
  }
}

// d_logits for one token, derived with p = probs[t,:], i_j = topk_idx[t,j], g_j = d_topk_w[t,j],
// c = tokens_per_expert, A = aux_scale, Z = z_scale and the token's share of the objective
//   L = Σ_j g_j w_j + A Σ_e c_e p_e + Z lse².
// The weights: w_j = p_{i_j} / S with S = Σ_l p_{i_l} under norm_topk_prob (else S = 1, no
// division). ∂w_j/∂p_{i_l} = δ_jl / S - p_{i_j} / S², so ∂(Σ_j g_j w_j)/∂p_{i_l} = (g_l - ḡ) / S
// with ḡ = Σ_j g_j w_j (without renormalisation: g_l). With lse held fixed,
//   dp_e = ∂L/∂p_e = A c_e + Σ_{l : i_l = e} (g_l - ḡ) / S.
// The softmax Jacobian ∂p_f/∂x_e = p_f (δ_fe - p_e) maps it to the logits: p_e (dp_e - Σ_f p_f
// dp_f). The z term acts on the logits directly, ∂lse/∂x_e = p_e, giving 2 Z lse p_e (as a term of
// dp it would be the same for every e and vanish under the Jacobian). Altogether
//   d_logits[t,e] = p_e (dp_e - Σ_f p_f dp_f + 2 Z lse).
// The choice i_j is piecewise constant in the logits: it carries no gradient.
template <class T>
void backward_impl(T* d_logits, const T* d_topk_w, const T* probs, const T* lse,
                   const int32_t* topk_idx, const int32_t* counts, int64_t num_tokens,
                   int64_t num_experts, int64_t topk, double aux_scale, double z_scale,
                   bool norm_topk_prob) {
#pragma omp parallel for schedule(static) if (num_tokens * num_experts > kMinParallelWork)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const T* p = probs + t * num_experts;
    const T* g = d_topk_w + t * topk;
    const int32_t* idx = topk_idx + t * topk;
    double sum = 1.0, g_bar = 0.0;  // S and ḡ
    if (norm_topk_prob) {
      sum = 0.0;
      for (int64_t j = 0; j < topk; ++j) sum += double(p[idx[j]]);
      for (int64_t j = 0; j < topk; ++j) g_bar += double(g[j]) * double(p[idx[j]]);
      g_bar /= sum;
    }
    std::vector<double> dp(static_cast<size_t>(num_experts));
    for (int64_t e = 0; e < num_experts; ++e) dp[e] = aux_scale * double(counts[e]);
    for (int64_t j = 0; j < topk; ++j) dp[idx[j]] += (double(g[j]) - g_bar) / sum;
    double dot = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) dot += double(p[e]) * dp[e];
    const double z_term = 2.0 * z_scale * double(lse[t]);
    for (int64_t e = 0; e < num_experts; ++e)
      d_logits[t * num_experts + e] = T(double(p[e]) * (dp[e] - dot + z_term));
  }
}

}  // namespace

void moe_router_forward(Tensor probs, Tensor lse, Tensor topk_idx, Tensor topk_w, Tensor logits,
                        bool norm_topk_prob) {
  constexpr const char* kOp = "moe_router_forward";
  check_compute_dtype(logits, kOp, "logits");
  check_rows(logits, kOp, "logits");
  const int64_t num_tokens = logits.dim(0), num_experts = logits.dim(1);
  const int64_t topk = check_topk_idx(topk_idx, num_tokens, num_experts, kOp);
  check_like(probs, logits.dtype, logits.shape, kOp, "probs");
  check_like(lse, logits.dtype, Shape{num_tokens}, kOp, "lse");
  check_like(topk_w, logits.dtype, Shape{num_tokens, topk}, kOp, "topk_w");
  const Tensor* outputs[] = {&probs, &lse, &topk_idx, &topk_w};
  for (const Tensor* a : outputs) {
    TS_CHECK(!overlaps(*a, logits), "{}: an output overlaps logits", kOp);
    for (const Tensor* b : outputs)
      TS_CHECK(a == b || !overlaps(*a, *b), "{}: probs, lse, topk_idx and topk_w must not overlap",
               kOp);
  }
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    forward_impl(probs.ptr<T>(), lse.ptr<T>(), topk_idx.ptr<int32_t>(), topk_w.ptr<T>(),
                 logits.ptr<T>(), num_tokens, num_experts, topk, norm_topk_prob);
  });
}

void moe_router_loss(Tensor loss, Tensor probs, Tensor lse, Tensor tokens_per_expert,
                     double aux_scale, double z_scale) {
  constexpr const char* kOp = "moe_router_loss";
  check_compute_dtype(probs, kOp, "probs");
  check_rows(probs, kOp, "probs");
  const int64_t num_tokens = probs.dim(0), num_experts = probs.dim(1);
  check_like(lse, probs.dtype, Shape{num_tokens}, kOp, "lse");
  check_counts(tokens_per_expert, num_experts, kOp);
  check_host(loss, kOp, "loss");
  TS_CHECK(loss.dtype == DType::f32 || loss.dtype == DType::f64,
           "{}: loss is {}, expected f32 or f64", kOp, loss.str());
  check_shape(loss, Shape{2}, kOp, "loss");
  for (const Tensor* in : {&probs, &lse, &tokens_per_expert})
    TS_CHECK(!overlaps(loss, *in), "{}: loss overlaps an input", kOp);
  double aux = 0.0, z = 0.0;
  dispatch_float(probs.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* p = probs.ptr<T>();
    // Σ_t probs[t,e] per expert, each summed in token order (independent of the thread count).
    std::vector<double> column(static_cast<size_t>(num_experts), 0.0);
    accumulate_column_sums(column.data(), num_tokens, num_experts,
                           [&](int64_t t, int64_t e) { return double(p[t * num_experts + e]); });
    const int32_t* counts = tokens_per_expert.ptr<int32_t>();
    for (int64_t e = 0; e < num_experts; ++e) aux += double(counts[e]) * column[e];
    const T* l = lse.ptr<T>();
    for (int64_t t = 0; t < num_tokens; ++t) z += double(l[t]) * double(l[t]);
  });
  store_stat(loss, 0, aux_scale * aux);
  store_stat(loss, 1, z_scale * z);
}

void moe_router_backward(Tensor d_logits, Tensor d_topk_w, Tensor probs, Tensor lse,
                         Tensor topk_idx, Tensor tokens_per_expert, double aux_scale,
                         double z_scale, bool norm_topk_prob) {
  constexpr const char* kOp = "moe_router_backward";
  check_compute_dtype(probs, kOp, "probs");
  check_rows(probs, kOp, "probs");
  const int64_t num_tokens = probs.dim(0), num_experts = probs.dim(1);
  const int64_t topk = check_topk_idx(topk_idx, num_tokens, num_experts, kOp);
  check_like(lse, probs.dtype, Shape{num_tokens}, kOp, "lse");
  check_like(d_topk_w, probs.dtype, Shape{num_tokens, topk}, kOp, "d_topk_w");
  check_like(d_logits, probs.dtype, probs.shape, kOp, "d_logits");
  check_counts(tokens_per_expert, num_experts, kOp);
  for (const Tensor* in : {&d_topk_w, &probs, &lse, &topk_idx, &tokens_per_expert})
    TS_CHECK(!overlaps(d_logits, *in), "{}: d_logits overlaps an input", kOp);
  // Checked here, before the parallel loop: an exception cannot leave an OpenMP region.
  const int32_t* idx = topk_idx.ptr<int32_t>();
  for (int64_t i = 0; i < num_tokens * topk; ++i)
    TS_CHECK(idx[i] >= 0 && idx[i] < num_experts, "{}: topk_idx[{}] = {} outside [0, E = {})", kOp,
             i, idx[i], num_experts);
  dispatch_float(probs.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(d_logits.ptr<T>(), d_topk_w.ptr<T>(), probs.ptr<T>(), lse.ptr<T>(), idx,
                  tokens_per_expert.ptr<int32_t>(), num_tokens, num_experts, topk, aux_scale,
                  z_scale, norm_topk_prob);
  });
}

}  // namespace tessera::cpu
