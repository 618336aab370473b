// Tests of adamw_update and adamw_update_multi (kernels/cpu/adamw.cpp, kernels/cuda/adamw.cu; the
// CPU runs adamw_update_multi as adamw_update per entry). CPU: one and ten steps against the
// formula in f64 and f32, the first step's size, weight decay alone, grad_scale, NaN confinement,
// rejected arguments; bf16/f16 gradients and states against the f32 kernel rounded once; bounds
// and thread counts. GPU parity: param, m, v bit for bit with the CPU over several steps, with and
// without decay and scaling, f32/bf16/f16 (loss-scaled) gradients, awkward sizes, misaligned
// views; the multi-tensor update bit for bit with the single-tensor one over 45 tensors.
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

#include <memory>
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

struct AdamState {
  HostTensor param, m, v;
};

// The formula of kernels/ops.h in double, written the textbook way (not torch's operation order):
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (mhat / (sqrt(vhat) + eps) + wd p).
void reference_step(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v,
                    const HostTensor& grad, const ops::AdamWStep& s) {
  const double b1 = s.beta1, b2 = s.beta2, lr = s.lr, wd = s.weight_decay, eps = s.eps;
  for (size_t i = 0; i < p.size(); ++i) {
    const double g = grad.get(int64_t(i)) * double(s.grad_scale);
    m[i] = b1 * m[i] + (1 - b1) * g;
    v[i] = b2 * v[i] + (1 - b2) * g * g;
    const double mhat = m[i] / (1 - std::pow(b1, s.step));
    const double vhat = v[i] / (1 - std::pow(b2, s.step));
    p[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * p[i]);
  }
}

std::vector<double> values(const HostTensor& h) {
  std::vector<double> out(h.size());
  for (int64_t i = 0; i < h.size(); ++i) out[i] = h.get(i);
  return out;
}

void expect_matches(const HostTensor& h, const std::vector<double>& ref, double rtol, double atol,
                    const char* what) {
  HostTensor r(DType::f64, h.t.shape);
  for (int64_t i = 0; i < r.size(); ++i) r.set(i, ref[i]);
  expect_close(h, r, rtol, atol, what);
}

// Runs num_steps updates with fresh random gradients on `state` and on the double reference that
// starts from the same values, then compares param, m and v.
void run_against_reference(DType dtype, int num_steps, float weight_decay, float grad_scale,
                           double rtol, double atol) {
  std::mt19937_64 rng(71);
  const Shape shape{3, 41};
  AdamState st{randn(dtype, shape, rng), HostTensor(dtype, shape), HostTensor(dtype, shape)};
  std::vector<double> p = values(st.param), m(p.size(), 0.0), v(p.size(), 0.0);
  ops::AdamWStep s;
  s.lr = 0.01f;
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = weight_decay;
  s.grad_scale = grad_scale;
  for (int step = 1; step <= num_steps; ++step) {
    s.step = step;
    const HostTensor grad = randn(dtype, shape, rng, 0.1);
    cpu::adamw_update(st.param, grad, st.m, st.v, s);
    reference_step(p, m, v, grad, s);
  }
  expect_matches(st.param, p, rtol, atol, "param");
  expect_matches(st.m, m, rtol, atol, "m");
  expect_matches(st.v, v, rtol, atol * atol, "v");
}

// f64: the kernel follows torch's operation order, the reference the textbook one; they are equal
// in exact arithmetic, so only rounding separates them (~1e-16 per operation, a few dozen
// operations per step, ten steps): 1e-12 relative is a generous yet meaningful bound.
TEST(AdamW, F64OneStepMatchesFormula) {
  run_against_reference(DType::f64, 1, 0.0f, 1.0f, 1e-12, 1e-15);
  run_against_reference(DType::f64, 1, 0.1f, 1.0f, 1e-12, 1e-15);
}

TEST(AdamW, F64TenStepsMatchFormula) {
  run_against_reference(DType::f64, 10, 0.0f, 1.0f, 1e-12, 1e-15);
  run_against_reference(DType::f64, 10, 0.05f, 0.5f, 1e-12, 1e-15);
}

