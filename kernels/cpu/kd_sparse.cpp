// Sparse (top-K) knowledge distillation, CPU reference: forward or reverse KL between the K + 1
// buckets (the teacher's top-K ids and the tail) of the teacher and of the student's tempered
// softmax (kernels/ops.h has the definitions), one row at a time in double. Also the
// vocabulary-parallel pieces (shard max, shard sums, finish) and the sharded backward; the
// unsharded forward runs the same three steps on the whole row. Not here: producing the teacher's
// top-K (kernels/cpu/topk_logits.cpp).
// Shape letters: N rows, V padded vocabulary width (>= vocab_size), Vl one shard's width, K teacher
// entries per row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// The floor of log qs_tail (kernels/ops.h): log(2^-126), the smallest normal f32.
constexpr double kLogTailFloor = -87.33654475055310898657;

void check_temperature(float temperature, const char* op) {
  TS_CHECK(std::isfinite(temperature) && temperature > 0.0f,
           "{}: temperature = {} must be positive and finite", op, temperature);
}

// Student logits (N, V) f32 or f64 and the vocabulary size. A shard (sharded = true) cannot check
// vocab_size against its width: only the caller knows the whole vocabulary. Returns N.
int64_t check_student(const Tensor& student, int vocab_size, int64_t vocab_start, bool sharded,
                      const char* op) {
  check_compute_dtype(student, op, "student");
  TS_CHECK(student.ndim() == 2, "{}: student must be (N, V), got {}", op, student.str());
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= student.dim(1)),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, student.dim(1));
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  return student.dim(0);
}

// A statistic (or teacher input) of `shape`: f32, or `dtype` (the student's f64).
void check_stat_shape(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                      const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::f32 || t.dtype == dtype, "{}: {} is {}, expected f32 or {}", op, name,
           t.str(), dtype_name(dtype));
  check_shape(t, shape, op, name);
}

void check_targets(const Tensor& targets, int64_t num_rows, const char* op) {
  check_host(targets, op, "targets");
  TS_CHECK(targets.dtype == DType::i32, "{}: targets is {}, expected i32", op, targets.str());
  check_shape(targets, Shape{num_rows}, op, "targets");
}

// topk_logits (N, K) with K >= 1 (f32, or the student's f64); returns K.
int64_t check_topk_logits(const Tensor& topk_logits, int64_t num_rows, DType dtype,
                          const char* op) {
  check_host(topk_logits, op, "topk_logits");
  TS_CHECK(topk_logits.ndim() == 2 && topk_logits.dim(0) == num_rows && topk_logits.dim(1) >= 1,
           "{}: topk_logits must be (N = {}, K >= 1), got {}", op, num_rows, topk_logits.str());
  check_stat_shape(topk_logits, dtype, topk_logits.shape, op, "topk_logits");
  return topk_logits.dim(1);
}

// topk_ids (N, K) i32: in every row distinct and in [0, vocab_size). Checked before any parallel
// loop (no throwing inside OpenMP regions).
void check_topk_ids(const Tensor& topk_ids, int64_t num_rows, int64_t k, int vocab_size,
                    const char* op) {
  check_host(topk_ids, op, "topk_ids");
  TS_CHECK(topk_ids.dtype == DType::i32, "{}: topk_ids is {}, expected i32", op, topk_ids.str());
  check_shape(topk_ids, Shape{num_rows, k}, op, "topk_ids");
  TS_CHECK(k <= vocab_size, "{}: K = {} ids per row, but only vocab_size = {} columns", op, k,
           vocab_size);
  const int32_t* ids = topk_ids.ptr<int32_t>();
  std::vector<int32_t> row(k);
  for (int64_t n = 0; n < num_rows; ++n) {
    std::copy_n(ids + n * k, k, row.begin());
    for (int32_t id : row)
      TS_CHECK(id >= 0 && id < vocab_size, "{}: topk_ids[{}] holds {}, outside [0, {})", op, n, id,
               vocab_size);
    std::sort(row.begin(), row.end());
    TS_CHECK(std::adjacent_find(row.begin(), row.end()) == row.end(),
             "{}: topk_ids[{}] holds an id twice", op, n);
  }
}

