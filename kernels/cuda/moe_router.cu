// CUDA MoE router (kernels/ops_moe.h), f32 throughout. Forward: one kernel, one warp per token:
// softmax (max, then a sum of expf in f32), probs written once, then K rounds of a warp arg-max
// over an integer key of the logits that encodes the CPU reference's order (larger logit first,
// NaN last, ties to the lower index), so both backends choose the same experts bit for bit whatever
// the rounding of the probabilities; topk_w is then read back from the probs written. Backward: one
// kernel, one warp per token. Loss: two small deterministic passes (a partition fixed by the
// sizes, per-block partials in double in the context workspace, then one block adds them in
// order). No float atomics anywhere: results repeat bit for bit. Lane l handles experts
// e = l + 32 i: coalesced row accesses, cached in registers for E <= 1024, re-read from memory for
// wider rows (same arithmetic). Shape letters: N tokens, E experts, K top-k.
// topk_idx is not checked on the host (that would synchronize): in the backward an index outside
// [0, E) makes its token's d_logits row NaN.
// Hazard: moe_router_loss uses the context workspace (kernels/cuda/context.h): it must not overlap
// other users of it on another stream.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "kernels/cuda/memory_bound.cuh"
#include "kernels/cuda/moe.h"

namespace tessera::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;  // tokens per block of the forward and backward kernels
constexpr int kRouterThreads = 32 * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- warp reductions --------------------------------------------------------------------------

// fmaxf skips NaN, like std::max in the CPU reference; a NaN logit poisons the sum instead.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
#endif
}

// ---- the choice order as an integer -----------------------------------------------------------
// order_key is increasing in the logit, equal for -0 and +0, and 0 for NaN (below every number's
// key, which is at least order_key(-inf) = 0x007fffff). A rank key appends ~e, so that of two
// equal logits the lower expert index has the larger key; rank key 0 means "no expert".

__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN
  if ((u << 1) == 0u) u = 0u;                      // -0 ranks as +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The logit of a key: the logit itself, except that -0 comes back as +0 and any NaN as NaN, which
// change no result of the forward (exp(+0 - m) = exp(-0 - m), fmaxf(m, +0) acts as fmaxf(m, -0)
// on every later difference and sum).
__device__ __forceinline__ float key_logit(uint32_t key) {
  if (key == 0u) return NAN;
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ uint64_t rank_key(uint32_t key, int e) {
  return (uint64_t(key) << 32) | uint64_t(~uint32_t(e));
}

// ---- a row as seen by one lane ----------------------------------------------------------------
// Lane l handles the experts e = l + 32 i (i < kPerLane) of a row of width E: cached in registers
// when kPerLane > 0 (E <= 32 kPerLane), else read from memory at each use (E > 1024).

// Order keys of the lane's logits (the forward's only copy of the row).
template <int kPerLane>
struct LaneKeys {
  const float* row;
  int width;
  int lane;
  uint32_t cache[kPerLane > 0 ? kPerLane : 1];

  __device__ LaneKeys(const float* r, int w, int l) : row(r), width(w), lane(l) {
    if constexpr (kPerLane > 0) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        cache[i] = e < width ? order_key(row[e]) : 0u;
      }
    }
  }
  // f(e, key) for each of the lane's experts, in increasing e.
  template <class F>
  __device__ __forceinline__ void for_each(F&& f) const {
    if constexpr (kPerLane > 0) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < width) f(e, cache[i]);
      }
    } else {
      for (int e = lane; e < width; e += 32) f(e, order_key(row[e]));
    }
  }
  // The lane's largest rank key below `last`, or 0 when it has none left.
  __device__ __forceinline__ uint64_t best_below(uint64_t last) const {
    uint64_t best = 0;
    for_each([&](int e, uint32_t key) {
      const uint64_t k = rank_key(key, e);
      if (k < last && k > best) best = k;
    });
    return best;
  }
};

// The lane's probabilities (or any f32 row) in the backward.
template <int kPerLane>
struct LaneRow {
  const float* row;
  int width;
  int lane;
  float cache[kPerLane > 0 ? kPerLane : 1];

  __device__ LaneRow(const float* r, int w, int l) : row(r), width(w), lane(l) {
    if constexpr (kPerLane > 0) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        cache[i] = e < width ? row[e] : 0.0f;
      }
    }
  }
  // f(e, value) for each of the lane's experts, in increasing e.
  template <class F>
  __device__ __forceinline__ void for_each(F&& f) const {
    if constexpr (kPerLane > 0) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < width) f(e, cache[i]);
      }
    } else {
      for (int e = lane; e < width; e += 32) f(e, row[e]);
    }
  }
};