// f32: each step rounds p, m, v a few times (2^-24 relative each); after ten steps p (O(1)) is
// within ~20 f32 ulps, and m, v within a few ulps of their own size.
TEST(AdamW, F32TenStepsMatchFormula) {
  run_against_reference(DType::f32, 10, 0.05f, 0.5f, 2e-6, 1e-6);
}

TEST(AdamW, FirstStepMovesByLearningRateTimesSign) {
  // With m = v = 0, mhat = g and vhat = g^2, so the step is lr g / (|g| + eps) ~ lr sign(g).
  HostTensor param = filled(DType::f64, {4}, 1.0), m(DType::f64, {4}), v(DType::f64, {4});
  HostTensor grad(DType::f64, {4});
  const double gs[] = {0.3, -2.0, 1e-3, -5e-4};
  for (int i = 0; i < 4; ++i) grad.set(i, gs[i]);
  ops::AdamWStep s;
  s.lr = 0.125f;
  cpu::adamw_update(param, grad, m, v, s);
  const double eps = s.eps;
  for (int i = 0; i < 4; ++i) {
    const double sign = gs[i] > 0 ? 1.0 : -1.0;
    EXPECT_NEAR(param.get(i), 1.0 - 0.125 * gs[i] / (std::fabs(gs[i]) + eps), 1e-15);
    EXPECT_NEAR(param.get(i), 1.0 - 0.125 * sign, 1e-4 * 0.125) << "element " << i;
  }
}

TEST(AdamW, WeightDecayAloneScalesParameters) {
  // Zero gradient and state: the Adam part is exactly 0, leaving p (1 - lr wd), in f32 math.
  std::mt19937_64 rng(72);
  for (float wd : {0.0f, 0.1f}) {
    HostTensor param = randn(DType::f32, {50}, rng), m(DType::f32, {50}), v(DType::f32, {50});
    const HostTensor before = param, grad(DType::f32, {50});
    ops::AdamWStep s;
    s.lr = 0.01f;
    s.weight_decay = wd;
    s.step = 3;
    cpu::adamw_update(param, grad, m, v, s);
    const float factor = float(1.0 - double(s.lr) * double(wd));
    for (int64_t i = 0; i < 50; ++i)
      EXPECT_EQ(param.get(i), double(before.f32[i] * factor)) << "wd " << wd << " element " << i;
  }
}

TEST(AdamW, GradScaleMultipliesTheGradient) {
  // grad g with scale 0.25 must equal grad g/4 with scale 1, bitwise (the scaling is exact).
  std::mt19937_64 rng(73);
  for (DType dtype : {DType::f32, DType::f64}) {
    const HostTensor param = randn(dtype, {30}, rng), grad = randn(dtype, {30}, rng);
    HostTensor quarter = grad;
    for (int64_t i = 0; i < 30; ++i) quarter.set(i, grad.get(i) * 0.25);
    AdamState a{param, HostTensor(dtype, {30}), HostTensor(dtype, {30})}, b = a;
    ops::AdamWStep s;
    s.lr = 0.01f;
    s.weight_decay = 0.1f;
    s.grad_scale = 0.25f;
    cpu::adamw_update(a.param, grad, a.m, a.v, s);
    s.grad_scale = 1.0f;
    cpu::adamw_update(b.param, quarter, b.m, b.v, s);
    expect_identical(a.param, b.param, "param");
    expect_identical(a.m, b.m, "m");
    expect_identical(a.v, b.v, "v");
  }
}

TEST(AdamW, NaNGradientStaysInItsElement) {
  std::mt19937_64 rng(74);
  HostTensor param = randn(DType::f32, {8}, rng), grad = randn(DType::f32, {8}, rng);
  HostTensor m(DType::f32, {8}), v(DType::f32, {8});
  grad.set(3, kNaN);
  cpu::adamw_update(param, grad, m, v, ops::AdamWStep{});
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(std::isnan(param.get(i)), i == 3) << "element " << i;
  EXPECT_TRUE(std::isnan(m.get(3)) && std::isnan(v.get(3)));
}

