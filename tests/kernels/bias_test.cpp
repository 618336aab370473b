// Tests of bias_add and bias_grad (kernels/cpu/bias.cpp, kernels/cuda/bias.cu). CPU: bit-exact
// against a naive double reference rounded once, accumulation (+=), awkward sizes, f32 vectors
// beside f64 and 16-bit tensors, bit-equality with matmul_forward's bias and matmul_backward's
// dbias, the adjoint identity and finite differences in f64, thread-count independence, NaN/Inf,
// degenerate sizes, rejected operands; bounds. GPU parity: f32/bf16/f16 with same-dtype and f32
// vectors, awkward and random sizes, misaligned views (the scalar load path), +=, NaN/Inf, guard
// bytes, bitwise run-to-run determinism of the column sums. Shape letters: M rows, N columns, K
// in-features.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <chrono>
#include <cstdio>
#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

struct Dims {
  int64_t m, n;
};
// Odd widths around the 64-column blocks of the column sums and the OpenMP threshold (M*N above
// 2^15 runs threaded), single rows and columns.
const Dims kSizes[] = {{1025, 3}, {1, 4097}, {3, 1025}, {1, 1}, {2050, 130}, {4099, 37}};

// The op's (matrix, vector) dtype pairs on the CPU: same dtype, or an f32 vector.
struct DtypePair {
  DType matrix, vector;
};
const DtypePair kPairs[] = {
    {DType::f32, DType::f32}, {DType::f64, DType::f64}, {DType::f64, DType::f32}};

// v rounded once to dtype (f32 or f64).
double round_to_dtype(DType dtype, double v) {
  return dtype == DType::f32 ? double(static_cast<float>(v)) : v;
}

// dbias + column sums of dout, each column summed in double over rows in increasing order, then
// rounded once to dbias's dtype: the documented CPU order.
HostTensor reference_bias_grad(const HostTensor& dbias, const HostTensor& dout, Dims d) {
  HostTensor out = dbias;
  for (int64_t j = 0; j < d.n; ++j) {
    double sum = 0.0;
    for (int64_t i = 0; i < d.m; ++i) sum += dout.get(i * d.n + j);
    out.set(j, round_to_dtype(out.t.dtype, dbias.get(j) + sum));
  }
  return out;
}

TEST(BiasAdd, ExactAgainstDoubleReference) {
  std::mt19937_64 rng(1);
  for (const DtypePair& p : kPairs) {
    for (const Dims& d : kSizes) {
      SCOPED_TRACE(::testing::Message() << dtype_name(p.matrix) << "/" << dtype_name(p.vector)
                                        << " M=" << d.m << " N=" << d.n);
      HostTensor out = randn(p.matrix, {d.m, d.n}, rng);
      const HostTensor bias = randn(p.vector, {d.n}, rng, 3.0);
      const HostTensor bias_before = bias;
      HostTensor want = out;
      for (int64_t i = 0; i < d.m; ++i)
        for (int64_t j = 0; j < d.n; ++j)
          want.set(i * d.n + j, round_to_dtype(p.matrix, out.get(i * d.n + j) + bias.get(j)));
      ops::bias_add(out, bias);
      expect_identical(out, want, "out");
      expect_identical(bias, bias_before, "bias (read only)");
    }
  }
}

TEST(BiasAdd, FlattensLeadingDims) {
  std::mt19937_64 rng(2);
  const HostTensor bias = randn(DType::f32, {7}, rng);
  HostTensor out3 = randn(DType::f32, {2, 5, 7}, rng);
  HostTensor out2 = out3;
  out2.t = out2.t.view({10, 7});
  ops::bias_add(out3, bias);
  ops::bias_add(out2, bias);
  expect_identical(out3, out2, "(B,T,N) vs (B*T,N)");
}

