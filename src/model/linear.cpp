// Linear and Norm forward/backward on top of the op contract.
#include "model/linear.h"

#include "kernels/ops.h"

namespace tessera {

void Linear::declare(ParamStore& ps, const std::string& name, int in, int out, bool with_bias,
                     float init_std) {
  in_features = in;
  out_features = out;
  weight = ps.add({name + ".weight", {out, in}, ParamClass::weight, InitKind::normal, init_std});
  bias = with_bias ? ps.add({name + ".bias", {out}, ParamClass::bias, InitKind::zeros, 0.0f}) : -1;
}

void Linear::forward(const ParamStore& ps, Tensor out, Tensor inp) const {
  ops::matmul_forward(out, inp, ps[weight].value, param_value(ps, bias));
}

void Linear::backward(ParamStore& ps, Tensor dinp, Tensor dout, Tensor inp,
                      bool accumulate_dinp) const {
  // dW += dout^T inp and db += colsum(dout) through matmul_backward; dinp separately through gemm
  // so that several branches (q, k, v) can sum into one input gradient without a scratch pass.
  ops::matmul_backward(Tensor(), ps[weight].grad, param_grad(ps, bias), dout, inp, ps[weight].value);
  if (!dinp.empty())
    ops::gemm(dinp, dout, ps[weight].value, false, false, 1.0f, accumulate_dinp ? 1.0f : 0.0f);
}

void Norm::declare(ParamStore& ps, const std::string& name, int width, NormKind k, bool with_bias,
                   float epsilon) {
  kind = k;
  eps = epsilon;
  weight = ps.add({name + ".weight", {width}, ParamClass::norm, InitKind::ones, 0.0f});
  const bool has_bias = with_bias && k == NormKind::layernorm;
  bias = has_bias ? ps.add({name + ".bias", {width}, ParamClass::norm, InitKind::zeros, 0.0f}) : -1;
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