// Real (non-padding) columns of a shard `width` wide that starts at global column vocab_start.
int64_t num_real_columns(int64_t vocab_start, int64_t width, int vocab_size) {
  return std::clamp<int64_t>(int64_t(vocab_size) - vocab_start, 0, width);
}

// slot[c] = i + 1 when local column c (of the shard starting at vocab_start) is id_i, else 0.
void mark_ids(std::vector<int32_t>& slot, const int32_t* ids, int64_t k, int64_t vocab_start,
              int64_t num_real) {
  slot.assign(num_real, 0);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = ids[i] - vocab_start;
    if (c >= 0 && c < num_real) slot[c] = int32_t(i + 1);
  }
}

// Max of the tempered logits over the first num_real columns; -inf when there are none. NaN is
// skipped here (std::max keeps the running max) and poisons the sums instead.
template <class T>
double max_of_row(const T* zs, int64_t num_real, double temperature) {
  double m = -kInf;
  for (int64_t c = 0; c < num_real; ++c) m = std::max(m, double(zs[c]) / temperature);
  return m;
}

// sum exp(us - m) over the first num_real columns, and over those that are not ids (the tail).
struct RowSums {
  double all = 0.0, tail = 0.0;
};
template <class T>
RowSums sums_of_row(const T* zs, const std::vector<int32_t>& slot, double m, double temperature) {
  RowSums r;
  for (size_t c = 0; c < slot.size(); ++c) {
    const double e = std::exp(double(zs[c]) / temperature - m);
    r.all += e;
    if (slot[c] == 0) r.tail += e;
  }
  return r;
}

// The teacher's side of a row: lse_t and log pt_tail (-inf with an empty tail).
struct TeacherRow {
  double lse_t, log_pt_tail;
  bool tail_empty;
};
TeacherRow teacher_row(const Tensor& teacher_lse, int64_t n, int64_t num_rows) {
  const double lse_t = load_stat(teacher_lse, n), tail_lse_t = load_stat(teacher_lse, num_rows + n);
  const bool empty = tail_lse_t == -kInf;
  return {lse_t, empty ? -kInf : tail_lse_t - lse_t, empty};
}

// p (log p - log q) with 0 log 0 = 0: the bucket's term of KL(p || q).
double kl_term(double log_p, double log_q) {
  const double p = std::exp(log_p);
  return p == 0.0 ? 0.0 : p * (log_p - log_q);
}

// lse_s, log qs_tail and the KL divergence of one row from its (global) max and sums; us(i) is
// the tempered student logit at id_i, zt(i) the teacher's raw logit.
struct RowResult {
  double lse_s, log_qs_tail, kl;
};
template <class Us, class Zt>
RowResult finish_row(double m, const RowSums& s, const TeacherRow& t, int64_t k, double temperature,
                     bool reverse, Us&& us, Zt&& zt) {
  RowResult r;
  r.lse_s = m + std::log(s.all);
  // Floored as ops.h says; a NaN sum stays NaN (the comparison is false).
  const double log_tail = std::log(s.tail) - std::log(s.all);
  r.log_qs_tail = t.tail_empty ? -kInf : log_tail < kLogTailFloor ? kLogTailFloor : log_tail;
  double kl = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double log_q = us(i) - r.lse_s, log_p = zt(i) / temperature - t.lse_t;
    kl += reverse ? kl_term(log_q, log_p) : kl_term(log_p, log_q);
  }
  if (!t.tail_empty)
    kl += reverse ? kl_term(r.log_qs_tail, t.log_pt_tail) : kl_term(t.log_pt_tail, r.log_qs_tail);
  r.kl = kl;
  return r;
}

void store_row(const Tensor& losses, const Tensor& stats, int64_t n, int64_t num_rows,
               const RowResult& r, bool ignored, double temperature) {
  store_stat(stats, n, r.lse_s);
  store_stat(stats, num_rows + n, r.log_qs_tail);
  store_stat(stats, 2 * num_rows + n, r.kl);
  store_stat(losses, n, ignored ? 0.0 : temperature * temperature * r.kl);
}

