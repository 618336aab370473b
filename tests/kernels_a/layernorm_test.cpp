// layernorm_forward / layernorm_backward: forward against the textbook formula, finite-difference
// gradients in f64 (C = 1, awkward C = 1025, batch 1, with and without bias), accumulation of
// dweight/dbias, NaN confinement to its row, f32 against f64, and precondition checks.
// Shape letters: N rows, C channels (B, T when the input is 3-D).
#include <cmath>
#include <random>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

constexpr float kEps = 1e-5f;

struct LayerNormCase {
  HostTensor inp, weight, bias, out, mean, rstd;  // (..., C), (C), (C) or empty, (..., C), (N), (N)
};

LayerNormCase make_case(DType dtype, Shape inp_shape, bool with_bias, std::mt19937_64& rng,
                        DType stat_dtype) {
  LayerNormCase l;
  const int64_t num_c = inp_shape[-1];
  l.inp = randn(dtype, inp_shape, rng, 2.0);
  for (int64_t i = 0; i < l.inp.size(); ++i) l.inp.set(i, l.inp.get(i) + 0.5);  // nonzero mean
  l.weight = randn(dtype, {num_c}, rng);
  if (with_bias) l.bias = randn(dtype, {num_c}, rng);
  l.out = HostTensor(dtype, inp_shape);
  l.mean = HostTensor(stat_dtype, {l.inp.size() / num_c});
  l.rstd = HostTensor(stat_dtype, {l.inp.size() / num_c});
  return l;
}

void forward(LayerNormCase& l) {
  cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, l.weight, l.bias, kEps);
}

TEST(LayerNorm, ForwardMatchesFormula) {
  std::mt19937_64 rng(21);
  LayerNormCase l = make_case(DType::f64, {3, 4, 37}, true, rng, DType::f64);
  forward(l);
  const int64_t num_c = 37;
  for (int64_t row = 0; row < 12; ++row) {
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < num_c; ++c) mean += l.inp.get(row * num_c + c) / num_c;
    for (int64_t c = 0; c < num_c; ++c)
      var += std::pow(l.inp.get(row * num_c + c) - mean, 2) / num_c;
    const double rstd = 1.0 / std::sqrt(var + kEps);
    EXPECT_NEAR(l.mean.get(row), mean, 1e-13);
    EXPECT_NEAR(l.rstd.get(row), rstd, 1e-12 * rstd);
    for (int64_t c = 0; c < num_c; ++c) {
      const double expect =
          (l.inp.get(row * num_c + c) - mean) * rstd * l.weight.get(c) + l.bias.get(c);
      EXPECT_NEAR(l.out.get(row * num_c + c), expect, 1e-12) << "row " << row << " c " << c;
    }
  }
}

// Finite differences in f64; the error budget (step and tolerance) is in kernels_a_util.h. C = 1
// makes dinp exactly 0 (the output is the bias whatever x is); C = 2 makes it tiny (~1e-7).
TEST(LayerNorm, GradientsMatchFiniteDifferences) {
  struct Case {
    Shape inp;
    bool bias;
  };
  const Case cases[] = {
      {{1, 1}, true}, {{2, 3, 7}, true}, {{1, 1, 1025}, true}, {{5, 64}, false}, {{3, 2}, true}};
  std::mt19937_64 rng(22);
  for (const Case& cs : cases) {
    LayerNormCase l = make_case(DType::f64, cs.inp, cs.bias, rng, DType::f64);
    const int64_t num_c = cs.inp[-1];
    forward(l);
    const HostTensor dout = randn(DType::f64, cs.inp, rng);
    HostTensor dinp(DType::f64, cs.inp), dweight(DType::f64, {num_c});
    HostTensor dbias = cs.bias ? HostTensor(DType::f64, {num_c}) : HostTensor();
    cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
    LayerNormCase scratch = l;
    const auto loss = fd_loss(dout, scratch.out, [&] {
      cpu::layernorm_forward(scratch.out, scratch.mean, scratch.rstd, l.inp, l.weight, l.bias,
                             kEps);
    });
    SCOPED_TRACE("shape " + cs.inp.str());
    expect_grad_matches(l.inp, dinp, loss, kFdTol, "dinp", kFdStep);
    expect_grad_matches(l.weight, dweight, loss, kFdTol, "dweight", kFdStep);
    if (cs.bias) expect_grad_matches(l.bias, dbias, loss, kFdTol, "dbias", kFdStep);
  }
}

