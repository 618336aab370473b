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
  for (const Param& p : params_)
    TS_CHECK(p.spec.name != spec.name, "duplicate parameter {}", spec.name);
  if (!params_.empty() && params_.back().spec.expert_parallel != spec.expert_parallel)
    num_elements_ = padded(num_elements_, expert_align_);
  Param p;
  p.offset = static_cast<size_t>(num_elements_);
  num_elements_ += spec.shape.numel();
  p.spec = std::move(spec);
  params_.push_back(std::move(p));
  return size() - 1;
}

void ParamStore::align_expert_runs(int64_t multiple) {
  TS_CHECK(params_.empty() && multiple >= 1, "align_expert_runs({}) after {} parameters", multiple,
           size());
  expert_align_ = multiple;
}

// Master weights are f32 whatever the compute dtype (f64 stays f64: the CPU reference tests).
static DType master_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

size_t ParamStore::bytes_for(int64_t n, DType dtype, bool with_master, bool fp32_grads,
                             bool with_grads) {
  const DType mdt = master_dtype_for(dtype);
  return Arena::aligned(dtype_storage_bytes(dtype, n)) +
         (with_grads ? Arena::aligned(dtype_storage_bytes(grad_dtype_for(dtype, fp32_grads), n))
                     : 0) +
         (with_master && mdt != dtype ? Arena::aligned(dtype_storage_bytes(mdt, n)) : 0);
}

void ParamStore::allocate(DType dtype, Device device, Arena* arena, int64_t pad_multiple,
                          bool with_master, bool fp32_grads, bool with_grads) {
  TS_CHECK(pad_multiple >= 1, "pad_multiple {}", pad_multiple);
  dtype_ = dtype;
  grad_dtype_ = grad_dtype_for(dtype, fp32_grads);
  master_dtype_ = master_dtype_for(dtype);
  device_ = device;
  padded_elements_ = padded(num_elements_, pad_multiple);
  const size_t bytes = dtype_storage_bytes(dtype, padded_elements_);
  const size_t master_bytes = dtype_storage_bytes(master_dtype_, padded_elements_);
  Arena own;
  if (!arena) {
    own = Arena(device, bytes_needed(dtype, pad_multiple, with_master, fp32_grads, with_grads),
                "parameters");
    arena = &own;
  }
  values_ = arena->alloc_bytes(bytes);
  grads_ =
      with_grads ? arena->alloc_bytes(dtype_storage_bytes(grad_dtype_, padded_elements_)) : nullptr;
  if (master_dtype_ == dtype)
    master_ = values_;  // f32 compute: the values are the masters
  else
    master_ = with_master ? arena->alloc_bytes(master_bytes) : nullptr;
  if (own.capacity() > 0) owned_ = own.take_buffer();
  for (Param& p : params_) {
    const int64_t off = static_cast<int64_t>(p.offset), end = off + p.spec.shape.numel();
    p.value = flat_values().slice(off, end).view(p.spec.shape);
    p.grad = has_grads() ? flat_grads().slice(off, end).view(p.spec.shape) : Tensor();
    p.master = has_master() ? flat_master().slice(off, end).view(p.spec.shape) : Tensor();
  }
  if (padded_elements_ > 0) zero_tensor(flat_values());  // the padding stays zero
  zero_grad();
}

// The local slice's elements of the full tensor, drawn by their global element indices: the full
// tensor is (outer, G, inner) around shard_dim and this rank holds [offset, offset + L) of G.
static void draw_normal_slice(const ParamSpec& spec, uint64_t seed, float* out) {
  const CounterRng rng(seed, spec.name);
  const Shape full = spec.full_shape();
  if (!spec.tp_sharded()) {
    rng.fill_normal(out, 0, uint64_t(full.numel()), spec.init_std);
    return;
  }
  const int d = spec.shard_dim;
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < d; ++i) outer *= full.dims[i];
  for (int i = d + 1; i < full.ndim; ++i) inner *= full.dims[i];
  const int64_t G = full.dims[d], L = spec.shape.dims[d];
  TS_CHECK(spec.shard_offset + L <= G, "{}: slice [{}, {}) of {}", spec.name, spec.shard_offset,
           spec.shard_offset + L, G);
  for (int64_t o = 0; o < outer; ++o)
    rng.fill_normal(out + o * L * inner, uint64_t((o * G + spec.shard_offset) * inner),
                    uint64_t(L * inner), spec.init_std);
}

void ParamStore::init(uint64_t seed) {
  // Draw on the host in f32 (the master precision), convert to the master dtype, upload.
  for (int idx = 0; idx < size(); ++idx) {
    Param& p = params_[idx];
    const int64_t n = p.spec.shape.numel();
    std::vector<float> host(n);
    draw_init(idx, seed, host.data());
    std::vector<char> converted(dtype_storage_bytes(master_dtype_, n));
    convert_buffer(host.data(), DType::f32, converted.data(), master_dtype_, n);
    const Tensor dst = has_master() ? p.master : p.value;
    if (has_master() || master_dtype_ == dtype_) {
      copy_bytes(dst.data, device_, converted.data(), Device::cpu, converted.size());
    } else {  // no masters kept here: round straight to the compute dtype
      std::vector<char> value_bytes(dtype_storage_bytes(dtype_, n));
      convert_buffer(host.data(), DType::f32, value_bytes.data(), dtype_, n);
      copy_bytes(dst.data, device_, value_bytes.data(), Device::cpu, value_bytes.size());
    }
  }
  refresh_values();
}

void ParamStore::draw_init(int idx, uint64_t seed, float* out) const {
  const ParamSpec& spec = params_[idx].spec;
  const int64_t n = spec.shape.numel();
  switch (spec.init) {
    case InitKind::zeros: std::fill(out, out + n, 0.0f); break;
    case InitKind::ones: std::fill(out, out + n, 1.0f); break;
    case InitKind::normal: draw_normal_slice(spec, seed, out); break;
  }
}

void ParamStore::refresh_values() {
  if (has_separate_master() && padded_elements_ > 0) ops::cast(flat_values(), flat_master());
}

void ParamStore::zero_grad() {
  if (padded_elements_ > 0 && has_grads()) zero_tensor(flat_grads());
}

const Param& ParamStore::find(const std::string& name) const {
  for (const Param& p : params_)
    if (p.spec.name == name) return p;
  TS_BUG("no parameter named {}", name);
}

Tensor ParamStore::flat_values() const {
  return Tensor(values_, dtype_, device_, {padded_elements_});
}
Tensor ParamStore::flat_grads() const {
  if (!grads_) return Tensor();
  return Tensor(grads_, grad_dtype_, device_, {padded_elements_});
}
Tensor ParamStore::flat_master() const {
  return master_ ? Tensor(master_, master_dtype_, device_, {padded_elements_}) : Tensor();
}

}  // namespace tessera
