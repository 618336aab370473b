// Dispatch of every op in kernels/ops.h to its backend, chosen by the device of the first tensor.
// The CUDA backend is linked only when built with TESSERA_CUDA. On the CPU, bf16/f16 operands run
// through the f32 reference kernels with CUDA's numerics (kernels/cpu/narrow.h).
#include "kernels/ops.h"

#include <algorithm>

#include "core/memory.h"

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/narrow.h"
#include "kernels/dispatch.h"
#include "kernels/op_profile.h"
#ifdef TESSERA_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#endif

namespace tessera::ops {

using detail::device_of;
using detail::no_cuda;

namespace {

// CPU bodies used by more than one entry point (the fused sequences run them step by step).
// NarrowScope (kernels/cpu/narrow.h) widens bf16/f16 operands to f32, runs the f32 reference and
// rounds the written ones back once; without a 16-bit operand it passes everything through.
void cpu_add_forward(Tensor out, Tensor a, Tensor b) {
  cpu::NarrowScope n("add_forward");
  cpu::add_forward(n.out(out, "out"), n.in(a, "a"), n.in(b, "b"));
  n.finish();
}

void cpu_layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                           Tensor bias, float eps) {
  cpu::NarrowScope n("layernorm_forward");
  cpu::layernorm_forward(n.out(out, "out"), n.stat_out(mean, "mean"), n.stat_out(rstd, "rstd"),
                         n.in(inp, "inp"), n.in(weight, "weight"), n.in(bias, "bias"), eps);
  n.finish();
}

// bias / dbias has the dtype of out / dout, or f32. Checked before NarrowScope, which widens a
// bf16 and an f16 operand alike to f32 and would hide a mismatch from the kernel's own check.
void check_bias_dtype(const Tensor& matrix, const Tensor& vector, const char* op,
                      const char* name) {
  TS_CHECK(matrix.empty() || vector.empty() || vector.dtype == matrix.dtype ||
               vector.dtype == DType::f32,
           "{}: {} is {}, expected {} or f32", op, name, vector.str(), dtype_name(matrix.dtype));
}

// param, m, v are normally the f32 master copy and state and grad f32/bf16/f16; any of them may
// be bf16/f16 here (read exactly, updated in f32, rounded once).
void cpu_adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s) {
  cpu::NarrowScope n("adamw_update");
  cpu::adamw_update(n.inout(param, "param"), n.in(grad, "grad"), n.inout(m, "m"), n.inout(v, "v"),
                    s);
  n.finish();
}
}  // namespace

void set_cuda_attention_impl(const std::string& impl) {
  TS_CHECK(impl == "cudnn" || impl == "native", "attention impl {}", impl);
#ifdef TESSERA_CUDA
  if (!cuda_available()) return;  // nothing runs on cuda here; creating a context would fail
  cuda::context().attention_impl = impl == "cudnn" ? cuda::kAttentionCudnn : cuda::kAttentionNative;
#endif
}

size_t cuda_workspace_bytes(int B, int T, int num_heads, int num_kv_heads, int head_dim,
                            DType dtype) {
#ifdef TESSERA_CUDA
  if (!cuda_available()) return 0;
  return std::max(cuda::default_workspace_bytes(),
                  cuda::attention_workspace_bytes(B, T, num_heads, num_kv_heads, head_dim, dtype));
#else
  return 0;
#endif
}

void use_cuda_workspace(void* ptr, size_t bytes) {
#ifdef TESSERA_CUDA
  cuda::use_workspace(ptr, bytes);
#else
  TS_BUG("use_cuda_workspace without a CUDA backend");
#endif
}

void synchronize(Device device) {
#ifdef TESSERA_CUDA
  if (device == Device::cuda) cuda::sync();
#endif
}

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start,
                       int64_t vocab_total) {
  const Device device = device_of({&out, &tokens, &wte, &wpe});
  const ProfileScope profile("embedding_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::embedding_forward(out, tokens, wte, wpe, vocab_start, vocab_total);
    return;
#else
    no_cuda("embedding_forward");
#endif
  }
  cpu::NarrowScope n("embedding_forward");
  cpu::embedding_forward(n.out(out, "out"), n.in(tokens, "tokens"), n.in(wte, "wte"),
                         n.in(wpe, "wpe"), vocab_start, vocab_total);
  n.finish();
}

