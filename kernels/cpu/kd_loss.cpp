// Knowledge-distillation loss (forward or reverse KL between the tempered softmaxes of student and
// teacher logits), CPU reference, one row at a time in double. Only columns [0, vocab_size) enter
// the softmaxes; padding columns get zero gradient; rows with a negative target are ignored (loss
// 0, zero gradient, lse still written). Statistics are f32, or f64 when the logits are f64 (exact
// finite-difference tests). Also the vocabulary-parallel pieces (shard max, shard sums, finish)
// and the sharded backward. The unsharded forward runs the same three steps on the whole row, so
// with one shard the protocol equals it bit for bit.
// Shape letters: N rows (= B*T), V padded vocabulary width (>= vocab_size), Vl one shard's width.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {
namespace {

void check_temperature(float temperature, const char* op) {
  TS_CHECK(std::isfinite(temperature) && temperature > 0.0f,
           "{}: temperature = {} must be positive and finite", op, temperature);
}

// Checks student and teacher (N, V) of one dtype and the vocabulary size. A shard (sharded =
// true) cannot check vocab_size against its width: only the caller knows the whole vocabulary.
// Returns N.
int64_t check_logits(const Tensor& student, const Tensor& teacher, int vocab_size,
                     int64_t vocab_start, bool sharded, const char* op) {
  check_compute_dtype(student, op, "student");
  TS_CHECK(student.ndim() == 2, "{}: student must be (N, V), got {}", op, student.str());
  check_like(teacher, student.dtype, student.shape, op, "teacher");
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= student.dim(1)),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, student.dim(1));
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  return student.dim(0);
}

// targets (N) i32 in host memory; only their sign is read (negative: the row is ignored).
void check_targets(const Tensor& targets, int64_t num_rows, const char* op) {
  check_host(targets, op, "targets");
  TS_CHECK(targets.dtype == DType::i32, "{}: targets is {}, expected i32", op, targets.str());
  check_shape(targets, Shape{num_rows}, op, "targets");
}

// A statistic of `shape`: f32, or `dtype` (the logits' f64).
void check_stat_shape(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                      const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::f32 || t.dtype == dtype, "{}: {} is {}, expected f32 or {}", op, name,
           t.str(), dtype_name(dtype));
  check_shape(t, shape, op, name);
}

// Real (non-padding) columns of a shard `width` wide that starts at global column vocab_start:
// they come first, the rest of the shard (possibly all of it) is padding.
int64_t num_real_columns(int64_t vocab_start, int64_t width, int vocab_size) {
  return std::clamp<int64_t>(int64_t(vocab_size) - vocab_start, 0, width);
}

// Row statistics: the maxima of us and ut, the sums of exp(u - max), the cross term (ops.h).
struct RowMax {
  double s = -std::numeric_limits<double>::infinity();
  double t = -std::numeric_limits<double>::infinity();
};
struct RowSums {
  double s = 0.0, t = 0.0, cross = 0.0;
};

// Maxima of the tempered logits over the first num_real columns; -inf when there are none. NaN
// logits are skipped here (std::max keeps the running max) and poison the sums instead.
template <class T>
RowMax max_of_row(const T* zs, const T* zt, int64_t num_real, double temperature) {
  RowMax m;
  for (int64_t c = 0; c < num_real; ++c) {
    m.s = std::max(m.s, double(zs[c]) / temperature);
    m.t = std::max(m.t, double(zt[c]) / temperature);
  }
  return m;
}

// Sums over the first num_real columns with the (global) maxima m.
template <class T>
RowSums sums_of_row(const T* zs, const T* zt, int64_t num_real, const RowMax& m, double temperature,
                    bool reverse) {
  RowSums r;
  for (int64_t c = 0; c < num_real; ++c) {
    const double us = double(zs[c]) / temperature, ut = double(zt[c]) / temperature;
    const double es = std::exp(us - m.s), et = std::exp(ut - m.t);
    r.s += es;
    r.t += et;
    r.cross += reverse ? es * (us - ut) : et * (ut - us);
  }
  return r;
}

// lse_s, lse_t and the KL divergence of one row from its global maxima and sums. The KL is the
// cross term's mean plus lse_s - lse_t (forward), written as the maxima's difference plus the
// log of the sums' ratio so that two large lse values are never subtracted.
struct RowResult {
  double lse_s, lse_t, kl;
};
RowResult finish_row(const RowMax& m, const RowSums& r, bool reverse) {
  RowResult out{m.s + std::log(r.s), m.t + std::log(r.t), 0.0};
  out.kl = reverse ? r.cross / r.s + (m.t - m.s) + std::log(r.t / r.s)
                   : r.cross / r.t + (m.s - m.t) + std::log(r.s / r.t);
  return out;
}

