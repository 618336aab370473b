// AdamW: per-parameter update through ops::adamw_update on views of the flat m/v buffers.
#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/ops.h"

namespace tessera {

// Moments are FP32 whatever the compute dtype (f64 only in the CPU reference tests).
static DType moment_dtype(DType param_dtype) {
  return param_dtype == DType::f64 ? DType::f64 : DType::f32;
}

size_t AdamW::bytes_for(int64_t n, DType param_dtype) {
  return 2 * Arena::aligned(dtype_storage_bytes(moment_dtype(param_dtype), n));
}

AdamW::AdamW(const ParamStore& params, const AdamWConfig& cfg, Arena* arena) : cfg_(cfg) {
  const DType mdt = moment_dtype(params.dtype());
  const int64_t n = params.num_elements();
  Arena own;
  if (!arena) {
    own = Arena(params.device(), bytes_needed(params), "optimizer");
    arena = &own;
  }
  m_view_ = Tensor(arena->alloc_bytes(dtype_storage_bytes(mdt, n)), mdt, params.device(), {n});
  v_view_ = Tensor(arena->alloc_bytes(dtype_storage_bytes(mdt, n)), mdt, params.device(), {n});
  if (own.capacity() > 0) owned_ = own.take_buffer();
  zero_tensor(m_view_);
  zero_tensor(v_view_);
}

bool adamw_decays(const AdamWConfig& cfg, const ParamSpec& spec) {
  const auto excluded = [&](DecayExempt cls) {
    return std::find(cfg.no_decay.begin(), cfg.no_decay.end(), cls) != cfg.no_decay.end();
  };
  switch (spec.cls) {
    case ParamClass::weight: return true;
    case ParamClass::bias: return !excluded(DecayExempt::biases);
    case ParamClass::norm: return !excluded(DecayExempt::norms);
    case ParamClass::embedding: return !excluded(DecayExempt::embeddings);
  }
  return true;
}

ops::AdamWStep adamw_step_for(const AdamWConfig& cfg, const ParamSpec& spec, float lr,
                              float grad_scale, int64_t step) {
  ops::AdamWStep s;
  s.lr = lr;
  s.beta1 = cfg.beta1;
  s.beta2 = cfg.beta2;
  s.eps = cfg.eps;
  s.weight_decay = adamw_decays(cfg, spec) ? cfg.weight_decay : 0.0f;
  s.step = static_cast<int>(step);
  s.grad_scale = grad_scale;
  return s;
}

void AdamW::step(ParamStore& params, float lr, float grad_scale) {
  ++step_;
  std::vector<ops::AdamWTensors> entries;
  entries.reserve(params.size());
  // 16-bit compute: the update also writes the rounded values (refresh_values in the same pass).
  const bool values = params.has_separate_master();
  for (Param& p : params.all()) {
    const int64_t begin = static_cast<int64_t>(p.offset), end = begin + p.value.numel();
    entries.push_back({p.master.view({p.master.numel()}), p.grad.view({p.grad.numel()}),
                       m_view_.slice(begin, end), v_view_.slice(begin, end),
                       adamw_step_for(cfg_, p.spec, lr, grad_scale, step_),
                       values ? p.value.view({p.value.numel()}) : Tensor()});
  }
  ops::adamw_update_multi(entries);
}

double grad_norm(const ParamStore& params) {
  return std::sqrt(ops::sum_squares(params.flat_grads()));
}

float clip_factor(double norm, float max_norm) {
  if (max_norm <= 0.0f) return 1.0f;
  return static_cast<float>(std::min(1.0, double(max_norm) / (norm + 1e-6)));
}

}  // namespace tessera
