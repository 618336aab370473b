// Softmax cross-entropy over a padded vocabulary, CPU reference, one row at a time in double; the
// exponentials through fast_exp (kernels/cpu/fast_math.h), whose loops vectorize.
// Only columns [0, vocab_size) enter the softmax; padding columns get zero gradient. Rows with a
// negative target are ignored: loss 0 and zero gradient, but lse is still the row's log-sum-exp.
// losses and lse are f32, or f64 when the logits are f64 (exact finite-difference tests).
// Also the vocabulary-parallel pieces (shard max, shard sums, finish) and the sharded backward,
// whose logits are the global columns [vocab_start, vocab_start + Vl).
// Shape letters: N rows (= B*T), V padded vocabulary width (>= vocab_size), Vl one shard's width.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fast_math.h"

namespace tessera::cpu {
namespace {

// sum over c < n of exp(row[c] - shift), added in column order in double. The exponentials are
// taken a block at a time into scratch (that loop vectorizes; the ordered sum would not).
template <class T>
double sum_exp_shifted(const T* row, int64_t n, double shift) {
  constexpr int64_t kBlock = 256;
  double e[kBlock];
  double sum = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t len = std::min(kBlock, n - c0);
    for (int64_t i = 0; i < len; ++i) e[i] = fast_exp(double(row[c0 + i]) - shift);
    for (int64_t i = 0; i < len; ++i) sum += e[i];
  }
  return sum;
}

// targets (N) i32 in host memory; every target a real class (< vocab_size) or negative (ignored).
// Checked here, before any parallel loop: an exception cannot leave an OpenMP region.
void check_targets(const Tensor& targets, int64_t num_rows, int vocab_size, const char* op) {
  check_host(targets, op, "targets");
  TS_CHECK(targets.dtype == DType::i32, "{}: targets is {}, expected i32", op, targets.str());
  check_shape(targets, Shape{num_rows}, op, "targets");
  const int32_t* tgt = targets.ptr<int32_t>();
  for (int64_t n = 0; n < num_rows; ++n)
    TS_CHECK(tgt[n] < vocab_size, "{}: targets[{}] = {} is not below vocab_size = {}", op, n,
             tgt[n], vocab_size);
}

// Checks logits (N, V) and the vocabulary size. A shard (sharded = true) cannot check vocab_size
// against the padded width: only the caller knows the whole vocabulary. Returns N.
int64_t check_logits(const Tensor& logits, int vocab_size, int64_t vocab_start, bool sharded,
                     const char* op) {
  check_compute_dtype(logits, op, "logits");
  TS_CHECK(logits.ndim() == 2, "{}: logits must be (N, V), got {}", op, logits.str());
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= logits.dim(1)),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, logits.dim(1));
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  return logits.dim(0);
}

// Real (non-padding) columns of a shard `width` wide that starts at global column vocab_start:
// they come first, the rest of the shard (possibly all of it) is padding.
int64_t num_real_columns(int64_t vocab_start, int64_t width, int vocab_size) {
  return std::clamp<int64_t>(int64_t(vocab_size) - vocab_start, 0, width);
}

// losses (N) and lse (N) f32 or T; logits (N, V); targets (N).
template <class T>
void forward_impl(const Tensor& losses, const Tensor& lse, const T* logits, const int32_t* targets,
                  int64_t num_rows, int64_t width, int vocab_size) {
#pragma omp parallel for schedule(static) if (num_rows * vocab_size > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    // The max is subtracted so exp() cannot overflow; a NaN logit makes this row's sum NaN.
    double max_logit = -std::numeric_limits<double>::infinity();
    for (int c = 0; c < vocab_size; ++c) max_logit = std::max(max_logit, double(row[c]));
    const double row_lse = max_logit + std::log(sum_exp_shifted(row, vocab_size, max_logit));
    store_stat(lse, n, row_lse);
    store_stat(losses, n, targets[n] < 0 ? 0.0 : row_lse - double(row[targets[n]]));
  }
}