TEST(BiasGrad, ExactAgainstDoubleReferenceAndAccumulates) {
  std::mt19937_64 rng(3);
  for (const DtypePair& p : kPairs) {
    for (const Dims& d : kSizes) {
      SCOPED_TRACE(::testing::Message() << dtype_name(p.matrix) << "/" << dtype_name(p.vector)
                                        << " M=" << d.m << " N=" << d.n);
      const HostTensor dout = randn(p.matrix, {d.m, d.n}, rng);
      const HostTensor dout_before = dout;
      HostTensor dbias = randn(p.vector, {d.n}, rng);  // accumulates onto random contents
      HostTensor want = reference_bias_grad(dbias, dout, d);
      ops::bias_grad(dbias, dout);
      expect_identical(dbias, want, "dbias after one call");
      want = reference_bias_grad(want, dout, d);
      ops::bias_grad(dbias, dout);
      expect_identical(dbias, want, "dbias after two calls (+=)");
      expect_identical(dout, dout_before, "dout (read only)");
    }
  }
}

TEST(BiasGrad, IndependentOfThreadCount) {
  std::mt19937_64 rng(4);
  const Dims d{4099, 130};
  const HostTensor dout = randn(DType::f32, {d.m, d.n}, rng);
  const HostTensor dbias0 = randn(DType::f32, {d.n}, rng);
  HostTensor one = dbias0, many = dbias0;
  with_threads(1, [&] { ops::bias_grad(one, dout); });
  with_threads(3, [&] { ops::bias_grad(many, dout); });
  expect_identical(many, one, "dbias, 3 threads vs 1");
}

// The ops are exactly the bias parts of the linear layer: f32/f64 matmul_forward with a bias
// equals the bias-free matmul followed by bias_add (the CPU adds the bias to the stored GEMM
// result either way), and matmul_backward's dbias equals bias_grad on every dtype. (For 16-bit
// out, matmul_forward rounds once and GEMM + bias_add twice; that is the contract.)
TEST(Bias, BitEqualToMatmulBiasAndDbias) {
  std::mt19937_64 rng(5);
  const int64_t m = 37, k = 29, n = 67;
  for (DType dtype : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(dtype));
    const HostTensor inp = randn(dtype, {m, k}, rng), weight = randn(dtype, {n, k}, rng);
    const HostTensor bias = randn(dtype, {n}, rng), dout = randn(dtype, {m, n}, rng);
    HostTensor fused(dtype, {m, n}), split(dtype, {m, n});
    ops::matmul_forward(fused, inp, weight, bias);
    ops::matmul_forward(split, inp, weight, Tensor());
    ops::bias_add(split, bias);
    expect_identical(split, fused, "matmul_forward + bias_add vs matmul_forward with bias");

    const HostTensor dbias0 = randn(dtype, {n}, rng);
    HostTensor dbias_matmul = dbias0, dbias_op = dbias0;
    HostTensor dweight(dtype, {n, k});
    ops::matmul_backward(Tensor(), dweight, dbias_matmul, dout, inp, weight);
    ops::bias_grad(dbias_op, dout);
    expect_identical(dbias_op, dbias_matmul, "bias_grad vs matmul_backward's dbias");
  }
  for (DType dtype : {DType::bf16, DType::f16}) {
    SCOPED_TRACE(dtype_name(dtype));
    std::vector<uint16_t> bits(m * (k + n) + n * k + n);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& b : bits)
      b = dtype == DType::bf16 ? f32_to_bf16_bits(normal(rng)) : f32_to_f16_bits(normal(rng));
    std::vector<uint16_t> db_matmul(bits.end() - n, bits.end()), db_op = db_matmul;
    uint16_t* base = bits.data();
    const Tensor dout(base, dtype, Device::cpu, {m, n});
    const Tensor inp(base + m * n, dtype, Device::cpu, {m, k});
    const Tensor weight(base + m * (n + k), dtype, Device::cpu, {n, k});
    std::vector<float> dweight(n * k, 0.0f);
    ops::matmul_backward(Tensor(), Tensor(dweight.data(), DType::f32, Device::cpu, {n, k}),
                         Tensor(db_matmul.data(), dtype, Device::cpu, {n}), dout, inp, weight);
    ops::bias_grad(Tensor(db_op.data(), dtype, Device::cpu, {n}), dout);
    EXPECT_EQ(db_op, db_matmul) << "16-bit bias_grad vs matmul_backward's dbias";
  }
}