void store_row(const Tensor& losses, const Tensor& lse, int64_t n, int64_t num_rows,
               const RowResult& r, bool ignored, double temperature) {
  store_stat(lse, n, r.lse_s);
  store_stat(lse, num_rows + n, r.lse_t);
  store_stat(losses, n, ignored ? 0.0 : temperature * temperature * r.kl);
}

// Runs f(n, zs, zt) for every row n of student and teacher (N, V), with zs and zt that row's
// logits (const T*, T the logits' type), rows in parallel when `work` elements are enough.
template <class F>
void for_each_row_pair(const Tensor& student, const Tensor& teacher, int64_t work, const char* op,
                       F&& f) {
  const int64_t num_rows = student.dim(0), width = student.dim(1);
  dispatch_float(student.dtype, op, [&](auto zero) {
    using T = decltype(zero);
    const T* zs = student.ptr<T>();
    const T* zt = teacher.ptr<T>();
#pragma omp parallel for schedule(static) if (work > kMinParallelWork)
    for (int64_t n = 0; n < num_rows; ++n) f(n, zs + n * width, zt + n * width);
  });
}

// dstudent (N, Vl) may be the same buffer as student: each element is read before it is written.
// Unsharded (vocab_start = 0, Vl >= vocab_size) this is exactly the plain backward.
template <class T>
void backward_impl(T* dstudent, const T* student, const T* teacher, const Tensor& lse,
                   const Tensor& losses, const int32_t* targets, int64_t num_rows, int64_t width,
                   int64_t num_real, double temperature, bool reverse, double dloss) {
  const double scale = dloss * temperature;
#pragma omp parallel for schedule(static) if (num_rows * width > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const T* zs = student + n * width;
    const T* zt = teacher + n * width;
    T* dzs = dstudent + n * width;
    if (targets[n] < 0) {
      std::fill(dzs, dzs + width, T(0));
      continue;
    }
    const double lse_s = load_stat(lse, n), lse_t = load_stat(lse, num_rows + n);
    // reverse: T ps_j ((us_j - ut_j) - (lse_s - lse_t + KL)), KL = loss / T^2.
    const double shift = lse_s - lse_t + load_stat(losses, n) / (temperature * temperature);
    for (int64_t c = 0; c < num_real; ++c) {
      const double us = double(zs[c]) / temperature, ut = double(zt[c]) / temperature;
      const double ps = std::exp(us - lse_s);
      dzs[c] = T(reverse ? scale * ps * ((us - ut) - shift) : scale * (ps - std::exp(ut - lse_t)));
    }
    std::fill(dzs + num_real, dzs + width, T(0));  // padding columns
  }
}

}  // namespace

void kd_loss_forward(Tensor losses, Tensor lse, Tensor student, Tensor teacher, Tensor targets,
                     int vocab_size, float temperature, bool reverse) {
  constexpr const char* kOp = "kd_loss_forward";
  const int64_t num_rows = check_logits(student, teacher, vocab_size, 0, false, kOp);
  check_temperature(temperature, kOp);
  check_targets(targets, num_rows, kOp);
  check_stat_shape(losses, student.dtype, Shape{num_rows}, kOp, "losses");
  check_stat_shape(lse, student.dtype, Shape{2, num_rows}, kOp, "lse");
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  const int32_t* tgt = targets.ptr<int32_t>();
  for_each_row_pair(
      student, teacher, num_rows * vocab_size, kOp, [&](int64_t n, const auto* zs, const auto* zt) {
        const RowMax m = max_of_row(zs, zt, vocab_size, temperature);
        const RowSums r = sums_of_row(zs, zt, vocab_size, m, temperature, reverse);
        store_row(losses, lse, n, num_rows, finish_row(m, r, reverse), tgt[n] < 0, temperature);
      });
}

