// Linear and Norm forward/backward on top of the op contract.
#include "model/linear.h"

#include "kernels/ops.h"

namespace tessera {

void Linear::declare(ParamStore& ps, const std::string& name, int in, int out, bool with_bias,
                     float init_std, TpSplit split, const ModelShard& shard) {
  const int tp = split == TpSplit::none ? 1 : shard.tp_size;
  const int r = split == TpSplit::none ? 0 : shard.tp_rank;
  TS_CHECK((split == TpSplit::column ? out : in) % tp == 0, "{}: {}x{} split {} ways", name, out,
           in, tp);
  in_features = split == TpSplit::row ? in / tp : in;
  out_features = split == TpSplit::column ? out / tp : out;
  add_bias = !(split == TpSplit::row && r > 0);
  ParamSpec w{name + ".weight",
              {out_features, in_features},
              ParamClass::weight,
              InitKind::normal,
              init_std};
  ParamSpec b{name + ".bias", {out_features}, ParamClass::bias, InitKind::zeros, 0.0f};
  if (tp > 1) {
    w.global_shape = Shape{out, in};
    w.shard_dim = split == TpSplit::column ? 0 : 1;
    w.shard_offset = int64_t(r) * (split == TpSplit::column ? out_features : in_features);
    if (split == TpSplit::column) {
      b.global_shape = Shape{out};
      b.shard_dim = 0;
      b.shard_offset = int64_t(r) * out_features;
    } else {
      b.owner = r == 0;  // replicated: every tp rank computes the same full gradient
    }
  }
  weight = ps.add(std::move(w));
  bias = with_bias ? ps.add(std::move(b)) : -1;
}

void Linear::forward(const ParamStore& ps, Tensor out, Tensor inp) const {
  if (compute) return compute->forward(*this, ps, out, inp);
  ops::matmul_forward(out, inp, ps[weight].value, add_bias ? param_value(ps, bias) : Tensor());
}

void Linear::backward(ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp,
                      bool accumulate_dinp) const {
  // dW += dout^T inp and db += colsum(dout) through matmul_backward; dinp separately through gemm
  // so that several branches (q, k, v) can sum into one input gradient without a scratch pass.
  if (compute) return compute->backward(*this, ps, dinp, dout, inp, accumulate_dinp);
  backward_weight(ps, dout, inp);
  if (!dinp.empty()) backward_input(ps, dinp, dout, accumulate_dinp);
}

void Linear::backward_input(const ParamStore& ps, Tensor dinp, Tensor dout,
                            bool accumulate_dinp) const {
  if (compute) return compute->backward_input(*this, ps, dinp, dout, accumulate_dinp);
  ops::gemm(dinp, dout, ps[weight].value, false, false, 1.0f, accumulate_dinp ? 1.0f : 0.0f);
}

void Linear::backward_weight(ParamStore& ps, Tensor dout, Tensor inp) const {
  if (compute) return compute->backward_weight(*this, ps, dout, inp);
  ops::matmul_backward(Tensor(), ps[weight].grad, param_grad(ps, bias), dout, inp,
                       ps[weight].value);
}

void column_parallel_backward(ParamStore& ps, const ModelShard& shard,
                              std::initializer_list<std::pair<const Linear*, Tensor>> layers,
                              Tensor dx, Tensor x) {
  if (shard.tp_size == 1) {
    bool first = true;
    for (const auto& [l, dout] : layers) {
      l->backward(ps, dx, dout, x, !first);
      first = false;
    }
    return;
  }
  bool first = true;
  for (const auto& [l, dout] : layers) {
    l->backward_input(ps, dx, dout, !first);
    first = false;
  }
  CommHandle dx_sum = copy_to_tp_region_backward_async(shard, dx);
  for (const auto& [l, dout] : layers) l->backward_weight(ps, dout, x);
  dx_sum->wait();
}

void Norm::declare(ParamStore& ps, const std::string& name, int width, NormKind k, bool with_bias,
                   float epsilon, const ModelShard& shard) {
  kind = k;
  eps = epsilon;
  // Norms act on the replicated residual stream: every tp rank holds them whole and computes the
  // same gradient, so tp rank 0 owns them.
  ParamSpec w{name + ".weight", {width}, ParamClass::norm, InitKind::ones, 0.0f};
  w.owner = shard.tp_rank == 0;
  ParamSpec b{name + ".bias", {width}, ParamClass::norm, InitKind::zeros, 0.0f};
  b.owner = shard.tp_rank == 0;
  weight = ps.add(std::move(w));
  const bool has_bias = with_bias && k == NormKind::layernorm;
  bias = has_bias ? ps.add(std::move(b)) : -1;
}

void Norm::forward(const ParamStore& ps, Tensor out, Tensor mean, Tensor rstd, Tensor inp) const {
  if (kind == NormKind::layernorm)
    ops::layernorm_forward(out, mean, rstd, inp, ps[weight].value, param_value(ps, bias), eps);
  else
    ops::rmsnorm_forward(out, rstd, inp, ps[weight].value, eps);
}

void Norm::forward_after_add(const ParamStore& ps, Tensor residual, Tensor out, Tensor mean,
                             Tensor rstd, Tensor a, Tensor b) const {
  if (kind == NormKind::layernorm) {
    ops::add_layernorm_forward(residual, out, mean, rstd, a, b, ps[weight].value,
                               param_value(ps, bias), eps);
  } else {
    ops::add_forward(residual, a, b);
    ops::rmsnorm_forward(out, rstd, residual, ps[weight].value, eps);
  }
}

void Norm::backward(ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp, Tensor mean,
                    Tensor rstd) const {
  if (kind == NormKind::layernorm)
    ops::layernorm_backward(dinp, ps[weight].grad, param_grad(ps, bias), dout, inp,
                            ps[weight].value, mean, rstd);
  else
    ops::rmsnorm_backward(dinp, ps[weight].grad, dout, inp, ps[weight].value, rstd);
}

}  // namespace tessera
