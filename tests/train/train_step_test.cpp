// train_step against the step written out by hand on the same model: zero the gradients, run each
// micro-batch of the loader's step with loss scale 1/M, take the global norm, clip, AdamW at the
// schedule's rate. Without clipping (and so without the norm's summation order mattering) the
// losses and the final weights match bit for bit; with clipping within float rounding.
#include "train/train_step.h"

#include <gtest/gtest.h>

#include <cmath>

#include "optim/adamw.h"
#include "tests/common/files.h"
#include "tests/train/train_test_util.h"

namespace tessera {
namespace {

struct HandResult {
  std::vector<double> losses, norms;
  std::vector<float> weights;  // flat, after the last step
};

// The step by hand, for `steps` steps of recipe r (dp 1, pp 1).
HandResult by_hand(const Recipe& recipe, int steps) {
  Recipe r = recipe;
  TrainData data(r);
  finalize_model_vocab(r.model, data.vocab_size(), r.file);
  data.make_loaders(r, 0, 1);
  Transformer model(r.model, DType::f32, Device::cpu);
  model.init_weights(r.train.seed);
  AdamWConfig acfg;
  acfg.beta1 = r.optim.beta1;
  acfg.beta2 = r.optim.beta2;
  acfg.eps = r.optim.eps;
  acfg.weight_decay = r.optim.weight_decay;
  acfg.no_decay = r.optim.no_decay;
  AdamW adamw(model.params(), acfg);
  const LrSchedule lr{r.optim.schedule,     r.optim.lr,    r.optim.min_lr,
                      r.optim.warmup_steps, r.train.steps, r.optim.decay_fraction};
  const int B = r.data.micro_batch, T = r.data.seq_len, M = r.micro_batches_per_step();
  Arena arena(Device::cpu, Batch::bytes_needed(B, T, Device::cpu) + 1024, "batch");
  Batch batch(B, T, Device::cpu, arena);
  Activations acts(model, B, T, true);
  HandResult h;
  for (int step = 0; step < steps; ++step) {
    model.params().zero_grad();
    double loss = 0.0;
    for (int m = 0; m < M; ++m) {
      data.train().fill(step, m, B, batch.inputs.data(), batch.targets.data());
      loss += model.forward(acts, batch.tokens, batch.labels);
      model.backward(acts, batch.tokens, batch.labels, 1.0f / float(M));
    }
    const double norm = grad_norm(model.params());
    adamw.step(model.params(), lr.at(step), clip_factor(norm, r.optim.grad_clip));
    h.losses.push_back(loss / M);
    h.norms.push_back(norm);
  }
  const Tensor w = model.params().flat_values();
  h.weights.assign(w.ptr<float>(), w.ptr<float>() + model.params().num_elements());
  return h;
}

void expect_matches(const std::vector<std::string>& overrides, bool bitwise) {
  const testing::ScratchDir dir;
  const Recipe r = testing::tiny_recipe(dir.str(), overrides);
  tessera::Run run(r);
  std::vector<double> losses, norms;
  for (int step = 0; step < 3; ++step) {
    const StepResult s = train_step(run, step);
    EXPECT_FALSE(s.skipped);
    EXPECT_EQ(s.lr, run.lr().at(step));
    losses.push_back(s.loss);
    norms.push_back(s.grad_norm);
  }
  const HandResult h = by_hand(r, 3);
  const Tensor w = run.model().params().flat_values();
  const std::vector<float> weights(w.ptr<float>(), w.ptr<float>() + h.weights.size());
  EXPECT_EQ(losses[0], h.losses[0]);  // the first step's forward sees the same weights
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(norms[i], h.norms[i], 1e-12 * h.norms[i]) << i;
  if (bitwise) {
    EXPECT_EQ(losses, h.losses);
    EXPECT_EQ(weights, h.weights);
    return;
  }
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(losses[i], h.losses[i], 1e-6 * h.losses[i]) << i;
  for (size_t i = 0; i < weights.size(); ++i)
    ASSERT_NEAR(weights[i], h.weights[i], 1e-5f * std::max(1.0f, std::fabs(h.weights[i]))) << i;
}

TEST(TrainStep, EqualsTheStepWrittenOutWithoutClipping) {
  expect_matches({"optim.grad_clip=0", "optim.warmup_steps=1"}, /*bitwise=*/true);
}

TEST(TrainStep, EqualsTheStepWrittenOutWithClipping) {
  // A clip below every step's norm: the factor is < 1 each time.
  expect_matches({"optim.grad_clip=0.05", "optim.schedule=linear"}, /*bitwise=*/false);
}

TEST(TrainStep, ReportsTheScaleAndNoSkipsWithoutFp16) {
  const testing::ScratchDir dir;
  tessera::Run run(testing::tiny_recipe(dir.str()));
  const StepResult s = train_step(run, 0);
  EXPECT_EQ(s.loss_scale, 1.0f);
  EXPECT_FALSE(s.skipped);
  EXPECT_GT(s.grad_norm, 0.0);
  EXPECT_TRUE(std::isfinite(s.loss));
}

}  // namespace
}  // namespace tessera
