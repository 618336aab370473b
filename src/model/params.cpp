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
  TS_CHECK(values_.data() == nullptr, "parameter {} registered after allocation", spec.name);
  for (const Param& p : params_) TS_CHECK(p.spec.name != spec.name, "duplicate parameter {}", spec.name);
  Param p;
  p.offset = static_cast<size_t>(num_elements_);
  num_elements_ += spec.shape.numel();
  p.spec = std::move(spec);
  params_.push_back(std::move(p));
  return size() - 1;
}

void ParamStore::allocate(DType dtype, Device device) {
  dtype_ = dtype;
  device_ = device;
  const size_t bytes = dtype_storage_bytes(dtype, num_elements_);
  values_ = Buffer(device, bytes);
  grads_ = Buffer(device, bytes);
  for (Param& p : params_) {
    const size_t byte_off = dtype_storage_bytes(dtype, static_cast<int64_t>(p.offset));
    p.value = Tensor(static_cast<char*>(values_.data()) + byte_off, dtype, device, p.spec.shape);
    p.grad = Tensor(static_cast<char*>(grads_.data()) + byte_off, dtype, device, p.spec.shape);
  }
  zero_grad();
}

void ParamStore::init(uint64_t seed) {
  // Draw on the host in f32 (the master precision), then cast into the compute dtype/device.
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
    Tensor src(host.data(), DType::f32, Device::cpu, p.spec.shape);
    if (p.value.device == Device::cpu) {
      ops::cast(p.value, src);
    } else {
      copy_tensor(p.value, src);  // cuda params are f32 here; narrower copies come from a cast pass
    }
  }
}

void ParamStore::zero_grad() {
  if (num_elements_ > 0) zero_tensor(flat_grads());
}

const Param& ParamStore::find(const std::string& name) const {
  for (const Param& p : params_)
    if (p.spec.name == name) return p;
  TS_BUG("no parameter named {}", name);
}

Tensor ParamStore::flat_values() const {
  return Tensor(values_.data(), dtype_, device_, {num_elements_});
}
Tensor ParamStore::flat_grads() const {
  return Tensor(grads_.data(), dtype_, device_, {num_elements_});
}

}  // namespace tessera