// Calls f.template operator()<kPerLane>() with the register cache that covers E experts.
template <class F>
void dispatch_lane_cache(int64_t num_experts, F&& f) {
  if (num_experts <= 32)
    f.template operator()<1>();
  else if (num_experts <= 64)
    f.template operator()<2>();
  else if (num_experts <= 128)
    f.template operator()<4>();
  else if (num_experts <= 256)
    f.template operator()<8>();
  else if (num_experts <= 512)
    f.template operator()<16>();
  else if (num_experts <= 1024)
    f.template operator()<32>();
  else
    f.template operator()<0>();
}

// ---- kernels ----------------------------------------------------------------------------------

// One warp per token: softmax, probs written once, then K rounds of the choice. A round is two
// warp reductions (the largest logit part of the lanes' best keys, then the largest index part
// among the lanes holding that logit) and a rescan by the winner's lane alone; every other lane's
// best is still the best it has left. The weights are read back from the probs just written.
template <int kPerLane>
__global__ void __launch_bounds__(kRouterThreads)
    moe_router_forward_kernel(float* probs, float* lse, int32_t* topk_idx, float* topk_w,
                              const float* logits, int64_t num_tokens, int num_experts, int topk,
                              bool norm_topk_prob) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= num_tokens) return;  // the whole warp
  const int lane = static_cast<int>(threadIdx.x % 32);
  const LaneKeys<kPerLane> x(logits + t * num_experts, num_experts, lane);

  float m = -INFINITY;
  x.for_each([&](int, uint32_t k) { m = fmaxf(m, key_logit(k)); });
  m = warp_max(m);
  float s = 0.0f;
  x.for_each([&](int, uint32_t k) { s += expf(key_logit(k) - m); });
  s = warp_sum(s);
  if (lane == 0) lse[t] = m + logf(s);
  float* p = probs + t * num_experts;
  x.for_each([&](int e, uint32_t k) { p[e] = expf(key_logit(k) - m) / s; });

  int32_t* idx_out = topk_idx + t * topk;
  uint64_t mine = x.best_below(~uint64_t(0));
  for (int j = 0; j < topk; ++j) {
    const uint32_t hi = warp_max_u32(uint32_t(mine >> 32));
    // Lanes whose best has another logit part offer 0, below every index part ~e.
    const uint32_t lo = warp_max_u32(uint32_t(mine >> 32) == hi ? uint32_t(mine) : 0u);
    const int e = static_cast<int>(~lo);
    if (lane == (j & 31)) idx_out[j] = e;
    if (lane == (e & 31)) mine = x.best_below((uint64_t(hi) << 32) | lo);  // the winner moves on
  }

  // topk_w = probs[topk_idx] (bit for bit), each lane its own j = lane + 32 i: it wrote those
  // indices itself, and __syncwarp orders the other lanes' probs stores before these loads.
  __syncwarp();
  float* w_out = topk_w + t * topk;
  float sum = 0.0f;  // Σ_j topk_w[t,j] before renormalisation, in every lane
  if (norm_topk_prob) {
    for (int j = lane; j < topk; j += 32) sum += p[idx_out[j]];
    sum = warp_sum(sum);
  }
  for (int j = lane; j < topk; j += 32) {
    const float w = p[idx_out[j]];
    w_out[j] = norm_topk_prob ? w / sum : w;
  }
}

