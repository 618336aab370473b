// Tests of grouped_gemm_forward / grouped_gemm_backward (kernels/cpu/grouped_gemm.cpp,
// kernels/cuda/grouped_gemm.cu). CPU: a hand example (an empty group, rows past offsets[G] holding
// NaN that must not be read and come out zero), equality with per-group matmul_forward /
// matmul_backward, finite-difference gradients in f64 (dw accumulates), accumulation and the
// empty-dx skip, offset and shape checks, bf16/f16 against the f32 kernel rounded once (dw 16-bit
// and f32), bounds. GPU parity: random offsets over G = 1..128 with empty, tiny and large groups,
// aligned shapes (the tensor-core path) and odd ones (the generic path), f32/bf16/f16, dw f32 and
// in w's dtype accumulated twice, NaN in unused rows, determinism, misaligned views, and the TMA
// kernel's boundaries (groups ending one row before, at and after a 64-row k-block; N', K' not
// multiples of the 64-wide boxes).
// Shape letters: R rows, G groups, N' out features (nn), K' in features (kk).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
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
  // No dw: the same dx.
  HostTensor dx_only = filled(DType::f64, {p.rows, p.kk}, kNaN);
  ops::grouped_gemm_backward(dx_only, Tensor(), p.dy, p.x, p.w, p.offsets);
  expect_identical(dx_only, dx1, "dx without dw");
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

// ---- GPU parity (kernels/cuda/grouped_gemm.cu)
// ---------------------------------------------------

