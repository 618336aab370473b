// Parity of the CUDA rotary embedding (kernels/cuda/rope.cu) with the CPU reference, forward and
// backward, f32, bf16 and f16: head dims that do and do not divide into 16-byte packs, head counts
// that do not divide into the kernel's head groups, long sequences with large position offsets
// (angles in the hundreds of thousands of radians), in-place use, and a (T, D/2) angle table too
// large for the workspace, which the kernel must process in chunks of T.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

// Angles are formed in double on both sides and cos/sin rounded to f32 on the GPU; the rotation
// itself is two f32 products and a sum: a few 1e-7 relative. bf16: output rounding, 2^-9
// (~1.1e-3 in L2); f16: 2^-11 (~2.8e-4 in L2; a rotation keeps unit-normal values in range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

struct RopeCase {
  int64_t b, t, h, d;
  float theta;
  int pos_offset;
};
const RopeCase kCases[] = {
    {1, 1, 1, 2, 10000.0f, 0},      {2, 5, 3, 6, 10000.0f, 3},
    {2, 17, 4, 64, 10000.0f, 0},    {1, 3, 2, 130, 500000.0f, 7},
    {3, 9, 5, 128, 1000000.0f, 11}, {1, 4096, 2, 128, 10000.0f, 100000},
    {2, 33, 7, 16, 10000.0f, 0},
};

class RopeTest : public ::testing::TestWithParam<DType> {};

TEST_P(RopeTest, ForwardAndBackwardMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(31);
  for (const RopeCase& c : kCases) {
    const Shape shape{c.b, c.t, c.h, c.d};
    const int64_t n = shape.numel();
    auto x = testing::random_vector(n, rng);
    x[n / 2] = std::numeric_limits<float>::quiet_NaN();
    x = testing::round_to(dtype, x);
    std::vector<float> fwd(n), bwd(n);
    cpu::rope_forward(host(fwd, shape), host(x, shape), c.theta, c.pos_offset);
    cpu::rope_backward(host(bwd, shape), host(x, shape), c.theta, c.pos_offset);
    DeviceTensor gx(dtype, shape), gout(dtype, shape);
    gx.upload(x);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " " + shape.str() + " offset " +
                             std::to_string(c.pos_offset);
    cuda::rope_forward(gout, gx, c.theta, c.pos_offset);
    auto got = gout.download();
    EXPECT_LE(testing::rel_l2(got, fwd), tolerance(dtype)) << "forward " << what;
    testing::expect_same_nonfinite(got, fwd, "rope_forward");
    EXPECT_TRUE(gout.guards_intact()) << what;
    cuda::rope_backward(gout, gx, c.theta, c.pos_offset);
    got = gout.download();
    EXPECT_LE(testing::rel_l2(got, bwd), tolerance(dtype)) << "backward " << what;
    testing::expect_same_nonfinite(got, bwd, "rope_backward");
    // In place (out is inp).
    cuda::rope_forward(gx, gx, c.theta, c.pos_offset);
    got = gx.download();
    EXPECT_LE(testing::rel_l2(got, fwd), tolerance(dtype)) << "in place " << what;
    EXPECT_TRUE(gx.guards_intact()) << what;
  }
}

// D = 16384: the (T, D/2) table of 8-byte (cos, sin) pairs fills the 64 MiB workspace at
// T = 1024, so T = 1030 takes two chunks.
TEST_P(RopeTest, TableLargerThanWorkspaceIsChunked) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(32);
  const Shape shape{1, 1030, 1, 16384};
  const int64_t n = shape.numel();
  auto x = testing::round_to(dtype, testing::random_vector(n, rng));
  std::vector<float> fwd(n);
  cpu::rope_forward(host(fwd, shape), host(x, shape), 10000.0f, 5);
  DeviceTensor gx(dtype, shape);
  gx.upload(x);
  settle();
  cuda::rope_forward(gx, gx, 10000.0f, 5);
  EXPECT_LE(testing::rel_l2(gx.download(), fwd), tolerance(dtype));
  EXPECT_TRUE(gx.guards_intact());
}

TEST_P(RopeTest, RejectsOddHeadDimAndPartialOverlap) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  DeviceTensor odd(dtype, {1, 2, 1, 5}), buf(dtype, {1, 2, 1, 9});
  settle();
  EXPECT_THROW(cuda::rope_forward(odd, odd, 10000.0f, 0), Error);
  const Tensor a(buf.t().data, dtype, Device::cuda, Shape{1, 2, 1, 4});
  const Tensor b(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{1, 2, 1, 4});
  EXPECT_THROW(cuda::rope_forward(b, a, 10000.0f, 0), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RopeTest, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
