// Causal grouped-query attention, CPU reference: one query row at a time, O(T) scratch per row,
// everything accumulated in double, exponentials by fast_exp. Backward recomputes the
// probabilities from the saved lse (flash-attention style) instead of storing the (T, T) matrix.
// lse is f32, or f64 when the op computes in f64 (an f32 lse would limit f64 finite-difference
// tests to ~1e-7).
// Shape letters: B batch, T time, Hq query heads, Hkv key/value heads, D head dim,
// G = Hq / Hkv query heads per key/value head; query head h reads key/value head h / G.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fast_math.h"

namespace tessera::cpu {
namespace {

struct AttnDims {
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
  int64_t group() const { return num_hq / num_hkv; }
  // Offsets of row (b, t, head) in the (B, T, H, D) tensors and of (b, h, t) in lse (B, Hq, T).
  int64_t q_row(int64_t b, int64_t t, int64_t h) const {
    return ((b * num_t + t) * num_hq + h) * head_dim;
  }
  int64_t kv_row(int64_t b, int64_t t, int64_t h) const {
    return ((b * num_t + t) * num_hkv + h) * head_dim;
  }
  int64_t lse_idx(int64_t b, int64_t h, int64_t t) const { return (b * num_hq + h) * num_t + t; }
  // Scalar work of one pass, for the OpenMP threshold.
  int64_t work() const { return num_b * num_hq * num_t * num_t * head_dim; }
};

template <class T>
double dot(const T* a, const T* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// One kv head's (T, D) rows of k or v (B, T, Hkv, D) as a (D, T) matrix of doubles.
template <class T>
void transpose_head(std::vector<double>& dst, const T* src, const AttnDims& d, int64_t b,
                    int64_t kv_h) {
  dst.resize(d.head_dim * d.num_t);
  for (int64_t j = 0; j < d.num_t; ++j) {
    const T* row = src + d.kv_row(b, j, kv_h);
    for (int64_t i = 0; i < d.head_dim; ++i) dst[i * d.num_t + j] = double(row[i]);
  }
}

// out[j] = dot(a, row j) for j < n, rows given transposed (bT is (D, T)): each sum takes the same
// products in the same order as dot(), so the doubles are dot()'s, but the loop over j vectorizes.
template <class T>
void dots_transposed(double* out, const T* a, const std::vector<double>& bT, const AttnDims& d,
                     int64_t n) {
  std::fill(out, out + n, 0.0);
  for (int64_t i = 0; i < d.head_dim; ++i) {
    const double ai = double(a[i]);
    const double* row = bT.data() + i * d.num_t;
    for (int64_t j = 0; j < n; ++j) out[j] += ai * row[j];
  }
}

// Checks the operands both passes share and returns the sizes.
AttnDims check_attention_args(const Tensor& out, const Tensor& lse, const Tensor& q,
                              const Tensor& k, const Tensor& v, const char* op) {
  check_compute_dtype(q, op, "q");
  check_float(k, q.dtype, op, "k");
  check_float(v, q.dtype, op, "v");
  check_float(out, q.dtype, op, "out");
  TS_CHECK(q.ndim() == 4, "{}: q must be (B, T, Hq, D), got {}", op, q.str());
  TS_CHECK(k.ndim() == 4, "{}: k must be (B, T, Hkv, D), got {}", op, k.str());
  const AttnDims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  TS_CHECK(d.num_hkv >= 1 && d.num_hq % d.num_hkv == 0,
           "{}: Hq = {} must be a multiple of Hkv = {}", op, d.num_hq, d.num_hkv);
  check_shape(k, Shape{d.num_b, d.num_t, d.num_hkv, d.head_dim}, op, "k");
  check_shape(v, k.shape, op, "v");
  check_shape(out, q.shape, op, "out");
  check_stat(lse, q.dtype, d.num_b * d.num_hq * d.num_t, op, "lse");
  check_shape(lse, Shape{d.num_b, d.num_hq, d.num_t}, op, "lse");
  return d;
}

// out (B,T,Hq,D), lse (B,Hq,T) f32 or T; q (B,T,Hq,D), k and v (B,T,Hkv,D).
template <class T>
void forward_impl(T* out, const Tensor& lse, const T* q, const T* k, const T* v, const AttnDims d,
                  double scale) {
  const int64_t num_rows = d.num_b * d.num_hq;
  // Parallel over (b, h): each thread owns whole output rows and lse entries.
#pragma omp parallel for schedule(static) if (d.work() > kMinParallelWork)
  for (int64_t bh = 0; bh < num_rows; ++bh) {
    const int64_t b = bh / d.num_hq, h = bh % d.num_hq, kv_h = h / d.group();
    std::vector<double> scores(d.num_t);  // (T) scaled scores of one query row, then exp(s - max)
    std::vector<double> acc(d.head_dim);  // (D)
    std::vector<double> k_t;              // (D, T) this head's keys, transposed
    transpose_head(k_t, k, d, b, kv_h);
    for (int64_t t = 0; t < d.num_t; ++t) {
      const T* q_t = q + d.q_row(b, t, h);
      dots_transposed(scores.data(), q_t, k_t, d, t + 1);  // causal: keys 0..t only
      double max_score = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= t; ++j) {
        scores[j] *= scale;
        max_score = std::max(max_score, scores[j]);
      }
      // Subtracting the max keeps exp() in range; a NaN score poisons sum, lse and out of this
      // row only.
      for (int64_t j = 0; j <= t; ++j) scores[j] = fast_exp(scores[j] - max_score);  // vectorizes
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j <= t; ++j) {
        const double p = scores[j];
        sum += p;
        const T* v_j = v + d.kv_row(b, j, kv_h);
        for (int64_t i = 0; i < d.head_dim; ++i) acc[i] += p * double(v_j[i]);
      }
      T* out_t = out + d.q_row(b, t, h);
      for (int64_t i = 0; i < d.head_dim; ++i) out_t[i] = T(acc[i] / sum);
      store_stat(lse, d.lse_idx(b, h, t), max_score + std::log(sum));
    }
  }
}

// With P = exp(S - lse) rebuilt per row:
//   dV += P^T dO,  dP = dO V^T,  Drow = rowsum(dO * O),  dS = P * (dP - Drow),
//   dQ = scale dS K,  dK += scale dS^T Q.
// Parallel over (b, kv head): a thread owns the dk/dv rows of its kv head and the dq rows of its
// G query heads, and adds the G heads' contributions in a fixed order, so results do not depend
// on the thread count.
template <class T>
void backward_impl(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                   const T* out, const Tensor& lse, const AttnDims d, double scale) {
  const int64_t num_groups = d.num_b * d.num_hkv;
#pragma omp parallel for schedule(static) if (d.work() > kMinParallelWork)
  for (int64_t bg = 0; bg < num_groups; ++bg) {
    const int64_t b = bg / d.num_hkv, kv_h = bg % d.num_hkv;
    std::vector<double> dk_acc(d.num_t * d.head_dim, 0.0);  // (T, D) sum of dS^T Q, unscaled
    std::vector<double> dv_acc(d.num_t * d.head_dim, 0.0);  // (T, D)
    std::vector<double> probs(d.num_t);                     // (T) one row of P
    std::vector<double> dq_acc(d.head_dim);                 // (D)
    std::vector<double> dpv(d.num_t);                       // (T) dO V^T of one row
    std::vector<double> k_t, v_t;                           // (D, T) this head's k and v
    transpose_head(k_t, k, d, b, kv_h);
    transpose_head(v_t, v, d, b, kv_h);
    for (int64_t h = kv_h * d.group(); h < (kv_h + 1) * d.group(); ++h) {
      for (int64_t t = 0; t < d.num_t; ++t) {
        const T* q_t = q + d.q_row(b, t, h);
        const T* do_t = dout + d.q_row(b, t, h);
        const double row_lse = load_stat(lse, d.lse_idx(b, h, t));
        const double drow = dot(do_t, out + d.q_row(b, t, h), d.head_dim);
        dots_transposed(probs.data(), q_t, k_t, d, t + 1);
        for (int64_t j = 0; j <= t; ++j) probs[j] = fast_exp(scale * probs[j] - row_lse);
        dots_transposed(dpv.data(), do_t, v_t, d, t + 1);
        std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
        for (int64_t j = 0; j <= t; ++j) {
          const T* k_j = k + d.kv_row(b, j, kv_h);
          const double ds = probs[j] * (dpv[j] - drow);
          double* dk_j = dk_acc.data() + j * d.head_dim;
          double* dv_j = dv_acc.data() + j * d.head_dim;
          for (int64_t i = 0; i < d.head_dim; ++i) {
            dq_acc[i] += ds * double(k_j[i]);
            dk_j[i] += ds * double(q_t[i]);
            dv_j[i] += probs[j] * double(do_t[i]);
          }
        }
        T* dq_t = dq + d.q_row(b, t, h);
        for (int64_t i = 0; i < d.head_dim; ++i) dq_t[i] = T(scale * dq_acc[i]);
      }
    }
    for (int64_t t = 0; t < d.num_t; ++t) {
      T* dk_t = dk + d.kv_row(b, t, kv_h);
      T* dv_t = dv + d.kv_row(b, t, kv_h);
      for (int64_t i = 0; i < d.head_dim; ++i) {
        dk_t[i] = T(scale * dk_acc[t * d.head_dim + i]);
        dv_t[i] = T(dv_acc[t * d.head_dim + i]);
      }
    }
  }
}

}  // namespace