TEST(AdamW, RejectsBadArguments) {
  HostTensor param(DType::f32, {4}), grad(DType::f32, {4}), m(DType::f32, {4}), v(DType::f32, {4});
  ops::AdamWStep s;
  s.step = 0;
  EXPECT_THROW(cpu::adamw_update(param, grad, m, v, s), Error);
  s.step = 1;
  HostTensor short_v(DType::f32, {3}), grad64(DType::f64, {4});
  EXPECT_THROW(cpu::adamw_update(param, grad, m, short_v, s), Error);
  EXPECT_THROW(cpu::adamw_update(param, grad64, m, v, s), Error);
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, AdamW) {
  ops::AdamWStep step;
  step.lr = 1e-2f;
  step.weight_decay = 0.1f;
  step.step = 3;
  step.grad_scale = 1.0f / 1024;  // FP16 loss-scale unscaling happens in f32, on the read value
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    // CUDA's layout: f32 master param and state, 16-bit gradient
    expect_contract(
        "adamw_update 16-bit grad", dt, {f32(s), narrow(s, 1000.0), f32(s), f32(s, true)},
        [&](const auto& t) { ops::adamw_update(t[0], t[1], t[2], t[3], step); }, 120);
    // every operand 16-bit (no master copy): read exactly, updated in f32, rounded once
    expect_contract(
        "adamw_update all 16-bit", dt,
        {narrow(s), narrow(s, 1000.0), narrow(s, 0.01), Operand{s, Kind::narrow, 1.0, true}},
        [&](const auto& t) { ops::adamw_update(t[0], t[1], t[2], t[3], step); }, 121);
    expect_contract(
        "adamw_update_multi", dt,
        {f32(s), narrow(s, 1000.0), f32(s), f32(s, true), narrow({7}), narrow({7}), f32({7}),
         f32({7}, true)},
        [&](const auto& t) {
          ops::AdamWStep no_decay = step;
          no_decay.weight_decay = 0.0f;
          const ops::AdamWTensors entries[] = {{t[0], t[1], t[2], t[3], step},
                                               {t[4], t[5], t[6], t[7], no_decay}};
          ops::adamw_update_multi(entries);
        },
        122);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(AdamW, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kF = 23;
  const HostTensor bias = randn(DType::f32, {kF}, rng);
  Guarded param({kF}), m({kF}), v({kF});
  for (Guarded* g : {&param, &m, &v}) cpu::fill(*g, 0.5f);
  cpu::adamw_update(param, bias, m, v, ops::AdamWStep{});
  for (const Guarded* g : {&param, &m, &v}) g->expect_guards_intact("adamw/fill");
}

TEST(AdamW, IsThreadCountIndependent) {
  std::mt19937_64 rng(87);
  const Shape s{300, 200};
  const HostTensor grad = randn(DType::f32, s, rng);
  HostTensor param = randn(DType::f32, s, rng), m = randn(DType::f32, s, rng, 0.01);
  HostTensor v = filled(DType::f32, s, 1e-4);
  ops::AdamWStep step;
  step.lr = 1e-3f;
  step.weight_decay = 0.1f;
  step.step = 4;
  expect_thread_independent("adamw_update", {&param, &m, &v},
                            [&] { cpu::adamw_update(param, grad, m, v, step); });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/adamw.cu)
// ----------------------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// Bitwise comparison that names the first differing element.
void expect_bitwise(const std::vector<float>& got, const std::vector<float>& ref,
                    const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(ref[i])) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << ref[i];
      return;
    }
  }
}

ops::AdamWStep step_config(int step, float weight_decay, float grad_scale) {
  ops::AdamWStep s;
  s.lr = 6e-4f;
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = weight_decay;
  s.step = step;
  s.grad_scale = grad_scale;
  return s;
}

// The loss scale an FP16 run would leave in its gradients (unscaled by grad_scale in the update):
// a power of two, so scaled values are as exact in f16 as unscaled ones would be in bf16.
float loss_scale(DType grad_dtype) { return grad_dtype == DType::f16 ? 1024.0f : 1.0f; }

class AdamWGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(AdamWGpu, StepsMatchCpuBitwise, "adamw_update") {
  const DType grad_dtype = GetParam();
  std::mt19937_64 rng(61);
  for (int64_t n : {1, 7, 4097, (1 << 20) + 3}) {
    for (int offset : {0, 1}) {
      for (float wd : {0.0f, 0.1f}) {
        auto param = testing::random_vector(n, rng);
        std::vector<float> m(n, 0.0f), v(n, 0.0f);
        DeviceTensor gp(DType::f32, {n + 1}), gm(DType::f32, {n + 1}), gv(DType::f32, {n + 1});
        DeviceTensor gg(grad_dtype, {n + 1});
        auto view = [&](const DeviceTensor& d, DType t) {
          return Tensor(static_cast<char*>(d.t().data) + offset * dtype_size(t), t, Device::cuda,
                        Shape{n});
        };
        auto upload_view = [&](DeviceTensor& d, const std::vector<float>& x) {
          std::vector<float> padded(n + 1, 0.0f);
          std::copy(x.begin(), x.end(), padded.begin() + offset);
          d.upload(padded);
        };
        upload_view(gp, param);
        upload_view(gm, m);
        upload_view(gv, v);
        for (int step = 1; step <= 3; ++step) {
          // The CPU sees exactly the gradient values the GPU reads (rounded for bf16 and f16).
          const float scale = loss_scale(grad_dtype);
          auto grad = testing::round_to(grad_dtype, testing::random_vector(n, rng, 0.1f * scale));
          const auto s = step_config(step, wd, (step == 2 ? 0.5f : 1.0f) / scale);
          cpu::adamw_update(host(param, {n}), host(grad, {n}), host(m, {n}), host(v, {n}), s);
          upload_view(gg, grad);
          settle();
          ops::adamw_update(view(gp, DType::f32), view(gg, grad_dtype), view(gm, DType::f32),
                            view(gv, DType::f32), s);
        }
        auto tail = [&](const DeviceTensor& d) {
          const auto all = d.download();
          return std::vector<float>(all.begin() + offset, all.begin() + offset + n);
        };
        const std::string what = std::string(dtype_name(grad_dtype)) +
                                 " grad, n=" + std::to_string(n) +
                                 " offset=" + std::to_string(offset) + " wd=" + std::to_string(wd);
        expect_bitwise(tail(gp), param, "param " + what);
        expect_bitwise(tail(gm), m, "m " + what);
        expect_bitwise(tail(gv), v, "v " + what);
        EXPECT_TRUE(gp.guards_intact() && gm.guards_intact() && gv.guards_intact()) << what;
      }
    }
  }
}

