// CUDA GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// Elementwise over any shape in f32 arithmetic (tanhf, not the fast approximation), 16-byte
// packs where aligned. out may alias inp and dinp may alias dout (read before write, same thread).
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

struct GeluForwardOp {
  __device__ void operator()(const float* x, float* y) const {
    const float v = x[0];
    y[0] = 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + kCubic * v * v * v)));
  }
};

// x = {dout, inp}: dinp = dout * (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx).
struct GeluBackwardOp {
  __device__ void operator()(const float* x, float* y) const {
    const float v = x[1];
    const float th = tanhf(kSqrt2OverPi * (v + kCubic * v * v * v));
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v);
    y[0] = x[0] * (0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * du);
  }
};

}  // namespace

void gelu_forward(Tensor out, Tensor inp, ops::Stream stream) {
  constexpr const char* kOp = "gelu_forward";
  expect_compute_dtype(inp, kOp, "inp");
  expect_tensor(out, inp.dtype, inp.shape, kOp, "out");
  TS_CHECK(!overlaps(out, inp) || out.data == inp.data, "{}: out partially overlaps inp", kOp);
  dispatch_float(inp, kOp, [&]<class T>() {
    MapArgs<T, 1, 1> args;
    args.in[0] = static_cast<const T*>(inp.data);
    args.out[0] = static_cast<T*>(out.data);
    launch_map(args, inp.numel(), GeluForwardOp{}, cuda_stream(stream));
  });
}

void gelu_backward(Tensor dinp, Tensor dout, Tensor inp, ops::Stream stream) {
  constexpr const char* kOp = "gelu_backward";
  expect_compute_dtype(inp, kOp, "inp");
  expect_tensor(dout, inp.dtype, inp.shape, kOp, "dout");
  expect_tensor(dinp, inp.dtype, inp.shape, kOp, "dinp");
  TS_CHECK(!overlaps(dinp, dout) || dinp.data == dout.data, "{}: dinp partially overlaps dout",
           kOp);
  TS_CHECK(!overlaps(dinp, inp), "{}: dinp must not alias inp", kOp);
  dispatch_float(inp, kOp, [&]<class T>() {
    MapArgs<T, 2, 1> args;
    args.in[0] = static_cast<const T*>(dout.data);
    args.in[1] = static_cast<const T*>(inp.data);
    args.out[0] = static_cast<T*>(dinp.data);
    launch_map(args, inp.numel(), GeluBackwardOp{}, cuda_stream(stream));
  });
}

}  // namespace tessera::cuda
