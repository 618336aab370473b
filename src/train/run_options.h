// What a recipe decides for one rank's run before anything is built: the compute dtype, the
// execution options of its pipeline stage, the schedule and the micro-batches per flush. Shared by
// Run and the memory planner (`tessera plan`), so both size the same run.
#pragma once
#include "config/recipe.h"
#include "core/dtype.h"
#include "data/teacher_cache.h"
#include "model/exec_options.h"
#include "optim/fp8_scaling.h"
#include "parallel/pipeline_schedule.h"

namespace tessera {

// The storage and compute dtype of parameters and activations. Masters and optimizer state are
// FP32 whatever this is. The CPU backend rounds every 16-bit result exactly as the GPU does, so
// bf16 and fp16 runs are testable without a GPU.
DType compute_dtype(Compute c);

// precision.fp8 as the FP8 state takes it (the student's FP8 linears, and an FP8 teacher's: its
// defaults, TransformerEngine's DelayedScaling ones, unless precision.compute is fp8).
Fp8ScalingConfig fp8_scaling_config(const Fp8Config& c);

// Recomputation and the FP32 layers of pipeline stage pp_rank, the gradient dtype, attention,
// and the shape of the teacher cache's rows when distilling from one (distill.teacher_cache).
ExecOptions exec_options(const Recipe& r, int pp_rank, const TeacherCacheMeta* cache = nullptr);

// One stage: plain accumulation (1F1B order, one live activation set) over every micro-batch of
// the step; several: the recipe's schedule over parallel.microbatches per flush.
PipelineSchedule run_schedule(const Recipe& r);
int run_flush_micro(const Recipe& r);

}  // namespace tessera
