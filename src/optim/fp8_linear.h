// FP8 linear layers (precision.compute: fp8): the hybrid recipe, E4M3 for weights and
// activations and E5M2 for gradients, with per-tensor delayed scaling (optim/fp8_scaling.h) and
// the scaled FP8 GEMMs of kernels/ops_fp8.h. Parameters, gradients and everything outside the
// linear layers stay in the model's dtype (BF16); only the GEMM operands are FP8. Also serves a
// frozen model (a distillation teacher: forward only, weights quantized once, attach_frozen).
// Shape letters: M rows (= B*T), K in features, N out features.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/memory.h"
#include "model/linear.h"
#include "optim/fp8_scaling.h"

namespace tessera {

class Communicator;
class Transformer;
struct ModelConfig;
struct ModelShard;

// Every FP8 linear of one model: three scaled tensors each (input x, weight w, output gradient
// dy), the FP8 weight copies, and the scratch the quantized activations and gradients pass
// through. Scales are those of the previous steps (delayed scaling): a step quantizes with the
// scales its predecessors' amaxes produced and records its own amaxes for the next one.
class Fp8Linears final : public LinearCompute {
 public:
  Fp8Linears(Device device, const Fp8ScalingConfig& cfg);
  ~Fp8Linears() override;
  Fp8Linears(const Fp8Linears&) = delete;
  Fp8Linears& operator=(const Fp8Linears&) = delete;

  // Registers every linear of `model` (its dtype must be bf16) and finalizes: the usual setup.
  void attach(Transformer& model);

  // A frozen model instead (a distillation teacher: forward only, its weights never change; bf16
  // dtype): registers every linear of `model`, carves everything from `arena` (exactly
  // frozen_bytes() of it: the state, W8 without W8^T, one x8 scratch of `max_rows` rows, no saved
  // x^T), and quantizes each weight once, with the per-tensor scale of its own amax (agreed over
  // `tp`, so every tp layout quantizes as one process would). Its forwards record the inputs'
  // amaxes like training ones; end_forward() rolls them into the scales. It has no backward.
  void attach_frozen(Transformer& model, int64_t max_rows, Arena& arena, Communicator* tp);
  static size_t frozen_bytes(const ModelConfig& model, const ModelShard& shard, int64_t max_rows,
                             const Fp8ScalingConfig& cfg);
  // After every forward of a frozen model (it has no optimizer step to end): the inputs' amaxes
  // max-reduced over `tp` (as end_step does), then the history and the scales updated. The
  // weights' scales stay those of attach_frozen: their amaxes are never recorded again, and
  // fp8_update_scales keeps a scale whose history holds only that same amax or zeros.
  void end_forward(Communicator* tp);
  bool frozen() const { return frozen_; }

  // Registers a linear before finalize(); returns its slot. shares_input_with_previous: the
  // linear reads the x of the slot added just before it (same rows, called right after it), so
  // its x scale is that slot's and a forward or backward right after it reuses the FP8 copy.
  int add(const std::string& name, int64_t out_features, int64_t in_features,
          bool shares_input_with_previous = false);
  // Allocates the scaling state and the weight copies (2 bytes per weight element: W and W^T).
  void finalize();
  int num_layers() const { return static_cast<int>(layers_.size()); }
  const std::string& name(int slot) const { return layers_[slot].name; }

  // y = x w^T (+ bias): x and w quantized to E4M3 with their current scales.
  void forward(const Linear& l, const ParamStore& ps, Tensor out /*(M,N)*/,
               Tensor inp /*(M,K)*/) override;
  // dy quantized to E5M2 once for both products: dinp = dy w (or +=), dW += dy^T x, db += ...
  void backward(const Linear& l, ParamStore& ps, Tensor dinp /*(M,K) or empty*/,
                Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/, bool accumulate_dinp) override;
  // The two halves, for callers that overlap a tp all-reduce between them; each quantizes dy.
  void backward_input(const Linear& l, const ParamStore& ps, Tensor dinp, Tensor dout,
                      bool accumulate_dinp) override;
  void backward_weight(const Linear& l, ParamStore& ps, Tensor dout, Tensor inp) override;
  // SwiGLU's backward straight into the gate and up projections' E5M2 dy8 and dy8^T (one kernel,
  // ops::swiglu_backward_fp8), recorded for their backward calls given dgate / dup; the 16-bit
  // gradients are never written. Not with biases (bias_grad reads dout) or outside training.
  bool swiglu_backward(const Linear& gate, const Linear& up, Tensor dgate, Tensor dup, Tensor dout,
                       Tensor h, Tensor u) override;

  // Evaluation and generation quantize with the current scales but record no amax, so they do
  // not steer training's scales.
  void set_recording(bool on) {
    recording_ = on;
    x_copy_ = {};
  }

