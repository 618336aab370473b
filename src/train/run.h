// Run: everything a training job builds once from its recipe — device and compute dtype, the
// parallel context, the data, the memory plan and its arena, this rank's model shard and its
// linear computation (FP8 under compute: fp8, QAT's fake quantization under qat:), data-parallel
// buckets, the optimizer, the LR schedule, the loss scaler, the pipeline executor and, when
// distilling, the teacher. train_step (train_step.h), evaluation, checkpoints and the loop
// (trainer.h) take a Run; none of them builds anything.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "config/recipe.h"
#include "core/memory.h"
#include "model/distill_loss.h"
#include "model/transformer.h"
#include "optim/distributed_optimizer.h"
#include "optim/fp8_linear.h"
#include "optim/loss_scaler.h"
#include "optim/lr_schedule.h"
#include "optim/qat_linear.h"
#include "parallel/parallel_context.h"
#include "parallel/watchdog.h"
#include "train/checkpointing.h"
#include "train/memory_plan.h"
#include "train/pipeline_executor.h"
#include "train/teacher.h"
#include "train/train_data.h"

namespace tessera {

class Run {
 public:
  // Validates the layout against the world, sizes everything (a run that does not fit stops
  // here), allocates, initializes the weights and, when checkpoint.resume asks, loads them.
  explicit Run(const Recipe& recipe);
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  const Recipe& recipe() const { return recipe_; }
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }
  ParallelContext& ctx() { return *ctx_; }
  bool rank0() const { return ctx_->rank() == 0; }
  Transformer& model() { return *model_; }
  const TrainData& data() const { return data_; }
  PipelineExecutor& pipe() { return *pipe_; }
  DistributedDataParallel& ddp() { return *ddp_; }
  DistributedOptimizer& opt() { return *opt_; }
  const LrSchedule& lr() const { return lr_; }
  LossScaler* scaler() { return scaler_ ? &*scaler_ : nullptr; }
  Fp8Linears* fp8() { return fp8_.get(); }
  QatLinears* qat() { return qat_.get(); }  // null unless qat.weights is int8 or int4
  PrecisionState precision_state() { return {scaler(), fp8()}; }
  const MemoryPlan& plan() const { return plan_; }
  const Arena& arena() const { return arena_; }
  int64_t start_step() const { return start_step_; }  // 0, or the resumed checkpoint's step
  const std::string& resumed_from() const { return resumed_from_; }  // "" unless resumed
  // Distillation (distill.teacher): the KD term of the objective, and the teacher while the
  // curriculum still needs it (null otherwise); free_teacher() returns its memory for good.
  DistillLoss* kd_loss() { return kd_; }
  Teacher* teacher() { return teacher_.get(); }
  void free_teacher();

  // Micro-batches per dp rank per step, run as num_flushes() pipeline flushes of flush_micro().
  int num_micro() const { return recipe_.micro_batches_per_step(); }
  int flush_micro() const { return flush_micro_; }
  int num_flushes() const { return num_micro() / flush_micro_; }
  // The sum over the job of one value per dp replica (from its last stage, tp rank 0); the same
  // on every rank.
  double replica_sum(double x);
  // The same with one value per dp replica and pipeline stage (tp rank 0 of each stage): a term
  // each stage computes its part of (distillation's hidden-state loss).
  double stage_sum(double x);
  void save(int64_t step);

 private:
  Recipe recipe_;  // resolved: the vocabulary filled in from the dataset
  Device device_;
  DType dtype_;
  TrainData data_;
  std::unique_ptr<ParallelContext> ctx_;
  ModelShard shard_;
  PipelineSchedule schedule_;
  int flush_micro_;
  MemoryPlan plan_;
  Arena arena_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<Fp8Linears> fp8_;
  std::unique_ptr<QatLinears> qat_;
  std::unique_ptr<DistributedDataParallel> ddp_;
  std::unique_ptr<DistributedOptimizer> opt_;
  LrSchedule lr_;
  std::optional<LossScaler> scaler_;
  std::unique_ptr<PipelineExecutor> pipe_;
  DistillLoss* kd_ = nullptr;  // owned by the model's objective
  std::unique_ptr<Teacher> teacher_;
  int64_t start_step_ = 0;
  std::string resumed_from_;
  // Last, so it stops first: ends the job when a collective hangs (parallel.timeout_s).
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace tessera
