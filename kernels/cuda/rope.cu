// CUDA rotary position embedding (NeoX / Hugging Face "rotate_half" pairing), forward and
// backward (the same rotation by the negative angle). Shape letters: B batch, T time, H heads,
// D head dim (even). Angles are formed in double, as in the CPU reference, so positions in the
// hundreds of thousands keep f32 accuracy: a first kernel writes a (T, D/2) table of
// (cos, ±sin) into the workspace (in chunks of T when it does not fit), a second rotates every
// head with f32 arithmetic and 16-byte packs where aligned. out may alias inp exactly.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

constexpr int kHeadsPerThread = 4;  // heads sharing one thread's table values (8 measured slower)

// table[tt, i] = (cos a, sign * sin a), a = (t_begin + tt + pos_offset) * theta^(-2i/D).
__global__ void __launch_bounds__(kBlock)
    rope_table_kernel(float2* table, int64_t t_begin, int64_t num_t, int half, int head_dim,
                      double theta, int pos_offset, float sign) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_t * half) return;
  const int64_t tt = idx / half;
  const int i = static_cast<int>(idx % half);
  const double inv_freq = 1.0 / pow(theta, double(2 * i) / double(head_dim));
  const double angle = (double(t_begin + tt) + double(pos_offset)) * inv_freq;
  double s, c;
  sincos(angle, &s, &c);
  table[idx] = make_float2(float(c), sign * float(s));
}

// out[..., i] = x1 cos - x2 sin, out[..., i + D/2] = x2 cos + x1 sin (x1 = inp[i], x2 =
// inp[i + D/2]) for times [t_begin, t_begin + num_t). A thread owns kWidth pairs of heads
// h = hg, hg + num_hg, ... (up to kHeadsPerThread of them) at one (b, t); it loads all of them
// before storing any, so in-place use is safe.
template <class T, int kWidth>
__global__ void __launch_bounds__(kBlock)
    rope_apply_kernel(T* out, const T* inp, const float2* table, int64_t num_b, int64_t num_t_total,
                      int64_t t_begin, int64_t num_t, int num_h, int half) {
  const int chunks_per_head = half / kWidth;
  const int num_hg = (num_h + kHeadsPerThread - 1) / kHeadsPerThread;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_b * num_t * num_hg * chunks_per_head) return;
  const int chunk = static_cast<int>(idx % chunks_per_head);
  const int64_t rest = idx / chunks_per_head;
  const int hg = static_cast<int>(rest % num_hg);
  const int64_t bt = rest / num_hg;  // over (b, tt)
  const int64_t tt = bt % num_t, b = bt / num_t;
  const int i0 = chunk * kWidth;

  const Pack<float2, kWidth> cs = load_pack<float2, kWidth>(table + tt * half + i0);
  const int64_t row_base = ((b * num_t_total + t_begin + tt) * num_h) * int64_t(2 * half);
  Pack<T, kWidth> x1[kHeadsPerThread], x2[kHeadsPerThread];
#pragma unroll
  for (int k = 0; k < kHeadsPerThread; ++k) {
    const int h = hg + k * num_hg;
    if (h < num_h) {
      const T* x = inp + row_base + int64_t(h) * 2 * half + i0;
      x1[k] = load_pack<T, kWidth>(x);
      x2[k] = load_pack<T, kWidth>(x + half);
    }
  }
#pragma unroll
  for (int k = 0; k < kHeadsPerThread; ++k) {
    const int h = hg + k * num_hg;
    if (h < num_h) {
      Pack<T, kWidth> y1, y2;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float a = to_f32(x1[k].v[j]), c = to_f32(x2[k].v[j]);
        y1.v[j] = from_f32<T>(a * cs.v[j].x - c * cs.v[j].y);
        y2.v[j] = from_f32<T>(c * cs.v[j].x + a * cs.v[j].y);
      }
      T* y = out + row_base + int64_t(h) * 2 * half + i0;
      store_pack<T, kWidth>(y, y1);
      store_pack<T, kWidth>(y + half, y2);
    }
  }
}