// dlogits (N, Vl) may be the same buffer as logits: each element is read before it is written.
// Unsharded (vocab_start = 0, Vl >= vocab_size) this is exactly the plain backward.
template <class T>
void backward_impl(T* dlogits, const T* logits, const Tensor& lse, const int32_t* targets,
                   int64_t num_rows, int64_t width, int64_t num_real, int64_t vocab_start,
                   double dloss, const T* addend) {
#pragma omp parallel for schedule(static) if (num_rows * width > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    T* drow = dlogits + n * width;
    if (targets[n] < 0) {
      std::fill(drow, drow + width, T(0));
    } else {
      const int64_t y = int64_t(targets[n]) - vocab_start;  // local column; may lie outside
      const double row_lse = load_stat(lse, n);
      const bool y_here = y >= 0 && y < num_real;
      // The target's probability first: in place, row[y] is overwritten by the loop.
      const double p_y = y_here ? fast_exp(double(row[y]) - row_lse) : 0.0;
      for (int64_t c = 0; c < num_real; ++c)  // no branch in the loop: it vectorizes
        drow[c] = T(dloss * fast_exp(double(row[c]) - row_lse));
      if (y_here) drow[y] = T(dloss * (p_y - 1.0));
      std::fill(drow + num_real, drow + width, T(0));  // padding columns
    }
    // The cross-entropy's gradient as the op without an addend gives it, plus the addend.
    if (addend != nullptr)
      for (int64_t c = 0; c < width; ++c) drow[c] += addend[n * width + c];
  }
}

// row_max (N): max over the first num_real columns of each row, -inf when there are none. NaN
// logits are skipped here (std::max keeps the running max) and poison the sums instead, as in
// forward_impl.
template <class T>
void shard_max_impl(const Tensor& row_max, const T* logits, int64_t num_rows, int64_t width,
                    int64_t num_real) {
#pragma omp parallel for schedule(static) if (num_rows * num_real > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < num_real; ++c) m = std::max(m, double(row[c]));
    store_stat(row_max, n, m);
  }
}

template <class T>
void shard_sums_impl(const Tensor& sum_exp, const Tensor& target_logit, const T* logits,
                     const Tensor& row_max, const int32_t* targets, int64_t num_rows, int64_t width,
                     int64_t num_real, int64_t vocab_start) {
#pragma omp parallel for schedule(static) if (num_rows * num_real > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* row = logits + n * width;
    const double m = load_stat(row_max, n);
    store_stat(sum_exp, n, sum_exp_shifted(row, num_real, m));
    // Targets are < vocab_size (checked), so a local column inside the shard is a real one.
    const int64_t y = int64_t(targets[n]) - vocab_start;
    const bool here = targets[n] >= 0 && y >= 0 && y < width;
    store_stat(target_logit, n, here ? double(row[y]) : 0.0);
  }
}

}  // namespace

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets,
                           int vocab_size) {
  constexpr const char* kOp = "cross_entropy_forward";
  const int64_t num_rows = check_logits(logits, vocab_size, 0, false, kOp);
  check_targets(targets, num_rows, vocab_size, kOp);
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
                            int vocab_size, float dloss, int64_t vocab_start, Tensor addend) {
  constexpr const char* kOp = "cross_entropy_backward";
  const int64_t num_rows = check_logits(logits, vocab_size, vocab_start, true, kOp);
  check_targets(targets, num_rows, vocab_size, kOp);
  check_stat(lse, logits.dtype, num_rows, kOp, "lse");
  check_like(dlogits, logits.dtype, logits.shape, kOp, "dlogits");
  TS_CHECK(!overlaps(dlogits, logits) || dlogits.data == logits.data,
           "{}: dlogits partially overlaps logits; only exact aliasing (in place) is supported",
           kOp);
  TS_CHECK(!overlaps(dlogits, lse), "{}: dlogits overlaps lse", kOp);
  if (!addend.empty()) {
    check_like(addend, logits.dtype, logits.shape, kOp, "addend");
    TS_CHECK(!overlaps(addend, dlogits), "{}: addend overlaps dlogits", kOp);
  }
  const int64_t width = logits.dim(1);
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(dlogits.ptr<T>(), logits.ptr<T>(), lse, targets.ptr<int32_t>(), num_rows, width,
                  num_real_columns(vocab_start, width, vocab_size), vocab_start, dloss,
                  addend.empty() ? nullptr : addend.ptr<T>());
  });
}

