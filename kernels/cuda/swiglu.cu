// CUDA SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x), and its backward. Elementwise
// over (N, F) in f32 arithmetic (expf, not the fast approximation), 16-byte packs where aligned.
// Like the CPU reference, an output may be exactly one of the inputs (read before write, same
// thread); partial overlaps are rejected, and dgate and dup must be distinct.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/swiglu_op.cuh"

namespace tessera::cuda {

namespace {

// An output may be one of the inputs exactly, never partly.
void check_alias(const Tensor& out, const Tensor& in, const char* op, const char* out_name,
                 const char* in_name) {
  TS_CHECK(!overlaps(out, in) || out.data == in.data, "{}: {} partially overlaps {}", op, out_name,
           in_name);
}

}  // namespace

void swiglu_forward(Tensor out, Tensor gate, Tensor up, ops::Stream stream) {
  constexpr const char* kOp = "swiglu_forward";
  expect_compute_dtype(gate, kOp, "gate");
  expect_tensor(up, gate.dtype, gate.shape, kOp, "up");
  expect_tensor(out, gate.dtype, gate.shape, kOp, "out");
  check_alias(out, gate, kOp, "out", "gate");
  check_alias(out, up, kOp, "out", "up");
  dispatch_float(gate, kOp, [&]<class T>() {
    MapArgs<T, 2, 1> args;
    args.in[0] = static_cast<const T*>(gate.data);
    args.in[1] = static_cast<const T*>(up.data);
    args.out[0] = static_cast<T*>(out.data);
    launch_map(args, gate.numel(), SwigluForwardOp{}, cuda_stream(stream));
  });
}

void swiglu_backward(Tensor dgate, Tensor dup, Tensor dout, Tensor gate, Tensor up,
                     ops::Stream stream) {
  constexpr const char* kOp = "swiglu_backward";
  expect_compute_dtype(gate, kOp, "gate");
  expect_tensor(up, gate.dtype, gate.shape, kOp, "up");
  expect_tensor(dout, gate.dtype, gate.shape, kOp, "dout");
  expect_tensor(dgate, gate.dtype, gate.shape, kOp, "dgate");
  expect_tensor(dup, gate.dtype, gate.shape, kOp, "dup");
  TS_CHECK(!overlaps(dgate, dup), "{}: dgate and dup must not alias", kOp);
  for (const Tensor* out : {&dgate, &dup}) {
    const char* name = out == &dgate ? "dgate" : "dup";
    check_alias(*out, dout, kOp, name, "dout");
    check_alias(*out, gate, kOp, name, "gate");
    check_alias(*out, up, kOp, name, "up");
  }
  dispatch_float(gate, kOp, [&]<class T>() {
    MapArgs<T, 3, 2> args;
    args.in[0] = static_cast<const T*>(dout.data);
    args.in[1] = static_cast<const T*>(gate.data);
    args.in[2] = static_cast<const T*>(up.data);
    args.out[0] = static_cast<T*>(dgate.data);
    args.out[1] = static_cast<T*>(dup.data);
    launch_map(args, gate.numel(), SwigluBackwardOp{}, cuda_stream(stream));
  });
}

}  // namespace tessera::cuda
