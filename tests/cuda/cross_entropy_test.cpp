// Parity of the CUDA fused softmax cross-entropy (kernels/cuda/cross_entropy.cu) with the CPU
// reference, f32, bf16 and f16: padded vocabularies (real columns < V), odd widths whose rows are
// not 16-byte aligned (V = 50257), the Qwen3 vocabulary (151936 wide), ignored rows (target -1),
// large logits, a NaN logit, and the gradient written in place over the logits.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <bit>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

// Losses and lse: f32 sums of up to 150k exponentials (fast exp, ~2 ulp) against double: under
// 1e-6 relative. dlogits: f32 exp(x - lse) per element, 1e-5 relative; bf16 rounds the output
// (2^-9 per element, ~1.1e-3 in L2); f16 rounds it to 2^-11 (~2.8e-4 in L2). Probabilities
// under f16's smallest subnormal (6e-8) flush to 0, an absolute error under 3e-8 per element
// that is invisible in the L2 norm (at most sqrt(150k) * 3e-8 ~ 1e-5 against a norm >= ~0.5).
// Logits up to ~30 * 5 = 150 are far inside f16's range (65504).
constexpr double kLossTolerance = 1e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

struct CeCase {
  int64_t rows, width;
  int vocab_size;
  float scale;  // logit standard deviation
};
const CeCase kCases[] = {{1, 1, 1, 1.0f},           {3, 7, 5, 2.0f},
                         {8, 50304, 50257, 2.0f},   {5, 50257, 50257, 1.0f},
                         {2, 151936, 151665, 3.0f}, {64, 1030, 1000, 30.0f}};

class CrossEntropyTest : public ::testing::TestWithParam<DType> {};

TEST_P(CrossEntropyTest, ForwardAndBackwardMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(41);
  for (const CeCase& c : kCases) {
    const int64_t n = c.rows, v = c.width;
    auto logits = testing::random_vector(n * v, rng, c.scale);
    if (n > 3) logits[3 * v + v / 3] = std::numeric_limits<float>::quiet_NaN();  // row 3 NaN
    logits = testing::round_to(dtype, logits);
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> pick(0, c.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) targets[i] = i % 4 == 2 ? -1 : pick(rng);  // some ignored
    std::vector<float> targets_f(targets.begin(), targets.end());

    std::vector<float> losses(n), lse(n), dlogits(n * v);
    Tensor tgt_host(targets.data(), DType::i32, Device::cpu, Shape{n});
    cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits, {n, v}), tgt_host,
                               c.vocab_size);
    const float dloss = 1.0f / float(n);
    cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}),
                                tgt_host, c.vocab_size, dloss);

    DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
    DeviceTensor glse(DType::f32, {n}), gdlogits(dtype, {n, v});
    glogits.upload(logits);
    gtargets.upload_i32(targets);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " N=" + std::to_string(n) +
                             " V=" + std::to_string(v) + " vocab=" + std::to_string(c.vocab_size);
    cuda::cross_entropy_forward(glosses, glse, glogits, gtargets, c.vocab_size);
    auto got_losses = glosses.download(), got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(got_losses, losses), kLossTolerance) << "losses " << what;
    EXPECT_LE(testing::rel_l2(got_lse, lse), kLossTolerance) << "lse " << what;
    testing::expect_same_nonfinite(got_losses, losses, "losses");
    testing::expect_same_nonfinite(got_lse, lse, "lse");
    for (int64_t i = 0; i < n; ++i) {
      if (targets[i] < 0) {
        EXPECT_EQ(got_losses[i], 0.0f) << "ignored row " << i;
      }
    }
    EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact()) << what;

    // The backward uses the CPU's lse, so the comparison isolates the gradient kernel.
    glse.upload(lse);
    settle();
    cuda::cross_entropy_backward(gdlogits, glogits, glse, gtargets, c.vocab_size, dloss);
    auto got = gdlogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "dlogits " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits");
    EXPECT_TRUE(gdlogits.guards_intact()) << what;
    for (int64_t i = 0; i < n; ++i) {  // padding columns and ignored rows are exactly zero
      for (int64_t col = 0; col < v; ++col) {
        if ((targets[i] < 0 || col >= c.vocab_size) && got[i * v + col] != 0.0f) {
          ADD_FAILURE() << what << ": dlogits[" << i << ", " << col << "] = " << got[i * v + col];
          break;
        }
      }
    }

    // In place: the gradient overwrites the logits.
    cuda::cross_entropy_backward(glogits, glogits, glse, gtargets, c.vocab_size, dloss);
    got = glogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "in place " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits in place");
    EXPECT_TRUE(glogits.guards_intact()) << what;
  }
}

// A logits view one element into its buffer: every row starts off the 16-byte grid.
TEST_P(CrossEntropyTest, MisalignedLogitsMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(42);
  const int64_t n = 6, v = 4096;
  const int vocab = 4000;
  auto all = testing::round_to(dtype, testing::random_vector(n * v + 1, rng, 2.0f));
  std::vector<float> logits(all.begin() + 1, all.end());
  std::vector<int32_t> targets = {0, 3999, -1, 17, 2048, 5};
  std::vector<float> losses(n), lse(n), dlogits(n * v);
  Tensor tgt_host(targets.data(), DType::i32, Device::cpu, Shape{n});
  cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits, {n, v}), tgt_host,
                             vocab);
  cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}), tgt_host,
                              vocab, 0.5f);
  DeviceTensor buf(dtype, {n * v + 1}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
  DeviceTensor glse(DType::f32, {n});
  buf.upload(all);
  gtargets.upload_i32(targets);
  settle();
  const Tensor view(static_cast<char*>(buf.t().data) + dtype_size(dtype), dtype, Device::cuda,
                    Shape{n, v});
  cuda::cross_entropy_forward(glosses, glse, view, gtargets, vocab);
  EXPECT_LE(testing::rel_l2(glosses.download(), losses), kLossTolerance);
  EXPECT_LE(testing::rel_l2(glse.download(), lse), kLossTolerance);
  cuda::cross_entropy_backward(view, view, glse, gtargets, vocab, 0.5f);
  const auto got = buf.download();
  EXPECT_EQ(std::bit_cast<uint32_t>(got[0]), std::bit_cast<uint32_t>(all[0]));
  EXPECT_LE(testing::rel_l2(std::vector<float>(got.begin() + 1, got.end()), dlogits),
            grad_tolerance(dtype));
  EXPECT_TRUE(buf.guards_intact());
}

// A target past the real vocabulary cannot be checked on the host without a synchronization:
// it must show up as a NaN loss and a NaN gradient row, never as a plausible number.
TEST_P(CrossEntropyTest, OutOfRangeTargetGivesNaN) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(43);
  const int64_t n = 2, v = 64;
  auto logits = testing::round_to(dtype, testing::random_vector(n * v, rng));
  DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), glosses(DType::f32, {n});
  DeviceTensor glse(DType::f32, {n});
  glogits.upload(logits);
  gtargets.upload_i32({3, 60});  // vocab_size 50: 60 is padding, not a class
  settle();
  cuda::cross_entropy_forward(glosses, glse, glogits, gtargets, 50);
  const auto losses = glosses.download();
  EXPECT_TRUE(std::isfinite(losses[0]));
  EXPECT_TRUE(std::isnan(losses[1]));
  cuda::cross_entropy_backward(glogits, glogits, glse, gtargets, 50, 1.0f);
  const auto grad = glogits.download();
  for (int64_t col = 0; col < v; ++col) EXPECT_TRUE(std::isnan(grad[v + col])) << col;
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CrossEntropyTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
