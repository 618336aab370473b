// CUDA knowledge-distillation loss: T^2 KL between the tempered softmaxes of student and teacher
// logits (forward KL, or reverse with kReverse), one block per row. The forward reads each row of
// student and teacher once, keeping online maxima, sums of exponentials and the cross term in
// f32; the backward writes dstudent in one pass (in place if asked: dstudent may be student),
// zeros in padding columns and on ignored rows (target < 0). Rows need not be 16-byte aligned:
// each row is walked as a scalar head, 16-byte packs and a scalar tail, and entirely as scalars
// when student and teacher (and dstudent) sit differently against the 16-byte grid. The
// vocabulary-parallel pieces (shard max, shard sums: one block per row over the shard's real
// columns; finish: elementwise) follow the same layout. Statistics are f32; all reductions
// combine in a fixed order, so results repeat bit for bit. The reverse-KL gradient forms its
// bracket in f64 (KdGrad).
//
// Two rows give exactly zero loss by construction: student == teacher, and a one-column vocabulary
// (both softmaxes are that column). Each side's tempered logit a = z s is rounded once, with an
// explicit __fmul_rn, and everything that must cancel is a difference of these same rounded
// values, with explicit __fsub_rn: the exponents a - max, the cross term's weights as - at, and
// the maxima's difference ms - mt in finish_row (the max of the raw logits times s is the largest
// of the rounded products: rounding is monotonic). The intrinsics are never contracted or
// reassociated; a plain `a * b - c` may become one FFMA, which leaves a product's rounding error
// where the two sides should cancel. Equal logits then give bitwise equal statistics and a zero
// cross term. A one-column row has a - max = 0 (2^0 = 1: ss = st = 1, log ratio 0) and
// cross / st + (ms - mt) = (at - as) + (as - at) = 0 exactly. The FMA forms used before,
// fma(z, s, -max) for the exponent and (zt - zs) s for the weights, broke the second: the first
// is the rounding error of z s (not 0), and the second is not the negation of round(zs s) -
// round(zt s), so a one-column row of 16-bit logits lost ~1e-7 |a| (losses ~1e-8 instead of 0).
// The price is one rounding of a (2^-24 |a| absolute) in each exponent and weight, random per
// column; for |a| <= 200 that is under 1.2e-5 absolute, far inside the losses' 2e-5 relative
// parity bound for KL values of O(1) or more (the form this kernel had before the FMAs).
// Shape letters: N rows, V padded vocabulary width (>= vocab_size), Vl shard width.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/softmax_rows.cuh"

namespace tessera::cuda {

namespace {

constexpr int kRowThreads = 512;  // threads per row (one block per row)
constexpr int kWarps = kRowThreads / 32;
constexpr int kUnroll = 2;  // packs of each row loaded before the first is used
// The forward holds more state per thread (two online softmaxes and the cross term): with two
// packs of each row in flight it needs 86 registers for bf16 (one 512-thread block per SM) and
// spills under a 64-register cap, so it loads one pack of each row at a time (56 registers) and
// keeps two blocks, 32 warps, per SM instead.
constexpr int kForwardUnroll = 1;
constexpr int kMinRowBlocks = 2;
constexpr float kLn2 = 0.6931471805599453f;

// Walks the first `count` columns of a student row and a teacher row together
// (for_each_in_rows): f(xs, xt) gets kN consecutive columns of each, as stored, kPacks packs of
// each row in flight per thread.
template <class T, int kPacks = kUnroll, class F>
__device__ __forceinline__ void for_each_column_pair(const T* zs, const T* zt, int count, F&& f) {
  for_each_in_rows<kRowThreads, kPacks>(count, f, zs, zt);
}

// ---- the unsharded forward ------------------------------------------------------------------

// Running statistics of one row in the log2 domain, a = z log2(e) / T (so exp(u) = 2^a): the
// maxima ms, mt, the sums of 2^(a - max), and the cross term, sum 2^(at - mt) (at - as) for the
// forward KL or 2^(as - ms) (as - at) for the reverse, rescaled with the sum it is weighted by.
template <bool kReverse>
struct KdOnline {
  float ms = -INFINITY, ss = 0.0f, mt = -INFINITY, st = 0.0f, cross = 0.0f;

