// The memory plan is exact: a Run's arena holds precisely plan.arena() bytes once everything is
// built, and training steps allocate nothing more (the peak stays there), for both families,
// 16-bit compute, ZeRO-1, recomputation, the FP32 head and embedding, and several micro-batches.
#include "train/memory_plan.h"

#include <gtest/gtest.h>

#include "tests/common/files.h"
#include "tests/train/train_test_util.h"
#include "train/run.h"
#include "train/train_step.h"

namespace tessera {
namespace {

class MemoryPlanCases : public ::testing::TestWithParam<std::vector<std::string>> {};

TEST_P(MemoryPlanCases, ArenaHoldsExactlyThePlan) {
  const testing::ScratchDir dir;
  tessera::Run run(testing::tiny_recipe(dir.str(), GetParam()));
  const MemoryPlan& plan = run.plan();
  EXPECT_EQ(run.arena().capacity(), plan.arena());
  EXPECT_EQ(run.arena().used(), plan.arena()) << "the plan reserves bytes nothing uses";
  EXPECT_GT(plan.params, 0u);
  EXPECT_GT(plan.optimizer, 0u);
  EXPECT_GT(plan.train_acts, 0u);
  EXPECT_EQ(plan.workspace, 0u);  // the CPU backend needs no scratch
  train_step(run, 0);
  EXPECT_EQ(run.arena().peak(), plan.arena()) << "a step allocated from the arena";
}

INSTANTIATE_TEST_SUITE_P(
    Configs, MemoryPlanCases,
    ::testing::Values(std::vector<std::string>{},
                      std::vector<std::string>{"model.family=llama", "model.ffn_hidden=48",
                                               "model.num_kv_heads=2"},
                      std::vector<std::string>{"precision.compute=bf16"},
                      std::vector<std::string>{"precision.compute=fp16"},
                      std::vector<std::string>{"precision.compute=bf16", "parallel.zero=1"},
                      std::vector<std::string>{"train.recompute=true"},
                      std::vector<std::string>{"precision.compute=bf16",
                                               "precision.high_precision=[lm_head, embedding]"},
                      std::vector<std::string>{"data.grad_accum=3", "data.micro_batch=3"},
                      // MoE: every block (GELU experts, dropping), and SwiGLU experts with a
                      // shared expert and a dense first block, in bf16 with 16-bit gradients,
                      // and under recomputation (one set holding both feed-forward kinds).
                      std::vector<std::string>{"moe.num_experts=4", "moe.capacity_factor=1"},
                      std::vector<std::string>{"model.family=llama", "model.ffn_hidden=48",
                                               "moe.num_experts=4", "moe.shared_experts=1",
                                               "moe.first_dense_layers=1", "precision.compute=bf16",
                                               "precision.grad_reduce=compute"},
                      std::vector<std::string>{"moe.num_experts=4", "moe.first_dense_layers=1",
                                               "train.recompute=true", "precision.compute=bf16"}));

TEST(MemoryPlan, Fp8CopiesLiveOutsideTheArena) {
  const testing::ScratchDir dir;
  tessera::Run run(testing::tiny_recipe(dir.str(), {"precision.compute=fp8"}));
  EXPECT_GT(run.plan().fp8, 0u);
  EXPECT_EQ(run.plan().total(), run.plan().arena() + run.plan().fp8);
  EXPECT_EQ(run.arena().used(), run.plan().arena());
}

TEST(MemoryPlan, MoreMicroBatchesPerFlushDoNotGrowOneStage) {
  // One stage keeps one live activation set whatever the micro-batch count (1F1B).
  const testing::ScratchDir dir;
  const tessera::Run a(testing::tiny_recipe(dir.str(), {"data.grad_accum=1"}));
  const tessera::Run b(testing::tiny_recipe(dir.str(), {"data.grad_accum=4"}));
  EXPECT_EQ(a.plan().train_acts, b.plan().train_acts);
}

}  // namespace
}  // namespace tessera
