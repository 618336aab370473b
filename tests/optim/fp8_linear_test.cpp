// The FP8 linear layer on the CPU (whose FP8 ops emulate the GPU's numerics): on operands that
// E4M3/E5M2 represent exactly it equals the BF16 linear bit for bit (so the plumbing of scales,
// transposes and operand order is right); on general operands its error stays within FP8's
// rounding; amaxes are recorded in training only and set the next step's scales.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"
#include "kernels/ops.h"
#include "model/linear.h"
#include "optim/fp8_linear.h"

namespace tessera {
namespace {

constexpr int M = 24, K = 32, N = 48;  // tokens, in features, out features

std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> out(t.numel());
  convert_buffer(t.data, t.dtype, out.data(), DType::f32, t.numel());
  return out;
}

void from_f32(Tensor t, const std::vector<float>& v) {
  convert_buffer(v.data(), DType::f32, t.data, t.dtype, t.numel());
}

// Values k / 8 with |k| <= 16 are exact in E4M3 (3 mantissa bits) and BF16; k / 4 with |k| <= 8
// are exact in E5M2 (2 mantissa bits).
std::vector<float> grid(int64_t n, int denom, int kmax, uint64_t seed) {
  const CounterRng rng(seed, "fp8-linear-test");
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i)
    v[i] = float(int(rng.bits(uint64_t(i)) % uint32_t(2 * kmax + 1)) - kmax) / float(denom);
  return v;
}

std::vector<float> uniform(int64_t n, float lo, float hi, uint64_t seed) {
  const CounterRng rng(seed, "fp8-linear-general");
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i)
    v[i] = round_bf16(lo + (hi - lo) * float(rng.bits(uint64_t(i)) >> 8) / float(1 << 24));
  return v;
}

// One bias-free linear in a bf16 store (the FP8 GEMM has no bias epilogue; bias_add is tested
// with the kernels), with its FP8 slot registered and finalized.
struct Fixture {
  ParamStore ps;
  Linear lin;
  Fp8Linears fp8{Device::cpu, Fp8ScalingConfig{}};
  Fixture() {
    lin.declare(ps, "l", K, N, /*with_bias=*/false, 0.02f);
    ps.allocate(DType::bf16, Device::cpu);
    lin.compute_slot = fp8.add("l.weight", N, K);
    fp8.finalize();
  }
  float scale(int which) const { return fp8.state().gather().scale[which]; }
};

Tensor host(DType t, Shape s, std::vector<char>& storage) {
  storage.assign(dtype_storage_bytes(t, s.numel()), 0);
  return Tensor(storage.data(), t, Device::cpu, s);
}

TEST(Fp8Linear, EqualsBf16LinearOnFp8RepresentableOperands) {
  Fixture f;
  from_f32(f.ps[f.lin.weight].value, grid(N * K, 8, 16, 1));
  std::vector<char> xs, ys8, ys16, dys, dx8s, dx16s;
  Tensor x = host(DType::bf16, {M, K}, xs), dy = host(DType::bf16, {M, N}, dys);
  from_f32(x, grid(M * K, 8, 16, 2));
  from_f32(dy, grid(M * N, 4, 8, 3));
  Tensor y16 = host(DType::bf16, {M, N}, ys16), y8 = host(DType::bf16, {M, N}, ys8);
  Tensor dx16 = host(DType::bf16, {M, K}, dx16s), dx8 = host(DType::bf16, {M, K}, dx8s);

  // Reference: the ordinary BF16 path, its weight gradient after one and two backwards.
  f.lin.forward(f.ps, y16, x);
  f.ps.zero_grad();
  f.lin.backward(f.ps, dx16, dy, x, false);
  const std::vector<float> dw16 = to_f32(f.ps[f.lin.weight].grad);
  f.lin.backward(f.ps, dx16, dy, x, false);
  const std::vector<float> dw16_twice = to_f32(f.ps[f.lin.weight].grad);

  // FP8 with the initial scales (1): every operand is exact, so only the output rounding is left.
  f.lin.compute = &f.fp8;
  f.lin.forward(f.ps, y8, x);
  f.ps.zero_grad();
  f.lin.backward(f.ps, dx8, dy, x, false);
  EXPECT_EQ(to_f32(y8), to_f32(y16));
  EXPECT_EQ(to_f32(dx8), to_f32(dx16));
  EXPECT_EQ(to_f32(f.ps[f.lin.weight].grad), dw16);

  // The split halves (the tp > 1 path) give the same bits, and dW accumulates.
  f.lin.backward_input(f.ps, dx8, dy, false);
  f.lin.backward_weight(f.ps, dy, x);
  EXPECT_EQ(to_f32(dx8), to_f32(dx16));
  EXPECT_EQ(to_f32(f.ps[f.lin.weight].grad), dw16_twice);
}

