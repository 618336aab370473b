// PipelineExecutor with one stage (pp = 1, a self communicator): a step's gradient accumulation
// equals running the micro-batches one by one bit for bit, the data-parallel hook runs once just
// before the last backward, evaluation weights each micro-batch by its valid tokens, and the
// executor takes from its arena exactly what bytes_needed() says.
#include "train/pipeline_executor.h"

#include <gtest/gtest.h>

#include "parallel/self_communicator.h"
#include "tests/common/tiny_models.h"
#include "tests/train/executor_test_util.h"

namespace tessera {
namespace {

using testing::fill_microbatch;

constexpr int kB = 2, kT = 8, kM = 3;

struct OneStage {
  ModelConfig cfg;
  Transformer model;
  SelfCommunicator pp{Device::cpu, "pp"};
  Arena arena;
  std::unique_ptr<PipelineExecutor> pipe;

  explicit OneStage(const ModelConfig& c) : cfg(c), model(c, DType::f32, Device::cpu) {
    model.init_weights(5);
    const size_t bytes = PipelineExecutor::bytes_needed(
        cfg, model.shard(), DType::f32, PipelineSchedule::one_f_one_b, kM, kB, kT, Device::cpu);
    arena = Arena(Device::cpu, bytes, "executor");
    pipe = std::make_unique<PipelineExecutor>(model, pp, PipelineSchedule::one_f_one_b, kM, kB, kT,
                                              arena);
  }
  PipelineExecutor::FillFn fill() const {
    return [this](int m, Batch& b) { fill_microbatch(cfg, m, b); };
  }
};

class OneStageExecutor : public ::testing::TestWithParam<const char*> {
 protected:
  ModelConfig config() const {
    return std::string(GetParam()) == "gpt2" ? testing::tiny_gpt2() : testing::tiny_llama();
  }
};

TEST_P(OneStageExecutor, AccumulationEqualsMicroBatchesRunAlone) {
  OneStage s(config());
  s.model.params().zero_grad();
  const float scale = 1.0f / kM;
  const PipelineExecutor::Result res = s.pipe->train_step(s.fill(), scale);
  const testing::SerialResult ref = testing::serial_reference(s.cfg, kM, kB, kT, scale);
  EXPECT_EQ(res.loss_sum, ref.loss_sum);
  for (const Param& p : s.model.params().all()) {
    const std::vector<float>* want = testing::serial_grad(ref, p.spec.name);
    ASSERT_NE(want, nullptr);
    EXPECT_EQ(std::vector<float>(p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel()), *want)
        << p.spec.name;
  }
}

TEST_P(OneStageExecutor, HookRunsOnceRightBeforeTheLastBackward) {
  OneStage s(config());
  int calls = 0;
  int64_t grads_seen_at_hook = -1;
  s.model.params().zero_grad();
  s.pipe->train_step(s.fill(), 1.0f, [&] {
    ++calls;
    // M - 1 backwards have run: the first parameter's gradient is no longer zero.
    grads_seen_at_hook = s.model.params()[0].grad.ptr<float>()[0] != 0.0f;
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(grads_seen_at_hook, 1);
}

TEST_P(OneStageExecutor, EvalSumsLossTimesValidTokens) {
  OneStage s(config());
  const PipelineExecutor::Result res = s.pipe->eval(s.fill(), kM);
  Arena arena(Device::cpu, Batch::bytes_needed(kB, kT, Device::cpu) + 1024, "batch");
  Batch batch(kB, kT, Device::cpu, arena);
  double want = 0.0;
  int64_t valid = 0;
  for (int m = 0; m < kM; ++m) {
    Activations acts(s.model, kB, kT, false);
    fill_microbatch(s.cfg, m, batch);
    want += s.model.forward(acts, batch.tokens, batch.labels) * double(batch.num_valid());
    valid += batch.num_valid();
  }
  EXPECT_EQ(res.loss_sum, want);
  EXPECT_EQ(res.valid, valid);
  EXPECT_LT(valid, int64_t(kM) * kB * kT);  // some targets are ignored
}

TEST_P(OneStageExecutor, TakesExactlyBytesNeeded) {
  OneStage s(config());
  EXPECT_EQ(s.arena.used(), s.arena.capacity());
}

INSTANTIATE_TEST_SUITE_P(Families, OneStageExecutor, ::testing::Values("gpt2", "llama"));

}  // namespace
}  // namespace tessera
