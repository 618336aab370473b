// The memory plan is exact: a Run's arena holds precisely plan.arena() bytes once everything is
// built, and training steps allocate nothing more (the peak stays there), for both families,
// 16-bit compute, ZeRO-1, recomputation, the FP32 head and embedding, several micro-batches and
// distillation (the teacher in an arena of its own; the hidden-state term's projections and
// differences in the student's).
#include "train/memory_plan.h"

#include <gtest/gtest.h>

#include "config/recipe.h"
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

// Distillation: the student's sets hold the teacher's logits and the KD buffers (in the plan's
// arena, exactly), and the teacher's weights and forward sit in an arena of their own of exactly
// plan.teacher bytes (a wider llama teacher in bf16 beside an fp32 gpt2 student, in fp32, and in
// fp8, whose scaling state, weight copies and input scratch are in that arena too).
// With hidden-state pairs (student 32 wide, teacher 48: both projected; with and without ZeRO-1)
// the projections are parameters and each set keeps one (N, 48) difference per pair.
TEST(MemoryPlan, DistillationTeacherAndKdBuffersArePlanned) {
  const testing::ScratchDir dir;
  const std::string teacher_dir = dir.str() + "/teacher";
  {
    tessera::Run teacher(testing::tiny_recipe(
        teacher_dir, {"model.family=llama", "model.hidden=48", "model.ffn_hidden=64",
                      "model.num_layers=3", "model.num_kv_heads=2"}));
    teacher.save(1);
  }
  for (const char* precision : {"bf16", "fp32", "fp8"}) {
    SCOPED_TRACE(precision);
    tessera::Run run(testing::tiny_recipe(
        dir.str() + "/student",
        {"distill.teacher=" + teacher_dir, std::string("distill.teacher_precision=") + precision,
         "distill.curriculum=[{alpha: 0.5}]"}));
    const MemoryPlan& plan = run.plan();
    ASSERT_NE(run.teacher(), nullptr);
    EXPECT_EQ(run.teacher()->bytes(), plan.teacher);
    EXPECT_EQ(plan.total(), plan.arena() + plan.teacher);
    EXPECT_EQ(run.arena().used(), plan.arena());
    const StepResult s = train_step(run, 0);
    EXPECT_GT(s.kd_loss, 0.0);
    EXPECT_EQ(run.arena().peak(), plan.arena()) << "a step allocated from the arena";
  }
  size_t without = 0;
  for (const char* pairs : {"[]", "[{student: 1, teacher: 3}, {student: 2, teacher: 1}]"}) {
    for (const char* zero : {"0", "1"}) {
      SCOPED_TRACE(std::string(pairs) + " zero " + zero);
      tessera::Run run(testing::tiny_recipe(
          dir.str() + "/hidden",
          {"distill.teacher=" + teacher_dir, "distill.curriculum=[{alpha: 0.5}]",
           std::string("distill.hidden_pairs=") + pairs, "precision.compute=bf16",
           std::string("parallel.zero=") + zero}));
      const MemoryPlan& plan = run.plan();
      EXPECT_EQ(run.arena().used(), plan.arena());
      const StepResult s = train_step(run, 0);
      EXPECT_EQ(run.arena().peak(), plan.arena()) << "a step allocated from the arena";
      if (std::string(pairs) == "[]") {
        if (std::string(zero) == "0") without = plan.arena();
        EXPECT_EQ(s.hidden_loss, 0.0);
        continue;
      }
      EXPECT_GT(s.hidden_loss, 0.0);
      // Two (48, 32) projections and their gradients (and, under zero 0, masters).
      if (std::string(zero) == "0") {
        EXPECT_GT(plan.arena(), without + 2 * 48 * 32 * 2 * 2);
      }
      const std::vector<StagePlan> stages = plan_stages(run.recipe(), Device::cpu);
      EXPECT_EQ(stages[0].plan.params, plan.params);
      EXPECT_EQ(stages[0].plan.train_acts, plan.train_acts);
      EXPECT_EQ(stages[0].params_held, run.recipe().model.num_params() + 2 * 48 * 32);
    }
  }
}

TEST(MemoryPlan, MoreMicroBatchesPerFlushDoNotGrowOneStage) {
  // One stage keeps one live activation set whatever the micro-batch count (1F1B).
  const testing::ScratchDir dir;
  const tessera::Run a(testing::tiny_recipe(dir.str(), {"data.grad_accum=1"}));
  const tessera::Run b(testing::tiny_recipe(dir.str(), {"data.grad_accum=4"}));
  EXPECT_EQ(a.plan().train_acts, b.plan().train_acts);
}

// `tessera plan` plans from the recipe alone what Run plans for its rank.
TEST(PlanStages, EqualWhatTheRunPlans) {
  for (const std::vector<std::string>& o :
       {std::vector<std::string>{},
        std::vector<std::string>{"moe.num_experts=4", "precision.compute=bf16",
                                 "parallel.zero=1"}}) {
    const testing::ScratchDir dir;
    const tessera::Run run(testing::tiny_recipe(dir.str(), o));
    const std::vector<StagePlan> stages = plan_stages(run.recipe(), Device::cpu);
    ASSERT_EQ(stages.size(), 1u);
    const MemoryPlan& a = stages[0].plan;
    const MemoryPlan& b = run.plan();
    EXPECT_EQ(a.params, b.params);
    EXPECT_EQ(a.optimizer, b.optimizer);
    EXPECT_EQ(a.train_acts, b.train_acts);
    EXPECT_EQ(a.workspace, b.workspace);
    EXPECT_EQ(stages[0].params_held, run.recipe().model.num_params());
  }
}

// Qwen3-30B-A3B per layout: expert parallelism divides each stage's routed experts (48 layers x
// 128 experts x 3 x 2048 x 768 in all) by ep, and ZeRO-1 the optimizer state by dp (dense) and
// dp / ep (experts).
TEST(PlanStages, Qwen3_30bA3bPerLayout) {
  const auto plan = [](std::vector<std::string> o) {
    Recipe r = load_recipe(testing::source_path("recipes/qwen3-30b-a3b.yaml"), o);
    finalize_model_vocab(r.model, r.model.vocab_size, r.file, r.parallel.tp);
    return plan_stages(r, Device::cuda);
  };
  const int64_t experts_per_layer = int64_t(128) * 3 * 2048 * 768;
  const auto ep1 = plan({"parallel.dp=8", "parallel.ep=1", "parallel.pp=4"});
  const auto ep8 = plan({"parallel.dp=8", "parallel.ep=8", "parallel.pp=4"});
  ASSERT_EQ(ep1.size(), 4u);
  ASSERT_EQ(ep8.size(), 4u);
  int64_t held = 0;
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(ep8[s].num_layers, 12);
    EXPECT_EQ(ep1[s].params_held - ep8[s].params_held, 12 * experts_per_layer / 8 * 7);
    EXPECT_LT(ep8[s].plan.params, ep1[s].plan.params / 4);
    held += ep1[s].params_held;
  }
  EXPECT_EQ(held, 30'532'122'624);  // every parameter on exactly one stage
}

}  // namespace
}  // namespace tessera