TEST(Fp8Linear, AmaxesSetTheNextStepsScales) {
  Fixture f;
  f.lin.compute = &f.fp8;
  from_f32(f.ps[f.lin.weight].value, grid(N * K, 8, 16, 4));  // max |w| = 2
  std::vector<char> xs, ys, dys, dxs;
  Tensor x = host(DType::bf16, {M, K}, xs), y = host(DType::bf16, {M, N}, ys);
  Tensor dy = host(DType::bf16, {M, N}, dys), dx = host(DType::bf16, {M, K}, dxs);
  std::vector<float> xv = grid(M * K, 8, 16, 5), dyv = grid(M * N, 4, 8, 6);
  xv[7] = 3.0f;     // max |x| = 3
  dyv[11] = -0.5f;  // max |dy| stays 2
  from_f32(x, xv);
  from_f32(dy, dyv);

  // Evaluation records nothing: the scales stay 1 after the step.
  f.fp8.set_recording(false);
  f.lin.forward(f.ps, y, x);
  f.fp8.set_recording(true);
  f.fp8.end_step(nullptr, nullptr);
  for (int k = 0; k < 3; ++k) EXPECT_EQ(f.scale(k), 1.0f) << k;

  f.lin.forward(f.ps, y, x);
  f.lin.backward(f.ps, dx, dy, x, false);
  f.fp8.end_step(nullptr, nullptr);
  EXPECT_EQ(f.scale(0), 448.0f / 3.0f);    // x: E4M3 max over its amax
  EXPECT_EQ(f.scale(1), 448.0f / 2.0f);    // w
  EXPECT_EQ(f.scale(2), 57344.0f / 2.0f);  // dy: E5M2
}

// General BF16 operands: each FP8 operand carries a relative error of at most 2^-4 (E4M3) or
// 2^-3 (E5M2) once scaled into range, so |y - y_ref| <= (2^-4 + 2^-4 + 2^-8) sum |x||w| after the
// scales have adapted (one step to record the amaxes), plus the bf16 output rounding.
TEST(Fp8Linear, GeneralOperandsStayWithinFp8Rounding) {
  Fixture f;
  const std::vector<float> wv = uniform(N * K, -0.3f, 0.3f, 7), xv = uniform(M * K, -5.0f, 5.0f, 8);
  from_f32(f.ps[f.lin.weight].value, wv);
  std::vector<char> xs, ys8, ys16;
  Tensor x = host(DType::bf16, {M, K}, xs);
  Tensor y8 = host(DType::bf16, {M, N}, ys8), y16 = host(DType::bf16, {M, N}, ys16);
  from_f32(x, xv);
  f.lin.forward(f.ps, y16, x);
  f.lin.compute = &f.fp8;
  f.lin.forward(f.ps, y8, x);  // records the amaxes
  f.fp8.end_step(nullptr, nullptr);
  f.lin.forward(f.ps, y8, x);  // with the adapted scales
  const std::vector<float> a = to_f32(y8), b = to_f32(y16);
  int differ = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double mag = 0.0;
      for (int k = 0; k < K; ++k) mag += std::abs(double(xv[i * K + k]) * wv[j * K + k]);
      const double bound = (0.0625 + 0.0625 + 0.0039) * mag + 0.008 * std::abs(b[i * N + j]);
      ASSERT_LE(std::abs(a[i * N + j] - b[i * N + j]), bound) << i << "," << j;
      differ += a[i * N + j] != b[i * N + j];
    }
  EXPECT_GT(differ, M * N / 4) << "FP8 did not quantize anything";
}

