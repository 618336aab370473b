// CUDA rotary position embedding (NeoX / Hugging Face "rotate_half" pairing), forward and
// backward (the same rotation by the negative angle). Shape letters: B batch, T time, H heads,
// D head dim (even). Angles are formed in double, as in the CPU reference, so positions in the
// hundreds of thousands keep f32 accuracy: a first kernel writes a (T, D/2) table of
// (cos, ±sin) into the workspace (in chunks of T when it does not fit), a second rotates every
// head with f32 arithmetic and 16-byte packs where aligned. out may alias inp exactly.
// rope_rows_forward (kernels/ops_infer.h) rotates each row by its own position, forming the angles
// and the rotation with the same two functions, so it equals rope_forward bit for bit.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/infer.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

constexpr int kHeadsPerThread = 4;  // heads sharing one thread's table values (8 measured slower)

// (cos a, sign * sin a) with a = pos * theta^(-2i/D), formed in double and rounded to f32 once.
__device__ __forceinline__ float2 rope_cos_sin(double pos, int i, int head_dim, double theta,
                                               float sign) {
  const double inv_freq = 1.0 / pow(theta, double(2 * i) / double(head_dim));
  const double angle = pos * inv_freq;
  double s, c;
  sincos(angle, &s, &c);
  return make_float2(float(c), sign * float(s));
}

// The rotation of one pair (x1, x2) = (inp[i], inp[i + D/2]), with the FMA placement spelled out
// so every kernel that rotates computes the very same f32 values.
__device__ __forceinline__ float2 rotate_pair(float x1, float x2, float2 cs) {
  return make_float2(__fmaf_rn(x1, cs.x, -__fmul_rn(x2, cs.y)),
                     __fmaf_rn(x2, cs.x, __fmul_rn(x1, cs.y)));
}

// table[tt, i] = (cos a, sign * sin a), a = (t_begin + tt + pos_offset) * theta^(-2i/D).
__global__ void __launch_bounds__(kBlock)
    rope_table_kernel(float2* table, int64_t t_begin, int64_t num_t, int half, int head_dim,
                      double theta, int pos_offset, float sign) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_t * half) return;
  const int64_t tt = idx / half;
  const int i = static_cast<int>(idx % half);
  table[idx] = rope_cos_sin(double(t_begin + tt) + double(pos_offset), i, head_dim, theta, sign);
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
        const float2 y = rotate_pair(to_f32(x1[k].v[j]), to_f32(x2[k].v[j]), cs.v[j]);
        y1.v[j] = from_f32<T>(y.x);
        y2.v[j] = from_f32<T>(y.y);
      }
      T* y = out + row_base + int64_t(h) * 2 * half + i0;
      store_pack<T, kWidth>(y, y1);
      store_pack<T, kWidth>(y + half, y2);
    }
  }
}

// rope_rows: block m rotates row m (H heads of D = 2 * half) by the angles of position pos[m],
// kRowsPairs pairs at a time: the block first forms their (cos, sin) once in shared memory (the
// same values rope_table_kernel forms for time 0 at pos_offset pos[m]), then every thread
// rotates pairs of every head. Each pair is read before it is written by the same thread, so out
// may alias inp. pos[m] < 0 (padding) copies the row.
constexpr int kRowsPairs = 1024;

template <class T>
__global__ void __launch_bounds__(kBlock)
    rope_rows_kernel(T* out, const T* inp, const int32_t* pos, int num_h, int half, double theta) {
  __shared__ float2 table[kRowsPairs];
  const int64_t row = blockIdx.x;
  const int64_t base = row * num_h * int64_t(2 * half);
  const int p = pos[row];
  if (p < 0) {
    if (out != inp)
      for (int64_t i = threadIdx.x; i < int64_t(num_h) * 2 * half; i += blockDim.x)
        out[base + i] = inp[base + i];
    return;
  }
  for (int i0 = 0; i0 < half; i0 += kRowsPairs) {
    const int width = min(kRowsPairs, half - i0);
    __syncthreads();  // the previous chunk's readers are done with the table
    for (int i = threadIdx.x; i < width; i += blockDim.x)
      table[i] = rope_cos_sin(double(0) + double(p), i0 + i, 2 * half, theta, 1.0f);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < int64_t(num_h) * width; j += blockDim.x) {
      const int h = static_cast<int>(j / width), i = static_cast<int>(j % width);
      const int64_t at = base + int64_t(h) * 2 * half + i0 + i;
      const float2 y = rotate_pair(to_f32(inp[at]), to_f32(inp[at + half]), table[i]);
      out[at] = from_f32<T>(y.x);
      out[at + half] = from_f32<T>(y.y);
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

void rope_rows_forward(Tensor out, Tensor inp, Tensor pos, float theta, ops::Stream stream) {
  constexpr const char* kOp = "rope_rows_forward";
  expect_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() == 3, "{}: inp must be (M,H,D), got {}", kOp, inp.str());
  expect_tensor(out, inp.dtype, inp.shape, kOp, "out");
  expect_tensor(pos, DType::i32, {inp.dim(0)}, kOp, "pos");
  TS_CHECK(!overlaps(out, inp) || out.data == inp.data,
           "{}: out partially overlaps inp; only exact aliasing (in place) is supported", kOp);
  TS_CHECK(inp.dim(2) % 2 == 0, "{}: head dim D = {} must be even", kOp, inp.dim(2));
  TS_CHECK(theta > 0.0f, "{}: theta = {} must be positive", kOp, theta);
  TS_CHECK(inp.dim(0) < (int64_t(1) << 31) && inp.dim(1) < (int64_t(1) << 30) &&
               inp.dim(2) < (int64_t(1) << 30),
           "{}: {} is too large", kOp, inp.str());
  if (inp.numel() == 0) return;
  dispatch_float(inp, kOp, [&]<class T>() {
    rope_rows_kernel<T><<<static_cast<unsigned>(inp.dim(0)), kBlock, 0, cuda_stream(stream)>>>(
        static_cast<T*>(out.data), static_cast<const T*>(inp.data),
        static_cast<const int32_t*>(pos.data), static_cast<int>(inp.dim(1)),
        static_cast<int>(inp.dim(2) / 2), double(theta));
    TS_CUDA_CHECK_LAUNCH();
  });
}

void rope_forward(Tensor out, Tensor inp, float theta, int pos_offset, ops::Stream stream) {
  rope_apply(out, inp, theta, pos_offset, +1.0f, "rope_forward", "out", "inp", cuda_stream(stream));
}

// The Jacobian of a rotation is the rotation itself, so dinp = R(angle)^T dout = R(-angle) dout.
void rope_backward(Tensor dinp, Tensor dout, float theta, int pos_offset, ops::Stream stream) {
  rope_apply(dinp, dout, theta, pos_offset, -1.0f, "rope_backward", "dinp", "dout",
             cuda_stream(stream));
}

}  // namespace tessera::cuda