float widen(DType dtype, uint16_t bits) {
  return dtype == DType::bf16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}
uint16_t narrow(DType dtype, float x) {
  return dtype == DType::bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
}
bool same_bits(DType dtype, uint16_t got, float want) {
  return std::isnan(want) ? std::isnan(widen(dtype, got)) : got == narrow(dtype, want);
}

// bf16/f16 through NarrowScope: bias_add is the f32 sum rounded once to the 16-bit dtype;
// bias_grad is the double column sum rounded to f32 (the f32 kernel's dbias) and then to dbias's
// storage dtype. bias and dbias are 16-bit or f32. The first column carries NaN, Inf and -Inf
// in dout, and two f16 maxima overflow to Inf (what FP16 loss scaling detects).
TEST(Bias, SixteenBitRoundsOnceFromF32) {
  std::mt19937_64 rng(6);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float kInf = std::numeric_limits<float>::infinity();
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (DType vec_dtype : {dtype, DType::f32}) {
      for (const Dims& d : {Dims{1025, 3}, Dims{3, 1025}, Dims{130, 67}}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << "/" << dtype_name(vec_dtype)
                                          << " M=" << d.m << " N=" << d.n);
        const bool narrow_vec = vec_dtype != DType::f32;
        std::vector<uint16_t> mat(d.m * d.n), vec_bits(d.n);
        std::vector<float> vec_f32(d.n);
        for (auto& x : mat) x = narrow(dtype, normal(rng));
        for (int64_t j = 0; j < d.n; ++j) {
          vec_f32[j] = narrow_vec ? widen(dtype, narrow(dtype, 2 * normal(rng))) : 2 * normal(rng);
          vec_bits[j] = narrow(dtype, vec_f32[j]);
        }
        const auto vec_tensor = [&] {
          return narrow_vec ? Tensor(vec_bits.data(), dtype, Device::cpu, {d.n})
                            : Tensor(vec_f32.data(), DType::f32, Device::cpu, {d.n});
        };
        const auto vec_at = [&](int64_t j) {
          return narrow_vec ? widen(dtype, vec_bits[j]) : vec_f32[j];
        };

        // bias_add; in f16, 65504 + 65504 overflows to +Inf.
        if (dtype == DType::f16 && narrow_vec) mat[0] = vec_bits[0] = narrow(dtype, 65504.0f);
        std::vector<uint16_t> out = mat;
        ops::bias_add(Tensor(out.data(), dtype, Device::cpu, {d.m, d.n}), vec_tensor());
        for (int64_t i = 0; i < d.m * d.n; ++i) {
          const float want = widen(dtype, mat[i]) + vec_at(i % d.n);
          ASSERT_TRUE(same_bits(dtype, out[i], want)) << "bias_add element " << i;
        }
        if (dtype == DType::f16 && narrow_vec) {
          EXPECT_EQ(widen(dtype, out[0]), kInf);
        }

        // bias_grad onto the current vector contents; dout[0,0] = NaN, dout[1,1] = +Inf.
        mat[0] = narrow(dtype, std::numeric_limits<float>::quiet_NaN());
        mat[d.n + 1] = narrow(dtype, kInf);
        std::vector<float> want(d.n);
        for (int64_t j = 0; j < d.n; ++j) {
          double sum = 0.0;
          for (int64_t i = 0; i < d.m; ++i) sum += widen(dtype, mat[i * d.n + j]);
          want[j] = static_cast<float>(double(vec_at(j)) + sum);
        }
        ops::bias_grad(vec_tensor(), Tensor(mat.data(), dtype, Device::cpu, {d.m, d.n}));
        for (int64_t j = 0; j < d.n; ++j) {
          const bool ok =
              narrow_vec ? same_bits(dtype, vec_bits[j], want[j])
                         : vec_f32[j] == want[j] || (std::isnan(vec_f32[j]) && std::isnan(want[j]));
          ASSERT_TRUE(ok) << "dbias element " << j << ": " << vec_at(j) << " vs " << want[j];
        }
        EXPECT_TRUE(std::isnan(vec_at(0))) << "NaN in column 0 reaches dbias";
        EXPECT_EQ(vec_at(1), kInf) << "Inf in column 1 reaches dbias";
      }
    }
  }
}

