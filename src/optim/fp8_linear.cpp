// Fp8Linears: slot bookkeeping, the FP8 weight copies (quantized once per optimizer step, reused
// by every micro-batch; a frozen model's once at attach), scratch for quantized activations and
// gradients, and the three GEMMs.
#include "optim/fp8_linear.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/ops.h"
#include "kernels/ops_fp8.h"
#include "model/transformer.h"
#include "parallel/communicator.h"

namespace tessera {

namespace {
constexpr int kX = 0, kW = 1, kDy = 2;                        // the three scaled tensors of a layer
constexpr int kX8 = 0, kDy8 = 1, kDy8T = 2, kNumScratch = 3;  // scratch buffers
constexpr size_t kAlign = 256;  // cuBLASLt FP8 wants 16-byte aligned operands
size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int state_index(int slot, int which) { return 3 * slot + which; }
}  // namespace

Fp8Linears::Fp8Linears(Device device, const Fp8ScalingConfig& cfg) : device_(device), cfg_(cfg) {
  validate_fp8_scaling_config(cfg, "precision.fp8");
}

Fp8Linears::~Fp8Linears() = default;

size_t Fp8Linears::FrozenSizes::total() const {
  return Arena::aligned(state) + Arena::aligned(weights) + Arena::aligned(x8) +
         Arena::aligned(discard);
}

Fp8Linears::FrozenSizes Fp8Linears::frozen_sizes(int64_t max_rows) const {
  FrozenSizes z;
  z.state = Fp8ScalingState::bytes_for(3 * int64_t(layers_.size()), cfg_);
  int64_t max_k = 0;
  for (const Layer& l : layers_) {
    z.weights += aligned(size_t(l.out_features * l.in_features));  // W8 only: no backward
    max_k = std::max<int64_t>(max_k, l.in_features);
  }
  z.x8 = aligned(dtype_storage_bytes(DType::e4m3, max_rows * max_k));
  z.discard = kAlign;
  return z;
}

size_t Fp8Linears::frozen_bytes(const ModelConfig& model, const ModelShard& shard, int64_t max_rows,
                                const Fp8ScalingConfig& cfg) {
  Fp8Linears plan(Device::cpu, cfg);  // registers only: nothing allocated
  for (const Transformer::LinearDecl& l : Transformer::declared_linears(model, shard))
    plan.add(l.name, l.out_features, l.in_features, l.shares_input_with_previous);
  return plan.frozen_sizes(max_rows).total();
}

void Fp8Linears::attach_frozen(Transformer& model, int64_t max_rows, Arena& arena,
                               Communicator* tp) {
  TS_CHECK(!state_, "Fp8Linears::attach_frozen after finalize");
  TS_CHECK(model.dtype() == DType::bf16, "a frozen FP8 model is bf16 outside its GEMMs, not {}",
           dtype_name(model.dtype()));
  std::vector<const Linear*> linears;
  model.for_each_linear([&](Linear& l) {
    l.compute = this;
    l.compute_slot = add(model.params()[l.weight].spec.name, l.out_features, l.in_features,
                         l.shares_input_with_previous);
    linears.push_back(&l);
  });
  frozen_ = true;
  const FrozenSizes z = frozen_sizes(max_rows);
  std::vector<DType> formats;
  size_t offset = 0;
  for (Layer& l : layers_) {
    formats.insert(formats.end(), {DType::e4m3, DType::e4m3, DType::e5m2});
    l.weight_offset = offset;
    offset += aligned(size_t(l.out_features * l.in_features));
  }
  state_ = std::make_unique<Fp8ScalingState>(device_, formats, cfg_, &arena);
  weights_base_ = static_cast<char*>(arena.alloc_bytes(z.weights));
  scratch_.resize(kNumScratch);
  scratch_[kX8].data = arena.alloc_bytes(z.x8);
  scratch_[kX8].size = z.x8;
  discard_amax_ = Tensor(arena.alloc_bytes(z.discard), DType::f32, device_, Shape{1});
  saved_x_t_.resize(layers_.size());
  // Each weight's amax (a quantization with scale 1 whose codes are overwritten below), agreed
  // over tp; update() turns it into the scale (the inputs' amaxes are 0: their scales stay 1);
  // then the copy the forwards read, its amax not recorded again.
  for (size_t s = 0; s < linears.size(); ++s) {
    const int w = state_index(int(s), kW);
    ops::fp8_quantize(weight8(int(s), false), Tensor(), state_->amax(w),
                      model.params()[linears[s]->weight].value, state_->scale(w));
  }
  state_->reduce_amax(tp);
  state_->update();
  for (size_t s = 0; s < linears.size(); ++s) {
    const int w = state_index(int(s), kW);
    ops::fp8_quantize(weight8(int(s), false), Tensor(), discard_amax_,
                      model.params()[linears[s]->weight].value, state_->scale(w));
    layers_[s].weights_fresh = true;
  }
}

void Fp8Linears::end_forward(Communicator* tp) {
  TS_CHECK(frozen_, "Fp8Linears::end_forward is for a frozen model; training ends with end_step");
  state_->reduce_amax(tp);
  state_->update();
  x_copy_ = {};
}

void Fp8Linears::check_not_frozen(const char* what) const {
  TS_CHECK(!frozen_, "Fp8Linears::{} on a frozen model (forward only)", what);
}

void Fp8Linears::attach(Transformer& model) {
  if (model.dtype() != DType::bf16)
    TS_USER_ERROR(
        "precision.compute fp8 keeps the model in bf16 outside the FP8 GEMMs; this "
        "model is {}",
        dtype_name(model.dtype()));
  model.for_each_linear([&](Linear& l) {
    l.compute = this;
    l.compute_slot = add(model.params()[l.weight].spec.name, l.out_features, l.in_features,
                         l.shares_input_with_previous);
  });
  finalize();
}

int Fp8Linears::add(const std::string& name, int64_t out_features, int64_t in_features,
                    bool shares_input_with_previous) {
  TS_CHECK(!state_, "Fp8Linears::add({}) after finalize", name);
  const int slot = num_layers();
  int x_owner = slot;
  if (shares_input_with_previous) {
    TS_CHECK(slot > 0 && layers_.back().in_features == in_features,
             "Fp8Linears::add({}): shares its input with the previous linear, which has {} input "
             "features, not {}",
             name, slot > 0 ? layers_.back().in_features : 0, in_features);
    x_owner = layers_.back().x_owner;
  }
  layers_.push_back({name, out_features, in_features});
  layers_.back().x_owner = x_owner;
  return slot;
}

// A follower's x state entry (3 * slot + kX) stays unused: its amax is never recorded, so its
// scale stays 1; the checkpoint layout keeps three entries per slot all the same.
int Fp8Linears::x_state(int slot) const { return state_index(layers_[slot].x_owner, kX); }

void Fp8Linears::quantize_x(int slot, Tensor inp, Tensor x8_t) {
  const int owner = layers_[slot].x_owner;
  const int64_t K = layers_[slot].in_features, M = inp.numel() / K;
  ops::fp8_quantize(scratch(kX8, DType::e4m3, Shape{M, K}), x8_t, amax_for(x_state(slot)),
                    inp.view({M, K}), state_->scale(x_state(slot)));
  x_copy_ = {owner, inp.data, M};
  if (!x8_t.empty()) saved_x_t_[owner].data = inp.data, saved_x_t_[owner].rows = M;
}

void Fp8Linears::quantize_x_forward(int slot, Tensor inp) {
  const int owner = layers_[slot].x_owner;
  const int64_t M = inp.numel() / layers_[slot].in_features;
  const bool reuse =
      owner != slot && x_copy_.owner == owner && x_copy_.data == inp.data && x_copy_.rows == M;
  if (reuse) return;
  // Only training forwards are followed by a backward; evaluation and a frozen model keep no x^T.
  quantize_x(slot, inp, recording_ && !frozen_ ? saved_x_t(owner, M) : Tensor());
}

Tensor Fp8Linears::x8_t_for_backward(int slot, Tensor inp) {
  const int owner = layers_[slot].x_owner;
  const int64_t M = inp.numel() / layers_[slot].in_features;
  Tensor x8_t = saved_x_t(owner, M);
  const SavedXT& saved = saved_x_t_[owner];
  if (saved.data == inp.data && saved.rows == M) return x8_t;
  // With the forward's scale (scales change only in end_step): the FP8 values the forward used.
  quantize_x(slot, inp, x8_t);
  return x8_t;
}

Tensor Fp8Linears::saved_x_t(int owner, int64_t rows) {
  const int64_t K = layers_[owner].in_features;
  SavedXT& saved = saved_x_t_[owner];
  const size_t need = aligned(dtype_storage_bytes(DType::e4m3, rows * K));
  if (saved.buf.size() < need) saved = {Buffer(device_, need), nullptr, 0};
  return Tensor(saved.buf.data(), DType::e4m3, device_, Shape{K, rows});
}

void Fp8Linears::finalize() {
  TS_CHECK(!state_, "Fp8Linears finalized twice");
  std::vector<DType> formats;
  size_t bytes = 0;
  for (Layer& l : layers_) {
    formats.insert(formats.end(), {DType::e4m3, DType::e4m3, DType::e5m2});
    l.weight_offset = bytes;
    bytes += 2 * aligned(size_t(l.out_features * l.in_features));
  }
  state_ = std::make_unique<Fp8ScalingState>(device_, formats, cfg_);
  weights_ = Buffer(device_, std::max<size_t>(bytes, kAlign));
  weights_base_ = static_cast<char*>(weights_.data());
  discard_ = Buffer(device_, kAlign);
  discard_amax_ = Tensor(discard_.data(), DType::f32, device_, Shape{1});
  scratch_.resize(kNumScratch);
  saved_x_t_.resize(layers_.size());
}

Tensor Fp8Linears::amax_for(int index) {
  if (recording_) return state_->amax(index);
  return discard_amax_;
}

Tensor Fp8Linears::scratch(int idx, DType dtype, Shape shape) {
  const size_t need = aligned(dtype_storage_bytes(dtype, shape.numel()));
  Scratch& b = scratch_[idx];
  if (b.size < need) {  // grows once, at the first (largest) use
    TS_CHECK(!frozen_,
             "a frozen model's FP8 scratch {} holds {} bytes, {} asked: more rows than "
             "attach_frozen planned",
             idx, b.size, need);
    b.owned = Buffer(device_, need);
    b.data = b.owned.data();
    b.size = need;
  }
  return Tensor(b.data, dtype, device_, shape);
}

Tensor Fp8Linears::weight8(int slot, bool transposed) {
  const Layer& l = layers_[slot];
  char* base = weights_base_ + l.weight_offset;
  if (transposed) check_not_frozen("weight8(transposed)");
  if (!transposed) return Tensor(base, DType::e4m3, device_, Shape{l.out_features, l.in_features});
  return Tensor(base + aligned(size_t(l.out_features * l.in_features)), DType::e4m3, device_,
                Shape{l.in_features, l.out_features});
}

void Fp8Linears::quantize_weight(const Linear& l, const ParamStore& ps, int slot) {
  Layer& layer = layers_[slot];
  if (layer.weights_fresh) return;
  // W and W^T in one pass: the forward GEMM reads W (N,K), the input gradient W^T (K,N).
  const int w = state_index(slot, kW);
  ops::fp8_quantize(weight8(slot, false), weight8(slot, true), amax_for(w), ps[l.weight].value,
                    state_->scale(w));
  // Only a recorded quantization may be reused: evaluation's copy did not count W's amax.
  layer.weights_fresh = recording_;
}

void Fp8Linears::forward(const Linear& l, const ParamStore& ps, Tensor out, Tensor inp) {
  const int s = l.compute_slot;
  const int64_t M = inp.numel() / l.in_features;
  quantize_weight(l, ps, s);
  quantize_x_forward(s, inp);
  Tensor y = out.view({M, l.out_features});
  ops::gemm_fp8(y, scratch(kX8, DType::e4m3, Shape{M, l.in_features}), weight8(s, false),
                state_->scale_inv(x_state(s)), state_->scale_inv(state_index(s, kW)), false);
  if (l.add_bias && l.bias >= 0) ops::bias_add(y, ps[l.bias].value);
}

Fp8Linears::DyOperands Fp8Linears::dout_operands(int slot, Tensor dout, bool with_transpose) {
  const int64_t N = layers_[slot].out_features, M = dout.numel() / N;
  for (FusedDy& f : fused_)
    if (f.slot == slot && f.data == dout.data && f.rows == M)
      return {
          Tensor(f.dy8.data(), DType::e5m2, device_, Shape{M, N}),
          with_transpose ? Tensor(f.dy8_t.data(), DType::e5m2, device_, Shape{N, M}) : Tensor()};
  DyOperands d{scratch(kDy8, DType::e5m2, Shape{M, N}),
               with_transpose ? scratch(kDy8T, DType::e5m2, Shape{N, M}) : Tensor()};
  ops::fp8_quantize(d.dy8, d.dy8_t, amax_for(state_index(slot, kDy)), dout.view({M, N}),
                    state_->scale(state_index(slot, kDy)));
  return d;
}

bool Fp8Linears::swiglu_backward(const Linear& gate, const Linear& up, Tensor dgate, Tensor dup,
                                 Tensor dout, Tensor h, Tensor u) {
  check_not_frozen("swiglu_backward");
  if (!recording_ || gate.bias >= 0 || up.bias >= 0 || gate.compute_slot < 0 || up.compute_slot < 0)
    return false;
  const int64_t N = gate.out_features, M = dout.numel() / N;
  Tensor out8[2], out8_t[2];
  const Linear* lin[2] = {&gate, &up};
  const Tensor grads[2] = {dgate, dup};
  for (int i = 0; i < 2; ++i) {
    FusedDy& f = fused_[i];
    const size_t need = aligned(size_t(M * N));
    if (f.dy8.size() < need) f.dy8 = Buffer(device_, need), f.dy8_t = Buffer(device_, need);
    f.slot = lin[i]->compute_slot, f.data = grads[i].data, f.rows = M;
    out8[i] = Tensor(f.dy8.data(), DType::e5m2, device_, Shape{M, N});
    out8_t[i] = Tensor(f.dy8_t.data(), DType::e5m2, device_, Shape{N, M});
  }
  const int sg = state_index(gate.compute_slot, kDy), su = state_index(up.compute_slot, kDy);
  ops::swiglu_backward_fp8(out8[0], out8_t[0], out8[1], out8_t[1], amax_for(sg), amax_for(su),
                           dout.view({M, N}), h.view({M, N}), u.view({M, N}), state_->scale(sg),
                           state_->scale(su));
  return true;
}

void Fp8Linears::backward(const Linear& l, ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp,
                          bool accumulate_dinp) {
  check_not_frozen("backward");
  const int s = l.compute_slot;
  const int64_t M = dout.numel() / l.out_features;
  const DyOperands dy = dout_operands(s, dout, true);
  if (!dinp.empty()) {
    quantize_weight(l, ps, s);  // normally fresh from the forward
    ops::gemm_fp8(dinp.view({M, l.in_features}), dy.dy8, weight8(s, true),
                  state_->scale_inv(state_index(s, kDy)), state_->scale_inv(state_index(s, kW)),
                  accumulate_dinp);
  }
  Tensor x8_t = x8_t_for_backward(s, inp);
  ops::gemm_fp8(ps[l.weight].grad, dy.dy8_t, x8_t, state_->scale_inv(state_index(s, kDy)),
                state_->scale_inv(x_state(s)), true);
  if (l.bias >= 0) ops::bias_grad(ps[l.bias].grad, dout.view({M, l.out_features}));
  for (FusedDy& f : fused_)  // the slot's backward is complete: its fused gradient is spent
    if (f.slot == s) f.slot = -1, f.data = nullptr;
}

void Fp8Linears::backward_input(const Linear& l, const ParamStore& ps, Tensor dinp, Tensor dout,
                                bool accumulate_dinp) {
  check_not_frozen("backward_input");
  const int s = l.compute_slot;
  const int64_t M = dout.numel() / l.out_features;
  const DyOperands dy = dout_operands(s, dout, false);
  quantize_weight(l, ps, s);
  ops::gemm_fp8(dinp.view({M, l.in_features}), dy.dy8, weight8(s, true),
                state_->scale_inv(state_index(s, kDy)), state_->scale_inv(state_index(s, kW)),
                accumulate_dinp);
}

void Fp8Linears::backward_weight(const Linear& l, ParamStore& ps, Tensor dout, Tensor inp) {
  backward(l, ps, Tensor(), dout, inp, false);
}

void Fp8Linears::end_step(Communicator* tp, Communicator* dp) {
  check_not_frozen("end_step");  // would mark the weights stale: a frozen model keeps them
  state_->reduce_amax(tp);
  state_->reduce_amax(dp);
  state_->update();
  for (Layer& l : layers_) l.weights_fresh = false;  // new weights and new scales
  x_copy_ = {};
  for (SavedXT& saved : saved_x_t_) saved.data = nullptr;
  for (FusedDy& f : fused_) f.slot = -1, f.data = nullptr;
}

}  // namespace tessera