  // kN more columns of logits zs, zt (a = z scale). Maxima first, so each column costs one
  // exponential per row and the old sums are rescaled once per pack. fmaxf skips NaN; a NaN logit
  // poisons the sums instead. The maximum of the raw logits times scale is the maximum of the
  // products (rounding is monotonic), and the logits are widened twice rather than held as floats.
  template <class T, int kN>
  __device__ __forceinline__ void add(const T (&zs)[kN], const T (&zt)[kN], float scale) {
    float pack_ms = to_f32(zs[0]), pack_mt = to_f32(zt[0]);
#pragma unroll
    for (int j = 1; j < kN; ++j) {
      pack_ms = fmaxf(pack_ms, to_f32(zs[j]));
      pack_mt = fmaxf(pack_mt, to_f32(zt[j]));
    }
    const float nms = fmaxf(ms, __fmul_rn(pack_ms, scale));
    const float nmt = fmaxf(mt, __fmul_rn(pack_mt, scale));
    // While every value so far is -inf the base is 0, so each term is 2^-inf = 0, not NaN.
    const float base_s = nms == -INFINITY ? 0.0f : nms, base_t = nmt == -INFINITY ? 0.0f : nmt;
    float sum_s = 0.0f, sum_t = 0.0f, c = 0.0f;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      // a rounded once per side; exponents and weights are differences of it (file comment).
      const float as = __fmul_rn(to_f32(zs[j]), scale), at = __fmul_rn(to_f32(zt[j]), scale);
      const float es = fast_exp2(__fsub_rn(as, base_s));
      const float et = fast_exp2(__fsub_rn(at, base_t));
      sum_s += es;
      sum_t += et;
      c = kReverse ? fmaf(es, __fsub_rn(as, at), c) : fmaf(et, __fsub_rn(at, as), c);
    }
    const float rs = fast_exp2(ms - base_s), rt = fast_exp2(mt - base_t);
    ss = fmaf(ss, rs, sum_s);
    st = fmaf(st, rt, sum_t);
    cross = fmaf(cross, kReverse ? rs : rt, c);
    ms = nms;
    mt = nmt;
  }

  __device__ __forceinline__ void merge(const KdOnline& o) {
    const float nms = fmaxf(ms, o.ms), nmt = fmaxf(mt, o.mt);
    const float base_s = nms == -INFINITY ? 0.0f : nms, base_t = nmt == -INFINITY ? 0.0f : nmt;
    const float rs = fast_exp2(ms - base_s), ors = fast_exp2(o.ms - base_s);
    const float rt = fast_exp2(mt - base_t), ort = fast_exp2(o.mt - base_t);
    // Explicit FMAs of one form: a contraction the compiler chose per expression could round the
    // student's and the teacher's sums differently where their values are equal.
    ss = fmaf(ss, rs, o.ss * ors);
    st = fmaf(st, rt, o.st * ort);
    cross = kReverse ? fmaf(cross, rs, o.cross * ors) : fmaf(cross, rt, o.cross * ort);
    ms = nms;
    mt = nmt;
  }

