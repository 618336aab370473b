// Linear and Norm: the two small layers every block is made of. Each holds parameter indices into
// a ParamStore and has an explicit forward/backward pair. Parameter gradients accumulate (+=).
// Shape letters: M rows (= B*T), K in features, N out features, C width.
#pragma once
#include <string>

#include "model/config.h"
#include "model/model_shard.h"
#include "model/params.h"

namespace tessera {

// Tensor-parallel split of a Linear (Megatron): column-parallel splits the output features (the
// weight's rows and the bias), row-parallel splits the input features (the weight's columns; the
// bias is whole and added by tp rank 0 only, so the all-reduce of the partial outputs adds it once).
enum class TpSplit { none, column, row };

struct Linear {
  int weight = -1;  // (N, K) PyTorch layout; this rank's slice under tensor parallelism
  int bias = -1;    // (N) or -1
  int in_features = 0, out_features = 0;  // local (this rank's) sizes
  bool add_bias = true;  // false on tp ranks > 0 of a row-parallel layer

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
inline Tensor param_value(const ParamStore& ps, int idx) { return idx < 0 ? Tensor() : ps[idx].value; }
inline Tensor param_grad(ParamStore& ps, int idx) { return idx < 0 ? Tensor() : ps[idx].grad; }

}  // namespace tessera