void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                        int64_t vocab_total) {
  const Device device = device_of({&dwte, &dwpe, &dout, &tokens});
  const ProfileScope profile("embedding_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::embedding_backward(dwte, dwpe, dout, tokens, vocab_start, vocab_total);
    return;
#else
    no_cuda("embedding_backward");
#endif
  }
  cpu::NarrowScope n("embedding_backward");
  cpu::embedding_backward(n.inout(dwte, "dwte"), n.inout(dwpe, "dwpe"), n.in(dout, "dout"),
                          n.in(tokens, "tokens"), vocab_start, vocab_total);
  n.finish();
}

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias,
                       float eps) {
  const Device device = device_of({&out, &mean, &rstd, &inp, &weight, &bias});
  const ProfileScope profile("layernorm_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::layernorm_forward(out, mean, rstd, inp, weight, bias, eps);
    return;
#else
    no_cuda("layernorm_forward");
#endif
  }
  cpu_layernorm_forward(out, mean, rstd, inp, weight, bias, eps);
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd) {
  const Device device = device_of({&dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd});
  const ProfileScope profile("layernorm_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd);
    return;
#else
    no_cuda("layernorm_backward");
#endif
  }
  cpu::NarrowScope n("layernorm_backward");
  cpu::layernorm_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"), n.inout(dbias, "dbias"),
                          n.in(dout, "dout"), n.in(inp, "inp"), n.in(weight, "weight"),
                          n.stat_in(mean, "mean"), n.stat_in(rstd, "rstd"));
  n.finish();
}

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps) {
  const Device device = device_of({&out, &rstd, &inp, &weight});
  const ProfileScope profile("rmsnorm_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::rmsnorm_forward(out, rstd, inp, weight, eps);
    return;
#else
    no_cuda("rmsnorm_forward");
#endif
  }
  cpu::NarrowScope n("rmsnorm_forward");
  cpu::rmsnorm_forward(n.out(out, "out"), n.stat_out(rstd, "rstd"), n.in(inp, "inp"),
                       n.in(weight, "weight"), eps);
  n.finish();
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight,
                      Tensor rstd) {
  const Device device = device_of({&dinp, &dweight, &dout, &inp, &weight, &rstd});
  const ProfileScope profile("rmsnorm_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd);
    return;
#else
    no_cuda("rmsnorm_backward");
#endif
  }
  cpu::NarrowScope n("rmsnorm_backward");
  cpu::rmsnorm_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"), n.in(dout, "dout"),
                        n.in(inp, "inp"), n.in(weight, "weight"), n.stat_in(rstd, "rstd"));
  n.finish();
}

void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta) {
  const Device device = device_of({&c, &a, &b});
  const ProfileScope profile("gemm", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::gemm(c, a, b, trans_a, trans_b, alpha, beta);
    return;
#else
    no_cuda("gemm");
#endif
  }
  cpu::NarrowScope n("gemm");
  // beta = 0 ignores c's contents (they may be garbage), so c is only read when beta != 0.
  const Tensor c32 = beta == 0.0f ? n.out(c, "c") : n.inout(c, "c");
  cpu::gemm(c32, n.in(a, "a"), n.in(b, "b"), trans_a, trans_b, alpha, beta);
  n.finish();
}

void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias) {
  const Device device = device_of({&out, &inp, &weight, &bias});
  const ProfileScope profile("matmul_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::matmul_forward(out, inp, weight, bias);
    return;
#else
    no_cuda("matmul_forward");
#endif
  }
  cpu::NarrowScope n("matmul_forward");
  cpu::matmul_forward(n.out(out, "out"), n.in(inp, "inp"), n.in(weight, "weight"),
                      n.in(bias, "bias"));
  n.finish();
}

