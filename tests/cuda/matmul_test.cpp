// Parity of the CUDA GEMM ops (kernels/cuda/matmul.cu on cuBLASLt, the FMA fallback gemm_simt and
// the fused fc+GELU of kernels/cuda/gemm_lt.h) with the CPU references on random inputs: every
// transpose pair, sizes 1, 7, 33, 1025, alpha/beta (beta = 0 must ignore a NaN-poisoned c, alpha
// = 0 must not read NaN a and b), bias, misaligned operands, += of parameter gradients.
// Each check prints "measured" lines with its error, so the bounds can be compared with reality.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/gemm_reference.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/gemm_lt.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera::testing {
namespace {

// Relative L2 bounds against the CPU result, which accumulates in double on the same inputs:
//  f32: cuBLASLt accumulates in f32 (CUBLAS_COMPUTE_32F, never TF32); the rounding error of a
//       K-term sum grows like sqrt(K) * 2^-24 ~ 2e-6 at K = 1025 (split-K changes the order, not
//       the size). 1e-5 is 5x that; TF32 (10-bit mantissa, ~3e-4) would fail it.
//  bf16: the output is rounded to bf16: at most 2^-9 relative per element, RMS 2^-9/sqrt(3) =
//       1.1e-3; f32 accumulation adds ~1e-6. Outputs rounded twice (the separate bias pass, a
//       parameter gradient accumulated over two calls) and terms that cancel (beta*c, bias,
//       prefill) raise that: measured at most 2.8e-3 over 64+ elements (H200), bound 4e-3.
//       Outputs of fewer than 64 elements get no averaging: the worst case of two roundings,
//       2 * 2^-9 = 3.9e-3 of the (possibly larger) intermediates, measured at most 4.8e-3
//       (a single dweight element, prefill + 2 gradients): bound 8e-3.
//  f16: the same roundings at 2^-11 instead of 2^-9 (10 mantissa bits to bf16's 7), products
//       accumulated in f32 (CUBLAS_COMPUTE_32F, never 16F): bf16's measured 2.8e-3 and 4.8e-3
//       scale to ~7e-4 and ~1.2e-3; bounds 1.5e-3 and 2.5e-3 (not yet measured on a GPU). The
//       largest values here (K = 1025 sums of unit products, ~32 std; dweight over 4097 rows,
//       ~64 std, twice) are far inside f16's range (65504).
constexpr double kBoundF32 = 1e-5;
constexpr double kBoundBf16 = 4e-3;
constexpr double kBoundBf16Tiny = 8e-3;
constexpr double kBoundF16 = 1.5e-3;
constexpr double kBoundF16Tiny = 2.5e-3;
constexpr size_t kTinyOutput = 64;
double bound(DType t, size_t numel) {
  if (t == DType::f32) return kBoundF32;
  if (t == DType::f16) return numel < kTinyOutput ? kBoundF16Tiny : kBoundF16;
  return numel < kTinyOutput ? kBoundBf16Tiny : kBoundBf16;
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }

size_t elem_size(DType t) { return t == DType::f32 ? 4 : 2; }

// A device tensor of `shape` that starts `offset` elements into a guarded allocation, so its
// pointer is only elem_size-aligned when offset is odd.
struct OffsetTensor {
  DeviceTensor storage;
  Shape shape;
  int64_t offset;
  OffsetTensor(DType dtype, Shape s, int64_t off)
      : storage(dtype, Shape{s.numel() + off}), shape(s), offset(off) {}
  Tensor t() const {
    const Tensor whole = storage.t();
    return Tensor(static_cast<char*>(whole.data) + offset * elem_size(whole.dtype), whole.dtype,
                  Device::cuda, shape);
  }
  void upload(const std::vector<float>& v) {
    std::vector<float> padded(offset, 0.0f);
    padded.insert(padded.end(), v.begin(), v.end());
    storage.upload(padded);
  }
  std::vector<float> download() const {
    std::vector<float> all = storage.download();
    return std::vector<float>(all.begin() + offset, all.end());
  }
};

void report(const std::string& what, double err, double limit) {
  std::printf("measured %-60s rel_l2 %.3e (bound %.1e)\n", what.c_str(), err, limit);
}

void expect_close_within(const std::vector<float>& got, const std::vector<float>& ref, double limit,
                         const std::string& what) {
  expect_same_nonfinite(got, ref, what.c_str());
  const double err = rel_l2(got, ref);
  report(what, err, limit);
  EXPECT_LE(err, limit) << what;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, DType dtype,
                  const std::string& what) {
  expect_close_within(got, ref, bound(dtype, ref.size()), what);
}

struct Dims {
  int64_t m, n, k;
};

const Dims kGemmShapes[] = {{1, 1, 1},        {1, 7, 33},      {7, 1, 33},     {33, 7, 1},
                            {7, 33, 1025},    {1025, 33, 7},   {33, 1025, 33}, {1025, 1025, 33},
                            {128, 256, 1025}, {1, 1025, 1025}, {1025, 1, 1025}};

std::string gemm_name(const char* engine, DType dtype, Dims d, bool ta, bool tb, float alpha,
                      float beta) {
  return fmt::format("{} {} m{} n{} k{} {}{} a{} b{}", engine, dtype_name(dtype), d.m, d.n, d.k,
                     ta ? 'T' : 'N', tb ? 'T' : 'N', alpha, beta);
}

// c = alpha op(a) op(b) + beta c on the GPU vs gemm_reference. beta = 0 leaves c NaN-poisoned.
void check_gemm(DType dtype, Dims d, bool ta, bool tb, float alpha, float beta, bool simt,
                std::mt19937_64& rng) {
  const Shape sa = ta ? Shape{d.k, d.m} : Shape{d.m, d.k};
  const Shape sb = tb ? Shape{d.n, d.k} : Shape{d.k, d.n};
  const Shape sc{d.m, d.n};
  std::vector<float> a = round_to(dtype, random_vector(sa.numel(), rng));
  std::vector<float> b = round_to(dtype, random_vector(sb.numel(), rng));
  std::vector<float> c = round_to(dtype, random_vector(sc.numel(), rng));
  DeviceTensor da(dtype, sa), db(dtype, sb), dc(dtype, sc);
  da.upload(a);
  db.upload(b);
  if (beta != 0.0f) dc.upload(c);
  if (simt)
    cuda::gemm_simt(dc, da, db, ta, tb, alpha, beta);
  else
    cuda::gemm(dc, da, db, ta, tb, alpha, beta);
  const std::vector<float> got = dc.download();
  cpu::gemm_reference(host(c, sc), host(a, sa), host(b, sb), ta, tb, alpha, beta);
  expect_close(got, c, dtype,
               gemm_name(simt ? "gemm_simt" : "gemm", dtype, d, ta, tb, alpha, beta));
  EXPECT_TRUE(dc.guards_intact());
}

TEST(CudaGemm, ParityAllTransposes) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(1);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Dims& d : kGemmShapes)
      for (int t = 0; t < 4; ++t) {
        check_gemm(dtype, d, t & 1, t & 2, 1.25f, 0.0f, false, rng);
        check_gemm(dtype, d, t & 1, t & 2, -0.75f, 0.5f, false, rng);
      }
}

