// Quantization-aware training (the recipe's `qat:` section, docs/QAT.md): the linears' GEMMs read
// fake-quantized weights W_fq = dequant(quant(W)) (int8 or int4, the exporters' rules,
// kernels/quant_math.h) and, when asked, inputs fake-quantized per token; the backward is the
// straight-through estimator (d/dW := d/dW_fq, d/dx := d/dx_fq). Attached through the model's
// pluggable computations: LinearCompute for every block linear, ExpertCompute for the routed
// experts' grouped GEMMs. Parameters, gradients and the optimizer are untouched.
// Shape letters: M rows (= B*T), K in features, N out features.
#pragma once
#include <string>
#include <vector>

#include "config/qat_config.h"
#include "core/memory.h"
#include "kernels/quantize.h"
#include "model/linear.h"
#include "model/moe.h"

namespace tessera {

class Communicator;
class Transformer;

class QatLinears final : public LinearCompute, public ExpertCompute {
 public:
  // recipe_file names the recipe in user errors (a layer whose K the group does not divide).
  QatLinears(const QatConfig& cfg, Device device, std::string recipe_file);
  QatLinears(const QatLinears&) = delete;
  QatLinears& operator=(const QatLinears&) = delete;

  // Attaches to the linears and routed experts of `model` that cfg.layers names (block linears by
  // kind: attention, mlp, shared_experts; routed experts: experts). Each weight's local K must be
  // a multiple of the group (user error naming the layer). Row-parallel weights under tp > 1
  // with per-channel int8 scales, and their per-token quantized inputs, take each row's amax
  // max-reduced over the model shard's tp communicator.
  void attach(Transformer& model);
  // Registers one linear (attach's building block; tests) whose weight ps[l.weight].value (N,K)
  // is allocated: quantized with one scale per qat.group_size columns of the local K (all of them
  // for 0). tp_row: the tp group whose ranks hold the other columns of each row (a row-parallel
  // layer under tp > 1: its per-channel int8 scales and per-token inputs take the row's amax over
  // it), or null. `kind` names the layer's qat.layers entry in errors. A linear flagged
  // shares_input_with_previous reuses the quantized input of the slot added just before it. Sets
  // l.compute and l.compute_slot.
  int add(Linear& l, const ParamStore& ps, const std::string& name, QatLayer kind,
          Communicator* tp_row = nullptr);
  int num_layers() const { return int(slots_.size()); }
  const std::string& name(int slot) const { return slots_[slot].name; }

  // Fake quantization on (the step is at or past qat.start_step) or off: off, every GEMM is the
  // model's own, bit for bit.
  void set_active(bool on) { active_ = on; }
  bool active() const { return active_; }
  // The weights changed (after each optimizer step, or a load): re-quantize each on its next use.
  // Between two calls every micro-batch and evaluation reuses one W_fq per weight.
  void invalidate();

  // W_fq of a slot, in the weight's dtype and shape (quantized now if stale).
  Tensor quantized_weight(const ParamStore& ps, int slot);

  // LinearCompute: y = x_fq W_fq^T (+ bias); dinp = dout W_fq (or +=); dW += dout^T x_fq,
  // db += colsum(dout). x_fq = x unless activations int8 (then quantized again in the backward,
  // giving the forward's values).
  void forward(const Linear& l, const ParamStore& ps, Tensor out /*(M,N)*/,
               Tensor inp /*(M,K)*/) override;
  void backward(const Linear& l, ParamStore& ps, Tensor dinp /*(M,K) or empty*/,
                Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/, bool accumulate_dinp) override;
  void backward_input(const Linear& l, const ParamStore& ps, Tensor dinp, Tensor dout,
                      bool accumulate_dinp) override;
  void backward_weight(const Linear& l, ParamStore& ps, Tensor dout, Tensor inp) override;

  // ExpertCompute: the routed experts' W_fq (El, rows, cols), quantized along cols; their inputs
  // fake-quantized in place per row when activations are int8.
  Tensor expert_weight(const ParamStore& ps, int param) override;
  void expert_input(Tensor x) override;

 private:
  struct Slot {
    std::string name;
    int param = -1;
    int64_t rows = 0, cols = 0;  // the weight as (rows, K)
    Communicator* tp_row =
        nullptr;       // tp group holding the rest of each row (row-parallel), or null
    int x_owner = -1;  // the slot whose quantized x a follower reuses
    Buffer copy;       // W_fq
    bool fresh = false;
  };
  // What the x scratch holds: x_owner's input at `data` (M rows), for followers (k, v after q).
  struct XCopy {
    int owner = -1;
    const void* data = nullptr;
    int64_t rows = 0;
  };
  int add_slot(const std::string& name, QatLayer kind, int param, const Tensor& value, int64_t cols,
               Communicator* tp_row);
  // inp fake-quantized per row into the x scratch (reused by a follower of the same input).
  Tensor quantized_input(int slot, Tensor inp);
  // out (R,K) = fake_quantize(in) with `group`; with `tp` (one group per row that spans the tp
  // ranks), each row's amax max-reduced over it first.
  void quantize(Tensor out, Tensor in, quant::IntBits bits, int64_t group, Communicator* tp);
  Tensor scratch(Buffer& buf, DType dtype, Shape shape);
  void check_group(const std::string& name, QatLayer kind, int64_t cols) const;

  QatConfig cfg_;
  Device device_;
  std::string recipe_file_;
  quant::IntBits bits_;
  bool active_ = false;
  std::vector<Slot> slots_;
  std::vector<int> expert_slot_;  // by parameter index, -1 for others (empty: no experts)
  Buffer x_buf_, amax_buf_;       // (M,K) quantized input, (M) f32 row amax
  XCopy x_copy_;
};

}  // namespace tessera
