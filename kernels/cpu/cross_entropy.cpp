// Softmax cross-entropy over a padded vocabulary, CPU reference, one row at a time in double.
// Only columns [0, vocab_size) enter the softmax; padding columns get zero gradient. Rows with a
// negative target are ignored: loss 0 and zero gradient, but lse is still the row's log-sum-exp.
// losses and lse are f32, or f64 when the logits are f64 (exact finite-difference tests).
// Shape letters: N rows (= B*T), V padded vocabulary width (>= vocab_size).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {
namespace {

// Checks logits (N, V), targets (N) and the vocabulary size; every target must be a real class
// (< vocab_size) or negative (ignored). Returns N.
int64_t check_ce_args(const Tensor& logits, const Tensor& targets, int vocab_size,
                      const char* op) {
  check_compute_dtype(logits, op, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", op, logits.str());
  const int64_t num_rows = logits.dim(0);
  TS_CHECK(vocab_size >= 1 && vocab_size <= logits.dim(1),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, logits.dim(1));
  check_host(targets, op, "targets");
  TS_CHECK(targets.dtype == DType::i32, "{}: targets is {}, expected i32", op, targets.str());
  check_shape(targets, Shape{num_rows}, op, "targets");
  // Checked here, before any parallel loop: an exception cannot leave an OpenMP region.
  const int32_t* tgt = targets.ptr<int32_t>();
  for (int64_t n = 0; n < num_rows; ++n)
    TS_CHECK(tgt[n] < vocab_size, "{}: targets[{}] = {} is not below vocab_size = {}", op, n,
             tgt[n], vocab_size);
  return num_rows;
}

// losses (N) and lse (N) f32 or T; logits (N, V); targets (N).
template <class T>
void forward_impl(const Tensor& losses, const Tensor& lse, const T* logits,
                  const int32_t* targets, int64_t num_rows, int64_t width, int vocab_size) {
#pragma omp parallel for schedule(static) if (num_rows * vocab_size > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    // The max is subtracted so exp() cannot overflow; a NaN logit makes this row's sum NaN.
    double max_logit = -std::numeric_limits<double>::infinity();
    for (int c = 0; c < vocab_size; ++c) max_logit = std::max(max_logit, double(row[c]));
    double sum = 0.0;
    for (int c = 0; c < vocab_size; ++c) sum += std::exp(double(row[c]) - max_logit);
    const double row_lse = max_logit + std::log(sum);
    store_stat(lse, n, row_lse);
    store_stat(losses, n, targets[n] < 0 ? 0.0 : row_lse - double(row[targets[n]]));
  }
}

// dlogits (N, V) may be the same buffer as logits: each element is read before it is written.
template <class T>
void backward_impl(T* dlogits, const T* logits, const Tensor& lse, const int32_t* targets,
                   int64_t num_rows, int64_t width, int vocab_size, double dloss) {
#pragma omp parallel for schedule(static) if (num_rows * vocab_size > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    T* drow = dlogits + n * width;
    const int32_t y = targets[n];
    if (y < 0) {
      std::fill(drow, drow + width, T(0));
      continue;
    }
    const double row_lse = load_stat(lse, n);
    for (int c = 0; c < vocab_size; ++c) {
      const double p = std::exp(double(row[c]) - row_lse);
      drow[c] = T(dloss * (p - (c == y ? 1.0 : 0.0)));
    }
    std::fill(drow + vocab_size, drow + width, T(0));  // padding columns
  }
}

}  // namespace

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets,
                           int vocab_size) {
  constexpr const char* kOp = "cross_entropy_forward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, kOp);
  check_stat(losses, logits.dtype, num_rows, kOp, "losses");
  check_stat(lse, logits.dtype, num_rows, kOp, "lse");
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    forward_impl(losses, lse, logits.ptr<T>(), targets.ptr<int32_t>(), num_rows, logits.dim(1),
                 vocab_size);
  });
}

void cross_entropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                            int vocab_size, float dloss) {
  constexpr const char* kOp = "cross_entropy_backward";
  const int64_t num_rows = check_ce_args(logits, targets, vocab_size, kOp);
  check_stat(lse, logits.dtype, num_rows, kOp, "lse");
  check_like(dlogits, logits.dtype, logits.shape, kOp, "dlogits");
  TS_CHECK(!overlaps(dlogits, logits) || dlogits.data == logits.data,
           "{}: dlogits partially overlaps logits; only exact aliasing (in place) is supported",
           kOp);
  TS_CHECK(!overlaps(dlogits, lse), "{}: dlogits overlaps lse", kOp);
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(dlogits.ptr<T>(), logits.ptr<T>(), lse, targets.ptr<int32_t>(), num_rows,
                  logits.dim(1), vocab_size, dloss);
  });
}

}  // namespace tessera::cpu