// bias_grad is the adjoint of bias_add in its bias argument: <bias_grad(g), b> = <g, bias_add(0,
// b)>, both sides being sum_ij g_ij b_j (f64, so they agree to a few ulps of the sum's terms);
// and bias_grad(g) is the gradient of L(b) = <g, bias_add(x, b)> by central differences.
TS_FD_TEST(Bias, AdjointAndFiniteDifferencesF64, "bias_add", "bias_grad") {
  std::mt19937_64 rng(7);
  for (const Dims& d : {Dims{37, 19}, Dims{1, 4097}, Dims{1025, 3}}) {
    SCOPED_TRACE(::testing::Message() << "M=" << d.m << " N=" << d.n);
    const HostTensor g = randn(DType::f64, {d.m, d.n}, rng);
    HostTensor b = randn(DType::f64, {d.n}, rng);
    HostTensor dbias(DType::f64, {d.n});  // zeros
    ops::bias_grad(dbias, g);
    HostTensor out(DType::f64, {d.m, d.n});  // zeros
    ops::bias_add(out, b);
    // Both sides sum the same M*N products; a recursive sum of k terms errs by at most about
    // k u (u = 2^-53) times the sum of their magnitudes (Higham 3.1), and the right side's dot
    // runs over all M*N, the left one's over M then N: bound (M*N + M + N) 2u sum |g_ij b_j|.
    double abs_terms = 0.0;
    for (int64_t i = 0; i < d.m * d.n; ++i) abs_terms += std::fabs(g.get(i) * b.get(i % d.n));
    const double bound = double(d.m * d.n + d.m + d.n) * std::ldexp(1.0, -52) * abs_terms;
    EXPECT_NEAR(dot(dbias, b), dot(g, out), bound);

    const HostTensor x = randn(DType::f64, {d.m, d.n}, rng);
    HostTensor y(DType::f64, {d.m, d.n});
    const auto loss = fd_loss(g, y, [&] {
      y = x;
      ops::bias_add(y, b);
    });
    expect_grad_matches(b, dbias, loss, kFdTol, "dbias", kFdStep);
  }
}