// ---- launchers ------------------------------------------------------------------------------

template <class T, int kWidth>
void rotate(const Tensor& out, const Tensor& inp, float theta, int pos_offset, float sign,
            cudaStream_t stream) {
  const int64_t num_b = inp.dim(0), num_t = inp.dim(1);
  const int num_h = static_cast<int>(inp.dim(2)), half = static_cast<int>(inp.dim(3) / 2);
  auto* table = static_cast<float2*>(context().workspace);
  const int64_t max_t = int64_t(context().workspace_bytes / sizeof(float2)) / half;
  TS_CHECK(max_t >= 1, "rope: workspace too small for D = {}", 2 * half);
  const int num_hg = (num_h + kHeadsPerThread - 1) / kHeadsPerThread;
  for (int64_t t_begin = 0; t_begin < num_t; t_begin += max_t) {
    const int64_t chunk_t = std::min(max_t, num_t - t_begin);
    rope_table_kernel<<<ceil_div(chunk_t * half, kBlock), kBlock, 0, stream>>>(
        table, t_begin, chunk_t, half, 2 * half, double(theta), pos_offset, sign);
    TS_CUDA_CHECK_LAUNCH();
    const int64_t work = num_b * chunk_t * num_hg * (half / kWidth);
    rope_apply_kernel<T, kWidth><<<ceil_div(work, kBlock), kBlock, 0, stream>>>(
        static_cast<T*>(out.data), static_cast<const T*>(inp.data), table, num_b, num_t, t_begin,
        chunk_t, num_h, half);
    TS_CUDA_CHECK_LAUNCH();
  }
}

void rope_apply(const Tensor& out, const Tensor& inp, float theta, int pos_offset, float sign,
                const char* op, const char* out_name, const char* inp_name, cudaStream_t stream) {
  expect_compute_dtype(inp, op, inp_name);
  TS_CHECK(inp.ndim() == 4, "{}: {} must be (B, T, H, D), got {}", op, inp_name, inp.str());
  expect_tensor(out, inp.dtype, inp.shape, op, out_name);
  TS_CHECK(!overlaps(out, inp) || out.data == inp.data,
           "{}: {} partially overlaps {}; only exact aliasing (in place) is supported", op,
           out_name, inp_name);
  TS_CHECK(inp.dim(3) % 2 == 0, "{}: head dim D = {} must be even", op, inp.dim(3));
  TS_CHECK(theta > 0.0f, "{}: theta = {} must be positive", op, theta);
  TS_CHECK(inp.dim(2) < (int64_t(1) << 30) && inp.dim(3) < (int64_t(1) << 30),
           "{}: {} has too many heads or too wide a head", op, inp.str());
  if (inp.numel() == 0) return;
  const int64_t half = inp.dim(3) / 2;
  dispatch_float(inp, op, [&]<class T>() {
    constexpr int kVec = kVecWidth<T>;
    if (half % kVec == 0 && is_aligned(inp.data) && is_aligned(out.data))
      rotate<T, kVec>(out, inp, theta, pos_offset, sign, stream);
    else
      rotate<T, 1>(out, inp, theta, pos_offset, sign, stream);
  });
}

}  // namespace

void rope_forward(Tensor out, Tensor inp, float theta, int pos_offset, ops::Stream stream) {
  rope_apply(out, inp, theta, pos_offset, +1.0f, "rope_forward", "out", "inp", cuda_stream(stream));
}

// The Jacobian of a rotation is the rotation itself, so dinp = R(angle)^T dout = R(-angle) dout.
void rope_backward(Tensor dinp, Tensor dout, float theta, int pos_offset, ops::Stream stream) {
  rope_apply(dinp, dout, theta, pos_offset, -1.0f, "rope_backward", "dinp", "dout",
             cuda_stream(stream));
}

}  // namespace tessera::cuda