  __device__ __forceinline__ KdOnline shfl_xor(int offset) const {
    KdOnline o;
    o.ms = __shfl_xor_sync(0xffffffffu, ms, offset);
    o.ss = __shfl_xor_sync(0xffffffffu, ss, offset);
    o.mt = __shfl_xor_sync(0xffffffffu, mt, offset);
    o.st = __shfl_xor_sync(0xffffffffu, st, offset);
    o.cross = __shfl_xor_sync(0xffffffffu, cross, offset);
    return o;
  }
};

// lse_s, lse_t and the KL of a row from its maxima and sums. The KL is written as the maxima's
// difference plus the log of the sums' ratio, so two large lse values are never subtracted (as
// the CPU reference does). The maxima and the cross term are in units of `unit` (ln 2 for the
// log2 domain of the forward kernel, 1 for the natural units of ops.h); they are converted after
// the maxima are subtracted, so a row whose terms cancel exactly (one column, or student ==
// teacher) gets exactly KL = 0.
struct KdRow {
  float lse_s, lse_t, kl;
};
__device__ __forceinline__ KdRow finish_row(float ms, float ss, float mt, float st, float cross,
                                            bool reverse, float unit) {
  KdRow r;
  r.lse_s = __fmaf_rn(ms, unit, logf(ss));  // one expression for both (file comment)
  r.lse_t = __fmaf_rn(mt, unit, logf(st));
  // The terms in the maxima's units are summed before the conversion (an FMA of each with `unit`
  // would leave a rounding residue where they cancel), and equal sums give log 1 = 0 without a
  // division that may round x / x.
  const float log_ratio = ss == st ? 0.0f : logf(ss / st);
  r.kl = reverse ? (cross / ss + (mt - ms)) * unit - log_ratio
                 : (cross / st + (ms - mt)) * unit + log_ratio;
  return r;
}

__device__ __forceinline__ void store_row(float* losses, float* lse, int64_t row, int64_t num_rows,
                                          const KdRow& r, bool ignored, float temperature) {
  lse[row] = r.lse_s;
  lse[num_rows + row] = r.lse_t;
  losses[row] = ignored ? 0.0f : temperature * temperature * r.kl;
}

// One block per row: online statistics per thread, merged in a fixed order (butterfly in each
// warp, then warp order in thread 0).
template <class T, bool kReverse>
__global__ void __launch_bounds__(kRowThreads, kMinRowBlocks)
    kd_loss_forward_kernel(float* losses, float* lse, const T* student, const T* teacher,
                           const int32_t* targets, int64_t num_rows, int64_t width, int vocab_size,
                           float temperature) {
  __shared__ float smem[5][kWarps];  // each warp's (ms, ss, mt, st, cross)
  const int64_t row = blockIdx.x;
  const float scale = kLog2e / temperature;  // z -> a = u log2(e)
  KdOnline<kReverse> acc;
  for_each_column_pair<T, kForwardUnroll>(
      student + row * width, teacher + row * width, vocab_size,
      [&]<int kN>(const T(&zs)[kN], const T(&zt)[kN]) { acc.add(zs, zt, scale); });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc.merge(acc.shfl_xor(offset));
  if (threadIdx.x % 32 == 0) {
    const int w = threadIdx.x / 32;
    smem[0][w] = acc.ms;
    smem[1][w] = acc.ss;
    smem[2][w] = acc.mt;
    smem[3][w] = acc.st;
    smem[4][w] = acc.cross;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  KdOnline<kReverse> total;
  for (int w = 0; w < kWarps; ++w) {
    KdOnline<kReverse> warp;
    warp.ms = smem[0][w];
    warp.ss = smem[1][w];
    warp.mt = smem[2][w];
    warp.st = smem[3][w];
    warp.cross = smem[4][w];
    total.merge(warp);
  }
  // Back to natural units: u = a ln(2).
  const KdRow r = finish_row(total.ms, total.ss, total.mt, total.st, total.cross, kReverse, kLn2);
  store_row(losses, lse, row, num_rows, r, targets[row] < 0, temperature);
}

// ---- the backward ---------------------------------------------------------------------------

// d loss / d zs for one column (ops.h), times dloss: forward KL T (ps - pt), reverse KL
// T ps ((us - ut) - shift) with shift = lse_s - lse_t + KL per row. The reverse bracket is formed
// in f64, as the CPU reference does: where ps is large the bracket is a small difference of
// lse-sized values (|u| up to ~|z| / T, e.g. 100 or more). In f32 each of us - lse_s,
// ut - lse_t and KL carries an absolute rounding of ~2^-24 |u| (6e-6 at 100), while the
// bracket of the dominant column of a peaked row (ps ~ 1) is only sum_k ps_k (...) ~ 1e-3 or
// less, so f32 lost the gradient's leading digits (rel L2 1.4e-4 against the f64 reference at
// scale 20, T = 0.5). In f64, (zs - zt) / T - shift is accurate to ~1e-14 absolute; the kernel
// is memory bound and the f64 work per element (two conversions, a subtraction, one DFMA and a
// conversion back) stays below H100's FP64 and conversion throughput. ps needs only a small
// relative error (~1e-6, as in the forward KL) and stays f32. Both forms give exactly 0 where
// zs == zt and the row's statistics are those of equal logits (lse_s == lse_t, KL = 0): the
// log-probabilities are one explicit FMA each, and the bracket is 0 inv_t - 0.
template <bool kReverse>
struct KdGrad {
  float inv_t, lse_s, lse_t, scale;  // scale = dloss T
  double inv_t_f64, shift;           // 1 / T and lse_s - lse_t + KL, KL = loss / T^2 (reverse)
  __device__ __forceinline__ float operator()(float zs, float zt) const {
    const float ps = fast_exp2(__fmaf_rn(zs, inv_t, -lse_s) * kLog2e);
    if constexpr (kReverse) {
      const double bracket = __fma_rn(double(zs) - double(zt), inv_t_f64, -shift);
      return scale * ps * static_cast<float>(bracket);
    }
    return scale * (ps - fast_exp2(__fmaf_rn(zt, inv_t, -lse_t) * kLog2e));
  }
};

// Every element is read before it is written, by the same thread: dstudent may be student. The
// row is the global columns [vocab_start, vocab_start + width); the first num_real are real.
// Ignored rows are written with zeros without reading the logits.
template <class T, bool kReverse>
__global__ void __launch_bounds__(kRowThreads)
    kd_loss_backward_kernel(T* dstudent, const T* student, const T* teacher, const float* lse,
                            const float* losses, const int32_t* targets, int64_t num_rows,
                            int64_t width, int64_t num_real, float temperature, float dloss) {
  constexpr int kVec = kVecWidth<T>;
  const int64_t row = blockIdx.x;
  const T* zs = student + row * width;
  const T* zt = teacher + row * width;
  T* dzs = dstudent + row * width;
  const bool ignored = targets[row] < 0;
  const int head = head_elems(dzs, width);
  const bool packs_ok = head_elems(zs, width) == head && head_elems(zt, width) == head;
  const int num_packs = packs_ok ? static_cast<int>((width - head) / kVec) : 0;
  const int64_t tail_begin = packs_ok ? head + int64_t(num_packs) * kVec : 0;
  if (ignored) {
    Pack<T, kVec> zero;
#pragma unroll
    for (int j = 0; j < kVec; ++j) zero.v[j] = from_f32<T>(0.0f);
    if (packs_ok)
      for (int c = threadIdx.x; c < head; c += kRowThreads) dzs[c] = from_f32<T>(0.0f);
    for (int p = threadIdx.x; p < num_packs; p += kRowThreads)
      store_pack<T, kVec>(dzs + head + int64_t(p) * kVec, zero);
    for (int64_t c = tail_begin + threadIdx.x; c < width; c += kRowThreads)
      dzs[c] = from_f32<T>(0.0f);
    return;
  }
  KdGrad<kReverse> grad;
  grad.inv_t = 1.0f / temperature;
  grad.lse_s = lse[row];
  grad.lse_t = lse[num_rows + row];
  grad.scale = dloss * temperature;
  // As the CPU reference: (lse_s - lse_t) + loss / T^2 in f64, from the f32 statistics.
  const double t = temperature;
  grad.inv_t_f64 = 1.0 / t;
  grad.shift = (double(grad.lse_s) - double(grad.lse_t)) + double(losses[row]) / (t * t);
  auto grad_at = [&](float xs, float xt, int64_t c) { return c < num_real ? grad(xs, xt) : 0.0f; };

  if (packs_ok) {
    for (int c = threadIdx.x; c < head; c += kRowThreads)
      dzs[c] = from_f32<T>(grad_at(to_f32(zs[c]), to_f32(zt[c]), c));
  }
  for_each_pack<kRowThreads, kUnroll>(
      num_packs,
      [&](int64_t c, const T(&xs)[kVec], const T(&xt)[kVec]) {
        const int64_t c0 = head + c;
        Pack<T, kVec> out;
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          out.v[j] = from_f32<T>(grad_at(to_f32(xs[j]), to_f32(xt[j]), c0 + j));
        store_pack<T, kVec>(dzs + c0, out);
      },
      zs + head, zt + head);
  for (int64_t c = tail_begin + threadIdx.x; c < width; c += kRowThreads)
    dzs[c] = from_f32<T>(grad_at(to_f32(zs[c]), to_f32(zt[c]), c));
}

// ---- vocabulary-parallel pieces ---------------------------------------------------------------

// row_max = (max of us, max of ut) over the row's num_real real columns; -inf when there are
// none. The max of the raw logits times 1/T equals the max of the products (rounding is
// monotonic), so only two products per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    kd_shard_max_kernel(float* row_max, const T* student, const T* teacher, int64_t num_rows,
                        int64_t width, int num_real, float inv_t) {
  __shared__ float smem[2][kWarps];
  const int64_t row = blockIdx.x;
  float ms = -INFINITY, mt = -INFINITY;
  for_each_column_pair(student + row * width, teacher + row * width, num_real,
                       [&]<int kN>(const T(&zs)[kN], const T(&zt)[kN]) {
#pragma unroll
                         for (int j = 0; j < kN; ++j) {
                           ms = fmaxf(ms, to_f32(zs[j]));
                           mt = fmaxf(mt, to_f32(zt[j]));
                         }
                       });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    ms = fmaxf(ms, __shfl_xor_sync(0xffffffffu, ms, offset));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, offset));
  }
  if (threadIdx.x % 32 == 0) {
    smem[0][threadIdx.x / 32] = ms;
    smem[1][threadIdx.x / 32] = mt;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 0; w < kWarps; ++w) {
    ms = fmaxf(ms, smem[0][w]);
    mt = fmaxf(mt, smem[1][w]);
  }
  row_max[row] = __fmul_rn(ms, inv_t);  // the largest of the products us (kd_shard_sums_kernel)
  row_max[num_rows + row] = __fmul_rn(mt, inv_t);
}

