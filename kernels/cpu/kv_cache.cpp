// The paged KV cache's writes, CPU reference (kernels/ops_infer.h): kv_cache_write scatters this
// step's K/V rows into their slots, kv_cache_copy_blocks copies whole blocks (copy-on-write).
// Byte copies, so any cache dtype works unchanged (16-bit caches are not widened).
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/infer.h"

namespace tessera::cpu {
namespace {

// k_cache and v_cache: (NB,BS,Hkv,D) of one dtype, same shape.
void check_caches(const Tensor& k_cache, const Tensor& v_cache, const char* op) {
  check_host(k_cache, op, "k_cache");
  check_host(v_cache, op, "v_cache");
  TS_CHECK(k_cache.ndim() == 4, "{}: k_cache must be (NB,BS,Hkv,D), got {}", op, k_cache.str());
  TS_CHECK(v_cache.dtype == k_cache.dtype && v_cache.shape == k_cache.shape,
           "{}: v_cache {} differs from k_cache {}", op, v_cache.str(), k_cache.str());
  TS_CHECK(dtype_size(k_cache.dtype) > 0, "{}: cache dtype {} is not byte-addressable", op,
           dtype_name(k_cache.dtype));
  TS_CHECK(!overlaps(k_cache, v_cache), "{}: k_cache and v_cache overlap", op);
}

void check_i32(const Tensor& t, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::i32, "{}: {} must be i32, got {}", op, name, t.str());
}

}  // namespace

void kv_cache_write(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, Tensor slots) {
  constexpr const char* kOp = "kv_cache_write";
  check_caches(k_cache, v_cache, kOp);
  check_i32(slots, kOp, "slots");
  TS_CHECK(slots.ndim() == 1, "{}: slots must be (M), got {}", kOp, slots.str());
  const int64_t num_m = slots.dim(0), num_slots = k_cache.dim(0) * k_cache.dim(1);
  const Shape row_shape{num_m, k_cache.dim(2), k_cache.dim(3)};
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_host(*t, kOp, name);
    TS_CHECK(t->dtype == k_cache.dtype, "{}: {} is {}, the cache is {}", kOp, name, t->str(),
             dtype_name(k_cache.dtype));
    check_shape(*t, row_shape, kOp, name);
    TS_CHECK(!overlaps(*t, k_cache) && !overlaps(*t, v_cache), "{}: {} overlaps the cache", kOp,
             name);
  }
  const int32_t* slot = slots.ptr<int32_t>();
  std::vector<char> used(size_t(num_slots), 0);
  for (int64_t m = 0; m < num_m; ++m) {
    if (slot[m] < 0) continue;
    TS_CHECK(slot[m] < num_slots, "{}: slots[{}] = {} is outside the cache's {} slots", kOp, m,
             slot[m], num_slots);
    TS_CHECK(!used[slot[m]], "{}: slot {} is written twice", kOp, slot[m]);
    used[slot[m]] = 1;
  }
  const size_t row_bytes = dtype_size(k_cache.dtype) * size_t(k_cache.dim(2) * k_cache.dim(3));
  for (int64_t m = 0; m < num_m; ++m) {
    if (slot[m] < 0) continue;
    std::memcpy(static_cast<char*>(k_cache.data) + slot[m] * row_bytes,
                static_cast<const char*>(k.data) + m * row_bytes, row_bytes);
    std::memcpy(static_cast<char*>(v_cache.data) + slot[m] * row_bytes,
                static_cast<const char*>(v.data) + m * row_bytes, row_bytes);
  }
}

void kv_cache_copy_blocks(Tensor k_cache, Tensor v_cache, Tensor copies) {
  constexpr const char* kOp = "kv_cache_copy_blocks";
  check_caches(k_cache, v_cache, kOp);
  check_i32(copies, kOp, "copies");
  TS_CHECK(copies.ndim() == 2 && copies.dim(1) == 2, "{}: copies must be (P,2), got {}", kOp,
           copies.str());
  const int64_t num_p = copies.dim(0), num_blocks = k_cache.dim(0);
  const int32_t* c = copies.ptr<int32_t>();
  std::vector<char> is_src(size_t(num_blocks), 0), is_dst(size_t(num_blocks), 0);
  for (int64_t p = 0; p < num_p; ++p) {
    const int32_t src = c[2 * p], dst = c[2 * p + 1];
    TS_CHECK(src >= 0 && src < num_blocks && dst >= 0 && dst < num_blocks,
             "{}: copy {} ({} -> {}) names a block outside [0, {})", kOp, p, src, dst, num_blocks);
    TS_CHECK(src != dst && !is_dst[dst], "{}: copy {} ({} -> {}): a destination must be distinct",
             kOp, p, src, dst);
    is_src[src] = 1;
    is_dst[dst] = 1;
  }
  for (int64_t b = 0; b < num_blocks; ++b)
    TS_CHECK(!(is_src[b] && is_dst[b]), "{}: block {} is both a source and a destination", kOp, b);
  const size_t block_bytes =
      dtype_size(k_cache.dtype) * size_t(k_cache.dim(1) * k_cache.dim(2) * k_cache.dim(3));
  for (int64_t p = 0; p < num_p; ++p)
    for (const Tensor* cache : {&k_cache, &v_cache})
      std::memcpy(static_cast<char*>(cache->data) + c[2 * p + 1] * block_bytes,
                  static_cast<const char*>(cache->data) + c[2 * p] * block_bytes, block_bytes);
}

}  // namespace tessera::cpu