// Linears that read the same x (q/k/v, gate/up) share one x scale and one FP8 copy of x; they
// must equal the same linears quantizing x each on their own, step after step (the shared amax is
// that same tensor's), and a follower must quantize afresh whenever its x is not the copy held
// (another pointer, or another group's x quantized in between).
TEST(Fp8Linear, SharedInputGroupEqualsSeparateQuantization) {
  struct Layers {
    ParamStore ps;
    Linear lin[4];  // 0, 1, 2 read the same x; 3 is another group
    Fp8Linears fp8{Device::cpu, Fp8ScalingConfig{}};
    // Appended, not "l" + std::string: g++ 12 -O3 warns falsely (-Wrestrict) on that form.
    static std::string name(int i) { return std::string("l").append(std::to_string(i)); }
    explicit Layers(bool share) {
      for (int i = 0; i < 4; ++i) lin[i].declare(ps, name(i), K, N, /*with_bias=*/false, 0.02f);
      ps.allocate(DType::bf16, Device::cpu);
      for (int i = 0; i < 4; ++i) {
        from_f32(ps[lin[i].weight].value, uniform(N * K, -0.3f, 0.3f, 20 + i));
        lin[i].compute = &fp8;
        lin[i].compute_slot = fp8.add(name(i), N, K, share && (i == 1 || i == 2));
      }
      fp8.finalize();
    }
  };
  Layers shared(true), separate(false);
  std::vector<char> xs, x2s, dys, dxs, ys;
  Tensor x = host(DType::bf16, {M, K}, xs), x2 = host(DType::bf16, {M, K}, x2s);
  Tensor dy = host(DType::bf16, {M, N}, dys), dx = host(DType::bf16, {M, K}, dxs);
  Tensor y = host(DType::bf16, {M, N}, ys);
  from_f32(dy, uniform(M * N, -1.0f, 1.0f, 31));
  from_f32(x2, uniform(M * K, -5.0f, 5.0f, 32));
  auto run = [&](Layers& L, int step) {  // outputs of every call, then every weight gradient
    std::vector<std::vector<float>> got;
    from_f32(x, uniform(M * K, -3.0f - step, 3.0f + step, 40 + step));
    L.ps.zero_grad();
    for (int i = 0; i < 3; ++i) {
      L.lin[i].forward(L.ps, y, x);
      got.push_back(to_f32(y));
    }
    // Calls that break the sharing contract, without recording (their amaxes would differ
    // between the two setups): each must quantize its own x.
    L.fp8.set_recording(false);
    L.lin[0].forward(L.ps, y, x);
    L.lin[1].forward(L.ps, y, x2);  // another pointer
    got.push_back(to_f32(y));
    L.lin[0].forward(L.ps, y, x);
    L.lin[3].forward(L.ps, y, x2);  // another group in between, then x changes in place
    from_f32(x, uniform(M * K, -2.0f, 2.0f, 50 + step));
    L.lin[2].forward(L.ps, y, x);
    got.push_back(to_f32(y));
    L.fp8.set_recording(true);
    for (int i = 0; i < 3; ++i) L.lin[i].backward(L.ps, dx, dy, x, i > 0);
    got.push_back(to_f32(dx));
    for (int i = 0; i < 4; ++i) got.push_back(to_f32(L.ps[L.lin[i].weight].grad));
    L.fp8.end_step(nullptr, nullptr);
    return got;
  };
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(step);
    const auto a = run(shared, step), b = run(separate, step);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "output " << i;
  }
  // The followers' own x entries are never used: their scales stay 1; the leader's moved.
  const auto st = shared.fp8.state().gather();
  EXPECT_NE(st.scale[0 * 3 + 0], 1.0f);
  EXPECT_EQ(st.scale[1 * 3 + 0], 1.0f);
  EXPECT_EQ(st.scale[2 * 3 + 0], 1.0f);
  EXPECT_EQ(st.scale[1 * 3 + 1], separate.fp8.state().gather().scale[1 * 3 + 1]);  // w: own
}

