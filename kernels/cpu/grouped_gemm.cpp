// CPU grouped GEMM (kernels/ops_moe.h): G linears over consecutive row ranges of x, each group one
// call of the CPU gemm (kernels/cpu/matmul.cpp: CBLAS when the build has it, else the plain loop
// accumulating in double), so a group computes exactly what matmul_forward / matmul_backward
// compute on its rows. Shapes: R rows, G groups, N' out and K' in features (nn, kk below).
#include <algorithm>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/moe.h"

namespace tessera::cpu {

namespace {

struct GroupedDims {
  int64_t rows = 0, groups = 0, nn = 0, kk = 0;  // R, G, N', K'
};

// x (R,K'), w (G,N',K') and offsets (G+1) i32 with offsets[0] = 0, non-decreasing, <= R. The
// offsets are read here, before any kernel runs: a bad one is a caller bug named in the message.
GroupedDims check_grouped(const Tensor& x, const Tensor& w, const Tensor& offsets, const char* op) {
  check_compute_dtype(x, op, "x");
  check_float(w, x.dtype, op, "w");
  TS_CHECK(x.ndim() == 2 && w.ndim() == 3, "{}: x must be (R,K') and w (G,N',K'), got x {}, w {}",
           op, x.str(), w.str());
  GroupedDims d{x.dim(0), w.dim(0), w.dim(1), w.dim(2)};
  TS_CHECK(x.dim(1) == d.kk, "{}: x {} does not end in K'={} of w {}", op, x.str(), d.kk, w.str());
  check_host(offsets, op, "offsets");
  TS_CHECK(offsets.dtype == DType::i32 && offsets.shape == Shape{d.groups + 1},
           "{}: offsets must be i32 ({}) (G+1 for G={} groups), got {}", op, d.groups + 1, d.groups,
           offsets.str());
  const int32_t* off = offsets.ptr<int32_t>();
  TS_CHECK(off[0] == 0, "{}: offsets[0] is {}, must be 0", op, off[0]);
  for (int64_t g = 0; g < d.groups; ++g)
    TS_CHECK(off[g] <= off[g + 1], "{}: offsets decrease at group {}: {} > {}", op, g, off[g],
             off[g + 1]);
  TS_CHECK(off[d.groups] <= d.rows, "{}: offsets[G] = {} exceeds the R = {} rows of x", op,
           off[d.groups], d.rows);
  return d;
}

// w[g] as an (N',K') matrix.
Tensor group_weight(const Tensor& w, int64_t g) {
  return w.slice(g, g + 1).view({w.dim(1), w.dim(2)});
}

// Rows [begin, R) of out (R,C) = 0: the rows past offsets[G] that no group owns.
void zero_rows_from(const Tensor& out, int64_t begin, const char* op) {
  const int64_t cols = out.dim(1), count = (out.dim(0) - begin) * cols;
  dispatch_float(out.dtype, op, [&](auto zero) {
    using T = decltype(zero);
    std::fill_n(out.ptr<T>() + begin * cols, count, T(0));
  });
}

}  // namespace

void grouped_gemm_forward(Tensor y, Tensor x, Tensor w, Tensor offsets) {
  constexpr const char* kOp = "grouped_gemm_forward";
  const GroupedDims d = check_grouped(x, w, offsets, kOp);
  check_like(y, x.dtype, Shape{d.rows, d.nn}, kOp, "y");
  TS_CHECK(!overlaps(y, x) && !overlaps(y, w), "{}: y must not alias x or w", kOp);
  const int32_t* off = offsets.ptr<int32_t>();
  for (int64_t g = 0; g < d.groups; ++g) {
    if (off[g] == off[g + 1]) continue;
    // y_g (M_g,N') = x_g (M_g,K') · w[g]^T
    gemm(y.slice(off[g], off[g + 1]), x.slice(off[g], off[g + 1]), group_weight(w, g), false, true,
         1.0f, 0.0f);
  }
  zero_rows_from(y, off[d.groups], kOp);
}

void grouped_gemm_backward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor offsets) {
  constexpr const char* kOp = "grouped_gemm_backward";
  const GroupedDims d = check_grouped(x, w, offsets, kOp);
  check_like(dy, x.dtype, Shape{d.rows, d.nn}, kOp, "dy");
  if (!dw.empty()) check_like(dw, x.dtype, w.shape, kOp, "dw");
  if (!dx.empty()) check_like(dx, x.dtype, x.shape, kOp, "dx");
  for (const Tensor* in : {&dy, &x, &w}) {
    TS_CHECK(!overlaps(dx, *in) && !overlaps(dw, *in), "{}: dx and dw must not alias dy, x or w",
             kOp);
  }
  TS_CHECK(!overlaps(dx, dw), "{}: dx and dw must not alias", kOp);
  const int32_t* off = offsets.ptr<int32_t>();
  for (int64_t g = 0; g < d.groups; ++g) {
    if (off[g] == off[g + 1]) continue;  // an empty group adds nothing to dw[g]
    const Tensor dy_g = dy.slice(off[g], off[g + 1]), x_g = x.slice(off[g], off[g + 1]);
    const Tensor w_g = group_weight(w, g);
    // dx_g (M_g,K') = dy_g (M_g,N') · w[g] (N',K');  dw[g] (N',K') += dy_g^T · x_g
    if (!dx.empty()) gemm(dx.slice(off[g], off[g + 1]), dy_g, w_g, false, false, 1.0f, 0.0f);
    if (!dw.empty()) gemm(group_weight(dw, g), dy_g, x_g, true, false, 1.0f, 1.0f);
  }
  if (!dx.empty()) zero_rows_from(dx, off[d.groups], kOp);
}

}  // namespace tessera::cpu