TEST(Bias, DegenerateSizes) {
  float storage[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  // M = 0: nothing to add, dbias unchanged.
  const Tensor empty_rows(storage, DType::f32, Device::cpu, {0, 4});
  const Tensor vec(storage + 4, DType::f32, Device::cpu, {4});
  ops::bias_add(empty_rows, vec);
  ops::bias_grad(vec, empty_rows);
  for (int j = 0; j < 4; ++j) EXPECT_EQ(storage[4 + j], float(5 + j));
  // N = 0: nothing at all.
  ops::bias_add(Tensor(storage, DType::f32, Device::cpu, {3, 0}),
                Tensor(storage + 4, DType::f32, Device::cpu, {0}));
  for (int j = 0; j < 8; ++j) EXPECT_EQ(storage[j], float(1 + j));
}

TEST(Bias, RejectsBadOperands) {
  std::vector<float> f(64, 1.0f);
  std::vector<double> f64(64, 1.0);
  std::vector<uint16_t> h(64, 0);
  const Tensor mat(f.data(), DType::f32, Device::cpu, {4, 5});
  const Tensor other(f.data() + 32, DType::f32, Device::cpu, {5});
  EXPECT_THROW(ops::bias_add(mat, Tensor(f.data() + 32, DType::f32, Device::cpu, {4})), Error);
  EXPECT_THROW(ops::bias_grad(Tensor(f.data() + 32, DType::f32, Device::cpu, {6}), mat), Error);
  // f64 vector beside f32 tensors (only an f32 vector may differ from the matrix's dtype)
  EXPECT_THROW(ops::bias_add(mat, Tensor(f64.data(), DType::f64, Device::cpu, {5})), Error);
  // f16 vector beside bf16 tensors
  const Tensor mat_bf16(h.data(), DType::bf16, Device::cpu, {4, 5});
  EXPECT_THROW(ops::bias_add(mat_bf16, Tensor(h.data() + 32, DType::f16, Device::cpu, {5})), Error);
  EXPECT_THROW(ops::bias_grad(Tensor(h.data() + 32, DType::f16, Device::cpu, {5}), mat_bf16),
               Error);
  // bias inside out, dbias inside dout
  EXPECT_THROW(ops::bias_add(mat, Tensor(f.data() + 5, DType::f32, Device::cpu, {5})), Error);
  EXPECT_THROW(ops::bias_grad(Tensor(f.data() + 5, DType::f32, Device::cpu, {5}), mat), Error);
  // absent bias, 0-d out, integer dtype
  EXPECT_THROW(ops::bias_add(mat, Tensor()), Error);
  EXPECT_THROW(ops::bias_add(Tensor(f.data(), DType::f32, Device::cpu, Shape{}), other), Error);
  EXPECT_THROW(ops::bias_grad(other, Tensor(h.data(), DType::i32, Device::cpu, {2, 5})), Error);
  ops::bias_add(mat, other);  // the well-formed call goes through
  EXPECT_EQ(f[0], 2.0f);
}

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Bias, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(95);
  const HostTensor bias = randn(DType::f32, {23}, rng), dout = randn(DType::f32, {10, 23}, rng);
  Guarded out({10, 23}), dbias({23}), out16({10, 23}, DType::bf16), dbias16({23}, DType::bf16);
  ops::bias_add(out, bias);
  ops::bias_grad(dbias, dout);
  std::vector<uint16_t> dout16(10 * 23, f32_to_bf16_bits(0.5f));
  ops::bias_add(out16, bias);  // f32 bias beside a bf16 out
  ops::bias_grad(dbias16, Tensor(dout16.data(), DType::bf16, Device::cpu, {10, 23}));
  expect_guards_intact({&out, &dbias, &out16, &dbias16}, "bias_add / bias_grad");
}

TEST(Bias, AddIsThreadCountIndependent) {
  std::mt19937_64 rng(96);
  const HostTensor bias = randn(DType::f32, {200}, rng);
  HostTensor out = randn(DType::f32, {300, 200}, rng);
  expect_thread_independent("bias_add", {&out}, [&] { ops::bias_add(out, bias); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/bias.cu)
// ----------------------------------------------------------------

namespace tessera::testing::gpu_cases {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

struct Dims {
  int64_t m, n;
};

// Odd N (scalar loads), N a multiple of 8 but not of a strip, single rows and columns, one row
// chunk (M <= 128) and many (M = 4097 splits into chunks of 128+ rows; N = 16384 is the model
// width the FP8 layer meets), plus random sizes.
std::vector<Dims> test_sizes(std::mt19937_64& rng) {
  std::vector<Dims> sizes = {{1, 1},    {1, 4097},   {1025, 3},   {3, 1025},   {129, 520},
                             {4097, 8}, {300, 1000}, {257, 4104}, {16, 16384}, {2049, 2056}};
  std::uniform_int_distribution<int64_t> dim(1, 3000);
  for (int i = 0; i < 6; ++i) sizes.push_back({dim(rng), dim(rng)});
  return sizes;
}

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

// Host storage of one tensor in any float dtype, converted from and to f32.
struct HostBuf {
  std::vector<char> bytes;
  Tensor t;
  HostBuf(DType dtype, Shape shape, const std::vector<float>& values)
      : bytes(dtype_storage_bytes(dtype, shape.numel())) {
    t = Tensor(bytes.data(), dtype, Device::cpu, shape);
    convert_buffer(values.data(), DType::f32, bytes.data(), dtype, shape.numel());
  }
  std::vector<float> values() const {
    std::vector<float> out(t.numel());
    convert_buffer(bytes.data(), t.dtype, out.data(), DType::f32, t.numel());
    return out;
  }
};

// A device tensor starting `offset` elements into a guarded allocation: an odd offset leaves
// the pointer 2- or 4-byte aligned, which forces the kernels' scalar path.
struct OffsetTensor {
  DeviceTensor storage;
  int64_t offset;
  Shape shape;
  DType dtype;
  OffsetTensor(DType dt, Shape s, int64_t off)
      : storage(dt, Shape{s.numel() + off}), offset(off), shape(s), dtype(dt) {}
  Tensor t() const {
    return Tensor(static_cast<char*>(storage.t().data) + offset * dtype_storage_bytes(dtype, 1),
                  dtype, Device::cuda, shape);
  }
  void upload(const std::vector<float>& v) {
    std::vector<float> padded(offset, 0.0f);
    padded.insert(padded.end(), v.begin(), v.end());
    storage.upload(padded);
  }
  std::vector<float> download() const {
    const std::vector<float> all = storage.download();
    return std::vector<float>(all.begin() + offset, all.end());
  }
};

bool same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// First element where two results differ bitwise (NaN matches NaN), or -1.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return int64_t(std::min(a.size(), b.size()));
  for (size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i]) || std::signbit(a[i]) != std::signbit(b[i])) return int64_t(i);
  return -1;
}

