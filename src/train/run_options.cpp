// Recipe -> per-rank run settings (see run_options.h).
#include "train/run_options.h"

#include "config/layout_check.h"
#include "core/error.h"

namespace tessera {

DType compute_dtype(Compute c) {
  switch (c) {
    case Compute::fp32: return DType::f32;
    case Compute::fp16: return DType::f16;
    case Compute::bf16:
    case Compute::fp8: return DType::bf16;  // fp8: FP8 GEMMs in the block linears, bf16 else
  }
  TS_BUG("unknown compute dtype {}", int(c));
}

Fp8ScalingConfig fp8_scaling_config(const Fp8Config& c) {
  Fp8ScalingConfig f;
  f.amax_history_len = c.amax_history_len;
  f.amax_compute = c.amax_compute == AmaxCompute::most_recent ? ops::Fp8AmaxCompute::most_recent
                                                              : ops::Fp8AmaxCompute::max;
  f.margin = c.margin;
  return f;
}

ExecOptions exec_options(const Recipe& r, int pp_rank, const TeacherCacheMeta* cache) {
  ExecOptions e;
  e.attention = r.train.attention;
  e.recompute = stage_recomputes(r, pp_rank);
  e.fp32_lm_head = r.precision.keeps_high_precision(HighPrecisionLayer::lm_head);
  e.fp32_embedding = r.precision.keeps_high_precision(HighPrecisionLayer::embedding);
  e.fp32_grads = r.precision.grad_reduce == GradReduce::fp32;
  e.moe_stat_records = r.micro_batches_per_step();
  e.distill = r.distill.enabled();
  if (cache) {
    e.distill_top_k = cache->top_k;
    e.distill_num_temps = int(cache->temperatures.size());
  }
  return e;
}

PipelineSchedule run_schedule(const Recipe& r) {
  return r.parallel.pp == 1 ? PipelineSchedule::one_f_one_b : r.parallel.schedule;
}

int run_flush_micro(const Recipe& r) {
  return r.parallel.pp == 1 ? r.micro_batches_per_step() : r.parallel.microbatches;
}

}  // namespace tessera
