// Per-row top-K of logits with tempered log-sum-exps (the distillation teacher cache), CPU
// reference: a partial sort of each row's real columns under the contract's total order (value
// descending, NaN above +inf, -0 tied with +0, ties by the lower id), then the log-sum-exps in
// double for every temperature. Not here: the distillation loss on such a cache
// (kernels/cpu/kd_sparse.cpp).
// Shape letters: N rows, V padded vocabulary width (>= vocab_size), K entries kept per row, nT
// temperatures.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// True when column a (value va) comes before column b (value vb) in the contract's order. The
// comparison of two numbers treats -0 and +0 as equal; NaNs are equal to each other.
bool ranks_before(double va, int32_t a, double vb, int32_t b) {
  const bool nan_a = std::isnan(va), nan_b = std::isnan(vb);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && va != vb) return va > vb;
  return a < b;
}

// log sum_j exp(z_j / t) over the columns c with take(c), with max_z the largest of them (the
// first in the order; -inf when all of them are -inf, giving -inf rather than -inf - -inf = NaN).
template <class T, class Take>
double tempered_lse(const T* z, int64_t count, double max_z, double t, Take&& take) {
  if (max_z == -kInf) return -kInf;
  const double m = max_z / t;
  double sum = 0.0;
  for (int64_t c = 0; c < count; ++c)
    if (take(c)) sum += std::exp(double(z[c]) / t - m);
  return m + std::log(sum);
}

}  // namespace

void topk_logits(Tensor values, Tensor ids, Tensor lse, Tensor logits, int vocab_size,
                 std::span<const float> temperatures) {
  constexpr const char* kOp = "topk_logits";
  check_compute_dtype(logits, kOp, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", kOp, logits.str());
  const int64_t num_rows = logits.dim(0), width = logits.dim(1);
  TS_CHECK(vocab_size >= 1 && vocab_size <= width, "{}: vocab_size = {} outside [1, V = {}]", kOp,
           vocab_size, width);
  check_host(values, kOp, "values");
  TS_CHECK(values.ndim() == 2 && values.dim(0) == num_rows,
           "{}: values must be (N = {}, K), got {}", kOp, num_rows, values.str());
  const int64_t k = values.dim(1);
  TS_CHECK(k >= 1 && k <= vocab_size, "{}: K = {} outside [1, vocab_size = {}]", kOp, k,
           vocab_size);
  TS_CHECK(values.dtype == DType::f32 || values.dtype == logits.dtype,
           "{}: values is {}, expected f32 or {}", kOp, values.str(), dtype_name(logits.dtype));
  check_host(ids, kOp, "ids");
  TS_CHECK(ids.dtype == DType::i32, "{}: ids is {}, expected i32", kOp, ids.str());
  check_shape(ids, Shape{num_rows, k}, kOp, "ids");
  const auto num_t = static_cast<int64_t>(temperatures.size());
  TS_CHECK(num_t >= 1, "{}: no temperatures (lse needs at least one)", kOp);
  for (float t : temperatures)
    TS_CHECK(std::isfinite(t) && t > 0.0f, "{}: temperature = {} must be positive and finite", kOp,
             t);
  check_host(lse, kOp, "lse");
  TS_CHECK(lse.dtype == DType::f32 || lse.dtype == logits.dtype,
           "{}: lse is {}, expected f32 or {}", kOp, lse.str(), dtype_name(logits.dtype));
  check_shape(lse, Shape{num_t, 2, num_rows}, kOp, "lse");
  const Tensor* outputs[] = {&values, &ids, &lse};
  for (const Tensor* out : outputs) {
    TS_CHECK(!overlaps(*out, logits), "{}: an output aliases logits", kOp);
    for (const Tensor* other : outputs)
      TS_CHECK(out == other || !overlaps(*out, *other), "{}: values, ids and lse overlap", kOp);
  }
  // One more than K when there is a tail: its first entry is the tail's max.
  const int64_t num_sorted = std::min<int64_t>(k + 1, vocab_size);
  int32_t* out_ids = ids.ptr<int32_t>();
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* all = logits.ptr<T>();
#pragma omp parallel if (num_rows * vocab_size > kMinParallelWork)
    {
      std::vector<int32_t> order(vocab_size);
      std::vector<char> in_top(vocab_size);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < num_rows; ++n) {
        const T* z = all + n * width;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + num_sorted, order.end(),
                          [&](int32_t a, int32_t b) { return ranks_before(z[a], a, z[b], b); });
        std::fill(in_top.begin(), in_top.end(), 0);
        for (int64_t i = 0; i < k; ++i) {
          const int32_t id = order[i];
          in_top[id] = 1;
          out_ids[n * k + i] = id;
          store_stat(values, n * k + i, double(z[id]));
        }
        for (int64_t t = 0; t < num_t; ++t) {
          const double temp = temperatures[t];
          store_stat(lse, (2 * t) * num_rows + n,
                     tempered_lse(z, vocab_size, z[order[0]], temp, [](int64_t) { return true; }));
          const double tail = num_sorted > k ? tempered_lse(z, vocab_size, z[order[k]], temp,
                                                            [&](int64_t c) { return !in_top[c]; })
                                             : -kInf;
          store_stat(lse, (2 * t + 1) * num_rows + n, tail);
        }
      }
    }
  });
}

}  // namespace tessera::cpu