// sums = (sum exp(us - ms), sum exp(ut - mt), cross term) over the real columns with the GLOBAL
// maxima, summed per thread, then in a fixed order across the block. As in the forward kernel
// (file comment), u = z inv_t is rounded once per side (the maxima are the largest of these
// products) and the exponents u - m and the cross term's weights us - ut are differences of it,
// so student == teacher and a one-column vocabulary give exactly KL = 0 in kd_shard_finish.
template <class T, bool kReverse>
__global__ void __launch_bounds__(kRowThreads)
    kd_shard_sums_kernel(float* sums, const T* student, const T* teacher, const float* row_max,
                         int64_t num_rows, int64_t width, int num_real, float inv_t) {
  __shared__ float smem[kWarps * 3];
  const int64_t row = blockIdx.x;
  const float ms = row_max[row], mt = row_max[num_rows + row];
  float s[3] = {0.0f, 0.0f, 0.0f};
  for_each_column_pair(student + row * width, teacher + row * width, num_real,
                       [&]<int kN>(const T(&zs)[kN], const T(&zt)[kN]) {
#pragma unroll
                         for (int j = 0; j < kN; ++j) {
                           const float us = __fmul_rn(to_f32(zs[j]), inv_t);
                           const float ut = __fmul_rn(to_f32(zt[j]), inv_t);
                           const float es = fast_exp2(__fsub_rn(us, ms) * kLog2e);
                           const float et = fast_exp2(__fsub_rn(ut, mt) * kLog2e);
                           s[0] += es;
                           s[1] += et;
                           s[2] = kReverse ? fmaf(es, __fsub_rn(us, ut), s[2])
                                           : fmaf(et, __fsub_rn(ut, us), s[2]);
                         }
                       });
  row_sum<kRowThreads, 3>(s, smem);
  if (threadIdx.x != 0) return;
  for (int k = 0; k < 3; ++k) sums[k * num_rows + row] = s[k];
}