void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                     Tensor weight) {
  const Device device = device_of({&dinp, &dweight, &dbias, &dout, &inp, &weight});
  const ProfileScope profile("matmul_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::matmul_backward(dinp, dweight, dbias, dout, inp, weight);
    return;
#else
    no_cuda("matmul_backward");
#endif
  }
  cpu::NarrowScope n("matmul_backward");
  cpu::matmul_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"), n.inout(dbias, "dbias"),
                       n.in(dout, "dout"), n.in(inp, "inp"), n.in(weight, "weight"));
  n.finish();
}

void bias_add(Tensor out, Tensor bias) {
  const Device device = device_of({&out, &bias});
  const ProfileScope profile("bias_add", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::bias_add(out, bias);
    return;
#else
    no_cuda("bias_add");
#endif
  }
  check_bias_dtype(out, bias, "bias_add", "bias");
  cpu::NarrowScope n("bias_add");
  cpu::bias_add(n.inout(out, "out"), n.in(bias, "bias"));
  n.finish();
}

void bias_grad(Tensor dbias, Tensor dout) {
  const Device device = device_of({&dbias, &dout});
  const ProfileScope profile("bias_grad", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::bias_grad(dbias, dout);
    return;
#else
    no_cuda("bias_grad");
#endif
  }
  check_bias_dtype(dout, dbias, "bias_grad", "dbias");
  cpu::NarrowScope n("bias_grad");
  cpu::bias_grad(n.inout(dbias, "dbias"), n.in(dout, "dout"));
  n.finish();
}

void rope_forward(Tensor out, Tensor inp, float theta, int pos_offset) {
  const Device device = device_of({&out, &inp});
  const ProfileScope profile("rope_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::rope_forward(out, inp, theta, pos_offset);
    return;
#else
    no_cuda("rope_forward");
#endif
  }
  cpu::NarrowScope n("rope_forward");
  cpu::rope_forward(n.out(out, "out"), n.in(inp, "inp"), theta, pos_offset);
  n.finish();
}

void rope_backward(Tensor dinp, Tensor dout, float theta, int pos_offset) {
  const Device device = device_of({&dinp, &dout});
  const ProfileScope profile("rope_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::rope_backward(dinp, dout, theta, pos_offset);
    return;
#else
    no_cuda("rope_backward");
#endif
  }
  cpu::NarrowScope n("rope_backward");
  cpu::rope_backward(n.out(dinp, "dinp"), n.in(dout, "dout"), theta, pos_offset);
  n.finish();
}

void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale) {
  const Device device = device_of({&out, &lse, &q, &k, &v});
  const ProfileScope profile("attention_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::attention_forward(out, lse, q, k, v, scale);
    return;
#else
    no_cuda("attention_forward");
#endif
  }
  cpu::NarrowScope n("attention_forward");
  cpu::attention_forward(n.out(out, "out"), n.stat_out(lse, "lse"), n.in(q, "q"), n.in(k, "k"),
                         n.in(v, "v"), scale);
  n.finish();
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                        Tensor out, Tensor lse, float scale) {
  const Device device = device_of({&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse});
  const ProfileScope profile("attention_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, scale);
    return;
#else
    no_cuda("attention_backward");
#endif
  }
  cpu::NarrowScope n("attention_backward");
  cpu::attention_backward(n.out(dq, "dq"), n.out(dk, "dk"), n.out(dv, "dv"), n.in(dout, "dout"),
                          n.in(q, "q"), n.in(k, "k"), n.in(v, "v"), n.in(out, "out"),
                          n.stat_in(lse, "lse"), scale);
  n.finish();
}

void gelu_forward(Tensor out, Tensor inp) {
  const Device device = device_of({&out, &inp});
  const ProfileScope profile("gelu_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::gelu_forward(out, inp);
    return;
#else
    no_cuda("gelu_forward");
#endif
  }
  cpu::NarrowScope n("gelu_forward");
  cpu::gelu_forward(n.out(out, "out"), n.in(inp, "inp"));
  n.finish();
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp) {
  const Device device = device_of({&dinp, &dout, &inp});
  const ProfileScope profile("gelu_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::gelu_backward(dinp, dout, inp);
    return;
#else
    no_cuda("gelu_backward");
#endif
  }
  cpu::NarrowScope n("gelu_backward");
  cpu::gelu_backward(n.out(dinp, "dinp"), n.in(dout, "dout"), n.in(inp, "inp"));
  n.finish();
}

