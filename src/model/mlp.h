// Feed-forward layer: GELU MLP (fc -> gelu -> proj, GPT-2) or SwiGLU (down(silu(gate x) * up x),
// Llama/Qwen). Shape letters: N rows (= B*T), C width, F FFN width.
#pragma once
#include "core/memory.h"
#include "model/linear.h"

namespace tessera {

struct MlpActs {
  Tensor h;    // (N,F) gelu: fc output (pre-activation); swiglu: gate projection
  Tensor up;   // (N,F) swiglu only
  Tensor act;  // (N,F) activation output, input of the last projection
};

struct MlpScratch {
  Tensor d_act;  // (N,F)
  Tensor d_h;    // (N,F)
  Tensor d_up;   // (N,F) swiglu only
};

class Mlp {
 public:
  // cfg is the whole model; under tensor parallelism this rank holds F/tp FFN columns.
  void declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
               const ModelShard& shard = {});
  // Activation sizes come from a LOCAL config (ffn_hidden already divided by tp).
  static MlpActs alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N);
  static MlpScratch alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N);

  void forward(const ParamStore& ps, MlpActs& a, Tensor y /*(N,C)*/, Tensor x /*(N,C)*/) const;
  // dx (N,C) is overwritten.
  void backward(ParamStore& ps, const MlpActs& a, MlpScratch& s, Tensor dx, Tensor dy,
                Tensor x) const;
  template <class F>
  void for_each_linear(F&& f) {
    f(in_);
    if (kind_ != ActivationKind::gelu) f(up_);
    f(out_);
  }

 private:
  ActivationKind kind_ = ActivationKind::gelu;
  Linear in_;   // gelu: fc; swiglu: gate
  Linear up_;   // swiglu only
  Linear out_;  // gelu: proj; swiglu: down (row-parallel; the others column-parallel)
  ModelShard shard_;
};

}  // namespace tessera