namespace tessera::testing::gpu_cases {
namespace {

using testing::DeviceTensor;
using testing::host;

// Relative L2 bounds against the CPU reference (double accumulation) on the same rounded inputs:
//  f32:  the generic kernel sums K' (or a group's rows, up to 1000) f32 FMAs in order: about
//        sqrt(K) 2^-24 ~ 3e-6 at K = 2048; bound 1e-5 (TF32, ~3e-4, would fail it).
//  bf16: the output is rounded to bf16 once (RMS 2^-9/sqrt(3) = 1.1e-3 relative); the f32
//        accumulation adds ~1e-6. dw in bf16 is rounded twice (prefill + g, then + g). Bounds as
//        for matmul (tests/kernels/matmul_test.cpp, measured there at most 2.8e-3): 4e-3, and 8e-3
//        for outputs under 64 elements, which get no averaging.
//  f16:  the same roundings at 2^-11: 1.5e-3 and 2.5e-3.
//  dw f32 beside 16-bit operands: f32 sums of at most 1000 exact products (bf16 x bf16 and
//        f16 x f16 are exact in f32), ~sqrt(1000) 2^-24 = 2e-6; bound 5e-5 as for matmul's FP32
//        main gradients, still 40x under a gradient rounded to bf16.
constexpr double kBoundMainGrad = 5e-5;
double bound(DType t, size_t numel) {
  if (t == DType::f32) return 1e-5;
  const bool tiny = numel < 64;
  if (t == DType::f16) return tiny ? 2.5e-3 : 1.5e-3;
  return tiny ? 8e-3 : 4e-3;
}

// rel_l2 within `limit`, no NaN/Inf where the reference has none, and on failure the worst element
// as (row, column) of a `cols`-wide matrix: a layout bug shows as a pattern of rows or columns.
void expect_close_within(const std::vector<float>& got, const std::vector<float>& ref, int64_t cols,
                         double limit, const std::string& what) {
  expect_same_nonfinite(got, ref, what);
  const double err = rel_l2(got, ref);
  std::printf("measured %-72s rel_l2 %.3e (bound %.1e)\n", what.c_str(), err, limit);
  if (err <= limit) return;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::fabs(got[i] - ref[i]) > std::fabs(got[worst] - ref[worst])) worst = i;
  ADD_FAILURE() << what << ": rel_l2 " << err << " > " << limit << "; worst at row "
                << int64_t(worst) / cols << " column " << int64_t(worst) % cols << ": "
                << got[worst] << " vs " << ref[worst];
}

struct Case {
  std::vector<int32_t> counts;  // rows per group
  int64_t tail, nn, kk;         // unused rows past offsets[G], N', K'
};

std::vector<int32_t> draw_counts(int groups, std::vector<int32_t> choices, std::mt19937_64& rng) {
  std::vector<int32_t> counts(groups);
  std::uniform_int_distribution<size_t> pick(0, choices.size() - 1);
  for (int32_t& c : counts) c = choices[pick(rng)];
  return counts;
}

// G = 1, 3, 16, 128; rows per group 0, 1, 7, 129, 1000; N', K' of 8, 72, 768, 2048 (the
// tensor-core path for 16-bit operands: partial tiles in every dimension, one or many k-blocks)
// and 1, 13 (the generic path). Sizes keep the CPU reference (no BLAS on the GPU machine) at a
// few GFLOP per dtype.
std::vector<Case> parity_cases() {
  std::mt19937_64 rng(31);
  const std::vector<int32_t> small{0, 1, 7, 129}, all{0, 1, 7, 129, 1000};
  return {
      {{1000}, 3, 768, 2048},
      {{129, 0, 7}, 2, 2048, 72},
      {draw_counts(16, small, rng), 5, 768, 2048},
      {draw_counts(16, all, rng), 4, 2048, 8},
      {draw_counts(128, all, rng), 1, 72, 8},
      {draw_counts(128, {0, 1, 7}, rng), 0, 8, 72},
      {{7, 0, 129}, 2, 13, 1},
      {draw_counts(16, small, rng), 3, 1, 13},
      {{1000}, 0, 13, 72},
      {draw_counts(3, all, rng), 1, 72, 13},
      // The TMA kernel's boundaries: groups of exactly one k-block, one row past it and one row
      // short (wgrad's last k-block holds the next group's rows, zeroed in shared memory), N' and
      // K' multiples of 8 but not of 64 (boxes partly past w[g] and x, zero-filled), R < 128.
      {{64, 65, 0, 1, 63}, 2, 136, 264},
      {{65, 64}, 0, 264, 136},
  };
}

std::vector<float> rounded(DType dtype, int64_t n, std::mt19937_64& rng, float stddev = 1.0f) {
  return round_to(dtype, random_vector(n, rng, stddev));
}

// The operands of one case (host, rounded to the dtype) and its CPU reference in f32.
struct Problem {
  Case c;
  std::vector<int32_t> offsets;
  int64_t rows = 0, groups = 0;
  std::vector<float> x, w, dy, y_ref, dx_ref, dw_once;  // dw_once: dw from zero, one call
};

Problem make_problem(DType dtype, const Case& c, std::mt19937_64& rng) {
  Problem p;
  p.c = c;
  p.offsets = prefix(c.counts);
  p.groups = int64_t(c.counts.size());
  p.rows = p.offsets.back() + c.tail;
  p.x = rounded(dtype, p.rows * c.kk, rng);
  p.w = rounded(dtype, p.groups * c.nn * c.kk, rng, 1.0f / std::sqrt(float(c.kk)));
  p.dy = rounded(dtype, p.rows * c.nn, rng);
  // Unused rows hold NaN: no kernel may read them (y and dx come out zero there, dw unharmed).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::fill(p.x.begin() + p.offsets.back() * c.kk, p.x.end(), nan);
  std::fill(p.dy.begin() + p.offsets.back() * c.nn, p.dy.end(), nan);
  p.y_ref.assign(p.rows * c.nn, 0.0f);
  p.dx_ref.assign(p.rows * c.kk, 0.0f);
  p.dw_once.assign(p.w.size(), 0.0f);
  const HostTensor offsets = offsets_of(p.offsets);
  const Shape sx{p.rows, c.kk}, sw{p.groups, c.nn, c.kk}, sy{p.rows, c.nn};
  cpu::grouped_gemm_forward(host(p.y_ref, sy), host(p.x, sx), host(p.w, sw), offsets);
  cpu::grouped_gemm_backward(host(p.dx_ref, sx), host(p.dw_once, sw), host(p.dy, sy), host(p.x, sx),
                             host(p.w, sw), offsets);
  return p;
}

std::string case_name(DType dtype, const Problem& p, const char* engine) {
  return fmt::format("{} {} G={} R={} N'={} K'={}", engine, dtype_name(dtype), p.groups, p.rows,
                     p.c.nn, p.c.kk);
}

// Forward, then backward twice onto prefilled dw (in the operands' dtype and in f32) on the GPU;
// `generic` forces the generic kernel. Checks values, zero unused rows, guards, and that a second
// run gives the same bits (no atomics, fixed reduction order).
void check_problem(DType dtype, const Problem& p, bool generic, std::mt19937_64& rng) {
  const Case& c = p.c;
  const Shape sx{p.rows, c.kk}, sw{p.groups, c.nn, c.kk}, sy{p.rows, c.nn};
  DeviceTensor x(dtype, sx), w(dtype, sw), dy(dtype, sy), y(dtype, sy), dx(dtype, sx);
  DeviceTensor dw(dtype, sw), dw32(DType::f32, sw), offsets(DType::i32, {p.groups + 1});
  x.upload(p.x);
  w.upload(p.w);
  dy.upload(p.dy);
  offsets.upload_i32(p.offsets);
  const std::vector<float> pre = rounded(dtype, int64_t(p.w.size()), rng);
  const std::vector<float> pre32 = random_vector(int64_t(p.w.size()), rng);
  dw.upload(pre);
  dw32.upload(pre32);

  const auto forward = [&] {
    if (generic) {
#ifdef TESSERA_CUDA
      cuda::grouped_gemm_forward_generic(y, x, w, offsets);
#endif
    } else {
      ops::grouped_gemm_forward(y, x, w, offsets);
    }
  };
  const auto backward = [&](const Tensor& dw_t) {
    if (generic) {
#ifdef TESSERA_CUDA
      cuda::grouped_gemm_backward_generic(dx, dw_t, dy, x, w, offsets);
#endif
    } else {
      ops::grouped_gemm_backward(dx, dw_t, dy, x, w, offsets);
    }
  };
  forward();
  backward(dw);
  backward(dw);
  backward(dw32);
  backward(dw32);

  // dw expected: (prefill + g) + g, rounded to the dtype after each call (f32: in f32).
  std::vector<float> dw_ref(p.w.size()), dw32_ref(p.w.size());
  for (size_t i = 0; i < dw_ref.size(); ++i) dw_ref[i] = pre[i] + p.dw_once[i];
  dw_ref = round_to(dtype, std::move(dw_ref));
  for (size_t i = 0; i < dw_ref.size(); ++i) {
    dw_ref[i] += p.dw_once[i];
    dw32_ref[i] = (pre32[i] + p.dw_once[i]) + p.dw_once[i];
  }
  dw_ref = round_to(dtype, std::move(dw_ref));
  const std::string name = case_name(dtype, p, generic ? "generic" : "auto");
  const std::vector<float> got_y = y.download(), got_dx = dx.download();
  expect_close_within(got_y, p.y_ref, c.nn, bound(dtype, got_y.size()), name + " y");
  expect_close_within(got_dx, p.dx_ref, c.kk, bound(dtype, got_dx.size()), name + " dx");
  expect_close_within(dw.download(), dw_ref, c.kk, bound(dtype, dw_ref.size()), name + " dw");
  expect_close_within(dw32.download(), dw32_ref, c.kk,
                      dtype == DType::f32 ? bound(dtype, 0) : kBoundMainGrad, name + " dw f32");
  // Rows past offsets[G]: exactly zero (they held NaN poison before the call).
  for (int64_t i = p.offsets.back() * c.nn; i < int64_t(got_y.size()); ++i)
    ASSERT_EQ(got_y[i], 0.0f) << name << " y unused row element " << i;
  for (int64_t i = p.offsets.back() * c.kk; i < int64_t(got_dx.size()); ++i)
    ASSERT_EQ(got_dx[i], 0.0f) << name << " dx unused row element " << i;
  EXPECT_TRUE(y.guards_intact() && dx.guards_intact() && dw.guards_intact() && dw32.guards_intact())
      << name;

  // Determinism: the same calls again give the same bits.
  const std::vector<unsigned char> y_bits = y.download_bytes(), dx_bits = dx.download_bytes();
  dw32.upload(pre32);
  backward(dw32);
  const std::vector<unsigned char> dw_bits = dw32.download_bytes();
  forward();
  dw32.upload(pre32);
  backward(dw32);
  EXPECT_EQ(y.download_bytes(), y_bits) << name << " y differs between two runs";
  EXPECT_EQ(dx.download_bytes(), dx_bits) << name << " dx differs between two runs";
  EXPECT_EQ(dw32.download_bytes(), dw_bits) << name << " dw differs between two runs";
}

class GroupedGemmGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(GroupedGemmGpu, ForwardAndBackwardMatchCpu, "grouped_gemm_forward",
                     "grouped_gemm_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(32);
  for (const Case& c : parity_cases()) {
    const Problem p = make_problem(dtype, c, rng);
    check_problem(dtype, p, false, rng);
#ifdef TESSERA_CUDA
    // The generic kernel on the aligned 16-bit shapes too (it is their fallback off Hopper).
    if (dtype != DType::f32 && c.nn % 8 == 0 && c.kk % 8 == 0) check_problem(dtype, p, true, rng);
#endif
  }
}

// x, w, y one element past their allocation's alignment: the wgmma kernel's 16-byte copies do not
// apply, so the op must take the generic path and still be right.
TEST_P(GroupedGemmGpu, MisalignedViews) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(33);
  const std::vector<int32_t> counts{40, 0, 130};
  const std::vector<int32_t> off = prefix(counts);
  const int64_t rows = off.back(), groups = 3, nn = 64, kk = 72;
  std::vector<float> x = rounded(dtype, rows * kk, rng);
  std::vector<float> w = rounded(dtype, groups * nn * kk, rng, 0.1f);
  std::vector<float> y_ref(rows * nn);
  cpu::grouped_gemm_forward(host(y_ref, {rows, nn}), host(x, {rows, kk}), host(w, {groups, nn, kk}),
                            offsets_of(off));
  DeviceTensor gx(dtype, {rows * kk + 1}), gw(dtype, {groups * nn * kk + 1}),
      gy(dtype, {rows * nn + 1}), goff(DType::i32, {groups + 1});
  std::vector<float> x1(1, 0.0f), w1(1, 0.0f);
  x1.insert(x1.end(), x.begin(), x.end());
  w1.insert(w1.end(), w.begin(), w.end());
  gx.upload(x1);
  gw.upload(w1);
  goff.upload_i32(off);
  const auto view = [&](const DeviceTensor& t, Shape s) {
    return Tensor(static_cast<char*>(t.t().data) + dtype_size(dtype), dtype, Device::cuda, s);
  };
  const Tensor vy = view(gy, {rows, nn}), vx = view(gx, {rows, kk}),
               vw = view(gw, {groups, nn, kk});
#ifdef TESSERA_CUDA
  EXPECT_STREQ(cuda::grouped_gemm_kernel_name(vy, vx, vw), "generic");
#endif
  ops::grouped_gemm_forward(vy, vx, vw, goff);
  std::vector<float> got = gy.download();
  EXPECT_TRUE(std::isnan(got[0])) << "the element before the view was written";
  got.erase(got.begin());
  expect_close_within(got, y_ref, nn, bound(dtype, got.size()),
                      fmt::format("misaligned {}", dtype_name(dtype)));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GroupedGemmGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

#ifdef TESSERA_CUDA  // the kernel choice is internal to the CUDA backend
// On an H100/H200 the aligned 16-bit shapes must reach the tensor-core kernel: a silent fallback
// to the generic kernel would pass every parity case and lose an order of magnitude.
TS_GPU_TEST(GroupedGemmPath, AlignedSixteenBitOperandsUseWgmma) {
  if (gpu_compute_capability() != 90) GTEST_SKIP() << "wgmma needs a CC 9.0 device";
  for (DType dtype : {DType::bf16, DType::f16}) {
    DeviceTensor x(dtype, {100, 72}), w(dtype, {4, 2048, 72}), y(dtype, {100, 2048});
    DeviceTensor dw32(DType::f32, {4, 2048, 72});
    EXPECT_STREQ(cuda::grouped_gemm_kernel_name(y, x, w), "wgmma") << dtype_name(dtype);
    EXPECT_STREQ(cuda::grouped_gemm_kernel_name(x, y, w), "wgmma") << "dgrad";
    EXPECT_STREQ(cuda::grouped_gemm_kernel_name(dw32, y, x), "wgmma") << "wgrad, f32 dw";
    DeviceTensor x13(dtype, {100, 13}), w13(dtype, {4, 2048, 13});
    EXPECT_STREQ(cuda::grouped_gemm_kernel_name(y, x13, w13), "generic") << "K' = 13";
  }
  DeviceTensor x(DType::f32, {100, 72}), w(DType::f32, {4, 2048, 72}), y(DType::f32, {100, 2048});
  EXPECT_STREQ(cuda::grouped_gemm_kernel_name(y, x, w), "generic") << "f32";
}
#endif

TS_GPU_TEST(GroupedGemmChecks, RejectsBadOperands) {
  DeviceTensor x(DType::bf16, {10, 16}), w(DType::bf16, {2, 8, 16}), y(DType::bf16, {10, 8});
  DeviceTensor off(DType::i32, {3}), off_short(DType::i32, {2}), w16(DType::f16, {2, 8, 16});
  off.upload_i32({0, 4, 10});
  EXPECT_THROW(ops::grouped_gemm_forward(y, x, w, off_short), Error) << "G+1 offsets";
  EXPECT_THROW(ops::grouped_gemm_forward(y, x, w16, off), Error) << "bf16 x, f16 w";
  EXPECT_THROW(ops::grouped_gemm_forward(x, x, w, off), Error) << "y is x";
  DeviceTensor dw16(DType::f16, {2, 8, 16});
  EXPECT_THROW(ops::grouped_gemm_backward(Tensor(), dw16, y, x, w, off), Error) << "f16 dw";
}

}  // namespace
}  // namespace tessera::testing::gpu_cases