void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale) {
  constexpr const char* kOp = "attention_forward";
  const AttnDims d = check_attention_args(out, lse, q, k, v, kOp);
  for (const Tensor* input : {&q, &k, &v})
    TS_CHECK(!overlaps(out, *input) && !overlaps(lse, *input), "{}: outputs overlap {}", kOp,
             input->str());
  dispatch_float(q.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    forward_impl(out.ptr<T>(), lse, q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), d, scale);
  });
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                        Tensor out, Tensor lse, float scale) {
  constexpr const char* kOp = "attention_backward";
  const AttnDims d = check_attention_args(out, lse, q, k, v, kOp);
  check_like(dout, q.dtype, q.shape, kOp, "dout");
  check_like(dq, q.dtype, q.shape, kOp, "dq");
  check_like(dk, q.dtype, k.shape, kOp, "dk");
  check_like(dv, q.dtype, k.shape, kOp, "dv");
  // dq rows are written while other rows of the inputs are still being read: no aliasing.
  for (const Tensor* grad : {&dq, &dk, &dv})
    for (const Tensor* input : {&dout, &q, &k, &v, &out, &lse})
      TS_CHECK(!overlaps(*grad, *input), "{}: gradient {} overlaps input {}", kOp, grad->str(),
               input->str());
  dispatch_float(q.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(dq.ptr<T>(), dk.ptr<T>(), dv.ptr<T>(), dout.ptr<T>(), q.ptr<T>(), k.ptr<T>(),
                  v.ptr<T>(), out.ptr<T>(), lse, d, scale);
  });
}

}  // namespace tessera::cpu
