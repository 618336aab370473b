// CUDA AdamW (decoupled weight decay): the contract's single-tensor adamw_update and the
// multi-tensor adamw_update_multi (one launch updates up to a few dozen tensors, so a step over
// hundreds of small tensors is not hundreds of launches; bitwise equal to adamw_update on each
// entry). Evaluated in exactly the order of
// the CPU reference (kernels/cpu/adamw.cpp, PyTorch's single-tensor path) with explicitly
// rounded f32 operations (__fmul_rn and friends, which nvcc never contracts into FMAs), so f32
// results are bitwise equal to the CPU's. param, m, v f32; grad f32, bf16 or f16 (an f16 grad
// may hold Inf/NaN after loss-scale overflow: the caller skips such steps, we compute them as is).
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

// Per-step scalars, formed in double and rounded once to f32 like the CPU reference.
struct AdamWScalars {
  float decay_factor;   // 1 - lr wd: exactly 1 when wd = 0, so p * 1 equals skipping the decay
  float m_weight;       // 1 - beta1
  float v_decay;        // beta2
  float v_weight;       // 1 - beta2
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;
  float eps;
  float grad_scale;
};

AdamWScalars make_scalars(const AdamWStep& s) {
  const double lr = s.lr, beta1 = s.beta1, beta2 = s.beta2;
  const double bias_correction1 = 1.0 - std::pow(beta1, double(s.step));
  const double bias_correction2 = 1.0 - std::pow(beta2, double(s.step));
  AdamWScalars k;
  k.decay_factor = s.weight_decay != 0.0f ? float(1.0 - lr * double(s.weight_decay)) : 1.0f;
  k.m_weight = float(1.0 - beta1);
  k.v_decay = float(beta2);
  k.v_weight = float(1.0 - beta2);
  k.neg_step_size = float(-(lr / bias_correction1));
  k.bias_correction2_sqrt = float(std::sqrt(bias_correction2));
  k.eps = s.eps;
  k.grad_scale = s.grad_scale;
  return k;
}

void check_step(const AdamWStep& s, const char* op) {
  TS_CHECK(s.step >= 1, "{}: step is {}, but steps are 1-based", op, s.step);
  TS_CHECK(s.beta1 >= 0.0f && s.beta1 < 1.0f && s.beta2 >= 0.0f && s.beta2 < 1.0f,
           "{}: betas ({}, {}) must lie in [0, 1)", op, s.beta1, s.beta2);
}

// ---- kernels ---------------------------------------------------------------------------------

// One element, in the CPU reference's order of operations.
__device__ __forceinline__ void adamw_element(float& param, float grad, float& m, float& v,
                                              const AdamWScalars& k) {
  const float g = __fmul_rn(grad, k.grad_scale);
  const float p = __fmul_rn(param, k.decay_factor);
  const float m_new = fmaf(k.m_weight, __fsub_rn(g, m), m);
  const float v_new = __fadd_rn(__fmul_rn(v, k.v_decay), __fmul_rn(__fmul_rn(k.v_weight, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v_new), k.bias_correction2_sqrt), k.eps);
  param = __fadd_rn(p, __fdiv_rn(__fmul_rn(k.neg_step_size, m_new), denom));
  m = m_new;
  v = v_new;
}

// V is the dtype of the 16-bit value copy written beside the master; float means none.
template <class V>
constexpr bool kHasValue = !std::is_same_v<V, float>;

// Elements [begin, end) of one tensor, kWidth at a time from `first` with stride `stride`
// (in packs), plus the (end - begin) % kWidth tail elements on the first threads.
template <class G, class V, int kWidth>
__device__ __forceinline__ void adamw_range(float* param, const G* grad, float* m, float* v,
                                            V* value, int64_t begin, int64_t end, int64_t first,
                                            int64_t stride, const AdamWScalars& k) {
  const int64_t num_packs = (end - begin) / kWidth;
  for (int64_t i = first; i < num_packs; i += stride) {
    const int64_t e = begin + i * kWidth;
    Pack<float, kWidth> p = load_pack<float, kWidth>(param + e);
    const Pack<G, kWidth> g = load_pack<G, kWidth>(grad + e);
    Pack<float, kWidth> mm = load_pack<float, kWidth>(m + e);
    Pack<float, kWidth> vv = load_pack<float, kWidth>(v + e);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) adamw_element(p.v[j], to_f32(g.v[j]), mm.v[j], vv.v[j], k);
    store_pack<float, kWidth>(param + e, p);
    store_pack<float, kWidth>(m + e, mm);
    store_pack<float, kWidth>(v + e, vv);
    if constexpr (kHasValue<V>) {
      Pack<V, kWidth> out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) out.v[j] = from_f32<V>(p.v[j]);
      store_pack<V, kWidth>(value + e, out);
    }
  }
  const int64_t tail = begin + num_packs * kWidth + first;
  if (kWidth > 1 && tail < end) {
    adamw_element(param[tail], to_f32(grad[tail]), m[tail], v[tail], k);
    if constexpr (kHasValue<V>) value[tail] = from_f32<V>(param[tail]);
  }
}