void swiglu_forward(Tensor out, Tensor gate, Tensor up) {
  const Device device = device_of({&out, &gate, &up});
  const ProfileScope profile("swiglu_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::swiglu_forward(out, gate, up);
    return;
#else
    no_cuda("swiglu_forward");
#endif
  }
  cpu::NarrowScope n("swiglu_forward");
  cpu::swiglu_forward(n.out(out, "out"), n.in(gate, "gate"), n.in(up, "up"));
  n.finish();
}

void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up) {
  const Device device = device_of({&dgate, &dup, &dout, &gate, &up});
  const ProfileScope profile("swiglu_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::swiglu_backward(dgate, dup, dout, gate, up);
    return;
#else
    no_cuda("swiglu_backward");
#endif
  }
  cpu::NarrowScope n("swiglu_backward");
  cpu::swiglu_backward(n.out(dgate, "dgate"), n.out(dup, "dup"), n.in(dout, "dout"),
                       n.in(gate, "gate"), n.in(up, "up"));
  n.finish();
}

void add_forward(Tensor out, Tensor a, Tensor b) {
  const Device device = device_of({&out, &a, &b});
  const ProfileScope profile("add_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::add_forward(out, a, b);
    return;
#else
    no_cuda("add_forward");
#endif
  }
  cpu_add_forward(out, a, b);
}

void add_inplace(Tensor dst, Tensor src) {
  const Device device = device_of({&dst, &src});
  const ProfileScope profile("add_inplace", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::add_inplace(dst, src);
    return;
#else
    no_cuda("add_inplace");
#endif
  }
  cpu::NarrowScope n("add_inplace");
  cpu::add_inplace(n.inout(dst, "dst"), n.in(src, "src"));
  n.finish();
}

void scale_inplace(Tensor x, float s) {
  const Device device = device_of({&x});
  const ProfileScope profile("scale_inplace", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::scale_inplace(x, s);
    return;
#else
    no_cuda("scale_inplace");
#endif
  }
  cpu::NarrowScope n("scale_inplace");
  cpu::scale_inplace(n.inout(x, "x"), s);
  n.finish();
}

void fill(Tensor x, float value) {
  const Device device = device_of({&x});
  const ProfileScope profile("fill", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::fill(x, value);
    return;
#else
    no_cuda("fill");
#endif
  }
  cpu::fill(x, value);  // takes every float dtype itself (one rounding of value)
}

void cast(Tensor dst, Tensor src) {
  const Device device = device_of({&dst, &src});
  const ProfileScope profile("cast", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cast(dst, src);
    return;
#else
    no_cuda("cast");
#endif
  }
  cpu::cast(dst, src);  // any float dtype pair, rounded once by convert_buffer
}

double sum_squares(Tensor x) {
  const Device device = device_of({&x});
  const ProfileScope profile("sum_squares", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    return cuda::sum_squares(x);

#else
    no_cuda("sum_squares");
#endif
  }
  cpu::NarrowScope n("sum_squares");
  return cpu::sum_squares(n.in(x, "x"));  // read-only: nothing to finish
}

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets,
                           int vocab_size) {
  const Device device = device_of({&losses, &lse, &logits, &targets});
  const ProfileScope profile("cross_entropy_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cross_entropy_forward(losses, lse, logits, targets, vocab_size);
    return;
#else
    no_cuda("cross_entropy_forward");
#endif
  }
  cpu::NarrowScope n("cross_entropy_forward");
  cpu::cross_entropy_forward(n.stat_out(losses, "losses"), n.stat_out(lse, "lse"),
                             n.in(logits, "logits"), n.in(targets, "targets"), vocab_size);
  n.finish();
}