// Runs f(n, zs, slot) for every row n of student (N, width), with zs that row's logits (const T*)
// and slot its ids marked over the shard's num_real real columns (mark_ids), rows in parallel
// when `work` elements are enough. Each thread keeps one slot vector.
template <class F>
void for_each_marked_row(const Tensor& student, const Tensor& topk_ids, int64_t vocab_start,
                         int64_t num_real, int64_t work, const char* op, F&& f) {
  const int64_t num_rows = student.dim(0), width = student.dim(1), k = topk_ids.dim(1);
  const int32_t* ids = topk_ids.ptr<int32_t>();
  dispatch_float(student.dtype, op, [&](auto zero) {
    using T = decltype(zero);
    const T* zs = student.ptr<T>();
#pragma omp parallel if (work > kMinParallelWork)
    {
      std::vector<int32_t> slot;
#pragma omp for schedule(static)
      for (int64_t n = 0; n < num_rows; ++n) {
        mark_ids(slot, ids + n * k, k, vocab_start, num_real);
        f(n, zs + n * width, slot);
      }
    }
  });
}

// The teacher's raw logit zt_i of row n.
double teacher_logit(const Tensor& topk_logits, int64_t n, int64_t k, int64_t i) {
  return load_stat(topk_logits, n * k + i);
}

// dstudent (N, Vl) may be the same buffer as student: each element is read before it is written.
template <class T>
void backward_impl(T* dstudent, const T* student, const Tensor& topk_logits, const Tensor& topk_ids,
                   const Tensor& teacher_lse, const Tensor& stats, const Tensor& losses,
                   const int32_t* targets, int64_t num_rows, int64_t width, int64_t vocab_start,
                   int64_t num_real, double temperature, bool reverse, double dloss) {
  const double scale = dloss * temperature;
  const int64_t k = topk_ids.dim(1);
  const int32_t* ids = topk_ids.ptr<int32_t>();
#pragma omp parallel if (num_rows * width > kMinParallelWork)
  {
    std::vector<int32_t> slot;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < num_rows; ++n) {
      const T* zs = student + n * width;
      T* dzs = dstudent + n * width;
      if (targets[n] < 0) {
        std::fill(dzs, dzs + width, T(0));
        continue;
      }
      mark_ids(slot, ids + n * k, k, vocab_start, num_real);
      const TeacherRow t = teacher_row(teacher_lse, n, num_rows);
      const double lse_s = load_stat(stats, n), log_qs_tail = load_stat(stats, num_rows + n);
      const double kl = load_stat(losses, n) / (temperature * temperature);
      // The tail's bucket: forward pt_tail / qs_tail as a log ratio, reverse g_tail; nothing
      // when the tail is empty (then no column reaches it).
      const double log_ratio = t.tail_empty ? -kInf : t.log_pt_tail - log_qs_tail;
      const double g_tail = t.tail_empty ? 0.0 : log_qs_tail - t.log_pt_tail;
      for (int64_t c = 0; c < num_real; ++c) {
        const double log_q = double(zs[c]) / temperature - lse_s;
        const double q = std::exp(log_q);
        double grad;
        if (slot[c] != 0) {
          const double log_p =
              teacher_logit(topk_logits, n, k, slot[c] - 1) / temperature - t.lse_t;
          grad = reverse ? q * ((log_q - log_p) - kl) : q - std::exp(log_p);
        } else {
          // qs_j pt_tail / qs_tail = exp(log qs_j + log(pt_tail / qs_tail)), never an inf / inf.
          grad = reverse ? q * (g_tail - kl) : q - std::exp(log_q + log_ratio);
        }
        dzs[c] = T(scale * grad);
      }
      std::fill(dzs + num_real, dzs + width, T(0));  // padding columns
    }
  }
}

}  // namespace

