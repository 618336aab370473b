// QatLinears on the CPU: the straight-through contract exactly (the forward is the linear of the
// fake-quantized weight and input, the input gradient is dout W_fq, the weight gradient dout^T
// x_fq, accumulating), the inactive layer is the plain Linear bit for bit, finite differences of
// the surrounding linear (quantization off, and with weight-only quantization the input gradient,
// which W_fq leaves linear), the once-per-step weight cache, the routed-expert hooks and the
// group error. The tp max-reduce is tested under mpirun (qat_linear_mpi_test.cpp).
// Shape letters: M rows, K in features, N out features.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/linear.h"
#include "optim/qat_linear.h"
#include "tests/common/errors.h"
#include "tests/common/tensors.h"

namespace tessera {
namespace {

using testing::HostTensor;

constexpr int64_t M = 12, K = 64, N = 40;

QatConfig config(QatBits bits, int group, QatActivations acts) {
  QatConfig c;
  c.weights = bits;
  c.group_size = group;
  c.activations = acts;
  return c;
}

// One linear (with bias) in a store of `dtype`, weights drawn by the store's initializer and the
// bias made nonzero.
struct Fixture {
  ParamStore ps;
  Linear lin;
  explicit Fixture(DType dtype, int64_t k = K) {
    lin.declare(ps, "layers.0.attn.wq", int(k), N, /*with_bias=*/true, 0.05f);
    ps.allocate(dtype, Device::cpu);
    ps.init(7);
    std::mt19937_64 rng(3);
    const HostTensor b = testing::randn(dtype, {N}, rng, 0.1);
    std::memcpy(ps[lin.bias].value.data, b.t.data, b.t.nbytes());
    ps.zero_grad();
  }
  Tensor w() const { return ps[lin.weight].value; }
  Tensor dw() { return ps[lin.weight].grad; }
  Tensor db() { return ps[lin.bias].grad; }
};

HostTensor copy_of(const Tensor& t) {
  HostTensor h(t.dtype, t.shape);
  std::memcpy(h.t.data, t.data, t.nbytes());
  return h;
}

void expect_same_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes()), 0) << what;
}

// The straight-through estimator, element for element: every result equals the plain linear ops
// run on W_fq = fake_quantize(W) and x_fq = fake_quantize(x) (int8 per row), and a second backward
// doubles the parameter gradients.
TEST(QatLinear, ForwardAndBackwardAreTheLinearOfTheFakeQuantizedOperands) {
  for (QatBits bits : {QatBits::int8, QatBits::int4}) {
    SCOPED_TRACE(to_string(bits));
    Fixture f(DType::f32);
    QatLinears q(config(bits, bits == QatBits::int8 ? 0 : 32, QatActivations::int8), Device::cpu,
                 "t.yaml");
    q.add(f.lin, f.ps, "layers.0.attn.wq.weight", QatLayer::attention);
    q.set_active(true);
    std::mt19937_64 rng(11);
    const HostTensor x = testing::randn(DType::f32, {M, K}, rng);
    const HostTensor dout = testing::randn(DType::f32, {M, N}, rng);
    // The reference operands, through the op alone.
    HostTensor w_fq(DType::f32, {N, K}), x_fq(DType::f32, {M, K});
    ops::fake_quantize(w_fq, f.w(),
                       bits == QatBits::int8 ? quant::IntBits::int8 : quant::IntBits::int4,
                       bits == QatBits::int8 ? K : 32);
    ops::fake_quantize(x_fq, x, quant::IntBits::int8, K);
    expect_same_bits(q.quantized_weight(f.ps, 0), w_fq, "W_fq");
    HostTensor y(DType::f32, {M, N}), y_ref(DType::f32, {M, N});
    f.lin.forward(f.ps, y, x);
    ops::matmul_forward(y_ref, x_fq, w_fq, f.ps[f.lin.bias].value);
    expect_same_bits(y, y_ref, "forward");
    HostTensor dx(DType::f32, {M, K}), dx_ref(DType::f32, {M, K});
    HostTensor dw_ref(DType::f32, {N, K}), db_ref(DType::f32, {N});
    f.lin.backward(f.ps, dx, dout, x, false);
    ops::gemm(dx_ref, dout, w_fq, false, false, 1.0f, 0.0f);
    ops::matmul_backward(Tensor(), dw_ref, db_ref, dout, x_fq, w_fq);
    expect_same_bits(dx, dx_ref, "dinp = dout W_fq");
    expect_same_bits(f.dw(), dw_ref, "dW = dout^T x_fq");
    expect_same_bits(f.db(), db_ref, "db");
    // The two halves (tp's overlap) and accumulation: the gradients double, dinp accumulates.
    f.lin.backward_input(f.ps, dx, dout, true);
    f.lin.backward_weight(f.ps, dout, x);
    ops::matmul_backward(Tensor(), dw_ref, db_ref, dout, x_fq, w_fq);
    ops::gemm(dx_ref, dout, w_fq, false, false, 1.0f, 1.0f);
    expect_same_bits(dx, dx_ref, "dinp accumulated");
    expect_same_bits(f.dw(), dw_ref, "dW accumulated");
  }
}