// Over 40 tensors (more than one launch's descriptors), assorted sizes including empty and
// misaligned ones, each with its own learning rate and decay: the multi-tensor update equals
// the single-tensor op on each, bit for bit, and the 16-bit values it writes equal ops::cast of
// the updated masters (bf16 values with f32 and bf16 gradients, f16 with f16).
TS_GPU_PARITY_TEST_P(AdamWGpu, MultiTensorMatchesSingleTensor, "adamw_update_multi") {
  const DType grad_dtype = GetParam();
  const DType value_dtype = grad_dtype == DType::f16 ? DType::f16 : DType::bf16;
  std::mt19937_64 rng(62);
  std::uniform_int_distribution<int64_t> size(0, 20000);
  constexpr int kTensors = 45;
  std::vector<int64_t> sizes(kTensors);
  for (int i = 0; i < kTensors; ++i) sizes[i] = i == 3 ? 0 : i == 7 ? 100003 : size(rng);
  // Two copies of each state: one updated by adamw_update, one by adamw_update_multi.
  std::vector<std::unique_ptr<DeviceTensor>> tensors;
  auto make = [&](DType t, int64_t n, const std::vector<float>& values) {
    tensors.push_back(std::make_unique<DeviceTensor>(t, Shape{n + 1}));
    tensors.back()->upload(values);
    return tensors.back().get();
  };
  struct Set {
    Tensor p, g, m, v, value;
  };
  std::vector<Set> single, multi;
  std::vector<ops::AdamWTensors> entries;
  for (int i = 0; i < kTensors; ++i) {
    const int64_t n = sizes[i];
    const int offset = i % 3 == 1 ? 1 : 0;
    auto p = testing::random_vector(n + 1, rng);
    auto g = testing::round_to(grad_dtype,
                               testing::random_vector(n + 1, rng, 0.1f * loss_scale(grad_dtype)));
    auto m = testing::random_vector(n + 1, rng, 0.01f);
    std::vector<float> v(n + 1);
    for (auto& x : v) x = std::abs(testing::random_vector(1, rng, 0.001f)[0]);
    for (auto* sets : {&single, &multi}) {
      auto view = [&](DeviceTensor* d, DType t) {
        return Tensor(static_cast<char*>(d->t().data) + offset * dtype_size(t), t, Device::cuda,
                      Shape{n});
      };
      sets->push_back(
          {view(make(DType::f32, n, p), DType::f32), view(make(grad_dtype, n, g), grad_dtype),
           view(make(DType::f32, n, m), DType::f32), view(make(DType::f32, n, v), DType::f32),
           view(make(value_dtype, n, std::vector<float>(n + 1, 0.0f)), value_dtype)});
    }
    auto s = step_config(5, i % 2 ? 0.1f : 0.0f, 0.75f / loss_scale(grad_dtype));
    s.lr = 1e-3f * float(1 + i % 4);
    entries.push_back(
        {multi.back().p, multi.back().g, multi.back().m, multi.back().v, s, multi.back().value});
  }
  settle();
  for (int i = 0; i < kTensors; ++i) {
    ops::adamw_update(single[i].p, single[i].g, single[i].m, single[i].v, entries[i].step);
    if (sizes[i] > 0) ops::cast(single[i].value, single[i].p);
  }
  ops::adamw_update_multi(entries);
  settle();
  for (int i = 0; i < kTensors; ++i) {
    const Tensor a = single[i].value, b = multi[i].value;
    std::vector<uint16_t> x(a.numel()), y(b.numel());
    copy_bytes(x.data(), Device::cpu, a.data, Device::cuda, a.nbytes());
    copy_bytes(y.data(), Device::cpu, b.data, Device::cuda, b.nbytes());
    EXPECT_EQ(y, x) << "values of tensor " << i << " (n=" << sizes[i] << ")";
  }
  for (int i = 0; i < kTensors; ++i) {
    for (auto member : {&Set::p, &Set::m, &Set::v}) {
      const Tensor a = single[i].*member, b = multi[i].*member;
      std::vector<float> x(a.numel()), y(b.numel());
      copy_bytes(x.data(), Device::cpu, a.data, Device::cuda, a.nbytes());
      copy_bytes(y.data(), Device::cpu, b.data, Device::cuda, b.nbytes());
      expect_bitwise(y, x, "tensor " + std::to_string(i) + " (n=" + std::to_string(sizes[i]) + ")");
    }
  }
  for (const auto& t : tensors) EXPECT_TRUE(t->guards_intact());
}

TS_GPU_TEST(AdamWChecks, RejectsBadArguments) {
  DeviceTensor p(DType::f32, {8}), g(DType::f32, {8}), m(DType::f32, {8}), v(DType::f32, {9});
  settle();
  EXPECT_THROW(ops::adamw_update(p, g, m, v, step_config(1, 0.0f, 1.0f)), Error);  // v shape
  EXPECT_THROW(ops::adamw_update(p, g, m, m, step_config(1, 0.0f, 1.0f)), Error);  // m is v
  DeviceTensor v8(DType::f32, {8});
  settle();
  EXPECT_THROW(ops::adamw_update(p, g, m, v8, step_config(0, 0.0f, 1.0f)), Error);  // step 0
}

INSTANTIATE_TEST_SUITE_P(GradDtypes, AdamWGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
