// Tests of grouped_gemm_forward / grouped_gemm_backward (kernels/cpu/grouped_gemm.cpp,
// kernels/cuda/grouped_gemm.cu). CPU: a hand example (an empty group, rows past offsets[G] holding
// NaN that must not be read and come out zero), equality with per-group matmul_forward /
// matmul_backward, finite-difference gradients in f64 (dw accumulates), accumulation and the
// empty-dx skip, offset and shape checks, bf16/f16 against the f32 kernel rounded once (dw 16-bit
// and f32), bounds. GPU parity: random offsets over G = 1..128 with empty, tiny and large groups,
// aligned shapes (the tensor-core path) and odd ones (the generic path), f32/bf16/f16, dw f32 and
// in w's dtype accumulated twice, NaN in unused rows, determinism, misaligned views.
// Shape letters: R rows, G groups, N' out features (nn), K' in features (kk).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/moe.h"
#include "kernels/ops.h"
#include "kernels/ops_moe.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/grouped_gemm.h"
#endif

namespace tessera::testing {
namespace {

HostTensor offsets_of(const std::vector<int32_t>& off) {
  HostTensor h(DType::i32, {int64_t(off.size())});
  for (size_t i = 0; i < off.size(); ++i) h.set(int64_t(i), off[i]);
  return h;
}

// offsets (G+1) from per-group row counts.
std::vector<int32_t> prefix(const std::vector<int32_t>& counts) {
  std::vector<int32_t> off{0};
  for (int32_t c : counts) off.push_back(off.back() + c);
  return off;
}

// ---- CPU reference -----------------------------------------------------------------------------

// Groups of 2, 0 and 1 rows over R = 5 rows: rows 3 and 4 belong to no group. They hold NaN in x
// and dy, which must not be read, and come out zero in y and dx. K' = N' = 2.
TEST(GroupedGemm, HandExampleWithEmptyGroupAndUnusedRows) {
  const HostTensor offsets = offsets_of({0, 2, 2, 3});
  HostTensor x(DType::f64, {5, 2}), w(DType::f64, {3, 2, 2}), dy(DType::f64, {5, 2});
  const double xs[] = {1, 2, 3, 4, 5, 6, kNaN, kNaN, kNaN, kNaN};
  // w0 = identity, w1 = [[2,2],[2,2]] (its group is empty), w2 = [[1,-1],[0.5,0]]
  const double ws[] = {1, 0, 0, 1, 2, 2, 2, 2, 1, -1, 0.5, 0};
  const double dys[] = {1, 0, 0, 1, 2, -1, kNaN, kNaN, kNaN, kNaN};
  for (int i = 0; i < 10; ++i) x.set(i, xs[i]), dy.set(i, dys[i]);
  for (int i = 0; i < 12; ++i) w.set(i, ws[i]);

  HostTensor y = filled(DType::f64, {5, 2}, kNaN);
  cpu::grouped_gemm_forward(y, x, w, offsets);
  // y_r = x_r · w_g^T: rows 0, 1 through w0; row 2 through w2: [5 - 6, 2.5]
  const double y_want[] = {1, 2, 3, 4, -1, 2.5, 0, 0, 0, 0};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(y.get(i), y_want[i]) << "y element " << i;

  HostTensor dx = filled(DType::f64, {5, 2}, kNaN), dw = filled(DType::f64, {3, 2, 2}, 1.0);
  cpu::grouped_gemm_backward(dx, dw, dy, x, w, offsets);
  // dx_r = dy_r · w_g: row 2 = 2 [1,-1] - [0.5,0] = [1.5, -2]
  const double dx_want[] = {1, 0, 0, 1, 1.5, -2, 0, 0, 0, 0};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(dx.get(i), dx_want[i]) << "dx element " << i;
  // dw_g = 1 + dy_g^T x_g: dw0 = [1,0]^T [1,2] + [0,1]^T [3,4]; dw1 unchanged; dw2 = [2,-1]^T [5,6]
  const double dw_want[] = {2, 3, 4, 5, 1, 1, 1, 1, 11, 13, -4, -5};
  for (int i = 0; i < 12; ++i) EXPECT_EQ(dw.get(i), dw_want[i]) << "dw element " << i;
}

struct Grouped {
  HostTensor x, w, dy, offsets;  // (R,K'), (G,N',K'), (R,N'), (G+1)
  int64_t rows, nn, kk;
};

// Random operands for per-group row counts `counts` and `tail` unused rows past offsets[G].
Grouped make_grouped(DType dtype, const std::vector<int32_t>& counts, int64_t tail, int64_t nn,
                     int64_t kk, std::mt19937_64& rng) {
  const std::vector<int32_t> off = prefix(counts);
  const int64_t rows = off.back() + tail, groups = int64_t(counts.size());
  return Grouped{
      randn(dtype, {rows, kk}, rng),
      randn(dtype, {groups, nn, kk}, rng, 1.0 / std::sqrt(double(std::max<int64_t>(kk, 1)))),
      randn(dtype, {rows, nn}, rng),
      offsets_of(off),
      rows,
      nn,
      kk};
}

// Rows [begin, end) of a (rows, cols) host tensor, as its own tensor.
HostTensor rows_of(const HostTensor& t, int64_t begin, int64_t end) {
  const int64_t cols = t.t.dim(t.t.ndim() - 1);
  HostTensor out(t.t.dtype, {end - begin, cols});
  for (int64_t i = 0; i < out.size(); ++i) out.set(i, t.get(begin * cols + i));
  return out;
}

// Every group computes what matmul_forward / matmul_backward (the same CPU gemm) compute on its
// rows: bitwise equal, for f32 and f64, with dw accumulating onto random contents.
TEST(GroupedGemm, EqualsPerGroupMatmul) {
  std::mt19937_64 rng(3);
  for (DType dtype : {DType::f32, DType::f64}) {
    const std::vector<int32_t> counts{5, 0, 17, 1, 40};
    const Grouped p = make_grouped(dtype, counts, 3, 33, 20, rng);
    HostTensor y(dtype, {p.rows, p.nn}), dx(dtype, {p.rows, p.kk});
    HostTensor dw = randn(dtype, p.w.t.shape, rng);
    const HostTensor dw0 = dw;
    cpu::grouped_gemm_forward(y, p.x, p.w, p.offsets);
    cpu::grouped_gemm_backward(dx, dw, p.dy, p.x, p.w, p.offsets);
    const std::vector<int32_t> off = prefix(counts);
    for (size_t g = 0; g < counts.size(); ++g) {
      const std::string what = std::string(dtype_name(dtype)) + " group " + std::to_string(g);
      HostTensor wg(dtype, {p.nn, p.kk}), dwg(dtype, {p.nn, p.kk});  // w[g], dw[g] before
      for (int64_t i = 0; i < wg.size(); ++i) {
        wg.set(i, p.w.get(int64_t(g) * wg.size() + i));
        dwg.set(i, dw0.get(int64_t(g) * wg.size() + i));
      }
      const HostTensor x_g = rows_of(p.x, off[g], off[g + 1]);
      const HostTensor dy_g = rows_of(p.dy, off[g], off[g + 1]);
      if (counts[g] > 0) {
        HostTensor y_g(dtype, {counts[g], p.nn}), dx_g(dtype, {counts[g], p.kk});
        cpu::matmul_forward(y_g, x_g, wg, Tensor());
        cpu::matmul_backward(dx_g, dwg, Tensor(), dy_g, x_g, wg);
        expect_identical(rows_of(y, off[g], off[g + 1]), y_g, what + " y");
        expect_identical(rows_of(dx, off[g], off[g + 1]), dx_g, what + " dx");
      }
      HostTensor got_dw(dtype, {p.nn, p.kk});
      for (int64_t i = 0; i < got_dw.size(); ++i) got_dw.set(i, dw.get(int64_t(g) * wg.size() + i));
      expect_identical(got_dw, dwg, what + " dw");
    }
    for (int64_t i = off.back() * p.nn; i < y.size(); ++i) EXPECT_EQ(y.get(i), 0.0) << "y tail";
    for (int64_t i = off.back() * p.kk; i < dx.size(); ++i) EXPECT_EQ(dx.get(i), 0.0) << "dx tail";
  }
}

// Finite differences in f64: loss = sum(dy * grouped_gemm_forward(x, w)). Linear in x and in w, so
// the central difference has no truncation error, only rounding (tests/common/tensors.h); a wrong
// group, row or transpose errs by O(1). dw starts from random contents and accumulates: the
// gradient is what backward added. Unused rows of x have zero gradient on both sides.
TS_FD_TEST(GroupedGemm, GradientsMatchFiniteDifferences, "grouped_gemm_forward",
           "grouped_gemm_backward") {
  struct Case {
    std::vector<int32_t> counts;
    int64_t tail, nn, kk;
  };
  const Case cases[] = {{{1}, 0, 1, 1}, {{3, 0, 4}, 2, 5, 7}, {{0, 9, 1, 6}, 1, 13, 3}};
  std::mt19937_64 rng(4);
  for (const Case& c : cases) {
    Grouped p = make_grouped(DType::f64, c.counts, c.tail, c.nn, c.kk, rng);
    HostTensor y(DType::f64, {p.rows, p.nn}), dx(DType::f64, {p.rows, p.kk});
    HostTensor dw = randn(DType::f64, p.w.t.shape, rng);
    const HostTensor dw0 = dw;
    cpu::grouped_gemm_backward(dx, dw, p.dy, p.x, p.w, p.offsets);
    HostTensor added(DType::f64, p.w.t.shape);
    for (int64_t i = 0; i < dw.size(); ++i) added.set(i, dw.get(i) - dw0.get(i));
    const auto loss = fd_loss(p.dy, y, [&] { cpu::grouped_gemm_forward(y, p.x, p.w, p.offsets); });
    expect_grad_matches(p.x, dx, loss, kFdTol, "dx", kFdStep);
    expect_grad_matches(p.w, added, loss, kFdTol, "dw", kFdStep);
  }
}

TEST(GroupedGemm, BackwardAccumulatesDwAndOverwritesDx) {
  std::mt19937_64 rng(5);
  const Grouped p = make_grouped(DType::f64, {4, 0, 6}, 2, 5, 3, rng);
  HostTensor dx = filled(DType::f64, {p.rows, p.kk}, kNaN);  // overwritten, never read
  HostTensor dw(DType::f64, p.w.t.shape);
  cpu::grouped_gemm_backward(dx, dw, p.dy, p.x, p.w, p.offsets);
  const HostTensor dx1 = dx, dw1 = dw;
  cpu::grouped_gemm_backward(dx, dw, p.dy, p.x, p.w, p.offsets);
  expect_identical(dx, dx1, "dx after two calls");
  for (int64_t i = 0; i < dw.size(); ++i) EXPECT_EQ(dw.get(i), 2 * dw1.get(i)) << i;
  EXPECT_EQ(count_nan(dx, 0, dx.size()), 0);
  // Group 1 is empty: its dw stays zero.
  for (int64_t i = 5 * 3; i < 2 * 5 * 3; ++i) EXPECT_EQ(dw.get(i), 0.0) << i;
  // No dx: the same dw.
  HostTensor dw_only(DType::f64, p.w.t.shape);
  cpu::grouped_gemm_backward(Tensor(), dw_only, p.dy, p.x, p.w, p.offsets);
  expect_identical(dw_only, dw1, "dw without dx");
}

TEST(GroupedGemm, RejectsBadOffsetsAndShapes) {
  std::mt19937_64 rng(6);
  const Grouped p = make_grouped(DType::f32, {2, 3}, 1, 4, 5, rng);
  HostTensor y(DType::f32, {p.rows, p.nn});
  for (const std::vector<int32_t>& bad :
       {std::vector<int32_t>{1, 2, 5}, {0, 4, 3}, {0, 2, 7}, {0, 5}}) {
    EXPECT_THROW(cpu::grouped_gemm_forward(y, p.x, p.w, offsets_of(bad)), Error)
        << bad[0] << " " << bad[1];
  }
  HostTensor f32_offsets(DType::f32, {3});
  EXPECT_THROW(cpu::grouped_gemm_forward(y, p.x, p.w, f32_offsets), Error);
  HostTensor wrong_k = randn(DType::f32, {2, 4, 6}, rng);
  EXPECT_THROW(cpu::grouped_gemm_forward(y, p.x, wrong_k, p.offsets), Error);
  HostTensor wrong_y(DType::f32, {p.rows, p.nn + 1});
  EXPECT_THROW(cpu::grouped_gemm_forward(wrong_y, p.x, p.w, p.offsets), Error);
  HostTensor dw64(DType::f64, p.w.t.shape);
  EXPECT_THROW(cpu::grouped_gemm_backward(Tensor(), dw64, p.dy, p.x, p.w, p.offsets), Error);
  HostTensor dw(DType::f32, p.w.t.shape);
  EXPECT_THROW(cpu::grouped_gemm_backward(p.dy, dw, p.dy, p.x, p.w, p.offsets), Error)
      << "dx aliases dy (and has the wrong shape)";
}

TEST(GroupedGemm, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(7);
  const Grouped p = make_grouped(DType::f32, {3, 0, 8, 2}, 2, 11, 6, rng);
  Guarded y({p.rows, p.nn}), dx({p.rows, p.kk}), dw(p.w.t.shape);
  cpu::grouped_gemm_forward(y, p.x, p.w, p.offsets);
  cpu::grouped_gemm_backward(dx, dw, p.dy, p.x, p.w, p.offsets);
  expect_guards_intact({&y, &dx, &dw}, "grouped_gemm");
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, GroupedGemm) {
  // offsets are not an operand of the contract check (its i32 draws are random, not sorted).
  const HostTensor offsets = offsets_of({0, 3, 3, 10});
  const int64_t rows = 12, groups = 3, nn = 17, kk = 129;
  const Shape sx{rows, kk}, sw{groups, nn, kk}, sy{rows, nn};
  for (DType dt : kNarrowTypes) {
    expect_contract(
        "grouped_gemm_forward", dt, {narrow(sy), narrow(sx), narrow(sw)},
        [&](const auto& t) { ops::grouped_gemm_forward(t[0], t[1], t[2], offsets); }, 60);
    const OpFn backward = [&](const auto& t) {
      ops::grouped_gemm_backward(t[0], t[1], t[2], t[3], t[4], offsets);
    };
    const OpFn no_dx = [&](const auto& t) {
      ops::grouped_gemm_backward(Tensor(), t[1], t[2], t[3], t[4], offsets);
    };
    // dw accumulates onto random contents, twice, in the operands' dtype and in f32.
    for (bool f32_dw : {false, true}) {
      const std::vector<Operand> bwd{narrow(sx), f32_dw ? f32(sw) : narrow(sw), narrow(sy),
                                     narrow(sx), narrow(sw)};
      const std::string tag = f32_dw ? " f32 dw" : "";
      expect_steps("grouped_gemm_backward twice" + tag, dt, bwd, {backward, backward}, 61);
      expect_steps("grouped_gemm_backward no dx" + tag, dt, bwd, {no_dx}, 62);
    }
  }
}

TEST(NarrowDtype, GroupedGemmRejectsMixedDtypes) {
  const HostTensor offsets = offsets_of({0, 2});
  std::vector<uint16_t> a(2 * 4), b(3 * 4), c(2 * 3);
  const Tensor x(a.data(), DType::bf16, Device::cpu, {2, 4});
  const Tensor w16(b.data(), DType::f16, Device::cpu, {1, 3, 4});
  const Tensor y(c.data(), DType::bf16, Device::cpu, {2, 3});
  EXPECT_THROW(ops::grouped_gemm_forward(y, x, w16, offsets), Error) << "bf16 x, f16 w";
}

}  // namespace narrow_cases

}  // namespace
}  // namespace tessera::testing