TEST(CudaGemm, FallbackKernelParity) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(2);
  const Dims shapes[] = {{1, 1, 1}, {7, 33, 1025}, {1025, 33, 7}, {65, 130, 17}};
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Dims& d : shapes)
      for (int t = 0; t < 4; ++t) {
        check_gemm(dtype, d, t & 1, t & 2, 1.0f, 0.0f, true, rng);
        check_gemm(dtype, d, t & 1, t & 2, 0.5f, -1.5f, true, rng);
      }
}

TEST(CudaGemm, MisalignedOperands) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(3);
  // a, b and c one element past 256-byte alignment: cuBLASLt must be asked for algorithms that
  // accept 2- or 4-byte alignment, or the call falls back to our kernel.
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const Dims d{33, 40, 72};
    OffsetTensor a(dtype, {d.m, d.k}, 1), b(dtype, {d.n, d.k}, 1), c(dtype, {d.m, d.n}, 1);
    std::vector<float> ha = round_to(dtype, random_vector(d.m * d.k, rng));
    std::vector<float> hb = round_to(dtype, random_vector(d.n * d.k, rng));
    std::vector<float> hc = round_to(dtype, random_vector(d.m * d.n, rng));
    a.upload(ha);
    b.upload(hb);
    c.upload(hc);
    cuda::gemm(c.t(), a.t(), b.t(), false, true, 1.0f, 1.0f);
    const std::vector<float> got = c.download();
    cpu::gemm_reference(host(hc, {d.m, d.n}), host(ha, {d.m, d.k}), host(hb, {d.n, d.k}), false,
                        true, 1.0f, 1.0f);
    expect_close(got, hc, dtype, fmt::format("gemm misaligned {}", dtype_name(dtype)));
    EXPECT_TRUE(c.storage.guards_intact());
  }
}