__global__ void __launch_bounds__(kBlock)
    kd_shard_finish_kernel(float* losses, float* lse, const float* row_max, const float* sums,
                           const int32_t* targets, int64_t num_rows, float temperature,
                           bool reverse) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < num_rows;
       n += int64_t(gridDim.x) * blockDim.x) {
    const KdRow r = finish_row(row_max[n], sums[n], row_max[num_rows + n], sums[num_rows + n],
                               sums[2 * num_rows + n], reverse, 1.0f);
    store_row(losses, lse, n, num_rows, r, targets[n] < 0, temperature);
  }
}

// ---- launchers ------------------------------------------------------------------------------

void check_temperature(float temperature, const char* op) {
  TS_CHECK(std::isfinite(temperature) && temperature > 0.0f,
           "{}: temperature = {} must be positive and finite", op, temperature);
}

// Checks student and teacher (N, V) of one dtype, the vocabulary size and the temperature;
// returns N. A shard (sharded = true) cannot check vocab_size against its width: only the caller
// knows the whole padded vocabulary.
int64_t check_logits(const Tensor& student, const Tensor& teacher, int vocab_size,
                     int64_t vocab_start, bool sharded, float temperature, const char* op) {
  expect_compute_dtype(student, op, "student");
  TS_CHECK(student.ndim() == 2, "{}: student must be (N, V), got {}", op, student.str());
  expect_tensor(teacher, student.dtype, student.shape, op, "teacher");
  const int64_t num_rows = student.dim(0), width = student.dim(1);
  TS_CHECK(vocab_size >= 1 && (sharded || vocab_size <= width),
           "{}: vocab_size = {} outside [1, V = {}]", op, vocab_size, width);
  TS_CHECK(vocab_start >= 0, "{}: vocab_start = {} is negative", op, vocab_start);
  TS_CHECK(num_rows < (int64_t(1) << 31), "{}: N = {} rows is too many for one launch", op,
           num_rows);
  TS_CHECK(width < (int64_t(1) << 31), "{}: V = {} columns is too many for one row", op, width);
  check_temperature(temperature, op);
  return num_rows;
}

