// Device memory on the CPU backend: Buffer ownership, Arena alignment/peak/mark-release/overflow,
// copies; the CUDA paths are checked where a device is visible and refused in CPU-only builds.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/memory.h"

namespace tessera {
namespace {

bool aligned256(const void* p) { return reinterpret_cast<uintptr_t>(p) % 256 == 0; }

TEST(Buffer, OwnsAlignedMemoryAndMoves) {
  Buffer a(Device::cpu, 100);
  ASSERT_NE(a.data(), nullptr);
  EXPECT_TRUE(aligned256(a.data()));
  EXPECT_EQ(a.size(), 100u);
  std::memset(a.data(), 0x5A, 100);
  void* p = a.data();
  Buffer b(std::move(a));
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(b.data(), p);
  Buffer c(Device::cpu, 10);
  c = std::move(b);  // c's old block is freed (ASan builds would flag a leak or double free)
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(static_cast<unsigned char*>(c.data())[99], 0x5A);
}

TEST(Arena, AlignmentPeakAndRelease) {
  Arena arena(Device::cpu, 4096, "scratch");
  EXPECT_EQ(arena.capacity(), 4096u);
  void* p1 = arena.alloc_bytes(1);
  void* p2 = arena.alloc_bytes(300);
  Tensor t = arena.alloc(DType::f32, {3, 5});
  for (void* p : {p1, p2, t.data}) EXPECT_TRUE(aligned256(p));
  EXPECT_EQ(static_cast<char*>(p2) - static_cast<char*>(p1), 256);
  EXPECT_EQ(static_cast<char*>(t.data) - static_cast<char*>(p2), 512);
  EXPECT_EQ(arena.used(), 1024u);
  EXPECT_EQ(t.shape, Shape({3, 5}));
  EXPECT_EQ(t.device, Device::cpu);

  const size_t mark = arena.mark();
  void* scratch = arena.alloc_bytes(2000);
  EXPECT_EQ(arena.used(), 1024u + 2048u);
  EXPECT_EQ(arena.peak(), 3072u);
  arena.release(mark);
  EXPECT_EQ(arena.used(), 1024u);
  EXPECT_EQ(arena.peak(), 3072u);             // the peak survives the release
  EXPECT_EQ(arena.alloc_bytes(10), scratch);  // rewound memory is reused
  EXPECT_THROW(arena.release(arena.used() + 256), Error);
  EXPECT_THROW(arena.release(1), Error);  // not a mark the arena could have handed out

  Arena odd(Device::cpu, 1000);
  EXPECT_EQ(odd.capacity(), 1024u);  // capacity is rounded up to the alignment
}

TEST(Arena, OverflowIsAUserErrorWithTheNumbers) {
  Arena arena(Device::cpu, 2048, "activations");
  arena.alloc_bytes(1500);
  try {
    arena.alloc_bytes(1000);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    const std::string what = e.what();
    EXPECT_NE(what.find("'activations'"), std::string::npos) << what;
    EXPECT_NE(what.find("requested 1000 bytes"), std::string::npos) << what;
    EXPECT_NE(what.find("1536 of 2048"), std::string::npos) << what;
  }
  EXPECT_EQ(arena.used(), 1536u);              // a refused allocation changes nothing
  EXPECT_NE(arena.alloc_bytes(512), nullptr);  // exactly fills it
  EXPECT_THROW(arena.alloc_bytes(1), Error);
  Arena none;
  EXPECT_THROW(none.alloc_bytes(1), Error);
}

TEST(Memory, CopyAndZeroOnHost) {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {};
  copy_tensor(Tensor(b, DType::f32, Device::cpu, {2, 3}), Tensor(a, DType::f32, Device::cpu, {6}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b[i], a[i]);
  zero_tensor(Tensor(b, DType::f32, Device::cpu, {2, 2}));
  EXPECT_EQ(b[3], 0.0f);
  EXPECT_EQ(b[4], 5.0f);
  int32_t c[6];
  EXPECT_THROW(
      copy_tensor(Tensor(c, DType::i32, Device::cpu, {6}), Tensor(a, DType::f32, Device::cpu, {6})),
      Error);
  EXPECT_THROW(
      copy_tensor(Tensor(b, DType::f32, Device::cpu, {5}), Tensor(a, DType::f32, Device::cpu, {6})),
      Error);
}

#ifdef TESSERA_CUDA
TEST(Memory, CudaRoundTrip) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible";
  Arena arena(Device::cuda, 1 << 20, "device");
  Tensor d1 = arena.alloc(DType::f32, {1000});
  Tensor d2 = arena.alloc(DType::f32, {1000});
  EXPECT_TRUE(aligned256(d1.data) && aligned256(d2.data));
  std::vector<float> host(1000), back(1000, -1.0f);
  for (int i = 0; i < 1000; ++i) host[i] = 0.5f * i;
  const Tensor h(host.data(), DType::f32, Device::cpu, {1000});
  const Tensor hb(back.data(), DType::f32, Device::cpu, {1000});
  copy_tensor(d1, h);
  copy_tensor(d2, d1);
  copy_tensor(hb, d2);
  EXPECT_EQ(back, host);
  zero_tensor(d2);
  copy_tensor(hb, d2);
  for (float v : back) ASSERT_EQ(v, 0.0f);
}

TEST(Memory, FailedCudaCallIsASystemErrorWithLocation) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible";
  try {
    device_alloc(Device::cuda, size_t{1} << 60);  // an exabyte: cudaMalloc must refuse
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::system);
    const std::string what = e.what();
    EXPECT_NE(what.find("cudaMalloc"), std::string::npos) << what;
    EXPECT_NE(what.find("memory.cpp:"), std::string::npos) << what;
  }
  Buffer after(Device::cuda, 1024);  // the failure left no sticky error behind
  EXPECT_NE(after.data(), nullptr);
}
#else
TEST(Memory, CudaRequestWithoutBackendIsAUserError) {
  EXPECT_FALSE(cuda_available());
  try {
    device_alloc(Device::cuda, 16);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_NE(std::string(e.what()).find("no CUDA backend"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Arena(Device::cuda, 1024), Error);
  float a[2] = {1, 2};
  EXPECT_THROW(copy_bytes(a, Device::cuda, a, Device::cpu, sizeof(a)), Error);
}
#endif

}  // namespace
}  // namespace tessera