TEST(CudaGemm, AlphaZeroAndEmptyK) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(4);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    const Shape sc{7, 33};
    const std::vector<float> c0 = round_to(dtype, random_vector(sc.numel(), rng));
    // a and b stay NaN-poisoned: alpha = 0 must not read them.
    DeviceTensor a(dtype, {7, 5}), b(dtype, {5, 33}), c(dtype, sc);
    c.upload(c0);
    cuda::gemm(c, a, b, false, false, 0.0f, 0.5f);
    std::vector<float> got = c.download();
    // 0.5 c is exact except for f16 subnormals, which it rounds (once, to nearest even).
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], round_to(dtype, {0.5f * c0[i]})[0]) << i;
    cuda::gemm(c, a, b, false, false, 0.0f, 0.0f);
    got = c.download();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], 0.0f) << i;
    // K = 0: the product is empty, c = beta * c.
    DeviceTensor a0(dtype, {7, 0}), b0(dtype, {0, 33});
    c.upload(c0);
    cuda::gemm(c, a0, b0, false, false, 1.0f, 2.0f);
    got = c.download();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], 2.0f * c0[i]) << i;
    EXPECT_TRUE(c.guards_intact());
  }
}

TEST(CudaGemm, PlansAreCachedAndResultsRepeat) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(5);
  const Shape sa{19, 29}, sb{29, 23}, sc{19, 23};
  DeviceTensor a(DType::f32, sa), b(DType::f32, sb), c1(DType::f32, sc), c2(DType::f32, sc);
  a.upload(random_vector(sa.numel(), rng));
  b.upload(random_vector(sb.numel(), rng));
  cuda::gemm(c1, a, b, false, false, 1.0f, 0.0f);
  const size_t plans = cuda::lt_gemm_plan_count();
  cuda::gemm(c2, a, b, false, false, 1.0f, 0.0f);
  EXPECT_EQ(cuda::lt_gemm_plan_count(), plans) << "same shape and alignment: no new plan";
  EXPECT_EQ(c1.download(), c2.download()) << "same inputs must give bitwise equal results";
}

TEST(CudaGemm, RejectsBadShapes) {
  TESSERA_REQUIRE_GPU();
  DeviceTensor a(DType::f32, {4, 5}), b(DType::f32, {6, 7}), c(DType::f32, {4, 7});
  EXPECT_THROW(cuda::gemm(c, a, b, false, false, 1.0f, 0.0f), Error);
  DeviceTensor bb(DType::bf16, {5, 7}), hb(DType::f16, {5, 7}), ha(DType::f16, {4, 5});
  EXPECT_THROW(cuda::gemm(c, a, bb, false, false, 1.0f, 0.0f), Error);
  EXPECT_THROW(cuda::gemm(c, a, hb, false, false, 1.0f, 0.0f), Error) << "f32 c, f16 b";
  DeviceTensor hc(DType::f16, {4, 7});
  EXPECT_THROW(cuda::gemm(hc, ha, bb, false, false, 1.0f, 0.0f), Error) << "f16 a, bf16 b";
  DeviceTensor sq(DType::f32, {7, 7});
  EXPECT_THROW(cuda::gemm(c, c, sq, false, false, 1.0f, 0.0f), Error) << "c aliases a";
}

// ---- matmul_forward / matmul_backward ----------------------------------------------------------

struct Linear {
  Shape inp;  // (..., K)
  int64_t n;
};

const Linear kLinearShapes[] = {{{1, 1}, 1},       {{7, 33}, 1025},      {{2, 5, 64}, 7},
                                {{1025, 33}, 8},   {{3, 40, 768}, 2304}, {{4097, 24}, 7},
                                {{4097, 16}, 1025}};

Shape with_last(Shape s, int64_t last) {
  s.dims[s.ndim - 1] = last;
  return s;
}

void check_forward(DType dtype, const Linear& l, bool with_bias, int64_t bias_offset,
                   std::mt19937_64& rng) {
  const int64_t k = l.inp[-1];
  const Shape so = with_last(l.inp, l.n), sw{l.n, k};
  std::vector<float> inp = round_to(dtype, random_vector(l.inp.numel(), rng));
  std::vector<float> w = round_to(dtype, random_vector(sw.numel(), rng, 0.1f));
  std::vector<float> bias = round_to(dtype, random_vector(l.n, rng));
  DeviceTensor di(dtype, l.inp), dw(dtype, sw), dout(dtype, so);
  OffsetTensor db(dtype, {l.n}, bias_offset);
  di.upload(inp);
  dw.upload(w);
  db.upload(bias);
  cuda::matmul_forward(dout, di, dw, with_bias ? db.t() : Tensor());
  const std::vector<float> got = dout.download();
  std::vector<float> ref(so.numel());
  cpu::matmul_forward(host(ref, so), host(inp, l.inp), host(w, sw),
                      with_bias ? host(bias, {l.n}) : Tensor());
  expect_close(got, ref, dtype,
               fmt::format("matmul_forward {} inp {} n{} bias {} off {}", dtype_name(dtype),
                           l.inp.str(), l.n, with_bias, bias_offset));
  EXPECT_TRUE(dout.guards_intact());
}