// bias_add is one f32 add rounded once to out's dtype on both sides, so GPU and CPU agree
// bit for bit, whatever the load path.
TS_GPU_PARITY_TEST(Bias, AddBitEqualToCpu, "bias_add") {
  std::mt19937_64 rng(11);
  for (const Dims& d : test_sizes(rng)) {
    for (DType dtype : kDtypes) {
      for (DType vec_dtype : {dtype, DType::f32}) {
        for (int64_t offset : {0, 1}) {
          SCOPED_TRACE(::testing::Message()
                       << dtype_name(dtype) << " out, " << dtype_name(vec_dtype)
                       << " bias, M=" << d.m << " N=" << d.n << " offset " << offset);
          const auto out0 = round_to(dtype, random_vector(d.m * d.n, rng));
          const auto bias = round_to(vec_dtype, random_vector(d.n, rng, 3.0f));
          OffsetTensor out(dtype, {d.m, d.n}, offset);
          DeviceTensor bias_dev(vec_dtype, {d.n});
          out.upload(out0);
          bias_dev.upload(bias);
          ops::bias_add(out.t(), bias_dev);
          HostBuf want(dtype, {d.m, d.n}, out0);
          HostBuf bias_host(vec_dtype, {d.n}, bias);
          ops::bias_add(want.t, bias_host.t);
          const int64_t bad = first_difference(out.download(), want.values());
          EXPECT_EQ(bad, -1) << "out differs from the CPU at element " << bad;
          EXPECT_EQ(first_difference(bias_dev.download(), bias), -1) << "bias was written";
          EXPECT_TRUE(out.storage.guards_intact() && bias_dev.guards_intact());
        }
      }
    }
  }
}

// Bound on |gpu - cpu| for one bias_grad call, per column j, with S_j = |dbias_j| + sum_i
// |dout_ij| and v_j the CPU result:
//   GPU: an f32 sum of M+1 terms in any order errs by at most about M 2^-24 S_j (Higham 3.1);
//   CPU: the double sum (error ~M 2^-53 S_j, negligible) rounded to f32, at most 2^-24 |v_j|;
//   both are then rounded to dbias's dtype (16-bit only), together at most one ulp there,
//   ulp <= 2^(1-p) |v| for p significand bits (bf16 8, f16 11), v the larger of the two
//   results, plus f16's subnormal spacing 2^-24 for values below 2^-14.
// The factor 1.01 covers the (1 - M u)^-1 of the exact bound. A wrong index or a dropped row
// errs by O(1) and fails it; sums of unit normals are ~sqrt(M), so the bound is ~M/sqrt(M)
// = sqrt(M) 2^-24 relative in f32: far tighter than any bug.
double bias_grad_bound(DType dtype, int64_t m, double abs_sum, double value) {
  const double accumulate = 1.01 * double(m) * std::ldexp(1.0, -24) * abs_sum;
  const double to_f32 = std::ldexp(1.0, -24) * std::fabs(value);
  double storage = 0.0;
  if (dtype == DType::bf16) storage = std::ldexp(1.0, -7) * std::fabs(value);
  if (dtype == DType::f16) storage = std::ldexp(1.0, -10) * std::fabs(value) + std::ldexp(1.0, -24);
  return accumulate + to_f32 + storage;
}