// Runs f.template operator()<kReverse>() with the compile-time reverse flag.
template <class F>
void dispatch_reverse(bool reverse, F&& f) {
  if (reverse)
    f.template operator()<true>();
  else
    f.template operator()<false>();
}

}  // namespace

void kd_loss_forward(Tensor losses, Tensor lse, Tensor student, Tensor teacher, Tensor targets,
                     int vocab_size, float temperature, bool reverse, ops::Stream stream) {
  constexpr const char* kOp = "kd_loss_forward";
  const int64_t num_rows = check_logits(student, teacher, vocab_size, 0, false, temperature, kOp);
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(lse, DType::f32, Shape{2, num_rows}, kOp, "lse");
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  for (const Tensor* out : {&losses, &lse})
    for (const Tensor* in : {&student, &teacher, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and lse must not alias an input", kOp);
  if (num_rows == 0) return;
  dispatch_float(student, kOp, [&]<class T>() {
    dispatch_reverse(reverse, [&]<bool kReverse>() {
      kd_loss_forward_kernel<T, kReverse><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
          static_cast<float*>(losses.data), static_cast<float*>(lse.data),
          static_cast<const T*>(student.data), static_cast<const T*>(teacher.data),
          static_cast<const int32_t*>(targets.data), num_rows, student.dim(1), vocab_size,
          temperature);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void kd_loss_backward(Tensor dstudent, Tensor student, Tensor teacher, Tensor lse, Tensor losses,
                      Tensor targets, int vocab_size, float temperature, bool reverse, float dloss,
                      int64_t vocab_start, ops::Stream stream) {
  constexpr const char* kOp = "kd_loss_backward";
  const int64_t num_rows =
      check_logits(student, teacher, vocab_size, vocab_start, true, temperature, kOp);
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  expect_tensor(lse, DType::f32, Shape{2, num_rows}, kOp, "lse");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(dstudent, student.dtype, student.shape, kOp, "dstudent");
  TS_CHECK(!overlaps(dstudent, student) || dstudent.data == student.data,
           "{}: dstudent partially overlaps student; only exact aliasing (in place) is supported",
           kOp);
  for (const Tensor* in : {&teacher, &lse, &losses, &targets})
    TS_CHECK(!overlaps(dstudent, *in),
             "{}: dstudent overlaps teacher, lse, losses or targets (only student may alias it)",
             kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  dispatch_float(student, kOp, [&]<class T>() {
    dispatch_reverse(reverse, [&]<bool kReverse>() {
      kd_loss_backward_kernel<T, kReverse><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
          static_cast<T*>(dstudent.data), static_cast<const T*>(student.data),
          static_cast<const T*>(teacher.data), static_cast<const float*>(lse.data),
          static_cast<const float*>(losses.data), static_cast<const int32_t*>(targets.data),
          num_rows, width, num_real_columns(vocab_start, width, vocab_size), temperature, dloss);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void kd_shard_max(Tensor row_max, Tensor student, Tensor teacher, int64_t vocab_start,
                  int vocab_size, float temperature, ops::Stream stream) {
  constexpr const char* kOp = "kd_shard_max";
  const int64_t num_rows =
      check_logits(student, teacher, vocab_size, vocab_start, true, temperature, kOp);
  expect_tensor(row_max, DType::f32, Shape{2, num_rows}, kOp, "row_max");
  TS_CHECK(!overlaps(row_max, student) && !overlaps(row_max, teacher),
           "{}: row_max must not alias student or teacher", kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  dispatch_float(student, kOp, [&]<class T>() {
    kd_shard_max_kernel<T><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
        static_cast<float*>(row_max.data), static_cast<const T*>(student.data),
        static_cast<const T*>(teacher.data), num_rows, width,
        num_real_columns(vocab_start, width, vocab_size), 1.0f / temperature);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void kd_shard_sums(Tensor sums, Tensor student, Tensor teacher, Tensor row_max, int64_t vocab_start,
                   int vocab_size, float temperature, bool reverse, ops::Stream stream) {
  constexpr const char* kOp = "kd_shard_sums";
  const int64_t num_rows =
      check_logits(student, teacher, vocab_size, vocab_start, true, temperature, kOp);
  expect_tensor(row_max, DType::f32, Shape{2, num_rows}, kOp, "row_max");
  expect_tensor(sums, DType::f32, Shape{3, num_rows}, kOp, "sums");
  for (const Tensor* in : {&student, &teacher, &row_max})
    TS_CHECK(!overlaps(sums, *in), "{}: sums must not alias an input", kOp);
  if (num_rows == 0) return;
  const int64_t width = student.dim(1);
  dispatch_float(student, kOp, [&]<class T>() {
    dispatch_reverse(reverse, [&]<bool kReverse>() {
      kd_shard_sums_kernel<T, kReverse><<<num_rows, kRowThreads, 0, cuda_stream(stream)>>>(
          static_cast<float*>(sums.data), static_cast<const T*>(student.data),
          static_cast<const T*>(teacher.data), static_cast<const float*>(row_max.data), num_rows,
          width, num_real_columns(vocab_start, width, vocab_size), 1.0f / temperature);
      TS_CUDA_CHECK_LAUNCH();
    });
  });
}

void kd_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sums, Tensor targets,
                     float temperature, bool reverse, ops::Stream stream) {
  constexpr const char* kOp = "kd_shard_finish";
  check_temperature(temperature, kOp);
  TS_CHECK(!row_max.empty() && row_max.ndim() == 2 && row_max.dim(0) == 2,
           "{}: row_max must be (2, N), got {}", kOp, row_max.str());
  const int64_t num_rows = row_max.dim(1);
  expect_tensor(row_max, DType::f32, Shape{2, num_rows}, kOp, "row_max");
  expect_tensor(sums, DType::f32, Shape{3, num_rows}, kOp, "sums");
  expect_tensor(losses, DType::f32, Shape{num_rows}, kOp, "losses");
  expect_tensor(lse, DType::f32, Shape{2, num_rows}, kOp, "lse");
  expect_tensor(targets, DType::i32, Shape{num_rows}, kOp, "targets");
  for (const Tensor* out : {&losses, &lse})
    for (const Tensor* in : {&row_max, &sums, &targets})
      TS_CHECK(!overlaps(*out, *in), "{}: losses and lse must not alias an input", kOp);
  TS_CHECK(!overlaps(losses, lse), "{}: losses and lse overlap", kOp);
  if (num_rows == 0) return;
  kd_shard_finish_kernel<<<grid_for(num_rows), kBlock, 0, cuda_stream(stream)>>>(
      static_cast<float*>(losses.data), static_cast<float*>(lse.data),
      static_cast<const float*>(row_max.data), static_cast<const float*>(sums.data),
      static_cast<const int32_t*>(targets.data), num_rows, temperature, reverse);
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace tessera::cuda
