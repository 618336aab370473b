// ParamStore: registration, flat allocation, layout-independent initialization.
#include "model/params.h"

#include <vector>

#include "core/rng.h"
#include "kernels/ops.h"

namespace tessera {

std::string_view param_class_name(ParamClass c) {
  switch (c) {
    case ParamClass::weight: return "weight";
    case ParamClass::bias: return "bias";
    case ParamClass::norm: return "norm";
    case ParamClass::embedding: return "embedding";
  }
  return "?";
}

int ParamStore::add(ParamSpec spec) {
  TS_CHECK(values_ == nullptr, "parameter {} registered after allocation", spec.name);
  for (const Param& p : params_) TS_CHECK(p.spec.name != spec.name, "duplicate parameter {}", spec.name);
  Param p;
  p.offset = static_cast<size_t>(num_elements_);
  num_elements_ += spec.shape.numel();
  p.spec = std::move(spec);
  params_.push_back(std::move(p));
  return size() - 1;
}

// Master weights are f32 whatever the compute dtype (f64 stays f64: the CPU reference tests).
static DType master_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

size_t ParamStore::bytes_for(int64_t n, DType dtype) {
  const size_t one = Arena::aligned(dtype_storage_bytes(dtype, n));
  const DType mdt = master_dtype_for(dtype);
  return 2 * one + (mdt != dtype ? Arena::aligned(dtype_storage_bytes(mdt, n)) : 0);
}

void ParamStore::allocate(DType dtype, Device device, Arena* arena) {
  dtype_ = dtype;
  master_dtype_ = master_dtype_for(dtype);
  device_ = device;
  const size_t bytes = dtype_storage_bytes(dtype, num_elements_);
  const size_t master_bytes = dtype_storage_bytes(master_dtype_, num_elements_);
  Arena own;
  if (!arena) {
    own = Arena(device, bytes_needed(dtype), "parameters");
    arena = &own;
  }
  values_ = arena->alloc_bytes(bytes);
  grads_ = arena->alloc_bytes(bytes);
  master_ = has_separate_master() ? arena->alloc_bytes(master_bytes) : values_;
  if (own.capacity() > 0) owned_ = own.take_buffer();
  for (Param& p : params_) {
    const int64_t off = static_cast<int64_t>(p.offset);
    p.value = flat_values().slice(off, off + p.spec.shape.numel()).view(p.spec.shape);
    p.grad = flat_grads().slice(off, off + p.spec.shape.numel()).view(p.spec.shape);
    p.master = flat_master().slice(off, off + p.spec.shape.numel()).view(p.spec.shape);
  }
  zero_grad();
}

void ParamStore::init(uint64_t seed) {
  // Draw on the host in f32 (the master precision), convert to the master dtype, upload.
  for (Param& p : params_) {
    const int64_t n = p.spec.shape.numel();
    std::vector<float> host(n);
    switch (p.spec.init) {
      case InitKind::zeros: std::fill(host.begin(), host.end(), 0.0f); break;
      case InitKind::ones: std::fill(host.begin(), host.end(), 1.0f); break;
      case InitKind::normal:
        CounterRng(seed, p.spec.name).fill_normal(host.data(), 0, n, p.spec.init_std);
        break;
    }
    std::vector<char> converted(dtype_storage_bytes(master_dtype_, n));
    convert_buffer(host.data(), DType::f32, converted.data(), master_dtype_, n);
    copy_bytes(p.master.data, device_, converted.data(), Device::cpu, converted.size());
  }
  refresh_values();
}

void ParamStore::refresh_values() {
  if (has_separate_master() && num_elements_ > 0) ops::cast(flat_values(), flat_master());
}

void ParamStore::zero_grad() {
  if (num_elements_ > 0) zero_tensor(flat_grads());
}

const Param& ParamStore::find(const std::string& name) const {
  for (const Param& p : params_)
    if (p.spec.name == name) return p;
  TS_BUG("no parameter named {}", name);
}

Tensor ParamStore::flat_values() const { return Tensor(values_, dtype_, device_, {num_elements_}); }
Tensor ParamStore::flat_grads() const { return Tensor(grads_, dtype_, device_, {num_elements_}); }
Tensor ParamStore::flat_master() const {
  return Tensor(master_, master_dtype_, device_, {num_elements_});
}

}  // namespace tessera