// Checks one bias_grad call on dbias (starting at dbias0) against the CPU reference run on the
// same values; returns the GPU result.
std::vector<float> expect_grad_call(OffsetTensor& dbias, const std::vector<float>& dbias0,
                                    const OffsetTensor& dout, const std::vector<float>& dout_host,
                                    Dims d, DType vec_dtype) {
  ops::bias_grad(dbias.t(), dout.t());
  const std::vector<float> gpu = dbias.download();
  HostBuf want(vec_dtype, {d.n}, dbias0);
  HostBuf dout_buf(dout.dtype, {d.m, d.n}, dout_host);
  ops::bias_grad(want.t, dout_buf.t);
  const std::vector<float> cpu = want.values();
  expect_same_nonfinite(gpu, cpu, "dbias");
  std::vector<double> abs_sum(dbias0.begin(), dbias0.end());
  for (double& s : abs_sum) s = std::fabs(s);
  for (int64_t i = 0; i < d.m; ++i)
    for (int64_t j = 0; j < d.n; ++j) abs_sum[j] += std::fabs(dout_host[i * d.n + j]);
  double worst = 0.0;  // largest error / bound
  for (int64_t j = 0; j < d.n; ++j) {
    if (!std::isfinite(cpu[j])) continue;
    const double err = std::fabs(double(gpu[j]) - cpu[j]);
    const double larger = std::max(std::fabs(double(gpu[j])), std::fabs(double(cpu[j])));
    const double bound = bias_grad_bound(vec_dtype, d.m, abs_sum[j], larger);
    worst = std::max(worst, err / bound);
    if (!(err <= bound)) {
      ADD_FAILURE() << "dbias[" << j << "]: gpu " << gpu[j] << ", cpu " << cpu[j] << ", error "
                    << err << " > bound " << bound;
      break;
    }
  }
  std::printf("measured bias_grad %s/%s M=%lld N=%lld: worst error %.3g of the bound\n",
              std::string(dtype_name(dout.dtype)).c_str(),
              std::string(dtype_name(vec_dtype)).c_str(), (long long)d.m, (long long)d.n, worst);
  return gpu;
}

