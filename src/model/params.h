// ParamStore: every parameter of a model, by global name, in one contiguous value buffer and one
// contiguous gradient buffer (so clipping, zeroing and optimizer passes are single sweeps).
// Initialization draws each parameter's FULL tensor from a counter-based RNG keyed by
// (seed, name, element index), so values do not depend on how the model is later sharded.
#pragma once
#include <string>
#include <vector>

#include "core/memory.h"
#include "core/tensor.h"

namespace tessera {

// Which optimizer group a parameter falls into (weight decay is configured per class).
enum class ParamClass { weight, bias, norm, embedding };
std::string_view param_class_name(ParamClass c);

enum class InitKind { normal, zeros, ones };

struct ParamSpec {
  std::string name;
  Shape shape;
  ParamClass cls = ParamClass::weight;
  InitKind init = InitKind::normal;
  float init_std = 0.02f;

  // Model parallelism. `shape` is what this rank holds; the full tensor is `global_shape` (empty:
  // the same as shape), split over tensor-parallel (or, for experts, expert-parallel) ranks along
  // `shard_dim` (-1: every rank holds all of it) from `shard_offset`. Initialization draws the full
  // tensor's element indices, so a slice holds exactly the values the unsplit tensor would.
  Shape global_shape;
  int shard_dim = -1;
  int64_t shard_offset = 0;
  // Replicated over tp, but each tp rank computes only part of its gradient (QK-norm weights see
  // only their rank's heads): the gradient is summed over tp before the optimizer.
  bool tp_partial_grad = false;
  // Tied embedding present on the first and the last pipeline stage: the two copies' gradients are
  // summed over the embedding group, so both stay equal.
  bool embedding_group = false;
  // False on ranks holding a copy that another rank owns: a tp-replicated parameter on tp rank > 0,
  // the tied embedding's copy on the last stage. Owners alone count it in the gradient norm and
  // write it to checkpoints, so no parameter is counted twice.
  bool owner = true;
  // A routed expert's weights under expert parallelism (a slice along shard_dim 0 of the (E, ...)
  // tensor, one per ep rank): every dp replica of this slice sits in the rank's expert_dp group,
  // so its gradient reduces over expert_dp, not dp (BucketLayout keeps such parameters in buckets
  // of their own).
  bool expert_parallel = false;

  Shape full_shape() const { return global_shape.ndim > 0 ? global_shape : shape; }
  bool tp_sharded() const { return shard_dim >= 0; }
};

struct Param {
  ParamSpec spec;
  Tensor value;       // compute dtype, on the model's device: what forward/backward read
  Tensor grad;        // same shape, grad_dtype(); accumulated by backward (empty when frozen)
  Tensor master;      // f32 master weights the optimizer updates; the same memory as value when the
                      // compute dtype is f32 (or f64 in tests), a separate copy otherwise; empty
                      // when the store keeps no masters (ZeRO-1 keeps its shard in the optimizer)
  size_t offset = 0;  // element offset inside the flat buffers
};

class ParamStore {
 public:
  ParamStore() = default;
  // Registers a parameter; returns its index. All registration precedes allocate().
  int add(ParamSpec spec);
  // Before the first add(): a parameter whose expert_parallel flag differs from the previous
  // one's starts at a multiple of `multiple` elements (the gap stays zero and belongs to no
  // parameter). With multiple = dp, gradient buckets can be cut exactly where the parameters that
  // reduce over dp meet those that reduce over expert_dp (data_parallel.h).
  void align_expert_runs(int64_t multiple);
  // Carves values, grads and (for 16-bit compute, when with_master) masters from `arena`, or from
  // buffers it owns when arena is null. The flat buffers are padded with zeros to a multiple of
  // pad_multiple elements (data-parallel buckets split evenly over dp ranks). With fp32_grads and
  // 16-bit values the gradients are f32 (grad_dtype_for): they accumulate micro-batches and
  // reduce over dp in FP32 (Megatron's main_grad, the weight-gradient GEMMs accumulating straight
  // into it); otherwise they have the values' dtype. bytes_needed() is what allocate() takes.
  // with_grads = false (a frozen model: a distillation teacher) keeps no gradients at all.
  void allocate(DType dtype, Device device, Arena* arena = nullptr, int64_t pad_multiple = 1,
                bool with_master = true, bool fp32_grads = false, bool with_grads = true);
  size_t bytes_needed(DType dtype, int64_t pad_multiple = 1, bool with_master = true,
                      bool fp32_grads = false, bool with_grads = true) const {
    return bytes_for(padded(num_elements_, pad_multiple), dtype, with_master, fp32_grads,
                     with_grads);
  }
  static size_t bytes_for(int64_t num_elements, DType dtype, bool with_master = true,
                          bool fp32_grads = false, bool with_grads = true);
  static DType grad_dtype_for(DType dtype, bool fp32_grads) {
    return fp32_grads && (dtype == DType::bf16 || dtype == DType::f16) ? DType::f32 : dtype;
  }
  static int64_t padded(int64_t n, int64_t multiple) {
    return (n + multiple - 1) / multiple * multiple;
  }
  void init(uint64_t seed);  // fills every master from the counter-based RNG, then the values
  // Parameter idx's initial values in f32 on the host (numel elements): what init() stores, before
  // any rounding to the compute dtype. ZeRO-1 seeds its FP32 master shard from it.
  void draw_init(int idx, uint64_t seed, float* out) const;
  void zero_grad();
  // value = master rounded to the compute dtype, for every parameter (after an optimizer step or
  // a checkpoint load). No-op when they share memory.
  void refresh_values();
  bool has_separate_master() const { return master_ != nullptr && master_ != values_; }
  bool has_master() const { return master_ != nullptr; }

  Param& operator[](int idx) { return params_[idx]; }
  const Param& operator[](int idx) const { return params_[idx]; }
  const Param& find(const std::string& name) const;  // bug if absent
  int size() const { return static_cast<int>(params_.size()); }
  // End of the last parameter in the flat buffers: the sum of the parameters' sizes plus any
  // align_expert_runs gaps.
  int64_t num_elements() const { return num_elements_; }
  int64_t padded_num_elements() const { return padded_elements_; }  // length of the flat buffers
  const std::vector<Param>& all() const { return params_; }
  std::vector<Param>& all() { return params_; }

  Tensor flat_values() const;  // (padded_num_elements)
  Tensor flat_grads() const;   // (padded_num_elements); empty without gradients
  bool has_grads() const { return grads_ != nullptr; }
  Tensor flat_master() const;  // (padded_num_elements) f32 (f64 in tests); empty without masters
  DType master_dtype() const { return master_dtype_; }
  DType dtype() const { return dtype_; }
  DType grad_dtype() const { return grad_dtype_; }
  Device device() const { return device_; }

 private:
  std::vector<Param> params_;
  int64_t num_elements_ = 0;
  int64_t padded_elements_ = 0;
  int64_t expert_align_ = 1;
  DType dtype_ = DType::f32;
  DType grad_dtype_ = DType::f32;
  DType master_dtype_ = DType::f32;
  Device device_ = Device::cpu;
  Buffer owned_;  // when not allocated from an arena
  void* values_ = nullptr;
  void* grads_ = nullptr;
  void* master_ = nullptr;
};

}  // namespace tessera