TEST(LayerNorm, BackwardAccumulatesParametersAndOverwritesInput) {
  std::mt19937_64 rng(23);
  LayerNormCase l = make_case(DType::f64, {6, 10}, true, rng, DType::f64);
  forward(l);
  const HostTensor dout = randn(DType::f64, {6, 10}, rng);
  HostTensor dinp = filled(DType::f64, {6, 10}, kNaN);
  HostTensor dweight(DType::f64, {10}), dbias(DType::f64, {10});
  cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
  const HostTensor dinp1 = dinp, dweight1 = dweight, dbias1 = dbias;
  cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
  expect_identical(dinp, dinp1, "dinp after two calls");
  for (int64_t c = 0; c < 10; ++c) {
    EXPECT_EQ(dweight.get(c), 2 * dweight1.get(c));
    EXPECT_EQ(dbias.get(c), 2 * dbias1.get(c));
  }
}

TEST(LayerNorm, NaNStaysInItsRow) {
  for (DType dtype : {DType::f32, DType::f64}) {
    std::mt19937_64 rng(24);
    LayerNormCase l = make_case(dtype, {4, 9}, true, rng, DType::f32);
    l.inp.set(1 * 9 + 4, kNaN);
    forward(l);
    for (int64_t row = 0; row < 4; ++row)
      EXPECT_EQ(count_nan(l.out, row * 9, row * 9 + 9), row == 1 ? 9 : 0) << "row " << row;
    const HostTensor dout = randn(dtype, {4, 9}, rng);
    HostTensor dinp(dtype, {4, 9}), dweight(dtype, {9}), dbias(dtype, {9});
    cpu::layernorm_backward(dinp, dweight, dbias, dout, l.inp, l.weight, l.mean, l.rstd);
    for (int64_t row = 0; row < 4; ++row)
      EXPECT_EQ(count_nan(dinp, row * 9, row * 9 + 9), row == 1 ? 9 : 0) << "row " << row;
    EXPECT_EQ(count_nan(dweight, 0, 9), 9);  // every column sums over the NaN row
  }
}

// f32 (with f32 saved statistics) against f64 on identical inputs: outputs are O(|weight| + |bias|)
// ~ 3 and each is rounded once from a double computation that used f32 inputs, so they agree to a
// few f32 ulps; dinp involves rstd rounded to f32 (relative 6e-8) times O(10) terms.
TEST(LayerNorm, F32AgreesWithF64) {
  std::mt19937_64 rng(25);
  LayerNormCase l32 = make_case(DType::f32, {2, 5, 300}, true, rng, DType::f32);
  LayerNormCase l64{to_dtype(l32.inp, DType::f64),  to_dtype(l32.weight, DType::f64),
                    to_dtype(l32.bias, DType::f64), HostTensor(DType::f64, {2, 5, 300}),
                    HostTensor(DType::f64, {10}),   HostTensor(DType::f64, {10})};
  forward(l32);
  forward(l64);
  expect_close(l32.out, l64.out, 1e-6, 1e-6, "layernorm out");
  expect_close(l32.rstd, l64.rstd, 1e-7, 0.0, "layernorm rstd");
  const HostTensor dout64 = randn(DType::f64, {2, 5, 300}, rng);
  const HostTensor dout32 = to_dtype(dout64, DType::f32);
  HostTensor dinp32(DType::f32, {2, 5, 300}), dw32(DType::f32, {300}), db32(DType::f32, {300});
  HostTensor dinp64(DType::f64, {2, 5, 300}), dw64(DType::f64, {300}), db64(DType::f64, {300});
  cpu::layernorm_backward(dinp32, dw32, db32, dout32, l32.inp, l32.weight, l32.mean, l32.rstd);
  cpu::layernorm_backward(dinp64, dw64, db64, to_dtype(dout32, DType::f64), l64.inp, l64.weight,
                          l64.mean, l64.rstd);
  expect_close(dinp32, dinp64, 1e-5, 1e-5, "layernorm dinp");
  expect_close(dw32, dw64, 1e-5, 1e-5, "layernorm dweight");
  expect_close(db32, db64, 1e-6, 1e-6, "layernorm dbias");
}

TEST(LayerNorm, RejectsBadOperands) {
  std::mt19937_64 rng(26);
  LayerNormCase l = make_case(DType::f32, {4, 8}, true, rng, DType::f32);
  HostTensor short_weight(DType::f32, {7});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, short_weight, l.bias, kEps),
               Error);
  HostTensor mean64(DType::f64, {4});  // stats may be f32 or the op's dtype (f32 here), not f64
  EXPECT_THROW(cpu::layernorm_forward(l.out, mean64, l.rstd, l.inp, l.weight, l.bias, kEps), Error);
  HostTensor short_rstd(DType::f32, {3});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, short_rstd, l.inp, l.weight, l.bias, kEps),
               Error);
  HostTensor weight64(DType::f64, {8});
  EXPECT_THROW(cpu::layernorm_forward(l.out, l.mean, l.rstd, l.inp, weight64, l.bias, kEps), Error);
}

}  // namespace
}  // namespace tessera::testing