TEST(CudaMatmul, ForwardParity) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(6);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Linear& l : kLinearShapes) {
      check_forward(dtype, l, false, 0, rng);
      check_forward(dtype, l, true, 0, rng);
      check_forward(dtype, l, true, 1, rng);  // misaligned bias: the separate bias pass
    }
}

// Backward twice from pre-filled parameter gradients: dweight and dbias must end at
// prefill + 2 * gradient (+= semantics), dinp at one gradient (overwrite).
void check_backward(DType dtype, const Linear& l, bool with_dinp, bool with_dbias,
                    std::mt19937_64& rng) {
  const int64_t k = l.inp[-1];
  const Shape so = with_last(l.inp, l.n), sw{l.n, k};
  std::vector<float> inp = round_to(dtype, random_vector(l.inp.numel(), rng));
  std::vector<float> w = round_to(dtype, random_vector(sw.numel(), rng, 0.1f));
  std::vector<float> dout = round_to(dtype, random_vector(so.numel(), rng));
  std::vector<float> dw = round_to(dtype, random_vector(sw.numel(), rng));
  std::vector<float> dbias = round_to(dtype, random_vector(l.n, rng));
  DeviceTensor g_inp(dtype, l.inp), g_w(dtype, sw), g_dout(dtype, so), g_dinp(dtype, l.inp),
      g_dw(dtype, sw), g_db(dtype, {l.n});
  g_inp.upload(inp);
  g_w.upload(w);
  g_dout.upload(dout);
  g_dw.upload(dw);
  g_db.upload(dbias);
  for (int rep = 0; rep < 2; ++rep)
    cuda::matmul_backward(with_dinp ? g_dinp.t() : Tensor(), g_dw, with_dbias ? g_db.t() : Tensor(),
                          g_dout, g_inp, g_w);
  std::vector<float> dinp(l.inp.numel());
  for (int rep = 0; rep < 2; ++rep)
    cpu::matmul_backward(with_dinp ? host(dinp, l.inp) : Tensor(), host(dw, sw),
                         with_dbias ? host(dbias, {l.n}) : Tensor(), host(dout, so),
                         host(inp, l.inp), host(w, sw));
  const std::string name =
      fmt::format("matmul_backward {} inp {} n{}", dtype_name(dtype), l.inp.str(), l.n);
  if (with_dinp) {
    expect_close(g_dinp.download(), dinp, dtype, name + " dinp");
    EXPECT_TRUE(g_dinp.guards_intact());
  }
  expect_close(g_dw.download(), dw, dtype, name + " dweight");
  EXPECT_TRUE(g_dw.guards_intact());
  if (with_dbias) {
    expect_close(g_db.download(), dbias, dtype, name + " dbias");
    EXPECT_TRUE(g_db.guards_intact());
  }
}

TEST(CudaMatmul, BackwardParityAccumulates) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::f32, DType::bf16, DType::f16})
    for (const Linear& l : kLinearShapes) {
      check_backward(dtype, l, true, true, rng);
      check_backward(dtype, l, false, false, rng);
    }
}

TEST(CudaMatmul, DbiasIsDeterministic) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(8);
  const Shape si{5000, 16}, sw{300, 16}, so{5000, 300};
  DeviceTensor inp(DType::f32, si), w(DType::f32, sw), dout(DType::f32, so);
  inp.upload(random_vector(si.numel(), rng));
  w.upload(random_vector(sw.numel(), rng));
  dout.upload(random_vector(so.numel(), rng));
  std::vector<std::vector<float>> results;
  for (int rep = 0; rep < 2; ++rep) {
    DeviceTensor dw(DType::f32, sw), db(DType::f32, {300});
    dw.upload(std::vector<float>(sw.numel(), 0.0f));
    db.upload(std::vector<float>(300, 0.0f));
    cuda::matmul_backward(Tensor(), dw, db, dout, inp, w);
    results.push_back(db.download());
  }
  EXPECT_EQ(results[0], results[1]);
}

}  // namespace
}  // namespace tessera::testing
