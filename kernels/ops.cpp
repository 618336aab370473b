// Dispatch of every op in kernels/ops.h to its backend, chosen by the device of the first tensor,
// through kernels/dispatch.h. The CUDA backend is linked only when built with TESSERA_CUDA; it gets
// the op's stream (and attention its implementation), which the CPU ignores. On the CPU, bf16/f16
// operands run through the f32 reference kernels with CUDA's numerics (kernels/cpu/narrow.h).
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

using detail::dispatch;

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

// Two float operands of one call share a dtype. Checked before NarrowScope, which widens a bf16
// and an f16 operand alike to f32 and would hide a mismatch from the kernel's own check.
void check_same_dtype(const Tensor& first, const Tensor& other, const char* op, const char* name) {
  TS_CHECK(first.empty() || other.empty() || other.dtype == first.dtype,
           "{}: {} is {}, expected {} (float tensors of one call share a dtype)", op, name,
           other.str(), dtype_name(first.dtype));
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

size_t cuda_workspace_bytes(int B, int T, int num_heads, int num_kv_heads, int head_dim,
                            DType dtype, AttentionImpl impl) {
#ifdef TESSERA_CUDA
  if (!cuda_available()) return 0;
  return std::max(
      cuda::default_workspace_bytes(),
      cuda::attention_workspace_bytes(B, T, num_heads, num_kv_heads, head_dim, dtype, impl));
#else
  (void)impl;
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

void synchronize(Device device, Stream stream) {
#ifdef TESSERA_CUDA
  if (device == Device::cuda) cuda::sync(stream);
#else
  (void)device, (void)stream;
#endif
}

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start,
                       int64_t vocab_total, Stream stream) {
  dispatch(
      "embedding_forward", {&out, &tokens, &wte, &wpe}, stream,
      TS_ON_CUDA(cuda::embedding_forward(out, tokens, wte, wpe, vocab_start, vocab_total, stream)),
      [&](cpu::NarrowScope& n) {
        cpu::embedding_forward(n.out(out, "out"), n.in(tokens, "tokens"), n.in(wte, "wte"),
                               n.in(wpe, "wpe"), vocab_start, vocab_total);
      });
}

void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                        int64_t vocab_total, Stream stream) {
  dispatch("embedding_backward", {&dwte, &dwpe, &dout, &tokens}, stream,
           TS_ON_CUDA(cuda::embedding_backward(dwte, dwpe, dout, tokens, vocab_start, vocab_total,
                                               stream)),
           [&](cpu::NarrowScope& n) {
             cpu::embedding_backward(n.inout(dwte, "dwte"), n.inout(dwpe, "dwpe"),
                                     n.in(dout, "dout"), n.in(tokens, "tokens"), vocab_start,
                                     vocab_total);
           });
}

void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight, Tensor bias,
                       float eps, Stream stream) {
  dispatch("layernorm_forward", {&out, &mean, &rstd, &inp, &weight, &bias}, stream,
           TS_ON_CUDA(cuda::layernorm_forward(out, mean, rstd, inp, weight, bias, eps, stream)),
           [&] { cpu_layernorm_forward(out, mean, rstd, inp, weight, bias, eps); });
}

void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                        Tensor weight, Tensor mean, Tensor rstd, Stream stream) {
  dispatch("layernorm_backward", {&dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd},
           stream,
           TS_ON_CUDA(cuda::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd,
                                               stream)),
           [&](cpu::NarrowScope& n) {
             cpu::layernorm_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"),
                                     n.inout(dbias, "dbias"), n.in(dout, "dout"), n.in(inp, "inp"),
                                     n.in(weight, "weight"), n.stat_in(mean, "mean"),
                                     n.stat_in(rstd, "rstd"));
           });
}