// d_logits[t,e] = p_e (dp_e - Σ_f p_f dp_f + 2 Z lse) with dp_e = A c_e + Σ_{l : i_l = e}
// (g_l - ḡ) / S (the derivation is in kernels/cpu/moe_router.cpp; S = 1, ḡ = 0 without
// renormalisation). dp_e is summed as the CPU sums it: A c_e first, then the choices in j order.
template <int kPerLane>
__global__ void __launch_bounds__(kRouterThreads)
    moe_router_backward_kernel(float* d_logits, const float* d_topk_w, const float* probs,
                               const float* lse, const int32_t* topk_idx, const int32_t* counts,
                               int64_t num_tokens, int num_experts, int topk, float aux_scale,
                               float z_scale, bool norm_topk_prob) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= num_tokens) return;  // the whole warp
  const int lane = static_cast<int>(threadIdx.x % 32);
  const LaneRow<kPerLane> p(probs + t * num_experts, num_experts, lane);
  const int32_t* idx = topk_idx + t * topk;
  const float* g = d_topk_w + t * topk;

  // S = Σ_j p_{i_j} and ḡ = Σ_j g_j p_{i_j} / S; an index outside [0, E) poisons the row.
  bool bad = false;
  float sum = 0.0f, g_dot_p = 0.0f;
  for (int j = lane; j < topk; j += 32) {
    const int e = idx[j];
    const bool ok = e >= 0 && e < num_experts;
    bad = bad || !ok;
    if (norm_topk_prob && ok) {
      const float pj = p.row[e];
      sum += pj;
      g_dot_p += g[j] * pj;
    }
  }
  bad = __any_sync(kFullMask, bad);
  float g_bar = 0.0f;
  if (norm_topk_prob) {
    sum = warp_sum(sum);
    g_bar = warp_sum(g_dot_p) / sum;
  } else {
    sum = 1.0f;
  }
  const float z_term = 2.0f * z_scale * lse[t];
  float* dx = d_logits + t * num_experts;

  if constexpr (kPerLane > 0) {
    float dp[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      dp[i] = e < num_experts ? aux_scale * float(counts[e]) : 0.0f;
    }
    for (int j = 0; j < topk; ++j) {
      const int e = idx[j];  // one address for the whole warp: a broadcast
      if ((e & 31) == lane) {
        const float c = (g[j] - g_bar) / sum;
        // An add to every slot (0 to the others): a branch per slot lets the compiler turn this
        // into dp[e >> 5], which moves dp into local memory.
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) dp[i] += (e >> 5) == i ? c : 0.0f;
      }
    }
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i < num_experts) dot += p.cache[i] * dp[i];
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < num_experts) dx[e] = bad ? NAN : p.cache[i] * (dp[i] - dot + z_term);
    }
  } else {
    // Wide rows: dp_e is recomputed at each use from the K choices.
    auto dp_of = [&](int e) {
      float d = aux_scale * float(counts[e]);
      for (int j = 0; j < topk; ++j)
        if (idx[j] == e) d += (g[j] - g_bar) / sum;
      return d;
    };
    float dot = 0.0f;
    p.for_each([&](int e, float v) { dot += v * dp_of(e); });
    dot = warp_sum(dot);
    p.for_each([&](int e, float v) { dx[e] = bad ? NAN : v * (dp_of(e) - dot + z_term); });
  }
}

// Block-wide sum of kBlock threads' values, the same in every thread, added in a fixed order.
__device__ __forceinline__ double block_sum(double v, double* smem /*kBlock / 32*/) {
  v = warp_sum(v);
  __syncthreads();  // a previous call's readers are done with smem
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kBlock / 32; ++w) total += smem[w];
  return total;
}

// Pass 1 of the loss: block b sums c_e * probs[t,e] and lse[t]^2 in double over a fixed,
// size-determined set of elements into partial[b] and partial[gridDim.x + b].
__global__ void __launch_bounds__(kBlock)
    moe_router_loss_partial_kernel(double* partial, const float* probs, const float* lse,
                                   const int32_t* counts, int64_t num_tokens, int num_experts) {
  __shared__ double smem[kBlock / 32];
  const int64_t first = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kBlock;
  const int64_t total = num_tokens * num_experts;
  // Element i of probs is expert i % E; from one element to the next that advances by stride % E.
  int e = static_cast<int>(first % num_experts);
  const int step = static_cast<int>(stride % num_experts);
  double aux = 0.0;
  for (int64_t i = first; i < total; i += stride) {
    aux += double(counts[e]) * double(probs[i]);
    e += step;
    if (e >= num_experts) e -= num_experts;
  }
  double z = 0.0;
  for (int64_t t = first; t < num_tokens; t += stride) {
    const double l = lse[t];
    z += l * l;
  }
  aux = block_sum(aux, smem);
  z = block_sum(z, smem);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = aux;
    partial[gridDim.x + blockIdx.x] = z;
  }
}

