// Parity of the CUDA activations (kernels/cuda/gelu.cu, swiglu.cu) with the CPU references,
// forward and backward, f32, bf16 and f16: awkward sizes, misaligned views (scalar path), in-place
// use where the contract allows it, and NaN/Inf agreement.
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

// f32: tanhf/expf are within 2 ulp and the CPU evaluates in double: a few 1e-7 relative.
// bf16: the output is rounded to bf16 (at most 2^-9 relative per element, ~1.1e-3 in L2).
// f16: rounded to f16 instead (2^-11 relative per element, RMS 2^-11/sqrt(3) ~2.8e-4 in L2; the
// inputs, |x| < ~20, stay far inside f16's range, so no element over- or underflows).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// Values spread over the interesting range of both activations, with NaN and +-Inf mixed in.
std::vector<float> inputs(int64_t n, std::mt19937_64& rng, DType dtype) {
  auto v = testing::random_vector(n, rng, 3.0f);
  if (n > 8) {
    v[3] = std::numeric_limits<float>::quiet_NaN();
    v[5] = std::numeric_limits<float>::infinity();
    v[7] = -std::numeric_limits<float>::infinity();
    v[n - 1] = -100.0f;  // sigmoid is 0 in f32 but 4e-44 in double: a negligible difference
  }
  return testing::round_to(dtype, v);
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, DType dtype,
                  const std::string& what) {
  EXPECT_LE(testing::rel_l2(got, ref), tolerance(dtype)) << what;
  testing::expect_same_nonfinite(got, ref, what.c_str());
}

const int64_t kSizes[] = {1, 7, 1025, 4097, (1 << 20) + 5};

class ActivationTest : public ::testing::TestWithParam<DType> {};

TEST_P(ActivationTest, GeluForwardAndBackwardMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(21);
  for (int64_t n : kSizes) {
    auto x = inputs(n, rng, dtype);
    auto d = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> out(n), dinp(n);
    cpu::gelu_forward(host(out, {n}), host(x, {n}));
    cpu::gelu_backward(host(dinp, {n}), host(d, {n}), host(x, {n}));
    DeviceTensor gx(dtype, {n}), gd(dtype, {n}), gout(dtype, {n}), gdinp(dtype, {n});
    gx.upload(x);
    gd.upload(d);
    settle();
    cuda::gelu_forward(gout, gx);
    cuda::gelu_backward(gdinp, gd, gx);
    const std::string what = std::string(dtype_name(dtype)) + " n=" + std::to_string(n);
    expect_close(gout.download(), out, dtype, "gelu_forward " + what);
    expect_close(gdinp.download(), dinp, dtype, "gelu_backward " + what);
    EXPECT_TRUE(gout.guards_intact() && gdinp.guards_intact()) << what;
    // In place: out = inp, then dinp = dout.
    cuda::gelu_backward(gd, gd, gx);
    cuda::gelu_forward(gx, gx);
    expect_close(gx.download(), out, dtype, "gelu_forward in place " + what);
    expect_close(gd.download(), dinp, dtype, "gelu_backward in place " + what);
  }
}

TEST_P(ActivationTest, SwigluForwardAndBackwardMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(22);
  for (int64_t n : kSizes) {
    // (N, F) with F odd when possible; the ops are elementwise over any shape.
    const Shape shape = n % 7 == 0 ? Shape{n / 7, 7} : Shape{n};
    auto g = inputs(n, rng, dtype);
    auto u = testing::round_to(dtype, testing::random_vector(n, rng));
    auto d = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> out(n), dg(n), du(n);
    cpu::swiglu_forward(host(out, shape), host(g, shape), host(u, shape));
    cpu::swiglu_backward(host(dg, shape), host(du, shape), host(d, shape), host(g, shape),
                         host(u, shape));
    DeviceTensor gg(dtype, shape), gu(dtype, shape), gd(dtype, shape), gout(dtype, shape);
    DeviceTensor gdg(dtype, shape), gdu(dtype, shape);
    gg.upload(g);
    gu.upload(u);
    gd.upload(d);
    settle();
    cuda::swiglu_forward(gout, gg, gu);
    cuda::swiglu_backward(gdg, gdu, gd, gg, gu);
    const std::string what = std::string(dtype_name(dtype)) + " n=" + std::to_string(n);
    expect_close(gout.download(), out, dtype, "swiglu_forward " + what);
    expect_close(gdg.download(), dg, dtype, "swiglu_backward dgate " + what);
    expect_close(gdu.download(), du, dtype, "swiglu_backward dup " + what);
    EXPECT_TRUE(gout.guards_intact() && gdg.guards_intact() && gdu.guards_intact()) << what;
  }
}

TEST_P(ActivationTest, MisalignedViewsUseTheScalarPath) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(23);
  const int64_t n = 1000;
  auto g = inputs(n + 1, rng, dtype);
  auto u = testing::round_to(dtype, testing::random_vector(n + 1, rng));
  std::vector<float> g_tail(g.begin() + 1, g.end()), u_tail(u.begin() + 1, u.end()), out(n);
  cpu::swiglu_forward(host(out, {n}), host(g_tail, {n}), host(u_tail, {n}));
  DeviceTensor gg(dtype, {n + 1}), gu(dtype, {n + 1}), gout(dtype, {n + 1});
  gg.upload(g);
  gu.upload(u);
  settle();
  auto view = [&](const DeviceTensor& t) {
    return Tensor(static_cast<char*>(t.t().data) + dtype_size(dtype), dtype, Device::cuda,
                  Shape{n});
  };
  cuda::swiglu_forward(view(gout), view(gg), view(gu));
  const auto all = gout.download();
  EXPECT_TRUE(std::isnan(all[0])) << "the element before the view was written";
  expect_close(std::vector<float>(all.begin() + 1, all.end()), out, dtype, "misaligned swiglu");
}

TEST_P(ActivationTest, RejectsPartialOverlap) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  DeviceTensor buf(dtype, {65});
  settle();
  const Tensor a(buf.t().data, dtype, Device::cuda, Shape{64});
  const Tensor b(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                 Shape{64});
  EXPECT_THROW(cuda::gelu_forward(b, a), Error);
  EXPECT_THROW(cuda::swiglu_backward(a, a, b, b, b), Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ActivationTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