// The backward's x^T comes from its forward (saved in FP8) when given that forward's x, and is
// quantized afresh when given another: a pipeline runs the forwards of several micro-batches
// before their backwards, so the saved copy belongs to the last one only. Interleaved calls
// must equal each micro-batch run alone (forward then backward) bit for bit.
TEST(Fp8Linear, BackwardOfAnEarlierMicroBatchRequantizesItsInput) {
  Fixture interleaved, alone;
  for (Fixture* f : {&interleaved, &alone}) {
    from_f32(f->ps[f->lin.weight].value, uniform(N * K, -0.3f, 0.3f, 60));
    f->lin.compute = &f->fp8;
  }
  std::vector<char> x1s, x2s, dys, dxs, ys;
  Tensor x1 = host(DType::bf16, {M, K}, x1s), x2 = host(DType::bf16, {M, K}, x2s);
  Tensor dy = host(DType::bf16, {M, N}, dys), dx = host(DType::bf16, {M, K}, dxs);
  Tensor y = host(DType::bf16, {M, N}, ys);
  from_f32(dy, uniform(M * N, -1.0f, 1.0f, 61));
  for (int step = 0; step < 3; ++step) {  // later steps run with scales other than 1
    SCOPED_TRACE(step);
    from_f32(x1, uniform(M * K, -3.0f, 3.0f, 70 + step));
    from_f32(x2, uniform(M * K, -0.2f, 0.2f, 80 + step));  // another range: other FP8 codes
    // Pipeline order: forward 1, forward 2, backward 2, backward 1.
    interleaved.ps.zero_grad();
    interleaved.lin.forward(interleaved.ps, y, x1);
    interleaved.lin.forward(interleaved.ps, y, x2);
    interleaved.lin.backward(interleaved.ps, dx, dy, x2, false);
    const std::vector<float> grad_after_2 = to_f32(interleaved.ps[interleaved.lin.weight].grad);
    interleaved.lin.backward(interleaved.ps, dx, dy, x1, false);
    const std::vector<float> grad_both = to_f32(interleaved.ps[interleaved.lin.weight].grad);
    // Each micro-batch alone, in the same order of accumulation.
    alone.ps.zero_grad();
    alone.lin.forward(alone.ps, y, x2);
    alone.lin.backward(alone.ps, dx, dy, x2, false);
    EXPECT_EQ(to_f32(alone.ps[alone.lin.weight].grad), grad_after_2);
    alone.lin.forward(alone.ps, y, x1);
    alone.lin.backward(alone.ps, dx, dy, x1, false);
    EXPECT_EQ(to_f32(alone.ps[alone.lin.weight].grad), grad_both);
    for (Fixture* f : {&interleaved, &alone}) f->fp8.end_step(nullptr, nullptr);
    // Both saw x1 and x2 in training forwards, so both record the same amaxes.
    EXPECT_EQ(interleaved.fp8.state().gather().scale, alone.fp8.state().gather().scale);
  }
}