void kd_loss_backward(Tensor dstudent, Tensor student, Tensor teacher, Tensor lse, Tensor losses,
                      Tensor targets, int vocab_size, float temperature, bool reverse, float dloss,
                      int64_t vocab_start) {
  constexpr const char* kOp = "kd_loss_backward";
  const int64_t num_rows = check_logits(student, teacher, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  check_targets(targets, num_rows, kOp);
  check_stat_shape(lse, student.dtype, Shape{2, num_rows}, kOp, "lse");
  check_stat_shape(losses, student.dtype, Shape{num_rows}, kOp, "losses");
  check_like(dstudent, student.dtype, student.shape, kOp, "dstudent");
  TS_CHECK(!overlaps(dstudent, student) || dstudent.data == student.data,
           "{}: dstudent partially overlaps student; only exact aliasing (in place) is supported",
           kOp);
  for (const Tensor* in : {&teacher, &lse, &losses, &targets})
    TS_CHECK(!overlaps(dstudent, *in),
             "{}: dstudent overlaps teacher, lse, losses or targets (only student may alias it)",
             kOp);
  const int64_t width = student.dim(1);
  dispatch_float(student.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(dstudent.ptr<T>(), student.ptr<T>(), teacher.ptr<T>(), lse, losses,
                  targets.ptr<int32_t>(), num_rows, width,
                  num_real_columns(vocab_start, width, vocab_size), temperature, reverse, dloss);
  });
}

void kd_shard_max(Tensor row_max, Tensor student, Tensor teacher, int64_t vocab_start,
                  int vocab_size, float temperature) {
  constexpr const char* kOp = "kd_shard_max";
  const int64_t num_rows = check_logits(student, teacher, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  check_stat_shape(row_max, student.dtype, Shape{2, num_rows}, kOp, "row_max");
  const int64_t num_real = num_real_columns(vocab_start, student.dim(1), vocab_size);
  for_each_row_pair(student, teacher, num_rows * num_real, kOp,
                    [&](int64_t n, const auto* zs, const auto* zt) {
                      const RowMax m = max_of_row(zs, zt, num_real, temperature);
                      store_stat(row_max, n, m.s);
                      store_stat(row_max, num_rows + n, m.t);
                    });
}

void kd_shard_sums(Tensor sums, Tensor student, Tensor teacher, Tensor row_max, int64_t vocab_start,
                   int vocab_size, float temperature, bool reverse) {
  constexpr const char* kOp = "kd_shard_sums";
  const int64_t num_rows = check_logits(student, teacher, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  check_stat_shape(row_max, student.dtype, Shape{2, num_rows}, kOp, "row_max");
  check_stat_shape(sums, student.dtype, Shape{3, num_rows}, kOp, "sums");
  TS_CHECK(!overlaps(sums, row_max), "{}: sums and row_max overlap", kOp);
  const int64_t num_real = num_real_columns(vocab_start, student.dim(1), vocab_size);
  for_each_row_pair(student, teacher, num_rows * num_real, kOp,
                    [&](int64_t n, const auto* zs, const auto* zt) {
                      const RowMax m{load_stat(row_max, n), load_stat(row_max, num_rows + n)};
                      const RowSums r = sums_of_row(zs, zt, num_real, m, temperature, reverse);
                      store_stat(sums, n, r.s);
                      store_stat(sums, num_rows + n, r.t);
                      store_stat(sums, 2 * num_rows + n, r.cross);
                    });
}

void kd_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sums, Tensor targets,
                     float temperature, bool reverse) {
  constexpr const char* kOp = "kd_shard_finish";
  check_temperature(temperature, kOp);
  // No logits here: row_max fixes the statistics' dtype (f32 or f64) and N.
  check_host(row_max, kOp, "row_max");
  TS_CHECK(row_max.dtype == DType::f32 || row_max.dtype == DType::f64,
           "{}: row_max is {}, expected f32 or f64", kOp, row_max.str());
  TS_CHECK(row_max.ndim() == 2 && row_max.dim(0) == 2, "{}: row_max must be (2, N), got {}", kOp,
           row_max.str());
  const int64_t num_rows = row_max.dim(1);
  const DType dtype = row_max.dtype;
  check_like(sums, dtype, Shape{3, num_rows}, kOp, "sums");
  check_like(losses, dtype, Shape{num_rows}, kOp, "losses");
  check_like(lse, dtype, Shape{2, num_rows}, kOp, "lse");
  check_targets(targets, num_rows, kOp);
  for (const Tensor* out : {&losses, &lse})
    for (const Tensor* in : {&row_max, &sums, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and lse must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  const int32_t* tgt = targets.ptr<int32_t>();
#pragma omp parallel for schedule(static) if (num_rows > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const RowMax m{load_stat(row_max, n), load_stat(row_max, num_rows + n)};
    const RowSums r{load_stat(sums, n), load_stat(sums, num_rows + n),
                    load_stat(sums, 2 * num_rows + n)};
    store_row(losses, lse, n, num_rows, finish_row(m, r, reverse), tgt[n] < 0, temperature);
  }
}

}  // namespace tessera::cpu