void kd_sparse_forward(Tensor losses, Tensor stats, Tensor student, Tensor topk_logits,
                       Tensor topk_ids, Tensor teacher_lse, Tensor targets, int vocab_size,
                       float temperature, bool reverse) {
  constexpr const char* kOp = "kd_sparse_forward";
  const int64_t num_rows = check_student(student, vocab_size, 0, false, kOp);
  check_temperature(temperature, kOp);
  const int64_t k = check_topk_logits(topk_logits, num_rows, student.dtype, kOp);
  check_topk_ids(topk_ids, num_rows, k, vocab_size, kOp);
  check_stat_shape(teacher_lse, student.dtype, Shape{2, num_rows}, kOp, "teacher_lse");
  check_targets(targets, num_rows, kOp);
  check_stat_shape(losses, student.dtype, Shape{num_rows}, kOp, "losses");
  check_stat_shape(stats, student.dtype, Shape{3, num_rows}, kOp, "stats");
  TS_CHECK(!overlaps(losses, stats), "{}: losses and stats overlap", kOp);
  for (const Tensor* out : {&losses, &stats})
    for (const Tensor* in : {&student, &topk_logits, &topk_ids, &teacher_lse, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and stats must not alias an input", kOp);
  const int32_t* tgt = targets.ptr<int32_t>();
  const int32_t* ids = topk_ids.ptr<int32_t>();
  for_each_marked_row(student, topk_ids, 0, vocab_size, num_rows * vocab_size, kOp,
                      [&](int64_t n, const auto* zs, const std::vector<int32_t>& slot) {
                        const double m = max_of_row(zs, vocab_size, temperature);
                        const RowSums s = sums_of_row(zs, slot, m, temperature);
                        const RowResult r = finish_row(
                            m, s, teacher_row(teacher_lse, n, num_rows), k, temperature, reverse,
                            [&](int64_t i) { return double(zs[ids[n * k + i]]) / temperature; },
                            [&](int64_t i) { return teacher_logit(topk_logits, n, k, i); });
                        store_row(losses, stats, n, num_rows, r, tgt[n] < 0, temperature);
                      });
}

void kd_sparse_backward(Tensor dstudent, Tensor student, Tensor topk_logits, Tensor topk_ids,
                        Tensor teacher_lse, Tensor stats, Tensor losses, Tensor targets,
                        int vocab_size, float temperature, bool reverse, float dloss,
                        int64_t vocab_start) {
  constexpr const char* kOp = "kd_sparse_backward";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  const int64_t k = check_topk_logits(topk_logits, num_rows, student.dtype, kOp);
  check_topk_ids(topk_ids, num_rows, k, vocab_size, kOp);
  check_stat_shape(teacher_lse, student.dtype, Shape{2, num_rows}, kOp, "teacher_lse");
  check_stat_shape(stats, student.dtype, Shape{3, num_rows}, kOp, "stats");
  check_stat_shape(losses, student.dtype, Shape{num_rows}, kOp, "losses");
  check_targets(targets, num_rows, kOp);
  check_like(dstudent, student.dtype, student.shape, kOp, "dstudent");
  TS_CHECK(!overlaps(dstudent, student) || dstudent.data == student.data,
           "{}: dstudent partially overlaps student; only exact aliasing (in place) is supported",
           kOp);
  for (const Tensor* in : {&topk_logits, &topk_ids, &teacher_lse, &stats, &losses, &targets})
    TS_CHECK(!overlaps(dstudent, *in),
             "{}: dstudent overlaps a teacher input, stats, losses or targets (only student may "
             "alias it)",
             kOp);
  const int64_t width = student.dim(1);
  dispatch_float(student.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    backward_impl(dstudent.ptr<T>(), student.ptr<T>(), topk_logits, topk_ids, teacher_lse, stats,
                  losses, targets.ptr<int32_t>(), num_rows, width, vocab_start,
                  num_real_columns(vocab_start, width, vocab_size), temperature, reverse, dloss);
  });
}

void kd_sparse_shard_max(Tensor row_max, Tensor student, int64_t vocab_start, int vocab_size,
                         float temperature) {
  constexpr const char* kOp = "kd_sparse_shard_max";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  check_stat_shape(row_max, student.dtype, Shape{num_rows}, kOp, "row_max");
  TS_CHECK(!overlaps(row_max, student), "{}: row_max must not alias student", kOp);
  const int64_t width = student.dim(1);
  const int64_t num_real = num_real_columns(vocab_start, width, vocab_size);
  dispatch_float(student.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* zs = student.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_real > kMinParallelWork)
    for (int64_t n = 0; n < num_rows; ++n)
      store_stat(row_max, n, max_of_row(zs + n * width, num_real, temperature));
  });
}