// Off (before qat.start_step) the layer is the plain Linear, bit for bit.
TEST(QatLinear, InactiveIsThePlainLinear) {
  Fixture a(DType::f32), b(DType::f32);
  QatLinears q(config(QatBits::int4, 32, QatActivations::int8), Device::cpu, "t.yaml");
  q.add(b.lin, b.ps, "layers.0.attn.wq.weight", QatLayer::attention);
  ASSERT_FALSE(q.active());
  std::mt19937_64 rng(12);
  const HostTensor x = testing::randn(DType::f32, {M, K}, rng);
  const HostTensor dout = testing::randn(DType::f32, {M, N}, rng);
  HostTensor ya(DType::f32, {M, N}), yb(DType::f32, {M, N});
  HostTensor dxa(DType::f32, {M, K}), dxb(DType::f32, {M, K});
  a.lin.forward(a.ps, ya, x);
  b.lin.forward(b.ps, yb, x);
  a.lin.backward(a.ps, dxa, dout, x, false);
  b.lin.backward(b.ps, dxb, dout, x, false);
  expect_same_bits(yb, ya, "forward");
  expect_same_bits(dxb, dxa, "dinp");
  expect_same_bits(b.dw(), a.dw(), "dW");
  expect_same_bits(b.db(), a.db(), "db");
}

// Central finite differences in f64 of loss = sum(dout * linear(x)): with quantization off every
// gradient; with weight-only quantization on, the input gradient (W_fq does not depend on x, so
// the layer is linear in x and dout W_fq is its exact derivative). The weight gradient under
// quantization is the STE's choice, not a derivative (tested exactly above).
TEST(QatLinear, GradientsMatchFiniteDifferences) {
  for (bool on : {false, true}) {
    SCOPED_TRACE(on ? "weights int4 on" : "off");
    Fixture f(DType::f64);
    QatLinears q(config(QatBits::int4, 32, QatActivations::none), Device::cpu, "t.yaml");
    q.add(f.lin, f.ps, "layers.0.attn.wq.weight", QatLayer::attention);
    q.set_active(on);
    std::mt19937_64 rng(13);
    HostTensor x = testing::randn(DType::f64, {M, K}, rng);
    const HostTensor dout = testing::randn(DType::f64, {M, N}, rng);
    HostTensor y(DType::f64, {M, N}), dx(DType::f64, {M, K});
    f.lin.backward(f.ps, dx, dout, x, false);
    // The weight and bias as host copies the forward writes back into the store, so finite
    // differences can perturb them; the quantized weight is re-made on every forward.
    HostTensor w = copy_of(f.w()), b = copy_of(f.ps[f.lin.bias].value);
    const auto forward = [&] {
      std::memcpy(f.w().data, w.t.data, w.t.nbytes());
      std::memcpy(f.ps[f.lin.bias].value.data, b.t.data, b.t.nbytes());
      q.invalidate();
      f.lin.forward(f.ps, y, x);
    };
    const auto loss = testing::fd_loss(dout, y, forward);
    testing::expect_grad_matches(x, dx, loss, testing::kFdTol, "dinp", testing::kFdStep);
    if (on) continue;
    const HostTensor dw = copy_of(f.dw()), db = copy_of(f.db());
    testing::expect_grad_matches(w, dw, loss, testing::kFdTol, "dW", testing::kFdStep);
    testing::expect_grad_matches(b, db, loss, testing::kFdTol, "db", testing::kFdStep);
  }
}

// W_fq is made once and reused until invalidate() (each optimizer step), however many
// micro-batches and evaluations run in between.
TEST(QatLinear, WeightIsRequantizedOnlyAfterInvalidate) {
  Fixture f(DType::f32);
  QatLinears q(config(QatBits::int8, 0, QatActivations::none), Device::cpu, "t.yaml");
  q.add(f.lin, f.ps, "layers.0.attn.wq.weight", QatLayer::attention);
  q.set_active(true);
  const HostTensor before = copy_of(q.quantized_weight(f.ps, 0));
  ops::scale_inplace(f.w(), 2.0f);  // an optimizer step, as far as the cache can tell
  expect_same_bits(q.quantized_weight(f.ps, 0), before, "cached");
  q.invalidate();
  HostTensor twice = before;
  ops::scale_inplace(twice, 2.0f);  // scales double, codes stay: exactly twice the values
  expect_same_bits(q.quantized_weight(f.ps, 0), twice, "re-quantized");
}

// The routed experts' hooks without a model: inactive, the weight is the stored one and the
// input rows are untouched; active, the input rows are fake-quantized per row (token) in place.
// attach() registering the experts' weights is covered end to end (tests/e2e/qat_train_test.cpp).
TEST(QatLinear, ExpertInputHookQuantizesRowsInPlaceOnlyWhenActive) {
  ParamStore ps;
  const int w = ps.add(ParamSpec{
      "layers.1.moe.experts.gate.weight", {4, 16, K}, ParamClass::weight, InitKind::normal, 0.05f});
  ps.allocate(DType::f32, Device::cpu);
  ps.init(9);
  QatLinears q(config(QatBits::int4, 64, QatActivations::int8), Device::cpu, "t.yaml");
  std::mt19937_64 rng(14);
  HostTensor x = testing::randn(DType::f32, {6, K}, rng), x_ref = x;
  q.expert_input(x);
  expect_same_bits(x, x_ref, "inactive input");
  EXPECT_EQ(q.expert_weight(ps, w).data, ps[w].value.data);
  q.set_active(true);
  q.expert_input(x);
  ops::fake_quantize(x_ref, x_ref, quant::IntBits::int8, K);
  expect_same_bits(x, x_ref, "input int8 per row");
}

TEST(QatLinear, GroupThatDoesNotDivideKIsAUserError) {
  Fixture f(DType::f32, 48);
  QatLinears q(config(QatBits::int4, 32, QatActivations::none), Device::cpu, "r.yaml");
  testing::expect_user_error(
      [&] { q.add(f.lin, f.ps, "layers.0.attn.wq.weight", QatLayer::attention); },
      {"r.yaml", "qat.group_size = 32", "48 input features", "layers.0.attn.wq.weight",
       "'attention'"});
}

}  // namespace
}  // namespace tessera
