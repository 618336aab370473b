// MemoryPlan: every byte a training rank keeps on its device, sized from the recipe and the
// rank's shard alone before anything is allocated, so a run that will not fit stops with the
// numbers instead of failing halfway, and one arena of exactly plan.arena() bytes serves the run.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "core/dtype.h"
#include "core/tensor.h"
#include "data/teacher_cache.h"
#include "model/exec_options.h"
#include "model/model_shard.h"
#include "parallel/pipeline_schedule.h"
#include "train/teacher.h"

namespace tessera {

struct MemoryPlan {
  size_t params = 0;      // values, gradients (FP32 with grad_reduce: fp32) and FP32 masters
                          // (unless ZeRO-1 shards them)
  size_t optimizer = 0;   // AdamW moments (and ZeRO-1's FP32 master shard)
  size_t train_acts = 0;  // the pipeline executor's activation sets, batches and p2p buffers
  size_t workspace = 0;   // GEMM + attention scratch of the CUDA backend
  size_t fp8 = 0;         // outside the arena: FP8 weight copies (W, W^T), scratch, saved x^T
  size_t teacher = 0;     // outside the arena: the distillation teacher's own arena (weights and
                          // one forward), freed once the curriculum no longer needs it
  size_t qat = 0;         // outside the arena: QAT's fake-quantized weight copies and input scratch

  size_t arena() const;  // what the arena holds: everything but fp8, the teacher and qat
  size_t total() const { return arena() + fp8 + teacher + qat; }
};

// What the plan needs to know about the run besides the recipe.
struct PlanInputs {
  ModelShard shard;  // this rank's (resolved) slice of the model
  ExecOptions exec;  // recomputation and FP32 layers of this stage
  DType dtype = DType::f32;
  Device device = Device::cpu;
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  int flush_micro = 1;                 // micro-batches per pipeline flush
  std::optional<TeacherSpec> teacher;  // distillation's teacher (distill.teacher)
};
// (PlanInputs::exec carries the teacher cache's row shape, distill.teacher_cache.)

MemoryPlan plan_memory(const Recipe& r, const PlanInputs& in);

// What Run plans with for the rank holding `shard` (run_options.h): its stage's execution options
// (with the teacher's hidden-state pairs), the compute dtype, the schedule and the flush size.
PlanInputs plan_inputs(const Recipe& r, const ModelShard& shard, Device device,
                       std::optional<TeacherSpec> teacher = std::nullopt,
                       const TeacherCacheMeta* cache = nullptr);

// From the recipe alone (no ranks, communicators or allocation; the recipe's vocabulary must be
// known): the plan of every pipeline stage's first rank (tp 0, ep 0; every tp and ep rank of a
// stage holds the same number of bytes). On a machine without a GPU the CUDA workspace, which
// cuDNN sizes on the device, is 0.
struct StagePlan {
  int stage = 0, first_layer = 0, num_layers = 0;
  int64_t params_held = 0;  // parameters this rank holds
  MemoryPlan plan;
};
std::vector<StagePlan> plan_stages(const Recipe& r, Device device);

// A user error naming every part of the plan when it exceeds the device's free memory (CUDA
// only; the CPU has no such check).
void check_plan_fits(const MemoryPlan& plan, Device device, const std::string& recipe_file);

}  // namespace tessera