TS_GPU_PARITY_TEST(Bias, GradMatchesCpuAccumulatesAndIsDeterministic, "bias_grad") {
  std::mt19937_64 rng(12);
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  for (const Dims& d : test_sizes(rng)) {
    for (DType dtype : kDtypes) {
      for (DType vec_dtype : {dtype, DType::f32}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " dout, " << dtype_name(vec_dtype)
                                          << " dbias, M=" << d.m << " N=" << d.n);
        auto dout_host = round_to(dtype, random_vector(d.m * d.n, rng));
        if (d.m >= 3 && d.n >= 3) {  // NaN, +Inf, -Inf in columns 0, 1, 2
          dout_host[0] = kNaN;
          dout_host[d.n + 1] = kInf;
          dout_host[2 * d.n + 2] = -kInf;
        }
        const auto dbias0 = round_to(vec_dtype, random_vector(d.n, rng));
        OffsetTensor dout(dtype, {d.m, d.n}, 0), dout_odd(dtype, {d.m, d.n}, 1);
        dout.upload(dout_host);
        dout_odd.upload(dout_host);
        OffsetTensor dbias(vec_dtype, {d.n}, 0);
        dbias.upload(dbias0);

        // One call, then a second one accumulating onto the GPU's own first result (so each
        // call is held to its own bound).
        const auto first = expect_grad_call(dbias, dbias0, dout, dout_host, d, vec_dtype);
        const auto second = expect_grad_call(dbias, first, dout, dout_host, d, vec_dtype);

        // Run to run, and aligned vs misaligned dout (vector vs scalar loads): the summation
        // order depends on (M, N) only, so every bit must repeat.
        for (const OffsetTensor* src : {&dout, &dout_odd}) {
          OffsetTensor again(vec_dtype, {d.n}, 1);
          again.upload(dbias0);
          ops::bias_grad(again.t(), src->t());
          const auto repeat_first = again.download();
          ops::bias_grad(again.t(), src->t());
          const int64_t bad1 = first_difference(repeat_first, first);
          const int64_t bad2 = first_difference(again.download(), second);
          EXPECT_EQ(bad1, -1) << (src == &dout ? "rerun" : "misaligned dout")
                              << " differs at element " << bad1;
          EXPECT_EQ(bad2, -1) << (src == &dout ? "rerun" : "misaligned dout")
                              << " differs after two calls at element " << bad2;
          EXPECT_TRUE(again.storage.guards_intact());
        }
        EXPECT_EQ(first_difference(dout.download(), dout_host), -1) << "dout was written";
        EXPECT_TRUE(dout.storage.guards_intact() && dbias.storage.guards_intact());
      }
    }
  }
}

// The shape the FP8 layer meets at scale (M = 16384 tokens, N = 4096 features, bf16): parity,
// determinism, and the achieved bandwidth printed for reference (not asserted: shared GPUs).
TS_GPU_TEST(Bias, LargeGradAndBandwidth) {
  std::mt19937_64 rng(13);
  const Dims d{16384, 4096};
  const DType dtype = DType::bf16;
  const auto dout_host = round_to(dtype, random_vector(d.m * d.n, rng));
  const auto dbias0 = round_to(DType::f32, random_vector(d.n, rng));
  OffsetTensor dout(dtype, {d.m, d.n}, 0);
  dout.upload(dout_host);
  OffsetTensor dbias(DType::f32, {d.n}, 0);
  dbias.upload(dbias0);
  const auto first = expect_grad_call(dbias, dbias0, dout, dout_host, d, DType::f32);
  dbias.upload(dbias0);
  ops::bias_grad(dbias.t(), dout.t());
  EXPECT_EQ(first_difference(dbias.download(), first), -1) << "rerun differs";

  constexpr int kReps = 20;
  ops::synchronize(Device::cuda);
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) ops::bias_grad(dbias.t(), dout.t());
  ops::synchronize(Device::cuda);
  const double grad_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / kReps;
  const auto start_add = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) ops::bias_add(dout.t(), dbias.t());
  ops::synchronize(Device::cuda);
  const double add_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_add).count() / kReps;
  const double bytes = double(d.m) * d.n * 2;
  std::printf("measured bias_grad bf16 %lldx%lld: %.1f us, %.0f GB/s read\n", (long long)d.m,
              (long long)d.n, grad_s * 1e6, bytes / grad_s / 1e9);
  std::printf("measured bias_add bf16 %lldx%lld: %.1f us, %.0f GB/s read+write\n", (long long)d.m,
              (long long)d.n, add_s * 1e6, 2 * bytes / add_s / 1e9);
}

TS_GPU_TEST(Bias, RejectsBadOperands) {
  DeviceTensor out(DType::bf16, {4, 5}), bias_f16(DType::f16, {5}), bias_short(DType::bf16, {4});
  EXPECT_THROW(ops::bias_add(out, bias_f16), Error);
  EXPECT_THROW(ops::bias_add(out, bias_short), Error);
  EXPECT_THROW(ops::bias_grad(bias_f16, out), Error);
  const Tensor inside(out.t().data, DType::bf16, Device::cuda, {5});
  EXPECT_THROW(ops::bias_add(out, inside), Error);
  EXPECT_THROW(ops::bias_grad(inside, out), Error);
}

}  // namespace
}  // namespace tessera::testing::gpu_cases