// Pass 2: one block adds the partials in a fixed order and applies the scales.
template <class L>
__global__ void __launch_bounds__(kBlock)
    moe_router_loss_finish_kernel(L* loss, const double* partial, int num_partials,
                                  double aux_scale, double z_scale) {
  __shared__ double smem[kBlock / 32];
  double aux = 0.0, z = 0.0;
  for (int i = threadIdx.x; i < num_partials; i += kBlock) {
    aux += partial[i];
    z += partial[num_partials + i];
  }
  aux = block_sum(aux, smem);
  z = block_sum(z, smem);
  if (threadIdx.x == 0) {
    loss[0] = L(aux_scale * aux);
    loss[1] = L(z_scale * z);
  }
}

// ---- checks -----------------------------------------------------------------------------------

// A present cuda tensor of this dtype and shape; router floats are f32 whatever the model's dtype.
void expect_router_tensor(const Tensor& t, DType dtype, const Shape& shape, const char* op,
                          const char* name) {
  TS_CHECK(!t.empty(), "{}: {} is empty, but it is required", op, name);
  TS_CHECK(t.device == Device::cuda, "{}: {} is {}, expected a cuda tensor", op, name, t.str());
  TS_CHECK(t.dtype == dtype, "{}: {} is {}, expected {} (router tensors are f32 on cuda)", op, name,
           t.str(), dtype_name(dtype));
  TS_CHECK(t.shape == shape, "{}: {} has shape {}, expected {}", op, name, t.shape.str(),
           shape.str());
}

// logits or probs: (N, E) f32 with E < 2^31; returns {N, E}.
std::pair<int64_t, int64_t> expect_rows(const Tensor& t, const char* op, const char* name) {
  TS_CHECK(t.ndim() == 2, "{}: {} must be (N, E), got {}", op, name, t.str());
  expect_router_tensor(t, DType::f32, t.shape, op, name);
  TS_CHECK(t.dim(1) >= 1 && t.dim(1) <= INT32_MAX, "{}: E = {} outside [1, 2^31)", op, t.dim(1));
  return {t.dim(0), t.dim(1)};
}

// topk_idx (N, K) i32 with 1 <= K <= E; returns K.
int expect_topk_idx(const Tensor& topk_idx, int64_t num_tokens, int64_t num_experts,
                    const char* op) {
  TS_CHECK(topk_idx.ndim() == 2 && topk_idx.dim(0) == num_tokens,
           "{}: topk_idx must be (N = {}, K), got {}", op, num_tokens, topk_idx.str());
  expect_router_tensor(topk_idx, DType::i32, topk_idx.shape, op, "topk_idx");
  const int64_t topk = topk_idx.dim(1);
  TS_CHECK(topk >= 1 && topk <= num_experts, "{}: K = {} outside [1, E = {}]", op, topk,
           num_experts);
  return static_cast<int>(topk);
}

void expect_no_overlap(std::initializer_list<const Tensor*> outputs,
                       std::initializer_list<const Tensor*> inputs, const char* op) {
  for (const Tensor* a : outputs) {
    for (const Tensor* b : inputs)
      TS_CHECK(!overlaps(*a, *b), "{}: an output overlaps an input", op);
    for (const Tensor* b : outputs)
      TS_CHECK(a == b || !overlaps(*a, *b), "{}: two outputs overlap", op);
  }
}

constexpr int kLossPartials = 1024;          // most pass-1 blocks of the loss
constexpr int64_t kLossItemsPerThread = 16;  // elements per thread before the grid grows

}  // namespace

void moe_router_forward(Tensor probs, Tensor lse, Tensor topk_idx, Tensor topk_w, Tensor logits,
                        bool norm_topk_prob, ops::Stream stream) {
  constexpr const char* kOp = "moe_router_forward";
  const auto [num_tokens, num_experts] = expect_rows(logits, kOp, "logits");
  const int topk = expect_topk_idx(topk_idx, num_tokens, num_experts, kOp);
  expect_router_tensor(probs, DType::f32, logits.shape, kOp, "probs");
  expect_router_tensor(lse, DType::f32, Shape{num_tokens}, kOp, "lse");
  expect_router_tensor(topk_w, DType::f32, Shape{num_tokens, topk}, kOp, "topk_w");
  expect_no_overlap({&probs, &lse, &topk_idx, &topk_w}, {&logits}, kOp);
  if (num_tokens == 0) return;
  dispatch_lane_cache(num_experts, [&]<int kPerLane>() {
    moe_router_forward_kernel<kPerLane>
        <<<ceil_div(num_tokens, kWarpsPerBlock), kRouterThreads, 0, cuda_stream(stream)>>>(
            static_cast<float*>(probs.data), static_cast<float*>(lse.data),
            static_cast<int32_t*>(topk_idx.data), static_cast<float*>(topk_w.data),
            static_cast<const float*>(logits.data), num_tokens, static_cast<int>(num_experts), topk,
            norm_topk_prob);
  });
  TS_CUDA_CHECK_LAUNCH();
}