void cross_entropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                            int vocab_size, float dloss, int64_t vocab_start) {
  const Device device = device_of({&dlogits, &logits, &lse, &targets});
  const ProfileScope profile("cross_entropy_backward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cross_entropy_backward(dlogits, logits, lse, targets, vocab_size, dloss, vocab_start);
    return;
#else
    no_cuda("cross_entropy_backward");
#endif
  }
  cpu::NarrowScope n("cross_entropy_backward");
  cpu::cross_entropy_backward(n.out(dlogits, "dlogits"), n.in(logits, "logits"),
                              n.stat_in(lse, "lse"), n.in(targets, "targets"), vocab_size, dloss,
                              vocab_start);
  n.finish();
}

void cross_entropy_shard_max(Tensor row_max, Tensor logits, int64_t vocab_start, int vocab_size) {
  const Device device = device_of({&row_max, &logits});
  const ProfileScope profile("cross_entropy_shard_max", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cross_entropy_shard_max(row_max, logits, vocab_start, vocab_size);
    return;
#else
    no_cuda("cross_entropy_shard_max");
#endif
  }
  cpu::NarrowScope n("cross_entropy_shard_max");
  cpu::cross_entropy_shard_max(n.stat_out(row_max, "row_max"), n.in(logits, "logits"), vocab_start,
                               vocab_size);
  n.finish();
}

void cross_entropy_shard_sums(Tensor sum_exp, Tensor target_logit, Tensor logits, Tensor row_max,
                              Tensor targets, int64_t vocab_start, int vocab_size) {
  const Device device = device_of({&sum_exp, &target_logit, &logits, &row_max, &targets});
  const ProfileScope profile("cross_entropy_shard_sums", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cross_entropy_shard_sums(sum_exp, target_logit, logits, row_max, targets, vocab_start,
                                   vocab_size);
    return;
#else
    no_cuda("cross_entropy_shard_sums");
#endif
  }
  cpu::NarrowScope n("cross_entropy_shard_sums");
  cpu::cross_entropy_shard_sums(n.stat_out(sum_exp, "sum_exp"),
                                n.stat_out(target_logit, "target_logit"), n.in(logits, "logits"),
                                n.stat_in(row_max, "row_max"), n.in(targets, "targets"),
                                vocab_start, vocab_size);
  n.finish();
}

void cross_entropy_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sum_exp,
                                Tensor target_logit, Tensor targets) {
  const Device device = device_of({&losses, &lse, &row_max, &sum_exp, &target_logit, &targets});
  const ProfileScope profile("cross_entropy_shard_finish", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::cross_entropy_shard_finish(losses, lse, row_max, sum_exp, target_logit, targets);
    return;
#else
    no_cuda("cross_entropy_shard_finish");
#endif
  }
  cpu::cross_entropy_shard_finish(losses, lse, row_max, sum_exp, target_logit, targets);
}

void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s) {
  const Device device = device_of({&param, &grad, &m, &v});
  const ProfileScope profile("adamw_update", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::adamw_update(param, grad, m, v, s);
    return;
#else
    no_cuda("adamw_update");
#endif
  }
  cpu_adamw_update(param, grad, m, v, s);
}

void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps) {
  const Device device = device_of({&residual, &out, &a, &b});
  const ProfileScope profile("add_layernorm_forward", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::add_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, eps);
    return;
#else
    no_cuda("add_layernorm_forward");
#endif
  }
  // The contract's sequence, each step rounded to its storage dtype as on CUDA: the norm reads
  // the stored (rounded) residual.
  cpu_add_forward(residual, a, b);
  cpu_layernorm_forward(out, mean, rstd, residual, weight, bias, eps);
}

void adamw_update_multi(std::span<const AdamWTensors> entries) {
  if (entries.empty()) return;
  const Device device = entries[0].param.device;
  const ProfileScope profile("adamw_update_multi", device);
  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    cuda::adamw_update_multi(entries);
    return;
#else
    no_cuda("adamw_update_multi");
#endif
  }
  for (const AdamWTensors& e : entries) cpu_adamw_update(e.param, e.grad, e.m, e.v, e.step);
}

}  // namespace tessera::ops
