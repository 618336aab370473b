// QatLinears: slot bookkeeping (one per quantized weight: block linears and routed experts), the
// W_fq copies (quantized once per invalidate(), i.e. once per optimizer step, and reused by every
// micro-batch), the per-token input quantization with its reuse by followers (k and v after q, up
// after gate), the tp max-reduce of row scales, and the GEMMs of the straight-through linear.
#include "optim/qat_linear.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/ops.h"
#include "model/transformer.h"
#include "parallel/communicator.h"

namespace tessera {

namespace {

// The kind of a block linear, from its weight's name (layers.N.attn.wq.weight, layers.N.mlp.fc,
// layers.N.moe.shared.down, ...).
QatLayer linear_kind(const std::string& name) {
  if (name.find(".attn.") != std::string::npos) return QatLayer::attention;
  if (name.find(".moe.shared.") != std::string::npos) return QatLayer::shared_experts;
  TS_CHECK(name.find(".mlp.") != std::string::npos, "QAT: linear {} of no known kind", name);
  return QatLayer::mlp;
}

}  // namespace

QatLinears::QatLinears(const QatConfig& cfg, Device device, std::string recipe_file)
    : cfg_(cfg), device_(device), recipe_file_(std::move(recipe_file)) {
  TS_CHECK(cfg.enabled(), "QatLinears without qat.weights");
  TS_CHECK(cfg.group_size >= 0, "QatLinears with an unresolved group_size {}", cfg.group_size);
  bits_ = cfg.weights == QatBits::int8 ? quant::IntBits::int8 : quant::IntBits::int4;
}

void QatLinears::attach(Transformer& model) {
  ParamStore& ps = model.params();
  const ModelShard& shard = model.shard();
  model.for_each_linear([&](Linear& l) {
    const std::string& name = ps[l.weight].spec.name;
    const QatLayer kind = linear_kind(name);
    if (!cfg_.quantizes(kind)) return;
    // A row-parallel weight is split along K (its columns) over tp.
    const bool row_split = shard.tp_size > 1 && ps[l.weight].spec.shard_dim == 1;
    add(l, ps, name, kind, row_split ? shard.tp_comm : nullptr);
  });
  if (!cfg_.quantizes(QatLayer::experts)) return;
  expert_slot_.assign(ps.size(), -1);
  model.for_each_moe([&](Moe& moe) {
    moe.for_each_expert_weight([&](int param) {
      const Tensor w = ps[param].value;  // (El, rows, cols): groups along cols
      expert_slot_[param] = add_slot(ps[param].spec.name, QatLayer::experts, param, w, w.dim(-1),
                                     nullptr);  // routed experts are whole on every tp rank
    });
    moe.set_expert_compute(this);
  });
}

int QatLinears::add(Linear& l, const ParamStore& ps, const std::string& name, QatLayer kind,
                    Communicator* tp_row) {
  const Tensor w = ps[l.weight].value;
  TS_CHECK(!w.empty() && w.ndim() == 2 && w.dim(1) == l.in_features,
           "QatLinears::add({}): weight {} is not allocated as (N, {})", name, w.str(),
           l.in_features);
  const int prev = slots_.empty() ? -1 : int(slots_.size()) - 1;
  const int slot = add_slot(name, kind, l.weight, w, l.in_features, tp_row);
  if (l.shares_input_with_previous && prev >= 0 && slots_[prev].cols == l.in_features)
    slots_[slot].x_owner = slots_[prev].x_owner;
  l.compute = this;
  l.compute_slot = slot;
  return slot;
}

void QatLinears::check_group(const std::string& name, QatLayer kind, int64_t cols) const {
  if (cfg_.group_size == 0 || cols % cfg_.group_size == 0) return;
  TS_USER_ERROR(
      "{}: qat.group_size = {} does not divide the {} input features of {} on this rank (a "
      "row-parallel layer holds K / tp of them under tensor parallelism); choose a group_size "
      "that divides {}, or leave '{}' out of qat.layers",
      recipe_file_, cfg_.group_size, cols, name, cols, to_string(kind));
}

int QatLinears::add_slot(const std::string& name, QatLayer kind, int param, const Tensor& value,
                         int64_t cols, Communicator* tp_row) {
  check_group(name, kind, cols);
  Slot s;
  s.name = name;
  s.param = param;
  s.cols = cols;
  s.rows = value.numel() / cols;
  s.tp_row = tp_row;
  s.x_owner = int(slots_.size());
  s.copy = Buffer(device_, std::max<size_t>(value.nbytes(), 1));
  slots_.push_back(std::move(s));
  return int(slots_.size()) - 1;
}

void QatLinears::invalidate() {
  for (Slot& s : slots_) s.fresh = false;
  x_copy_ = {};
}

Tensor QatLinears::scratch(Buffer& buf, DType dtype, Shape shape) {
  const size_t need = std::max<size_t>(dtype_storage_bytes(dtype, shape.numel()), 1);
  if (buf.size() < need) {
    buf = Buffer(device_, need);
    x_copy_ = {};  // it may have lived there
  }
  return Tensor(buf.data(), dtype, device_, shape);
}

void QatLinears::quantize(Tensor out, Tensor in, quant::IntBits bits, int64_t group,
                          Communicator* tp) {
  if (!tp) return ops::fake_quantize(out, in, bits, group);
  // One scale per row of the whole layer: the max of every tp rank's part of the row.
  const Tensor amax = scratch(amax_buf_, DType::f32, Shape{in.dim(0)});
  ops::row_absmax(amax, in);
  tp->all_reduce(amax, ReduceOp::max);
  ops::fake_quantize(out, in, bits, group, amax);
}

Tensor QatLinears::quantized_weight(const ParamStore& ps, int slot) {
  Slot& s = slots_[slot];
  const Tensor w = ps[s.param].value;
  TS_CHECK(w.nbytes() <= s.copy.size() && w.numel() == s.rows * s.cols,
           "QAT slot {}: weight {} does not match its copy", s.name, w.str());
  const Tensor copy(s.copy.data(), w.dtype, w.device, w.shape);
  if (!s.fresh) {
    // Per-channel int8 scales of a row-parallel weight span its tp ranks.
    quantize(copy.view({s.rows, s.cols}), w.view({s.rows, s.cols}), bits_, cfg_.group_for(s.cols),
             cfg_.group_size == 0 ? s.tp_row : nullptr);
    s.fresh = true;
  }
  return copy;
}

Tensor QatLinears::quantized_input(int slot, Tensor inp) {
  if (cfg_.activations == QatActivations::none) return inp;
  const Slot& s = slots_[slot];
  const int64_t M = inp.numel() / s.cols;
  // A follower reads the very x its group's leader quantized just before it (Linear's contract
  // for shares_input_with_previous); the leader always quantizes afresh.
  if (s.x_owner != slot && x_copy_.owner == s.x_owner && x_copy_.data == inp.data &&
      x_copy_.rows == M)
    return Tensor(x_buf_.data(), inp.dtype, inp.device, inp.shape);
  const Tensor x = scratch(x_buf_, inp.dtype, inp.shape);
  quantize(x.view({M, s.cols}), inp.view({M, s.cols}), quant::IntBits::int8, s.cols, s.tp_row);
  x_copy_ = {s.x_owner, inp.data, M};
  return x;
}

void QatLinears::forward(const Linear& l, const ParamStore& ps, Tensor out, Tensor inp) {
  const Tensor bias = l.add_bias ? param_value(ps, l.bias) : Tensor();
  if (!active_) return ops::matmul_forward(out, inp, ps[l.weight].value, bias);
  const Tensor w = quantized_weight(ps, l.compute_slot);
  ops::matmul_forward(out, quantized_input(l.compute_slot, inp), w, bias);
}

void QatLinears::backward(const Linear& l, ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp,
                          bool accumulate_dinp) {
  // As Linear's own: the weight gradient first, then the input gradient.
  backward_weight(l, ps, dout, inp);
  if (!dinp.empty()) backward_input(l, ps, dinp, dout, accumulate_dinp);
}

void QatLinears::backward_input(const Linear& l, const ParamStore& ps, Tensor dinp, Tensor dout,
                                bool accumulate_dinp) {
  // Straight through x_fq: d/dx := d/dx_fq = dout W_fq.
  const Tensor w = active_ ? quantized_weight(ps, l.compute_slot) : ps[l.weight].value;
  ops::gemm(dinp, dout, w, false, false, 1.0f, accumulate_dinp ? 1.0f : 0.0f);
}

void QatLinears::backward_weight(const Linear& l, ParamStore& ps, Tensor dout, Tensor inp) {
  // Straight through W_fq: dW += dout^T x_fq (the x the forward's GEMM read).
  if (!active_)
    return ops::matmul_backward(Tensor(), ps[l.weight].grad, param_grad(ps, l.bias), dout, inp,
                                ps[l.weight].value);
  const Tensor w = quantized_weight(ps, l.compute_slot);
  ops::matmul_backward(Tensor(), ps[l.weight].grad, param_grad(ps, l.bias), dout,
                       quantized_input(l.compute_slot, inp), w);
}

Tensor QatLinears::expert_weight(const ParamStore& ps, int param) {
  if (!active_) return ps[param].value;
  TS_CHECK(param >= 0 && param < int(expert_slot_.size()) && expert_slot_[param] >= 0,
           "QAT: parameter {} is not a registered expert weight", param);
  return quantized_weight(ps, expert_slot_[param]);
}

void QatLinears::expert_input(Tensor x) {
  if (!active_ || cfg_.activations == QatActivations::none) return;
  ops::fake_quantize(x, x, quant::IntBits::int8, x.dim(-1));  // per row (token), in place
}

}  // namespace tessera