void cross_entropy_shard_max(Tensor row_max, Tensor logits, int64_t vocab_start, int vocab_size) {
  constexpr const char* kOp = "cross_entropy_shard_max";
  const int64_t num_rows = check_logits(logits, vocab_size, vocab_start, true, kOp);
  check_stat(row_max, logits.dtype, num_rows, kOp, "row_max");
  const int64_t width = logits.dim(1);
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    shard_max_impl(row_max, logits.ptr<T>(), num_rows, width,
                   num_real_columns(vocab_start, width, vocab_size));
  });
}

void cross_entropy_shard_sums(Tensor sum_exp, Tensor target_logit, Tensor logits, Tensor row_max,
                              Tensor targets, int64_t vocab_start, int vocab_size) {
  constexpr const char* kOp = "cross_entropy_shard_sums";
  const int64_t num_rows = check_logits(logits, vocab_size, vocab_start, true, kOp);
  check_targets(targets, num_rows, vocab_size, kOp);
  check_stat(row_max, logits.dtype, num_rows, kOp, "row_max");
  check_stat(sum_exp, logits.dtype, num_rows, kOp, "sum_exp");
  check_stat(target_logit, logits.dtype, num_rows, kOp, "target_logit");
  TS_CHECK(!overlaps(sum_exp, target_logit) && !overlaps(sum_exp, row_max) &&
               !overlaps(target_logit, row_max),
           "{}: sum_exp, target_logit and row_max must be distinct buffers", kOp);
  const int64_t width = logits.dim(1);
  dispatch_float(logits.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    shard_sums_impl(sum_exp, target_logit, logits.ptr<T>(), row_max, targets.ptr<int32_t>(),
                    num_rows, width, num_real_columns(vocab_start, width, vocab_size), vocab_start);
  });
}

void cross_entropy_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sum_exp,
                                Tensor target_logit, Tensor targets) {
  constexpr const char* kOp = "cross_entropy_shard_finish";
  // No logits here: row_max fixes the statistics' dtype (f32 or f64) and N.
  check_host(row_max, kOp, "row_max");
  TS_CHECK(row_max.dtype == DType::f32 || row_max.dtype == DType::f64,
           "{}: row_max is {}, expected f32 or f64", kOp, row_max.str());
  TS_CHECK(row_max.ndim() == 1, "{}: row_max must be (N), got {}", kOp, row_max.str());
  const int64_t num_rows = row_max.dim(0);
  const Shape rows{num_rows};
  check_like(sum_exp, row_max.dtype, rows, kOp, "sum_exp");
  check_like(target_logit, row_max.dtype, rows, kOp, "target_logit");
  check_like(losses, row_max.dtype, rows, kOp, "losses");
  check_like(lse, row_max.dtype, rows, kOp, "lse");
  check_host(targets, kOp, "targets");
  TS_CHECK(targets.dtype == DType::i32, "{}: targets is {}, expected i32", kOp, targets.str());
  check_shape(targets, rows, kOp, "targets");
  for (const Tensor* out : {&losses, &lse})
    for (const Tensor* other : {&row_max, &sum_exp, &target_logit, &targets})
      TS_CHECK(!overlaps(*out, *other), "{}: losses and lse must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  const int32_t* tgt = targets.ptr<int32_t>();
#pragma omp parallel for schedule(static) if (num_rows > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const double row_lse = load_stat(row_max, n) + std::log(load_stat(sum_exp, n));
    store_stat(lse, n, row_lse);
    store_stat(losses, n, tgt[n] < 0 ? 0.0 : row_lse - load_stat(target_logit, n));
  }
}

}  // namespace tessera::cpu
