// The SwiGLU element functions of the CUDA backend, shared by swiglu.cu (the 16-bit ops) and
// fp8_cast.cu (the backward fused with FP8 quantization), so both compute the same bits.
#pragma once

namespace tessera::cuda {

// expf(-x) overflows to Inf for x < -88.7: sigmoid 0 and silu -0, the right limits.
__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// x = {gate, up}.
struct SwigluForwardOp {
  __device__ void operator()(const float* x, float* y) const {
    y[0] = x[0] * swiglu_sigmoid(x[0]) * x[1];
  }
};

// x = {dout, gate, up}; y = {dgate, dup}. d silu / dx = sigmoid(x) (1 + x (1 - sigmoid(x))).
struct SwigluBackwardOp {
  __device__ void operator()(const float* x, float* y) const {
    const float grad_out = x[0], g = x[1], u = x[2], s = swiglu_sigmoid(g);
    y[0] = grad_out * u * s * (1.0f + g * (1.0f - s));
    y[1] = grad_out * g * s;
  }
};

}  // namespace tessera::cuda
