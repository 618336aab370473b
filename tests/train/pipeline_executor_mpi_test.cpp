// PipelineExecutor across pipeline stages under mpirun (pp = the world): for GPipe and 1F1B, the
// last stage's loss and every stage's parameter gradients equal the serial run of the whole model
// over the same micro-batches bit for bit (activations and their gradients cross stages as exact
// copies; each stage accumulates its micro-batches in the serial order), except the tied
// embedding, whose two copies' gradients sum to the serial one; evaluation too. With and without
// recomputation: the live micro-batches share one recomputation set and one scratch, and the
// executor's arena holds exactly what bytes_needed plans.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "tests/common/tiny_models.h"
#include "tests/train/executor_test_util.h"
#include "train/pipeline_executor.h"

namespace tessera {
namespace {

using testing::fill_microbatch;

constexpr int kB = 2, kT = 8, kM = 4;

class PipelineStages
    : public ::testing::TestWithParam<std::tuple<const char*, PipelineSchedule, bool>> {
 protected:
  static void SetUpTestSuite() {
    ctx_ = new ParallelContext(ParallelSizes{1, 1, world_size()}, Device::cpu);
  }
  static void TearDownTestSuite() {
    delete ctx_;
    ctx_ = nullptr;
  }
  ModelConfig config() const {
    ModelConfig c = std::string(std::get<0>(GetParam())) == "gpt2" ? testing::tiny_gpt2()
                                                                   : testing::tiny_llama();
    c.num_layers = 5;  // uneven over 2 and 4 stages
    return c;
  }
  // This rank's stage of `cfg`: an even split with the remainder on the earliest stages.
  static ModelShard stage_shard(const ModelConfig& cfg) {
    const int pp = ctx_->comm(Group::pp).size();
    std::vector<int> counts(pp, cfg.num_layers / pp);
    for (int s = 0; s < cfg.num_layers % pp; ++s) ++counts[s];
    return ModelShard::make(cfg, 1, 0, pp, ctx_->comm(Group::pp).rank(), counts, nullptr);
  }
  static ExecOptions exec() {
    ExecOptions e;
    e.recompute = std::get<2>(GetParam());
    return e;
  }
  static double sum_over_ranks(double x) {
    return ctx_->host_comm(Group::world).all_reduce_scalar(x, ReduceOp::sum);
  }
  static ParallelContext* ctx_;
};
ParallelContext* PipelineStages::ctx_ = nullptr;

TEST_P(PipelineStages, TrainStepEqualsTheSerialModel) {
  const ModelConfig cfg = config();
  const PipelineSchedule kind = std::get<1>(GetParam());
  const ModelShard shard = stage_shard(cfg);
  Transformer model(cfg, DType::f32, Device::cpu, nullptr, shard, 1, true, exec());
  model.init_weights(5);
  Arena arena(
      Device::cpu,
      PipelineExecutor::bytes_needed(cfg, shard, DType::f32, kind, kM, kB, kT, Device::cpu, exec()),
      "executor");
  PipelineExecutor pipe(model, ctx_->comm(Group::pp), kind, kM, kB, kT, arena);
  EXPECT_EQ(arena.used(), arena.capacity()) << "bytes_needed plans more than the executor takes";
  const float scale = 1.0f / kM;
  const auto fill = [&](int m, Batch& b) { fill_microbatch(cfg, m, b); };
  model.params().zero_grad();
  const PipelineExecutor::Result res = pipe.train_step(fill, scale);
  const testing::SerialResult ref = testing::serial_reference(cfg, kM, kB, kT, scale);
  if (shard.last_stage())
    EXPECT_EQ(res.loss_sum, ref.loss_sum);
  else
    EXPECT_EQ(res.loss_sum, 0.0);

  double tied = 0.0;  // this rank's part of the tied embedding's gradient, element 3
  for (const Param& p : model.params().all()) {
    const std::vector<float> got(p.grad.ptr<float>(), p.grad.ptr<float>() + p.grad.numel());
    const std::vector<float>* want = testing::serial_grad(ref, p.spec.name);
    ASSERT_NE(want, nullptr);
    if (p.spec.embedding_group) {
      tied += got[3];
      continue;
    }
    EXPECT_EQ(got, *want) << p.spec.name << " on stage " << shard.pp_rank;
  }
  if (cfg.tied_embeddings && shard.pp_size > 1) {
    const double sum = sum_over_ranks(tied);
    const double want = (*testing::serial_grad(ref, "embed.wte"))[3];
    EXPECT_NEAR(sum, want, 1e-6 * std::max(1.0, std::fabs(want)));
  }
}

TEST_P(PipelineStages, EvalEqualsTheSerialModel) {
  const ModelConfig cfg = config();
  const PipelineSchedule kind = std::get<1>(GetParam());
  const ModelShard shard = stage_shard(cfg);
  Transformer model(cfg, DType::f32, Device::cpu, nullptr, shard, 1, true, exec());
  model.init_weights(5);
  Arena arena(
      Device::cpu,
      PipelineExecutor::bytes_needed(cfg, shard, DType::f32, kind, kM, kB, kT, Device::cpu, exec()),
      "executor");
  PipelineExecutor pipe(model, ctx_->comm(Group::pp), kind, kM, kB, kT, arena);
  EXPECT_EQ(arena.used(), arena.capacity()) << "bytes_needed plans more than the executor takes";
  const PipelineExecutor::Result res =
      pipe.eval([&](int m, Batch& b) { fill_microbatch(cfg, m, b); }, kM);

  Transformer whole(cfg, DType::f32, Device::cpu);
  whole.init_weights(5);
  Arena batch_arena(Device::cpu, Batch::bytes_needed(kB, kT, Device::cpu) + 1024, "batch");
  Batch batch(kB, kT, Device::cpu, batch_arena);
  double want = 0.0;
  for (int m = 0; m < kM; ++m) {
    Activations acts(whole, kB, kT, false);
    fill_microbatch(cfg, m, batch);
    want += whole.forward(acts, batch.tokens, batch.labels) * double(batch.num_valid());
  }
  EXPECT_EQ(res.loss_sum, shard.last_stage() ? want : 0.0);
}

INSTANTIATE_TEST_SUITE_P(Schedules, PipelineStages,
                         ::testing::Combine(::testing::Values("gpt2", "llama"),
                                            ::testing::Values(PipelineSchedule::gpipe,
                                                              PipelineSchedule::one_f_one_b),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "_" +
                                  (std::get<1>(info.param) == PipelineSchedule::gpipe ? "gpipe"
                                                                                      : "1f1b") +
                                  (std::get<2>(info.param) ? "_recompute" : "");
                         });

}  // namespace
}  // namespace tessera