template <class G, int kWidth>
__global__ void __launch_bounds__(kBlock)
    adamw_kernel(float* param, const G* grad, float* m, float* v, int64_t n, AdamWScalars k) {
  adamw_range<G, float, kWidth>(param, grad, m, v, nullptr, 0, n,
                                int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                                int64_t(gridDim.x) * blockDim.x, k);
}

// Multi-tensor launch: the descriptors travel as kernel parameters (under the classic 4 KB).
constexpr int kMaxTensorsPerLaunch = 40;
constexpr int64_t kChunkElems = int64_t(kBlock) * 4 * 8;  // elements per block: 8 packs a thread

struct MultiTensor {
  float* param;
  const void* grad;
  float* m;
  float* v;
  void* value;  // the 16-bit copy, or null
  int64_t n;
  int64_t block_begin;  // first block of this tensor in the launch
  AdamWScalars k;
};
struct MultiArgs {
  MultiTensor t[kMaxTensorsPerLaunch];
  int num_tensors;
};
static_assert(sizeof(MultiArgs) <= 4000, "kernel parameters must stay under 4 KB");

template <class G, class V>
__global__ void __launch_bounds__(kBlock) adamw_multi_kernel(MultiArgs a) {
  int idx = 0;  // the tensor that owns this block (uniform across the block)
  while (idx + 1 < a.num_tensors && a.t[idx + 1].block_begin <= blockIdx.x) ++idx;
  const MultiTensor& t = a.t[idx];
  const int64_t begin = (blockIdx.x - t.block_begin) * kChunkElems;
  const int64_t end = std::min(t.n, begin + kChunkElems);
  const G* grad = static_cast<const G*>(t.grad);
  V* value = static_cast<V*>(t.value);
  constexpr int kWidth = 4;
  const bool packs = reinterpret_cast<uintptr_t>(t.param) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(t.m) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(t.v) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(grad) % (sizeof(G) * kWidth) == 0 &&
                     reinterpret_cast<uintptr_t>(value) % (sizeof(V) * kWidth) == 0;
  if (packs)
    adamw_range<G, V, kWidth>(t.param, grad, t.m, t.v, value, begin, end, threadIdx.x, blockDim.x,
                              t.k);
  else
    adamw_range<G, V, 1>(t.param, grad, t.m, t.v, value, begin, end, threadIdx.x, blockDim.x, t.k);
}

// ---- launchers ------------------------------------------------------------------------------

void check_tensors(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                   const char* op) {
  TS_CHECK(!param.empty() && param.device == Device::cuda && param.dtype == DType::f32,
           "{}: param must be an f32 cuda tensor (the master copy), got {}", op, param.str());
  TS_CHECK(!grad.empty() && grad.device == Device::cuda && is_compute_dtype(grad.dtype),
           "{}: grad must be an f32, bf16 or f16 cuda tensor, got {}", op, grad.str());
  TS_CHECK(grad.shape == param.shape, "{}: grad has shape {}, expected {}", op, grad.shape.str(),
           param.shape.str());
  expect_tensor(m, DType::f32, param.shape, op, "m");
  expect_tensor(v, DType::f32, param.shape, op, "v");
  TS_CHECK(!overlaps(param, grad) && !overlaps(param, m) && !overlaps(param, v) &&
               !overlaps(grad, m) && !overlaps(grad, v) && !overlaps(m, v),
           "{}: param, grad, m and v must be distinct buffers", op);
}

