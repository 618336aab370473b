// bias_add and bias_grad on the CPU (kernels/cpu/bias.cpp through kernels/ops.h): bit-exact
// against a naive double reference rounded once, accumulation (+=), awkward sizes, f32 vectors
// beside f64 and 16-bit tensors, bit-equality with matmul_forward's bias and matmul_backward's
// dbias, the adjoint identity and finite differences in f64, thread-count independence, NaN/Inf,
// degenerate sizes and the rejected operands. Shape letters: M rows, N columns, K in-features.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

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
TEST(Bias, AdjointAndFiniteDifferencesF64) {
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

}  // namespace
}  // namespace tessera::testing