void rmsnorm_forward(Tensor out, Tensor rstd, Tensor inp, Tensor weight, float eps, Stream stream) {
  dispatch("rmsnorm_forward", {&out, &rstd, &inp, &weight}, stream,
           TS_ON_CUDA(cuda::rmsnorm_forward(out, rstd, inp, weight, eps, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::rmsnorm_forward(n.out(out, "out"), n.stat_out(rstd, "rstd"), n.in(inp, "inp"),
                                  n.in(weight, "weight"), eps);
           });
}

void rmsnorm_backward(Tensor dinp, Tensor dweight, Tensor dout, Tensor inp, Tensor weight,
                      Tensor rstd, Stream stream) {
  dispatch("rmsnorm_backward", {&dinp, &dweight, &dout, &inp, &weight, &rstd}, stream,
           TS_ON_CUDA(cuda::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::rmsnorm_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"),
                                   n.in(dout, "dout"), n.in(inp, "inp"), n.in(weight, "weight"),
                                   n.stat_in(rstd, "rstd"));
           });
}

void gemm(Tensor c, Tensor a, Tensor b, bool trans_a, bool trans_b, float alpha, float beta,
          Stream stream) {
  dispatch("gemm", {&c, &a, &b}, stream,
           TS_ON_CUDA(cuda::gemm(c, a, b, trans_a, trans_b, alpha, beta, stream)),
           [&](cpu::NarrowScope& n) {
             // beta = 0 ignores c's contents (they may be garbage), so c is only read when
             // beta != 0.
             const Tensor c32 = beta == 0.0f ? n.out(c, "c") : n.inout(c, "c");
             cpu::gemm(c32, n.in(a, "a"), n.in(b, "b"), trans_a, trans_b, alpha, beta);
           });
}