// Every entry has a value or none; values are bf16 or f16 (one dtype per call), shaped like param,
// on the device, apart from the other buffers.
void check_value(const ops::AdamWTensors& e, const Tensor& first, const char* op) {
  TS_CHECK(e.value.empty() == first.empty(), "{}: either every entry has a value or none", op);
  if (e.value.empty()) return;
  TS_CHECK(e.value.device == Device::cuda &&
               (e.value.dtype == DType::bf16 || e.value.dtype == DType::f16) &&
               e.value.dtype == first.dtype && e.value.shape == e.param.shape,
           "{}: value must be a bf16 or f16 cuda tensor of param's shape, one dtype per call; "
           "got {} for param {}",
           op, e.value.str(), e.param.str());
  TS_CHECK(!overlaps(e.value, e.param) && !overlaps(e.value, e.grad) && !overlaps(e.value, e.m) &&
               !overlaps(e.value, e.v),
           "{}: value must not share memory with param, grad, m or v", op);
}

}  // namespace

void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWStep& s,
                  ops::Stream stream) {
  constexpr const char* kOp = "adamw_update";
  check_tensors(param, grad, m, v, kOp);
  check_step(s, kOp);
  const int64_t n = param.numel();
  if (n == 0) return;
  const AdamWScalars k = make_scalars(s);
  dispatch_float(grad, kOp, [&]<class G>() {
    constexpr int kWidth = 4;
    auto* p = static_cast<float*>(param.data);
    const auto* g = static_cast<const G*>(grad.data);
    auto* mm = static_cast<float*>(m.data);
    auto* vv = static_cast<float*>(v.data);
    if (is_aligned(p) && is_aligned(mm) && is_aligned(vv) && is_aligned(g, sizeof(G) * kWidth))
      adamw_kernel<G, kWidth>
          <<<grid_for(ceil_div(n, kWidth)), kBlock, 0, cuda_stream(stream)>>>(p, g, mm, vv, n, k);
    else
      adamw_kernel<G, 1><<<grid_for(n), kBlock, 0, cuda_stream(stream)>>>(p, g, mm, vv, n, k);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void adamw_update_multi(std::span<const ops::AdamWTensors> entries, ops::Stream stream) {
  constexpr const char* kOp = "adamw_update_multi";
  if (entries.empty()) return;
  const DType grad_dtype = entries[0].grad.dtype;
  const Tensor& value0 = entries[0].value;
  for (const ops::AdamWTensors& e : entries) {
    check_tensors(e.param, e.grad, e.m, e.v, kOp);
    check_step(e.step, kOp);
    TS_CHECK(e.grad.dtype == grad_dtype, "{}: grads of one call share a dtype: {} and {}", kOp,
             dtype_name(grad_dtype), e.grad.str());
    check_value(e, value0, kOp);
  }
  auto launch = [&](MultiArgs& args, int64_t num_blocks) {
    if (args.num_tensors == 0) return;
    dispatch_float(entries[0].grad, kOp, [&]<class G>() {
      const auto run = [&]<class V>() {
        adamw_multi_kernel<G, V><<<num_blocks, kBlock, 0, cuda_stream(stream)>>>(args);
      };
      if (value0.empty())
        run.template operator()<float>();
      else if (value0.dtype == DType::bf16)
        run.template operator()<__nv_bfloat16>();
      else
        run.template operator()<__half>();
      TS_CUDA_CHECK_LAUNCH();
    });
    args.num_tensors = 0;
  };
  MultiArgs args{};
  int64_t num_blocks = 0;
  for (const ops::AdamWTensors& e : entries) {
    const int64_t n = e.param.numel();
    if (n == 0) continue;
    const int64_t blocks = ceil_div(n, kChunkElems);
    TS_CHECK(blocks < (int64_t(1) << 30), "{}: tensor {} too large", kOp, e.param.str());
    if (args.num_tensors == kMaxTensorsPerLaunch || num_blocks + blocks >= (int64_t(1) << 31)) {
      launch(args, num_blocks);
      num_blocks = 0;
    }
    args.t[args.num_tensors++] = MultiTensor{static_cast<float*>(e.param.data),
                                             e.grad.data,
                                             static_cast<float*>(e.m.data),
                                             static_cast<float*>(e.v.data),
                                             e.value.data,
                                             n,
                                             num_blocks,
                                             make_scalars(e.step)};
    num_blocks += blocks;
  }
  launch(args, num_blocks);
}

}  // namespace tessera::cuda
