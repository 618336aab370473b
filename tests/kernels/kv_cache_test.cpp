// Tests of kv_cache_write / kv_cache_copy_blocks (kernels/cpu/kv_cache.cpp,
// kernels/cuda/kv_cache.cu). CPU: writes and copies against a hand-indexed copy of the cache
// (skipped slots, blocks of 1 and 3 tokens, bf16 bits moved unchanged), rejected slots and
// copies. GPU parity: the same writes and copies on random caches in f32/bf16/f16, with row sizes
// that allow 16-byte moves and ones that do not, compared bit for bit with the CPU.
// Shape letters: NB blocks, BS tokens per block, Hkv heads, D head dim, M rows, P copies.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/infer.h"
#include "kernels/ops_infer.h"
#include "tests/common/gpu.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

HostTensor i32_tensor(const std::vector<int32_t>& v, Shape s) {
  HostTensor h(DType::i32, s);
  for (size_t i = 0; i < v.size(); ++i) h.set(int64_t(i), v[i]);
  return h;
}

TS_CPU_VALUE_TEST(KvCache, WriteScattersRowsToSlots, "kv_cache_write") {
  std::mt19937_64 rng(1);
  for (int64_t bs : {1, 3, 16}) {
    const int64_t nb = 5, hkv = 2, d = 6, row = hkv * d;
    HostTensor kc = randn(DType::f32, {nb, bs, hkv, d}, rng),
               vc = randn(DType::f32, kc.t.shape, rng);
    const HostTensor k0 = kc, v0 = vc;
    const int64_t slots_total = nb * bs;
    const std::vector<int32_t> slots = {int32_t(slots_total - 1), -1, 0, int32_t(bs), -7};
    const int64_t m = int64_t(slots.size());
    HostTensor k = randn(DType::f32, {m, hkv, d}, rng), v = randn(DType::f32, {m, hkv, d}, rng);
    cpu::kv_cache_write(kc, vc, k, v, i32_tensor(slots, {m}));
    HostTensor want_k = k0, want_v = v0;
    for (int64_t i = 0; i < m; ++i) {
      if (slots[i] < 0) continue;
      for (int64_t j = 0; j < row; ++j) {
        want_k.set(slots[i] * row + j, k.get(i * row + j));
        want_v.set(slots[i] * row + j, v.get(i * row + j));
      }
    }
    expect_identical(kc, want_k, "k_cache BS " + std::to_string(bs));
    expect_identical(vc, want_v, "v_cache BS " + std::to_string(bs));
  }
}

TS_CPU_VALUE_TEST(KvCache, CopyBlocksCopiesWholeBlocks, "kv_cache_copy_blocks") {
  std::mt19937_64 rng(2);
  const int64_t nb = 6, bs = 3, hkv = 1, d = 4, per_block = bs * hkv * d;
  HostTensor kc = randn(DType::f64, {nb, bs, hkv, d}, rng), vc = randn(DType::f64, kc.t.shape, rng);
  const HostTensor k0 = kc, v0 = vc;
  const std::vector<int32_t> copies = {0, 5, 2, 1, 0, 3};  // 0 -> 5, 2 -> 1, 0 -> 3
  cpu::kv_cache_copy_blocks(kc, vc, i32_tensor(copies, {3, 2}));
  HostTensor want_k = k0, want_v = v0;
  for (size_t p = 0; p < copies.size(); p += 2)
    for (int64_t j = 0; j < per_block; ++j) {
      want_k.set(copies[p + 1] * per_block + j, k0.get(copies[p] * per_block + j));
      want_v.set(copies[p + 1] * per_block + j, v0.get(copies[p] * per_block + j));
    }
  expect_identical(kc, want_k, "k_cache");
  expect_identical(vc, want_v, "v_cache");
}

TEST(KvCache, SixteenBitCachesMoveBitsUnchanged) {
  // bf16 bits including a NaN payload and -0: a byte copy, never widened.
  std::vector<uint16_t> cache(2 * 2 * 1 * 2, 0x1111), rows = {0x7fc1, 0x8000, 0x3f80, 0xc000};
  std::vector<uint16_t> vcache = cache, vrows = rows;
  const Tensor kc(cache.data(), DType::bf16, Device::cpu, {2, 2, 1, 2});
  const Tensor vc(vcache.data(), DType::bf16, Device::cpu, {2, 2, 1, 2});
  const Tensor k(rows.data(), DType::bf16, Device::cpu, {2, 1, 2});
  const Tensor v(vrows.data(), DType::bf16, Device::cpu, {2, 1, 2});
  ops::kv_cache_write(kc, vc, k, v, i32_tensor({3, 0}, {2}));
  EXPECT_EQ(cache, (std::vector<uint16_t>{0x3f80, 0xc000, 0x1111, 0x1111, 0x1111, 0x1111, 0x7fc1,
                                          0x8000}));
  ops::kv_cache_copy_blocks(kc, vc, i32_tensor({1, 0}, {1, 2}));
  EXPECT_EQ(cache, (std::vector<uint16_t>{0x1111, 0x1111, 0x7fc1, 0x8000, 0x1111, 0x1111, 0x7fc1,
                                          0x8000}));
}