void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias, Stream stream) {
  dispatch("matmul_forward", {&out, &inp, &weight, &bias}, stream,
           TS_ON_CUDA(cuda::matmul_forward(out, inp, weight, bias, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::matmul_forward(n.out(out, "out"), n.in(inp, "inp"), n.in(weight, "weight"),
                                 n.in(bias, "bias"));
           });
}

void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                     Tensor weight, Stream stream) {
  dispatch("matmul_backward", {&dinp, &dweight, &dbias, &dout, &inp, &weight}, stream,
           TS_ON_CUDA(cuda::matmul_backward(dinp, dweight, dbias, dout, inp, weight, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::matmul_backward(n.out(dinp, "dinp"), n.inout(dweight, "dweight"),
                                  n.inout(dbias, "dbias"), n.in(dout, "dout"), n.in(inp, "inp"),
                                  n.in(weight, "weight"));
           });
}

void bias_add(Tensor out, Tensor bias, Stream stream) {
  dispatch("bias_add", {&out, &bias}, stream, TS_ON_CUDA(cuda::bias_add(out, bias, stream)),
           [&](cpu::NarrowScope& n) {
             check_bias_dtype(out, bias, "bias_add", "bias");
             cpu::bias_add(n.inout(out, "out"), n.in(bias, "bias"));
           });
}

void bias_grad(Tensor dbias, Tensor dout, Stream stream) {
  dispatch("bias_grad", {&dbias, &dout}, stream, TS_ON_CUDA(cuda::bias_grad(dbias, dout, stream)),
           [&](cpu::NarrowScope& n) {
             check_bias_dtype(dout, dbias, "bias_grad", "dbias");
             cpu::bias_grad(n.inout(dbias, "dbias"), n.in(dout, "dout"));
           });
}

void rope_forward(Tensor out, Tensor inp, float theta, int pos_offset, Stream stream) {
  dispatch("rope_forward", {&out, &inp}, stream,
           TS_ON_CUDA(cuda::rope_forward(out, inp, theta, pos_offset, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::rope_forward(n.out(out, "out"), n.in(inp, "inp"), theta, pos_offset);
           });
}

void rope_backward(Tensor dinp, Tensor dout, float theta, int pos_offset, Stream stream) {
  dispatch("rope_backward", {&dinp, &dout}, stream,
           TS_ON_CUDA(cuda::rope_backward(dinp, dout, theta, pos_offset, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::rope_backward(n.out(dinp, "dinp"), n.in(dout, "dout"), theta, pos_offset);
           });
}

void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale,
                       AttentionImpl impl, Stream stream) {
  dispatch("attention_forward", {&out, &lse, &q, &k, &v}, stream,
           TS_ON_CUDA(cuda::attention_forward(out, lse, q, k, v, scale, impl, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::attention_forward(n.out(out, "out"), n.stat_out(lse, "lse"), n.in(q, "q"),
                                    n.in(k, "k"), n.in(v, "v"), scale);
           });
}

void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                        Tensor out, Tensor lse, float scale, AttentionImpl impl, Stream stream) {
  dispatch("attention_backward", {&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse}, stream,
           TS_ON_CUDA(
               cuda::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, scale, impl, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::attention_backward(n.out(dq, "dq"), n.out(dk, "dk"), n.out(dv, "dv"),
                                     n.in(dout, "dout"), n.in(q, "q"), n.in(k, "k"), n.in(v, "v"),
                                     n.in(out, "out"), n.stat_in(lse, "lse"), scale);
           });
}

void gelu_forward(Tensor out, Tensor inp, Stream stream) {
  dispatch("gelu_forward", {&out, &inp}, stream, TS_ON_CUDA(cuda::gelu_forward(out, inp, stream)),
           [&](cpu::NarrowScope& n) { cpu::gelu_forward(n.out(out, "out"), n.in(inp, "inp")); });
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp, Stream stream) {
  dispatch("gelu_backward", {&dinp, &dout, &inp}, stream,
           TS_ON_CUDA(cuda::gelu_backward(dinp, dout, inp, stream)), [&](cpu::NarrowScope& n) {
             cpu::gelu_backward(n.out(dinp, "dinp"), n.in(dout, "dout"), n.in(inp, "inp"));
           });
}

void swiglu_forward(Tensor out, Tensor gate, Tensor up, Stream stream) {
  dispatch("swiglu_forward", {&out, &gate, &up}, stream,
           TS_ON_CUDA(cuda::swiglu_forward(out, gate, up, stream)), [&](cpu::NarrowScope& n) {
             cpu::swiglu_forward(n.out(out, "out"), n.in(gate, "gate"), n.in(up, "up"));
           });
}

void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up, Stream stream) {
  dispatch("swiglu_backward", {&dgate, &dup, &dout, &gate, &up}, stream,
           TS_ON_CUDA(cuda::swiglu_backward(dgate, dup, dout, gate, up, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::swiglu_backward(n.out(dgate, "dgate"), n.out(dup, "dup"), n.in(dout, "dout"),
                                  n.in(gate, "gate"), n.in(up, "up"));
           });
}

void add_forward(Tensor out, Tensor a, Tensor b, Stream stream) {
  dispatch("add_forward", {&out, &a, &b}, stream, TS_ON_CUDA(cuda::add_forward(out, a, b, stream)),
           [&] { cpu_add_forward(out, a, b); });
}

void add_inplace(Tensor dst, Tensor src, Stream stream) {
  dispatch("add_inplace", {&dst, &src}, stream, TS_ON_CUDA(cuda::add_inplace(dst, src, stream)),
           [&](cpu::NarrowScope& n) { cpu::add_inplace(n.inout(dst, "dst"), n.in(src, "src")); });
}

void scale_inplace(Tensor x, float s, Stream stream) {
  dispatch("scale_inplace", {&x}, stream, TS_ON_CUDA(cuda::scale_inplace(x, s, stream)),
           [&](cpu::NarrowScope& n) { cpu::scale_inplace(n.inout(x, "x"), s); });
}

void fill(Tensor x, float value, Stream stream) {
  // The CPU fill takes every float dtype itself (one rounding of value).
  dispatch("fill", {&x}, stream, TS_ON_CUDA(cuda::fill(x, value, stream)),
           [&] { cpu::fill(x, value); });
}

void cast(Tensor dst, Tensor src, Stream stream) {
  // Any float dtype pair on the CPU, rounded once by convert_buffer.
  dispatch("cast", {&dst, &src}, stream, TS_ON_CUDA(cuda::cast(dst, src, stream)),
           [&] { cpu::cast(dst, src); });
}

double sum_squares(Tensor x, Stream stream) {
  return dispatch("sum_squares", {&x}, stream, TS_ON_CUDA(cuda::sum_squares(x, stream)),
                  [&](cpu::NarrowScope& n) { return cpu::sum_squares(n.in(x, "x")); });
}

void cross_entropy_forward(Tensor losses, Tensor lse, Tensor logits, Tensor targets, int vocab_size,
                           Stream stream) {
  dispatch(
      "cross_entropy_forward", {&losses, &lse, &logits, &targets}, stream,
      TS_ON_CUDA(cuda::cross_entropy_forward(losses, lse, logits, targets, vocab_size, stream)),
      [&](cpu::NarrowScope& n) {
        cpu::cross_entropy_forward(n.stat_out(losses, "losses"), n.stat_out(lse, "lse"),
                                   n.in(logits, "logits"), n.in(targets, "targets"), vocab_size);
      });
}

void cross_entropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                            int vocab_size, float dloss, int64_t vocab_start, Tensor addend,
                            Stream stream) {
  dispatch("cross_entropy_backward", {&dlogits, &logits, &lse, &targets, &addend}, stream,
           TS_ON_CUDA(cuda::cross_entropy_backward(dlogits, logits, lse, targets, vocab_size, dloss,
                                                   vocab_start, addend, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::cross_entropy_backward(n.out(dlogits, "dlogits"), n.in(logits, "logits"),
                                         n.stat_in(lse, "lse"), n.in(targets, "targets"),
                                         vocab_size, dloss, vocab_start, n.in(addend, "addend"));
           });
}

void cross_entropy_shard_max(Tensor row_max, Tensor logits, int64_t vocab_start, int vocab_size,
                             Stream stream) {
  dispatch(
      "cross_entropy_shard_max", {&row_max, &logits}, stream,
      TS_ON_CUDA(cuda::cross_entropy_shard_max(row_max, logits, vocab_start, vocab_size, stream)),
      [&](cpu::NarrowScope& n) {
        cpu::cross_entropy_shard_max(n.stat_out(row_max, "row_max"), n.in(logits, "logits"),
                                     vocab_start, vocab_size);
      });
}

void cross_entropy_shard_sums(Tensor sum_exp, Tensor target_logit, Tensor logits, Tensor row_max,
                              Tensor targets, int64_t vocab_start, int vocab_size, Stream stream) {
  dispatch("cross_entropy_shard_sums", {&sum_exp, &target_logit, &logits, &row_max, &targets},
           stream,
           TS_ON_CUDA(cuda::cross_entropy_shard_sums(sum_exp, target_logit, logits, row_max,
                                                     targets, vocab_start, vocab_size, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::cross_entropy_shard_sums(n.stat_out(sum_exp, "sum_exp"),
                                           n.stat_out(target_logit, "target_logit"),
                                           n.in(logits, "logits"), n.stat_in(row_max, "row_max"),
                                           n.in(targets, "targets"), vocab_start, vocab_size);
           });
}

void cross_entropy_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sum_exp,
                                Tensor target_logit, Tensor targets, Stream stream) {
  // Statistics only (f32, or f64 in f64 tests): nothing to widen.
  dispatch("cross_entropy_shard_finish",
           {&losses, &lse, &row_max, &sum_exp, &target_logit, &targets}, stream,
           TS_ON_CUDA(cuda::cross_entropy_shard_finish(losses, lse, row_max, sum_exp, target_logit,
                                                       targets, stream)),
           [&] {
             cpu::cross_entropy_shard_finish(losses, lse, row_max, sum_exp, target_logit, targets);
           });
}

void kd_loss_forward(Tensor losses, Tensor lse, Tensor student, Tensor teacher, Tensor targets,
                     int vocab_size, float temperature, bool reverse, Stream stream) {
  constexpr const char* kOp = "kd_loss_forward";
  dispatch(kOp, {&losses, &lse, &student, &teacher, &targets}, stream,
           TS_ON_CUDA(cuda::kd_loss_forward(losses, lse, student, teacher, targets, vocab_size,
                                            temperature, reverse, stream)),
           [&](cpu::NarrowScope& n) {
             check_same_dtype(student, teacher, kOp, "teacher");
             cpu::kd_loss_forward(n.stat_out(losses, "losses"), n.stat_out(lse, "lse"),
                                  n.in(student, "student"), n.in(teacher, "teacher"),
                                  n.in(targets, "targets"), vocab_size, temperature, reverse);
           });
}

void kd_loss_backward(Tensor dstudent, Tensor student, Tensor teacher, Tensor lse, Tensor losses,
                      Tensor targets, int vocab_size, float temperature, bool reverse, float dloss,
                      int64_t vocab_start, Stream stream) {
  constexpr const char* kOp = "kd_loss_backward";
  dispatch(kOp, {&dstudent, &student, &teacher, &lse, &losses, &targets}, stream,
           TS_ON_CUDA(cuda::kd_loss_backward(dstudent, student, teacher, lse, losses, targets,
                                             vocab_size, temperature, reverse, dloss, vocab_start,
                                             stream)),
           [&](cpu::NarrowScope& n) {
             check_same_dtype(student, teacher, kOp, "teacher");
             check_same_dtype(student, dstudent, kOp, "dstudent");
             cpu::kd_loss_backward(n.out(dstudent, "dstudent"), n.in(student, "student"),
                                   n.in(teacher, "teacher"), n.stat_in(lse, "lse"),
                                   n.stat_in(losses, "losses"), n.in(targets, "targets"),
                                   vocab_size, temperature, reverse, dloss, vocab_start);
           });
}

void kd_shard_max(Tensor row_max, Tensor student, Tensor teacher, int64_t vocab_start,
                  int vocab_size, float temperature, Stream stream) {
  constexpr const char* kOp = "kd_shard_max";
  dispatch(kOp, {&row_max, &student, &teacher}, stream,
           TS_ON_CUDA(cuda::kd_shard_max(row_max, student, teacher, vocab_start, vocab_size,
                                         temperature, stream)),
           [&](cpu::NarrowScope& n) {
             check_same_dtype(student, teacher, kOp, "teacher");
             cpu::kd_shard_max(n.stat_out(row_max, "row_max"), n.in(student, "student"),
                               n.in(teacher, "teacher"), vocab_start, vocab_size, temperature);
           });
}

void kd_shard_sums(Tensor sums, Tensor student, Tensor teacher, Tensor row_max, int64_t vocab_start,
                   int vocab_size, float temperature, bool reverse, Stream stream) {
  constexpr const char* kOp = "kd_shard_sums";
  dispatch(kOp, {&sums, &student, &teacher, &row_max}, stream,
           TS_ON_CUDA(cuda::kd_shard_sums(sums, student, teacher, row_max, vocab_start, vocab_size,
                                          temperature, reverse, stream)),
           [&](cpu::NarrowScope& n) {
             check_same_dtype(student, teacher, kOp, "teacher");
             cpu::kd_shard_sums(n.stat_out(sums, "sums"), n.in(student, "student"),
                                n.in(teacher, "teacher"), n.stat_in(row_max, "row_max"),
                                vocab_start, vocab_size, temperature, reverse);
           });
}

void kd_shard_finish(Tensor losses, Tensor lse, Tensor row_max, Tensor sums, Tensor targets,
                     float temperature, bool reverse, Stream stream) {
  // Statistics only (f32, or f64 in f64 tests): nothing to widen.
  dispatch(
      "kd_shard_finish", {&losses, &lse, &row_max, &sums, &targets}, stream,
      TS_ON_CUDA(
          cuda::kd_shard_finish(losses, lse, row_max, sums, targets, temperature, reverse, stream)),
      [&] { cpu::kd_shard_finish(losses, lse, row_max, sums, targets, temperature, reverse); });
}

void kd_sparse_forward(Tensor losses, Tensor stats, Tensor student, Tensor topk_logits,
                       Tensor topk_ids, Tensor teacher_lse, Tensor targets, int vocab_size,
                       float temperature, bool reverse, Stream stream) {
  dispatch(
      "kd_sparse_forward",
      {&losses, &stats, &student, &topk_logits, &topk_ids, &teacher_lse, &targets}, stream,
      TS_ON_CUDA(cuda::kd_sparse_forward(losses, stats, student, topk_logits, topk_ids, teacher_lse,
                                         targets, vocab_size, temperature, reverse, stream)),
      [&](cpu::NarrowScope& n) {
        cpu::kd_sparse_forward(n.stat_out(losses, "losses"), n.stat_out(stats, "stats"),
                               n.in(student, "student"), n.stat_in(topk_logits, "topk_logits"),
                               n.in(topk_ids, "topk_ids"), n.stat_in(teacher_lse, "teacher_lse"),
                               n.in(targets, "targets"), vocab_size, temperature, reverse);
      });
}

void kd_sparse_backward(Tensor dstudent, Tensor student, Tensor topk_logits, Tensor topk_ids,
                        Tensor teacher_lse, Tensor stats, Tensor losses, Tensor targets,
                        int vocab_size, float temperature, bool reverse, float dloss,
                        int64_t vocab_start, Stream stream) {
  constexpr const char* kOp = "kd_sparse_backward";
  dispatch(
      kOp, {&dstudent, &student, &topk_logits, &topk_ids, &teacher_lse, &stats, &losses, &targets},
      stream,
      TS_ON_CUDA(cuda::kd_sparse_backward(dstudent, student, topk_logits, topk_ids, teacher_lse,
                                          stats, losses, targets, vocab_size, temperature, reverse,
                                          dloss, vocab_start, stream)),
      [&](cpu::NarrowScope& n) {
        check_same_dtype(student, dstudent, kOp, "dstudent");
        cpu::kd_sparse_backward(n.out(dstudent, "dstudent"), n.in(student, "student"),
                                n.stat_in(topk_logits, "topk_logits"), n.in(topk_ids, "topk_ids"),
                                n.stat_in(teacher_lse, "teacher_lse"), n.stat_in(stats, "stats"),
                                n.stat_in(losses, "losses"), n.in(targets, "targets"), vocab_size,
                                temperature, reverse, dloss, vocab_start);
      });
}

void kd_sparse_shard_max(Tensor row_max, Tensor student, int64_t vocab_start, int vocab_size,
                         float temperature, Stream stream) {
  dispatch("kd_sparse_shard_max", {&row_max, &student}, stream,
           TS_ON_CUDA(cuda::kd_sparse_shard_max(row_max, student, vocab_start, vocab_size,
                                                temperature, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::kd_sparse_shard_max(n.stat_out(row_max, "row_max"), n.in(student, "student"),
                                      vocab_start, vocab_size, temperature);
           });
}

void kd_sparse_shard_sums(Tensor sums, Tensor student, Tensor topk_ids, Tensor row_max,
                          int64_t vocab_start, int vocab_size, float temperature, Stream stream) {
  dispatch("kd_sparse_shard_sums", {&sums, &student, &topk_ids, &row_max}, stream,
           TS_ON_CUDA(cuda::kd_sparse_shard_sums(sums, student, topk_ids, row_max, vocab_start,
                                                 vocab_size, temperature, stream)),
           [&](cpu::NarrowScope& n) {
             cpu::kd_sparse_shard_sums(n.stat_out(sums, "sums"), n.in(student, "student"),
                                       n.in(topk_ids, "topk_ids"), n.stat_in(row_max, "row_max"),
                                       vocab_start, vocab_size, temperature);
           });
}

void kd_sparse_shard_finish(Tensor losses, Tensor stats, Tensor row_max, Tensor sums,
                            Tensor topk_logits, Tensor teacher_lse, Tensor targets,
                            float temperature, bool reverse, Stream stream) {
  // Statistics and teacher values only (f32, or f64 in f64 tests): nothing to widen.
  dispatch(
      "kd_sparse_shard_finish",
      {&losses, &stats, &row_max, &sums, &topk_logits, &teacher_lse, &targets}, stream,
      TS_ON_CUDA(cuda::kd_sparse_shard_finish(losses, stats, row_max, sums, topk_logits,
                                              teacher_lse, targets, temperature, reverse, stream)),
      [&] {
        cpu::kd_sparse_shard_finish(losses, stats, row_max, sums, topk_logits, teacher_lse, targets,
                                    temperature, reverse);
      });
}

void topk_logits(Tensor values, Tensor ids, Tensor lse, Tensor logits, int vocab_size,
                 std::span<const float> temperatures, Stream stream) {
  dispatch(
      "topk_logits", {&values, &ids, &lse, &logits}, stream,
      TS_ON_CUDA(cuda::topk_logits(values, ids, lse, logits, vocab_size, temperatures, stream)),
      [&](cpu::NarrowScope& n) {
        // bf16/f16 logits widen exactly, so the order and the copied values are unchanged.
        cpu::topk_logits(n.stat_out(values, "values"), n.out(ids, "ids"), n.stat_out(lse, "lse"),
                         n.in(logits, "logits"), vocab_size, temperatures);
      });
}

void fake_quantize(Tensor out, Tensor in, quant::IntBits bits, int64_t group, Tensor row_amax,
                   Stream stream) {
  constexpr const char* kOp = "fake_quantize";
  dispatch(kOp, {&out, &in, &row_amax}, stream,
           TS_ON_CUDA(cuda::fake_quantize(out, in, bits, group, row_amax, stream)),
           [&](cpu::NarrowScope& n) {
             // Checked before widening: a bf16 out beside an f16 in would pass as f32 and f32.
             check_same_dtype(in, out, kOp, "out");
             // bf16/f16 widen exactly; the f32 value q * d is rounded once to out's dtype.
             cpu::fake_quantize(n.out(out, "out"), n.in(in, "in"), bits, group,
                                n.stat_in(row_amax, "row_amax"));
           });
}

void row_absmax(Tensor amax, Tensor in, Stream stream) {
  dispatch("row_absmax", {&amax, &in}, stream, TS_ON_CUDA(cuda::row_absmax(amax, in, stream)),
           [&](cpu::NarrowScope& n) { cpu::row_absmax(n.stat_out(amax, "amax"), n.in(in, "in")); });
}

void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s,
                  Stream stream) {
  dispatch("adamw_update", {&param, &grad, &m, &v}, stream,
           TS_ON_CUDA(cuda::adamw_update(param, grad, m, v, s, stream)),
           [&] { cpu_adamw_update(param, grad, m, v, s); });
}

void add_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                           Tensor b, Tensor weight, Tensor bias, float eps, Stream stream) {
  dispatch("add_layernorm_forward", {&residual, &out, &a, &b}, stream,
           TS_ON_CUDA(cuda::add_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias,
                                                  eps, stream)),
           [&] {
             // The contract's sequence, each step rounded to its storage dtype as on CUDA: the
             // norm reads the stored (rounded) residual.
             cpu_add_forward(residual, a, b);
             cpu_layernorm_forward(out, mean, rstd, residual, weight, bias, eps);
           });
}

void adamw_update_multi(std::span<const AdamWTensors> entries, Stream stream) {
  if (entries.empty()) return;
  dispatch("adamw_update_multi", entries[0].param.device, stream,
           TS_ON_CUDA(cuda::adamw_update_multi(entries, stream)), [&] {
             for (const AdamWTensors& e : entries) {
               cpu_adamw_update(e.param, e.grad, e.m, e.v, e.step);
               if (!e.value.empty()) cast(e.value, e.param);
             }
           });
}

}  // namespace tessera::ops
