// CUDA writes of the paged KV cache (kernels/ops_infer.h): kv_cache_write scatters this step's K/V
// rows into their slots, kv_cache_copy_blocks copies whole blocks (copy-on-write). Pure byte
// moves in the widest unit (16 bytes down to 1) that every row and pointer allows; indices outside
// the cache are skipped, so the GPU never writes out of bounds.
#include <cstdint>

#include "kernels/cuda/infer.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {
namespace {

// k_cache[slots[m]] = k[m] (rows of units_per_row units U), likewise v.
template <class U>
__global__ void __launch_bounds__(kBlock)
    kv_write_kernel(U* k_cache, U* v_cache, const U* k, const U* v, const int32_t* slots,
                    int64_t num_m, int64_t units_per_row, int64_t num_slots) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < num_m * units_per_row;
       i += stride) {
    const int64_t m = i / units_per_row, u = i % units_per_row;
    const int64_t slot = slots[m];
    if (slot < 0 || slot >= num_slots) continue;
    k_cache[slot * units_per_row + u] = k[i];
    v_cache[slot * units_per_row + u] = v[i];
  }
}

// Block copies[p][1] = block copies[p][0] (units_per_block units U each), in both caches.
template <class U>
__global__ void __launch_bounds__(kBlock)
    kv_copy_kernel(U* k_cache, U* v_cache, const int32_t* copies, int64_t num_p,
                   int64_t units_per_block, int64_t num_blocks) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < num_p * units_per_block;
       i += stride) {
    const int64_t p = i / units_per_block, u = i % units_per_block;
    const int64_t src = copies[2 * p], dst = copies[2 * p + 1];
    if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) continue;
    k_cache[dst * units_per_block + u] = k_cache[src * units_per_block + u];
    v_cache[dst * units_per_block + u] = v_cache[src * units_per_block + u];
  }
}

// Calls f.template operator()<U>() with the widest U of 16, 8, 4, 2, 1 bytes dividing `bytes`
// (a row or block) with every pointer aligned to it.
template <class F>
void dispatch_unit(size_t bytes, std::initializer_list<const void*> ptrs, F&& f) {
  const auto fits = [&](size_t unit) {
    if (bytes % unit != 0) return false;
    for (const void* p : ptrs)
      if (!is_aligned(p, unit)) return false;
    return true;
  };
  if (fits(16))
    f.template operator()<uint4>();
  else if (fits(8))
    f.template operator()<uint2>();
  else if (fits(4))
    f.template operator()<uint32_t>();
  else if (fits(2))
    f.template operator()<uint16_t>();
  else
    f.template operator()<uint8_t>();
}

void check_caches(const Tensor& k_cache, const Tensor& v_cache, const char* op) {
  expect_cuda(k_cache, op);
  TS_CHECK(k_cache.ndim() == 4, "{}: k_cache must be (NB,BS,Hkv,D), got {}", op, k_cache.str());
  TS_CHECK(dtype_size(k_cache.dtype) > 0, "{}: cache dtype {} is not byte-addressable", op,
           dtype_name(k_cache.dtype));
  expect_tensor(v_cache, k_cache.dtype, k_cache.shape, op, "v_cache");
  TS_CHECK(!overlaps(k_cache, v_cache), "{}: k_cache and v_cache overlap", op);
}

void expect_i32(const Tensor& t, const Shape& shape, const char* op, const char* name) {
  expect_tensor(t, DType::i32, shape, op, name);
}

}  // namespace

void kv_cache_write(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, Tensor slots,
                    ops::Stream stream) {
  constexpr const char* kOp = "kv_cache_write";
  check_caches(k_cache, v_cache, kOp);
  TS_CHECK(slots.ndim() == 1, "{}: slots must be (M), got {}", kOp, slots.str());
  const int64_t num_m = slots.dim(0);
  expect_i32(slots, {num_m}, kOp, "slots");
  const Shape row_shape{num_m, k_cache.dim(2), k_cache.dim(3)};
  expect_tensor(k, k_cache.dtype, row_shape, kOp, "k");
  expect_tensor(v, k_cache.dtype, row_shape, kOp, "v");
  if (num_m == 0 || k_cache.numel() == 0) return;
  const size_t row_bytes = dtype_size(k_cache.dtype) * size_t(k_cache.dim(2) * k_cache.dim(3));
  const int64_t num_slots = k_cache.dim(0) * k_cache.dim(1);
  dispatch_unit(row_bytes, {k_cache.data, v_cache.data, k.data, v.data}, [&]<class U>() {
    const int64_t units = int64_t(row_bytes / sizeof(U));
    kv_write_kernel<U><<<grid_for(num_m * units), kBlock, 0, cuda_stream(stream)>>>(
        static_cast<U*>(k_cache.data), static_cast<U*>(v_cache.data), static_cast<const U*>(k.data),
        static_cast<const U*>(v.data), static_cast<const int32_t*>(slots.data), num_m, units,
        num_slots);
    TS_CUDA_CHECK_LAUNCH();
  });
}

void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies, ops::Stream stream) {
  constexpr const char* kOp = "kv_cache_copy_blocks";
  check_caches(k_cache, v_cache, kOp);
  TS_CHECK(copies.ndim() == 2 && copies.dim(1) == 2, "{}: copies must be (P,2), got {}", kOp,
           copies.str());
  const int64_t num_p = copies.dim(0);
  expect_i32(copies, {num_p, 2}, kOp, "copies");
  if (num_p == 0 || k_cache.numel() == 0) return;
  const size_t block_bytes =
      dtype_size(k_cache.dtype) * size_t(k_cache.dim(1) * k_cache.dim(2) * k_cache.dim(3));
  dispatch_unit(block_bytes, {k_cache.data, v_cache.data}, [&]<class U>() {
    const int64_t units = int64_t(block_bytes / sizeof(U));
    kv_copy_kernel<U><<<grid_for(num_p * units), kBlock, 0, cuda_stream(stream)>>>(
        static_cast<U*>(k_cache.data), static_cast<U*>(v_cache.data),
        static_cast<const int32_t*>(copies.data), num_p, units, k_cache.dim(0));
    TS_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tessera::cuda
