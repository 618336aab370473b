// The distillation teacher in FP8 (distill.teacher_precision: fp8) against the same checkpoint in
// BF16: its logits stay within E4M3's rounding of the BF16 ones; each weight is quantized once, at
// load, with the scale of its own amax, and that scale never moves; the inputs' scales follow the
// forwards' amaxes (delayed scaling, updated after every forward, with no backward or optimizer
// step); the whole FP8 state lives in the teacher's arena (memory_plan_test checks the plan).
#include "train/teacher.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "tests/common/files.h"
#include "tests/train/train_test_util.h"
#include "train/run.h"
#include "train/train_step.h"

namespace tessera {
namespace {

constexpr int kB = 2, kT = 16, kVocab = 64;  // the tiny recipe's micro-batch and vocabulary

// A llama teacher (SwiGLU: gate and up share one FP8 input, as q/k/v do) trained a few steps on
// mock data, saved as `dir`.
void save_teacher(const std::string& dir) {
  tessera::Run teacher(
      testing::tiny_recipe(dir, {"model.family=llama", "model.hidden=48", "model.ffn_hidden=64",
                                 "model.num_layers=3", "model.num_kv_heads=2", "optim.lr=3e-3"}));
  for (int64_t s = 0; s < 4; ++s) train_step(teacher, s);
  teacher.save(4);
}

std::vector<float> to_f32(const Tensor& t) {
  std::vector<float> out(t.numel());
  convert_buffer(t.data, t.dtype, out.data(), DType::f32, t.numel());
  return out;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Micro-batch `idx` of random tokens, (B, T) i32 on the host.
std::vector<int32_t> tokens(uint64_t idx) {
  const CounterRng rng(idx, "teacher-test-tokens");
  std::vector<int32_t> t(kB * kT);
  for (size_t i = 0; i < t.size(); ++i) t[i] = int32_t(rng.bits(i) % kVocab);
  return t;
}

std::vector<float> teacher_logits(Teacher& teacher, std::vector<int32_t> toks) {
  teacher.forward(Tensor(toks.data(), DType::i32, Device::cpu, Shape{kB, kT}), Tensor());
  return to_f32(teacher.logits());
}

// A student run distilling from `teacher_dir` in `precision` (extra: more overrides).
Recipe student(const std::string& out, const std::string& teacher_dir, const std::string& precision,
               std::vector<std::string> extra = {}) {
  extra.insert(extra.end(),
               {"distill.teacher=" + teacher_dir, "distill.teacher_precision=" + precision,
                "distill.curriculum=[{alpha: 1}]"});
  return testing::tiny_recipe(out, extra);
}

// Tolerance: E4M3 keeps 3 mantissa bits, so one rounding errs by at most 2^-4 (6.25%) relative
// and, over a binade's uniformly spread values, by about 2^-3 / sqrt(12) / 1.44 = 2.5% RMS. A GEMM
// whose two operands are both rounded errs by about sqrt(2) x 2.5% = 3.6% RMS of its output (the
// K products' errors are independent, as are their signs). The residual stream adds those outputs
// to BF16 terms and the head is BF16, so the logits' relative error stays near one GEMM's, not a
// sum over the 12 (each block's error partly averages out): measured 2.0% to 2.7% over these four
// forwards, the first (input scales still 1) included: inputs above 2^-6 keep all 3 bits at scale
// 1. Bound 5%: one GEMM's RMS error with 40% to spare, about twice the measured error.
constexpr double kBound = 0.05;

TEST(Fp8Teacher, LogitsStayWithinE4m3RoundingOfBf16) {
  const testing::ScratchDir dir;
  save_teacher(dir / "teacher");
  tessera::Run bf16(student(dir / "bf16", dir / "teacher", "bf16"));
  tessera::Run fp8(student(dir / "fp8", dir / "teacher", "fp8"));
  ASSERT_NE(bf16.teacher(), nullptr);
  ASSERT_NE(fp8.teacher(), nullptr);
  ASSERT_EQ(bf16.teacher()->fp8(), nullptr);
  ASSERT_NE(fp8.teacher()->fp8(), nullptr);
  for (uint64_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    const std::vector<float> ref = teacher_logits(*bf16.teacher(), tokens(i));
    const std::vector<float> got = teacher_logits(*fp8.teacher(), tokens(i));
    const double err = rel_l2(got, ref);
    EXPECT_GT(err, 0.0) << "the FP8 path did not run";
    EXPECT_LT(err, kBound);
  }
}

// Each weight is quantized once with scale 448 / max|W| (margin 0); forwards leave that scale
// alone, even after the weights' load-time amax has left a short history (length 2); the inputs'
// scales come from the forwards (1 before the first); the gradients' are never touched.
TEST(Fp8Teacher, WeightsQuantizedOnceAndInputScalesFollowTheForwards) {
  const testing::ScratchDir dir;
  save_teacher(dir / "teacher");
  // The student's own FP8 recipe sets the teacher's scaling knobs too.
  tessera::Run run(student(dir / "fp8", dir / "teacher", "fp8",
                           {"precision.compute=fp8", "precision.fp8={amax_history_len: 2}"}));
  Teacher& teacher = *run.teacher();
  const Fp8Linears& fp8 = *teacher.fp8();
  EXPECT_TRUE(fp8.frozen());
  EXPECT_EQ(fp8.state().config().amax_history_len, 2);
  const ParamStore& ps = teacher.model().params();
  const Fp8ScalingState::State loaded = fp8.state().gather();
  for (int s = 0; s < fp8.num_layers(); ++s) {
    SCOPED_TRACE(fp8.name(s));
    float amax = 0.0f;
    for (float w : to_f32(ps.find(fp8.name(s)).value)) amax = std::max(amax, std::abs(w));
    EXPECT_EQ(loaded.scale[3 * s + 1], 448.0f / amax);
    EXPECT_EQ(loaded.scale[3 * s + 0], 1.0f);  // no forward yet
  }
  for (uint64_t i = 0; i < 4; ++i) teacher_logits(teacher, tokens(i));
  const Fp8ScalingState::State after = fp8.state().gather();
  for (int s = 0; s < fp8.num_layers(); ++s) {
    SCOPED_TRACE(fp8.name(s));
    EXPECT_EQ(after.scale[3 * s + 1], loaded.scale[3 * s + 1]);
    EXPECT_EQ(after.amax_history[3 * s + 1], 0.0f);  // rolled out, scale kept
    EXPECT_EQ(after.scale[3 * s + 2], 1.0f);         // no gradient ever
  }
  // The leaders of the input groups (q/k/v; gate/up) were calibrated.
  EXPECT_NE(after.scale[0], 1.0f);
}

}  // namespace
}  // namespace tessera