  // After the optimizer step: amaxes agreed over the groups that see the same tensors (tp ranks
  // share x and dy and split w; dp replicas see different data and must keep equal scales), then
  // the history and scales are updated and the FP8 weight copies are marked stale.
  void end_step(Communicator* tp, Communicator* dp);

  Fp8ScalingState& state() { return *state_; }
  const Fp8ScalingState& state() const { return *state_; }

 private:
  struct Layer {
    std::string name;
    int64_t out_features = 0, in_features = 0;
    size_t weight_offset = 0;    // of its W8 and W8^T in weights_
    bool weights_fresh = false;  // W8 matches the current weights and scale
    int x_owner = -1;            // the slot whose x scale (and FP8 x) this layer uses
  };
  // What the x scratch holds: x_owner's x at `data` (M rows). A follower of that group reuses
  // it in its forward; any other quantization into the scratch, a new step or a switch of
  // recording replaces or clears it. A group's leader always quantizes afresh.
  struct XCopy {
    int owner = -1;
    const void* data = nullptr;
    int64_t rows = 0;
  };
  // x^T in FP8 kept from a training forward for the weight-gradient GEMM of the backward, one per
  // group owner: the forward quantizes x once into both layouts, so the backward reads 1 byte per
  // element instead of re-quantizing 2 (what TransformerEngine saves too). `data`/`rows` name the
  // x it was made from; a backward given another x (a pipeline's other micro-batch, quantized
  // since) quantizes afresh.
  struct SavedXT {
    Buffer buf;
    const void* data = nullptr;
    int64_t rows = 0;
  };
  // A gradient quantized by swiglu_backward for `slot`, standing for the 16-bit dout at `data`
  // (M rows) that was not written; a full backward of the slot consumes it.
  struct FusedDy {
    int slot = -1;
    const void* data = nullptr;
    int64_t rows = 0;
    Buffer dy8, dy8_t;
  };
  struct DyOperands {
    Tensor dy8, dy8_t;  // (M,N), (N,M) e5m2; dy8_t empty when not asked for
  };
  // State entry `index`'s recording amax, or a discard slot in evaluation.
  Tensor amax_for(int index);
  // Grows on demand (a frozen model's is carved once: more rows are a bug); 16-byte aligned.
  Tensor scratch(int idx, DType dtype, Shape shape);
  void quantize_weight(const Linear& l, const ParamStore& ps, int slot);
  Tensor weight8(int slot, bool transposed);
  // dy8 (and dy8^T) for a backward of `slot`: the fused ones when swiglu_backward made them for
  // this dout, else quantized into scratch kDy8 (, kDy8T).
  DyOperands dout_operands(int slot, Tensor dout, bool with_transpose);
  // x8 (M,K) into scratch kX8 (recorded in XCopy) and, when x8_t is given, x8^T into it (the
  // owner's SavedXT, tagged with inp).
  void quantize_x(int slot, Tensor inp, Tensor x8_t);
  // The x8 (M,K) of the forward in scratch kX8, reused per XCopy; a recording forward also keeps
  // x8^T (K,M) in the owner's SavedXT.
  void quantize_x_forward(int slot, Tensor inp);
  // The owner's x8^T (K,M) for the backward: the forward's copy when it was made from `inp`, else
  // quantized afresh.
  Tensor x8_t_for_backward(int slot, Tensor inp);
  Tensor saved_x_t(int owner, int64_t rows);  // the owner's (K,rows) buffer, grown on demand
  int x_state(int slot) const;
  // What attach_frozen carves from its arena, each piece Arena-aligned.
  struct FrozenSizes {
    size_t state = 0, weights = 0, x8 = 0, discard = 0;
    size_t total() const;
  };
  FrozenSizes frozen_sizes(int64_t max_rows) const;
  void check_not_frozen(const char* what) const;

  // A scratch buffer: its own allocation, or (frozen) a fixed piece of the model's arena.
  struct Scratch {
    Buffer owned;
    void* data = nullptr;
    size_t size = 0;
  };

  Device device_;
  Fp8ScalingConfig cfg_;
  std::vector<Layer> layers_;
  std::unique_ptr<Fp8ScalingState> state_;
  Buffer weights_;                  // W8 (N,K) then W8^T (K,N) per layer (frozen: W8 only)
  char* weights_base_ = nullptr;    // weights_'s data, or the frozen model's arena piece
  Buffer discard_;                  // (1) f32 amax sink for evaluation
  Tensor discard_amax_;             // (1) f32: discard_'s, or the frozen model's arena piece
  std::vector<Scratch> scratch_;    // x8, dy8, dy8^T
  std::vector<SavedXT> saved_x_t_;  // by slot; only group owners' are used
  FusedDy fused_[2];                // gate's and up's, from swiglu_backward
  bool recording_ = true;
  bool frozen_ = false;  // attach_frozen: forward only, weights quantized once, memory in an arena
  XCopy x_copy_;
};

}  // namespace tessera