void kd_sparse_shard_sums(Tensor sums, Tensor student, Tensor topk_ids, Tensor row_max,
                          int64_t vocab_start, int vocab_size, float temperature) {
  constexpr const char* kOp = "kd_sparse_shard_sums";
  const int64_t num_rows = check_student(student, vocab_size, vocab_start, true, kOp);
  check_temperature(temperature, kOp);
  check_host(topk_ids, kOp, "topk_ids");
  TS_CHECK(topk_ids.ndim() == 2 && topk_ids.dim(0) == num_rows && topk_ids.dim(1) >= 1,
           "{}: topk_ids must be (N = {}, K >= 1), got {}", kOp, num_rows, topk_ids.str());
  const int64_t k = topk_ids.dim(1);
  check_topk_ids(topk_ids, num_rows, k, vocab_size, kOp);
  check_stat_shape(row_max, student.dtype, Shape{num_rows}, kOp, "row_max");
  check_stat_shape(sums, student.dtype, Shape{2 + k, num_rows}, kOp, "sums");
  for (const Tensor* in : {&student, &topk_ids, &row_max})
    TS_CHECK(!overlaps(sums, *in), "{}: sums must not alias an input", kOp);
  const int64_t num_real = num_real_columns(vocab_start, student.dim(1), vocab_size);
  const int32_t* ids = topk_ids.ptr<int32_t>();
  for_each_marked_row(student, topk_ids, vocab_start, num_real, num_rows * num_real, kOp,
                      [&](int64_t n, const auto* zs, const std::vector<int32_t>& slot) {
                        const RowSums s = sums_of_row(zs, slot, load_stat(row_max, n), temperature);
                        store_stat(sums, n, s.all);
                        store_stat(sums, num_rows + n, s.tail);
                        for (int64_t i = 0; i < k; ++i) {
                          const int64_t c = ids[n * k + i] - vocab_start;
                          const bool here = c >= 0 && c < num_real;
                          store_stat(sums, (2 + i) * num_rows + n,
                                     here ? double(zs[c]) / temperature : 0.0);
                        }
                      });
}

void kd_sparse_shard_finish(Tensor losses, Tensor stats, Tensor row_max, Tensor sums,
                            Tensor topk_logits, Tensor teacher_lse, Tensor targets,
                            float temperature, bool reverse) {
  constexpr const char* kOp = "kd_sparse_shard_finish";
  check_temperature(temperature, kOp);
  // No logits here: row_max fixes the statistics' dtype (f32 or f64) and N.
  check_host(row_max, kOp, "row_max");
  TS_CHECK(row_max.dtype == DType::f32 || row_max.dtype == DType::f64,
           "{}: row_max is {}, expected f32 or f64", kOp, row_max.str());
  TS_CHECK(row_max.ndim() == 1, "{}: row_max must be (N), got {}", kOp, row_max.str());
  const int64_t num_rows = row_max.dim(0);
  const DType dtype = row_max.dtype;
  const int64_t k = check_topk_logits(topk_logits, num_rows, dtype, kOp);
  check_like(sums, dtype, Shape{2 + k, num_rows}, kOp, "sums");
  check_stat_shape(teacher_lse, dtype, Shape{2, num_rows}, kOp, "teacher_lse");
  check_like(losses, dtype, Shape{num_rows}, kOp, "losses");
  check_like(stats, dtype, Shape{3, num_rows}, kOp, "stats");
  check_targets(targets, num_rows, kOp);
  for (const Tensor* out : {&losses, &stats})
    for (const Tensor* in : {&row_max, &sums, &topk_logits, &teacher_lse, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and stats must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, stats), "{}: losses and stats overlap", kOp);
  const int32_t* tgt = targets.ptr<int32_t>();
#pragma omp parallel for schedule(static) if (num_rows * k > kMinParallelWork)
  for (int64_t n = 0; n < num_rows; ++n) {
    const RowSums s{load_stat(sums, n), load_stat(sums, num_rows + n)};
    const RowResult r = finish_row(
        load_stat(row_max, n), s, teacher_row(teacher_lse, n, num_rows), k, temperature, reverse,
        [&](int64_t i) { return load_stat(sums, (2 + i) * num_rows + n); },
        [&](int64_t i) { return teacher_logit(topk_logits, n, k, i); });
    store_row(losses, stats, n, num_rows, r, tgt[n] < 0, temperature);
  }
}

}  // namespace tessera::cpu
