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
};

struct Param {
  ParamSpec spec;
  Tensor value;   // compute dtype, on the model's device: what forward/backward read
  Tensor grad;    // same dtype and shape; accumulated by backward
  Tensor master;  // f32 master weights the optimizer updates; the same memory as value when the
                  // compute dtype is f32 (or f64 in tests), a separate copy otherwise
  size_t offset = 0;  // element offset inside the flat buffers
};

class ParamStore {
 public:
  ParamStore() = default;
  // Registers a parameter; returns its index. All registration precedes allocate().
  int add(ParamSpec spec);
  // Carves values, grads and (for 16-bit compute) masters from `arena`, or from buffers it owns
  // when arena is null. bytes_needed() is what allocate() takes from an arena.
  void allocate(DType dtype, Device device, Arena* arena = nullptr);
  size_t bytes_needed(DType dtype) const { return bytes_for(num_elements_, dtype); }
  static size_t bytes_for(int64_t num_elements, DType dtype);
  void init(uint64_t seed);  // fills every master from the counter-based RNG, then the values
  void zero_grad();
  // value = master rounded to the compute dtype, for every parameter (after an optimizer step or
  // a checkpoint load). No-op when they share memory.
  void refresh_values();
  bool has_separate_master() const { return master_dtype_ != dtype_; }

  Param& operator[](int idx) { return params_[idx]; }
  const Param& operator[](int idx) const { return params_[idx]; }
  const Param& find(const std::string& name) const;  // bug if absent
  int size() const { return static_cast<int>(params_.size()); }
  int64_t num_elements() const { return num_elements_; }
  const std::vector<Param>& all() const { return params_; }
  std::vector<Param>& all() { return params_; }

  Tensor flat_values() const;  // (num_elements)
  Tensor flat_grads() const;   // (num_elements)
  Tensor flat_master() const;  // (num_elements) f32 (f64 in tests)
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

 private:
  std::vector<Param> params_;
  int64_t num_elements_ = 0;
  DType dtype_ = DType::f32;
  DType master_dtype_ = DType::f32;
  Device device_ = Device::cpu;
  Buffer owned_;  // when not allocated from an arena
  void* values_ = nullptr;
  void* grads_ = nullptr;
  void* master_ = nullptr;
};

}  // namespace tessera
