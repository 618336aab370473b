// Linear and Norm: the two small layers every block is made of. Each holds parameter indices into
// a ParamStore and has an explicit forward/backward pair. Parameter gradients accumulate (+=).
// Shape letters: M rows (= B*T), K in features, N out features, C width.
#pragma once
#include <initializer_list>
#include <string>
#include <utility>

#include "config/model_config.h"
#include "model/model_shard.h"
#include "model/params.h"

namespace tessera {

struct Linear;

// Another way to compute a linear layer's GEMMs: FP8 with delayed scaling (optim/fp8_linear.h)
// under precision.compute: fp8, or QAT's fake-quantized weights and inputs (optim/qat_linear.h).
// The precision policy lives in src/optim; layers only call through this interface, so the model
// does not depend on it.
class LinearCompute {
 public:
  virtual ~LinearCompute() = default;
  virtual void forward(const Linear& l, const ParamStore& ps, Tensor out, Tensor inp) = 0;
  virtual void backward(const Linear& l, ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp,
                        bool accumulate_dinp) = 0;
  virtual void backward_input(const Linear& l, const ParamStore& ps, Tensor dinp, Tensor dout,
                              bool accumulate_dinp) = 0;
  virtual void backward_weight(const Linear& l, ParamStore& ps, Tensor dout, Tensor inp) = 0;
  // Optional fusion of SwiGLU's backward with what the gate and up projections' backward makes of
  // their output gradients (FP8: the E5M2 operands straight from one kernel). Returns false when
  // it does not apply: the caller then runs ops::swiglu_backward into dgate/dup. When it returns
  // true, dgate/dup are NOT written, and the next backward of `gate` given dgate and of `up` given
  // dup use the fused result instead of reading them.
  virtual bool swiglu_backward(const Linear& /*gate*/, const Linear& /*up*/, Tensor /*dgate*/,
                               Tensor /*dup*/, Tensor /*dout*/, Tensor /*h*/, Tensor /*u*/) {
    return false;
  }
};

// Tensor-parallel split of a Linear (Megatron): column-parallel splits the output features (the
// weight's rows and the bias), row-parallel splits the input features (the weight's columns; the
// bias is whole and added by tp rank 0 only, so the all-reduce of the partial outputs adds it
// once).
enum class TpSplit { none, column, row };

struct Linear {
  int weight = -1;  // (N, K) PyTorch layout; this rank's slice under tensor parallelism
  int bias = -1;    // (N) or -1
  int in_features = 0, out_features = 0;  // local (this rank's) sizes
  bool add_bias = true;                   // false on tp ranks > 0 of a row-parallel layer
  LinearCompute* compute = nullptr;       // null: the dtype's own GEMMs (kernels/ops.h)
  int compute_slot = -1;                  // this layer's index in *compute
  // Reads the same x as the linear declared just before it, in the same call order (k and v
  // after q, up after gate): FP8 quantizes that x once for the group, with one scale.
  bool shares_input_with_previous = false;

  // in/out are the full sizes; the local slice follows from split and the shard's tp rank.
  void declare(ParamStore& ps, const std::string& name, int in, int out, bool with_bias,
               float init_std, TpSplit split = TpSplit::none, const ModelShard& shard = {});
  void forward(const ParamStore& ps, Tensor out /*(M,N)*/, Tensor inp /*(M,K)*/) const;
  // dinp (M,K) is overwritten, or accumulated into when accumulate_dinp; empty skips it.
  void backward(ParamStore& ps, Tensor dinp, Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/,
                bool accumulate_dinp) const;
  // backward's two halves, for callers that overlap the input gradient's tensor-parallel
  // all-reduce with the weight gradient: dinp = dout W (or +=), then dW += dout^T inp, db += ...
  void backward_input(const ParamStore& ps, Tensor dinp /*(M,K)*/, Tensor dout /*(M,N)*/,
                      bool accumulate_dinp) const;
  void backward_weight(ParamStore& ps, Tensor dout /*(M,N)*/, Tensor inp /*(M,K)*/) const;
};

// Backward of column-parallel linears that all read the same replicated x (q/k/v; MLP gate/up):
// their input gradients sum into dx (overwritten), which is all-reduced over tp while their
// weight gradients compute. With tp = 1 each layer runs its whole backward in turn (one FP8
// quantization of its output gradient instead of two).
void column_parallel_backward(ParamStore& ps, const ModelShard& shard,
                              std::initializer_list<std::pair<const Linear*, Tensor>> layers,
                              Tensor dx /*(M,K)*/, Tensor x /*(M,K)*/);

struct Norm {
  NormKind kind = NormKind::layernorm;
  int weight = -1;  // (C)
  int bias = -1;    // (C) or -1 (layernorm only)
  float eps = 1e-5f;

  void declare(ParamStore& ps, const std::string& name, int width, NormKind k, bool with_bias,
               float epsilon, const ModelShard& shard = {});
  // mean is unused (may be empty) for RMSNorm.
  void forward(const ParamStore& ps, Tensor out, Tensor mean, Tensor rstd, Tensor inp) const;
  void backward(ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp, Tensor mean,
                Tensor rstd) const;
  // residual = a + b, then out = norm(residual): one fused pass for LayerNorm on CUDA.
  void forward_after_add(const ParamStore& ps, Tensor residual, Tensor out, Tensor mean,
                         Tensor rstd, Tensor a, Tensor b) const;
};

// Tensor for an optional parameter index (-1 -> empty tensor).
inline Tensor param_value(const ParamStore& ps, int idx) {
  return idx < 0 ? Tensor() : ps[idx].value;
}
inline Tensor param_grad(ParamStore& ps, int idx) { return idx < 0 ? Tensor() : ps[idx].grad; }

}  // namespace tessera