// SwiGLU's backward fused with the E5M2 quantization of dgate and dup (Fp8Linears::
// swiglu_backward, which leaves the 16-bit gradients unwritten) gives the gate and up projections
// the same dx, weight gradients and next scales as ops::swiglu_backward followed by their usual
// backward, bit for bit: through the whole backward (tp 1) and the split halves (tp > 1).
TEST(Fp8Linear, FusedSwigluBackwardEqualsSeparateOps) {
  constexpr int F = 40;  // the FFN width: gate and up map K -> F
  struct Pair {
    ParamStore ps;
    Linear gate, up;
    Fp8Linears fp8{Device::cpu, Fp8ScalingConfig{}};
    Pair() {
      gate.declare(ps, "gate", K, F, /*with_bias=*/false, 0.02f);
      up.declare(ps, "up", K, F, /*with_bias=*/false, 0.02f);
      ps.allocate(DType::bf16, Device::cpu);
      from_f32(ps[gate.weight].value, uniform(F * K, -0.3f, 0.3f, 90));
      from_f32(ps[up.weight].value, uniform(F * K, -0.3f, 0.3f, 91));
      gate.compute = up.compute = &fp8;
      gate.compute_slot = fp8.add("gate", F, K);
      up.compute_slot = fp8.add("up", F, K, /*shares_input_with_previous=*/true);
      fp8.finalize();
    }
  };
  Pair fused, separate;
  std::vector<char> xs, hs, us, ds, dgs, dus, dxs;
  Tensor x = host(DType::bf16, {M, K}, xs), h = host(DType::bf16, {M, F}, hs);
  Tensor u = host(DType::bf16, {M, F}, us), dact = host(DType::bf16, {M, F}, ds);
  Tensor dgate = host(DType::bf16, {M, F}, dgs), dup = host(DType::bf16, {M, F}, dus);
  Tensor dx = host(DType::bf16, {M, K}, dxs);
  for (int step = 0; step < 3; ++step) {  // later steps quantize with scales other than 1
    for (bool split : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "step " << step << (split ? " split" : " whole"));
      from_f32(x, uniform(M * K, -2.0f, 2.0f, 100 + step));
      from_f32(h, uniform(M * F, -4.0f, 4.0f, 110 + step));
      from_f32(u, uniform(M * F, -3.0f, 3.0f, 120 + step));
      from_f32(dact, uniform(M * F, -0.5f, 0.5f, 130 + step));
      std::vector<std::vector<float>> got[2];
      for (int which = 0; which < 2; ++which) {
        Pair& P = which == 0 ? fused : separate;
        std::vector<char> ys;
        Tensor y = host(DType::bf16, {M, F}, ys);
        P.ps.zero_grad();
        P.gate.forward(P.ps, y, x);
        P.up.forward(P.ps, y, x);
        from_f32(dgate, std::vector<float>(M * F, 7.0f));  // what an unwritten gradient holds
        from_f32(dup, std::vector<float>(M * F, 7.0f));
        if (which == 0) {
          ASSERT_TRUE(P.fp8.swiglu_backward(P.gate, P.up, dgate, dup, dact, h, u));
          EXPECT_EQ(to_f32(dgate), std::vector<float>(M * F, 7.0f)) << "dgate was written";
        } else {
          ops::swiglu_backward(dgate, dup, dact, h, u);
        }
        if (!split) {
          P.gate.backward(P.ps, dx, dgate, x, false);
          P.up.backward(P.ps, dx, dup, x, true);
        } else {
          P.gate.backward_input(P.ps, dx, dgate, false);
          P.up.backward_input(P.ps, dx, dup, true);
          P.gate.backward_weight(P.ps, dgate, x);
          P.up.backward_weight(P.ps, dup, x);
        }
        got[which] = {to_f32(dx), to_f32(P.ps[P.gate.weight].grad), to_f32(P.ps[P.up.weight].grad)};
        P.fp8.end_step(nullptr, nullptr);
        got[which].push_back(P.fp8.state().gather().scale);
      }
      ASSERT_EQ(got[0].size(), got[1].size());
      for (size_t i = 0; i < got[0].size(); ++i) EXPECT_EQ(got[0][i], got[1][i]) << "output " << i;
    }
  }
  // With a bias the fusion declines (bias_grad reads the 16-bit gradient).
  ParamStore ps;
  Linear g, v;
  g.declare(ps, "g", K, F, /*with_bias=*/true, 0.02f);
  v.declare(ps, "v", K, F, /*with_bias=*/true, 0.02f);
  ps.allocate(DType::bf16, Device::cpu);
  Fp8Linears fp8{Device::cpu, Fp8ScalingConfig{}};
  g.compute_slot = fp8.add("g", F, K);
  v.compute_slot = fp8.add("v", F, K, true);
  fp8.finalize();
  EXPECT_FALSE(fp8.swiglu_backward(g, v, dgate, dup, dact, h, u));
}

}  // namespace
}  // namespace tessera