void moe_router_loss(Tensor loss, Tensor probs, Tensor lse, Tensor tokens_per_expert,
                     double aux_scale, double z_scale, ops::Stream stream) {
  constexpr const char* kOp = "moe_router_loss";
  const auto [num_tokens, num_experts] = expect_rows(probs, kOp, "probs");
  expect_router_tensor(lse, DType::f32, Shape{num_tokens}, kOp, "lse");
  expect_router_tensor(tokens_per_expert, DType::i32, Shape{num_experts}, kOp, "tokens_per_expert");
  expect_router_tensor(loss, loss.dtype == DType::f64 ? DType::f64 : DType::f32, Shape{2}, kOp,
                       "loss");  // f32 or f64
  expect_no_overlap({&loss}, {&probs, &lse, &tokens_per_expert}, kOp);
  // The partition depends only on N and E, never on the device: deterministic sums.
  const int num_partials = static_cast<int>(std::min<int64_t>(
      kLossPartials, ceil_div(num_tokens * num_experts, kBlock * kLossItemsPerThread)));
  Context& ctx = context();
  TS_CHECK(ctx.workspace_bytes >= 2 * kLossPartials * sizeof(double), "{}: workspace too small",
           kOp);
  auto* partial = static_cast<double*>(ctx.workspace);
  const cudaStream_t s = cuda_stream(stream);
  if (num_partials > 0) {
    moe_router_loss_partial_kernel<<<num_partials, kBlock, 0, s>>>(
        partial, static_cast<const float*>(probs.data), static_cast<const float*>(lse.data),
        static_cast<const int32_t*>(tokens_per_expert.data), num_tokens,
        static_cast<int>(num_experts));
    TS_CUDA_CHECK_LAUNCH();
  }
  if (loss.dtype == DType::f64) {
    moe_router_loss_finish_kernel<<<1, kBlock, 0, s>>>(static_cast<double*>(loss.data), partial,
                                                       num_partials, aux_scale, z_scale);
  } else {
    moe_router_loss_finish_kernel<<<1, kBlock, 0, s>>>(static_cast<float*>(loss.data), partial,
                                                       num_partials, aux_scale, z_scale);
  }
  TS_CUDA_CHECK_LAUNCH();
}

void moe_router_backward(Tensor d_logits, Tensor d_topk_w, Tensor probs, Tensor lse,
                         Tensor topk_idx, Tensor tokens_per_expert, double aux_scale,
                         double z_scale, bool norm_topk_prob, ops::Stream stream) {
  constexpr const char* kOp = "moe_router_backward";
  const auto [num_tokens, num_experts] = expect_rows(probs, kOp, "probs");
  const int topk = expect_topk_idx(topk_idx, num_tokens, num_experts, kOp);
  expect_router_tensor(lse, DType::f32, Shape{num_tokens}, kOp, "lse");
  expect_router_tensor(d_topk_w, DType::f32, Shape{num_tokens, topk}, kOp, "d_topk_w");
  expect_router_tensor(d_logits, DType::f32, probs.shape, kOp, "d_logits");
  expect_router_tensor(tokens_per_expert, DType::i32, Shape{num_experts}, kOp, "tokens_per_expert");
  expect_no_overlap({&d_logits}, {&d_topk_w, &probs, &lse, &topk_idx, &tokens_per_expert}, kOp);
  if (num_tokens == 0) return;
  dispatch_lane_cache(num_experts, [&]<int kPerLane>() {
    moe_router_backward_kernel<kPerLane>
        <<<ceil_div(num_tokens, kWarpsPerBlock), kRouterThreads, 0, cuda_stream(stream)>>>(
            static_cast<float*>(d_logits.data), static_cast<const float*>(d_topk_w.data),
            static_cast<const float*>(probs.data), static_cast<const float*>(lse.data),
            static_cast<const int32_t*>(topk_idx.data),
            static_cast<const int32_t*>(tokens_per_expert.data), num_tokens,
            static_cast<int>(num_experts), topk, static_cast<float>(aux_scale),
            static_cast<float>(z_scale), norm_topk_prob);
  });
  TS_CUDA_CHECK_LAUNCH();
}

}  // namespace tessera::cuda