TEST(KvCache, RejectsBadSlotsAndCopies) {
  HostTensor kc(DType::f32, {2, 2, 1, 4}), vc(DType::f32, {2, 2, 1, 4});
  HostTensor k(DType::f32, {2, 1, 4}), v(DType::f32, {2, 1, 4});
  EXPECT_THROW(cpu::kv_cache_write(kc, vc, k, v, i32_tensor({1, 4}, {2})), Error);  // >= NB*BS
  EXPECT_THROW(cpu::kv_cache_write(kc, vc, k, v, i32_tensor({2, 2}, {2})), Error);  // twice
  HostTensor k_wrong(DType::f64, {2, 1, 4});
  EXPECT_THROW(cpu::kv_cache_write(kc, vc, k_wrong, v, i32_tensor({0, 1}, {2})), Error);
  EXPECT_THROW(cpu::kv_cache_copy_blocks(kc, vc, i32_tensor({0, 2}, {1, 2})), Error);  // range
  EXPECT_THROW(cpu::kv_cache_copy_blocks(kc, vc, i32_tensor({0, 0}, {1, 2})), Error);  // same
  HostTensor kc3(DType::f32, {3, 2, 1, 4}), vc3(DType::f32, {3, 2, 1, 4});
  EXPECT_THROW(cpu::kv_cache_copy_blocks(kc3, vc3, i32_tensor({0, 1, 1, 2}, {2, 2})), Error);
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/kv_cache.cu) ----------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::settle;

class KvCacheGpu : public testing::GpuCaseP<DType> {};

// Pure copies: the GPU must equal the CPU bit for bit. D = 6 (bf16: 12-byte rows, 4-byte moves;
// f32: 24-byte rows, 8-byte moves) and D = 64 (16-byte moves); BS = 1, 3, 16.
TS_GPU_PARITY_TEST_P(KvCacheGpu, WriteAndCopyMatchCpu, "kv_cache_write", "kv_cache_copy_blocks") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(51);
  for (int64_t d : {6, 64})
    for (int64_t bs : {1, 3, 16}) {
      const int64_t nb = 9, hkv = 2, m = 7;
      const Shape cache_shape{nb, bs, hkv, d}, row_shape{m, hkv, d};
      auto kc = testing::round_to(dtype, testing::random_vector(cache_shape.numel(), rng));
      auto vc = testing::round_to(dtype, testing::random_vector(cache_shape.numel(), rng));
      auto k = testing::round_to(dtype, testing::random_vector(row_shape.numel(), rng));
      auto v = testing::round_to(dtype, testing::random_vector(row_shape.numel(), rng));
      std::vector<int32_t> all(nb * bs);
      for (size_t i = 0; i < all.size(); ++i) all[i] = int32_t(i);
      std::shuffle(all.begin(), all.end(), rng);
      std::vector<int32_t> slots(all.begin(), all.begin() + m);
      slots[2] = -1;  // skipped
      const std::vector<int32_t> copies = {0, 8, 3, 1, 0, 5};
      DeviceTensor gkc(dtype, cache_shape), gvc(dtype, cache_shape), gk(dtype, row_shape),
          gv(dtype, row_shape), gslots(DType::i32, {m}), gcopies(DType::i32, {3, 2});
      gkc.upload(kc), gvc.upload(vc), gk.upload(k), gv.upload(v);
      gslots.upload_i32(slots), gcopies.upload_i32(copies);
      settle();
      ops::kv_cache_write(gkc, gvc, gk, gv, gslots);
      ops::kv_cache_copy_blocks(gkc, gvc, gcopies);
      cpu::kv_cache_write(testing::host(kc, cache_shape), testing::host(vc, cache_shape),
                          testing::host(k, row_shape), testing::host(v, row_shape),
                          Tensor(slots.data(), DType::i32, Device::cpu, {m}));
      cpu::kv_cache_copy_blocks(
          testing::host(kc, cache_shape), testing::host(vc, cache_shape),
          Tensor(const_cast<int32_t*>(copies.data()), DType::i32, Device::cpu, {3, 2}));
      const std::string what =
          std::string(dtype_name(dtype)) + " D " + std::to_string(d) + " BS " + std::to_string(bs);
      EXPECT_EQ(gkc.download(), kc) << what;
      EXPECT_EQ(gvc.download(), vc) << what;
      EXPECT_TRUE(gkc.guards_intact() && gvc.guards_intact()) << what;
    }
}

// Out-of-range slots and blocks are skipped on the GPU (never written out of bounds).
TEST_P(KvCacheGpu, OutOfRangeIndicesWriteNothing) {
  const DType dtype = GetParam();
  const Shape cache_shape{2, 2, 1, 8};
  std::vector<float> zeros(cache_shape.numel(), 0.0f), ones(2 * 8, 1.0f);
  DeviceTensor gkc(dtype, cache_shape), gvc(dtype, cache_shape), gk(dtype, {2, 1, 8}),
      gv(dtype, {2, 1, 8}), gslots(DType::i32, {2}), gcopies(DType::i32, {1, 2});
  gkc.upload(zeros), gvc.upload(zeros), gk.upload(ones), gv.upload(ones);
  gslots.upload_i32({4, 1000});
  gcopies.upload_i32({0, 7});
  settle();
  ops::kv_cache_write(gkc, gvc, gk, gv, gslots);
  ops::kv_cache_copy_blocks(gkc, gvc, gcopies);
  EXPECT_EQ(gkc.download(), zeros);
  EXPECT_TRUE(gkc.guards_intact() && gvc.guards_intact());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KvCacheGpu, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
