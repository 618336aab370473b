// MemoryPlan: the byte counts of parameters, optimizer state, activations, backend workspace and
// FP8 copies for one rank, from the recipe and the rank's shard (no allocation).
#include "train/memory_plan.h"

#include <algorithm>

#include "config/layout_check.h"
#include "core/error.h"
#include "core/memory.h"
#include "kernels/ops.h"
#include "model/transformer.h"
#include "optim/distributed_optimizer.h"
#include "train/pipeline_executor.h"
#include "train/run_options.h"
#include "train/teacher.h"

namespace tessera {

namespace {

// An upper bound for FP8 (optim/fp8_linear.h): 2 bytes per local parameter (W8, W8^T), three
// (M, max width) byte matrices of scratch (x8, dy8, dy8^T), and the x^T each input group's
// forward keeps for its backward (per block: q/k/v and gate/up read the hidden width, the output
// projection the heads' width, the down projection the FFN width).
size_t fp8_bytes(const Recipe& r, const ModelShard& shard) {
  const ModelConfig local = Transformer::local_config(r.model, shard);
  const int64_t rows = int64_t(r.data.micro_batch) * r.data.seq_len;
  const int64_t width = std::max<int64_t>(local.hidden, local.ffn_hidden);
  const int64_t saved_width =
      2 * local.hidden + int64_t(local.num_heads) * local.resolved_head_dim() + local.ffn_hidden;
  return 2 * size_t(Transformer::local_num_params(r.model, shard)) +
         size_t(rows) * size_t(3 * width + local.num_layers * saved_width);
}

// An upper bound for QAT (optim/qat_linear.h): a copy of every local parameter in the compute
// dtype (the quantized weights are a subset), an (M, widest K) input scratch and its row amaxes.
size_t qat_bytes(const Recipe& r, const ModelShard& shard, DType dtype) {
  const ModelConfig local = Transformer::local_config(r.model, shard);
  const int64_t rows = int64_t(r.data.micro_batch) * r.data.seq_len;
  int64_t width = std::max<int64_t>(
      {local.hidden, int64_t(local.num_heads) * local.resolved_head_dim(), local.ffn_hidden});
  if (r.moe.enabled())
    width = std::max<int64_t>(width, int64_t(r.moe.shared_experts) * r.moe.shared_ffn_hidden);
  return dtype_size(dtype) * (size_t(Transformer::local_num_params(r.model, shard)) +
                              size_t(rows) * size_t(width)) +
         4 * size_t(rows);
}

}  // namespace

size_t MemoryPlan::arena() const {
  return params + optimizer + train_acts + Arena::aligned(workspace);
}

MemoryPlan plan_memory(const Recipe& r, const PlanInputs& in) {
  const ParallelConfig& par = r.parallel;
  const int B = r.data.micro_batch, T = r.data.seq_len;
  MemoryPlan plan;
  // The parameters include distillation's hidden-state projections (in.exec.hidden_pairs).
  plan.params = Transformer::param_bytes(r.model, in.shard, in.dtype, par.dp, par.zero == 0,
                                         in.exec.fp32_grads, true, in.exec.hidden_pairs);
  // The bucket layout only needs the parameters' shapes and the gradients' dtype.
  const DType grad_dtype = ParamStore::grad_dtype_for(in.dtype, in.exec.fp32_grads);
  const int64_t bucket_numel =
      std::max<int64_t>(1, par.bucket_bytes() / int64_t(dtype_size(grad_dtype)));
  plan.optimizer = DistributedOptimizer::bytes_for(
      BucketLayout(Transformer::declared_params(r.model, in.shard, in.exec.hidden_pairs), par.dp,
                   bucket_numel, par.ep),
      in.dtype, par.zero);
  plan.train_acts =
      PipelineExecutor::bytes_needed(r.model, in.shard, in.dtype, in.schedule, in.flush_micro, B, T,
                                     in.device, in.exec, teacher_dims(in.teacher));
  if (in.device == Device::cuda)
    plan.workspace =
        ops::cuda_workspace_bytes(B, T, r.model.num_heads / par.tp, r.model.num_kv_heads / par.tp,
                                  r.model.resolved_head_dim(), in.dtype, in.exec.attention);
  if (r.precision.compute == Compute::fp8) plan.fp8 = fp8_bytes(r, in.shard);
  if (r.qat.enabled()) plan.qat = qat_bytes(r, in.shard, in.dtype);
  if (in.teacher) {
    const TeacherSpec& t = *in.teacher;
    plan.teacher = Teacher::bytes_needed(t, in.shard, B, T, in.exec.attention);
    if (in.device == Device::cuda)  // one workspace serves both models
      plan.workspace = std::max(
          plan.workspace,
          ops::cuda_workspace_bytes(B, T, t.model.num_heads / par.tp, t.model.num_kv_heads / par.tp,
                                    t.model.resolved_head_dim(), t.dtype, in.exec.attention));
  }
  return plan;
}

PlanInputs plan_inputs(const Recipe& r, const ModelShard& shard, Device device,
                       std::optional<TeacherSpec> teacher, const TeacherCacheMeta* cache) {
  PlanInputs in{shard,
                exec_options(r, shard.pp_rank, cache),
                compute_dtype(r.precision.compute),
                device,
                run_schedule(r),
                run_flush_micro(r),
                std::move(teacher)};
  if (in.teacher) in.exec.hidden_pairs = in.teacher->hidden_pairs;  // with the teacher's width
  return in;
}

std::vector<StagePlan> plan_stages(const Recipe& r, Device device) {
  const ParallelConfig& par = r.parallel;
  validate_layout(r, par.dp * par.tp * par.pp);
  const std::vector<int> layers = resolve_stage_layers(r);
  // The teacher cache's rows are sized from its header (the dataset check is Run's).
  std::optional<TeacherCacheMeta> cache;
  if (!r.distill.teacher_cache.empty()) cache = TeacherCache::open(r.distill.teacher_cache).meta();
  std::vector<StagePlan> out;
  for (int s = 0; s < par.pp; ++s) {
    const ModelShard shard = ModelShard::make(r.model, par.tp, 0, par.pp, s, layers, nullptr)
                                 .with_ep_size(par.dp, par.ep, 0);
    StagePlan st;
    st.stage = s;
    st.first_layer = shard.first_layer;
    st.num_layers = shard.num_layers;
    // The teacher's tokenizer is not checked here (that needs the dataset): Run checks it.
    std::optional<TeacherSpec> teacher;
    if (r.distill.online()) teacher = read_teacher_spec(r, "");
    const PlanInputs in =
        plan_inputs(r, shard, device, std::move(teacher), cache ? &*cache : nullptr);
    const ParamStore declared = Transformer::declared_params(r.model, shard, in.exec.hidden_pairs);
    for (const Param& p : declared.all()) st.params_held += p.spec.shape.numel();
    st.plan = plan_memory(r, in);
    out.push_back(st);
  }
  return out;
}

void check_plan_fits(const MemoryPlan& plan, Device device, const std::string& recipe_file) {
  size_t free_bytes = 0, total_bytes = 0;
  if (!device_memory_info(device, &free_bytes, &total_bytes) || plan.total() <= free_bytes) return;
  TS_USER_ERROR(
      "{}: this run needs {:.2f} GB of GPU memory per rank (parameters {:.2f}, "
      "optimizer {:.2f}, activations and pipeline buffers {:.2f}, workspace {:.2f}, "
      "fp8 copies {:.2f}, distillation teacher {:.2f}, qat copies {:.2f}) but {:.2f} GB of {:.2f} "
      "are free; lower "
      "data.micro_batch or data.seq_len, set train.recompute: true, or spread the model with "
      "parallel.tp / parallel.pp",
      recipe_file, plan.total() / 1e9, plan.params / 1e9, plan.optimizer / 1e9,
      plan.train_acts / 1e9, plan.workspace / 1e9, plan.fp8 / 1e9, plan.teacher / 1e9,
      plan.qat / 1e9, free_bytes / 1e9, total_bytes / 1e9);
}

}  // namespace tessera
