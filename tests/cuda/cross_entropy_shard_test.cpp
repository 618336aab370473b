// Parity of the CUDA vocabulary-parallel cross-entropy pieces (kernels/cuda/cross_entropy.cu:
// shard max, shard sums, finish, and the backward with vocab_start) with the CPU reference, f32,
// bf16 and f16: N = 1, Vl = 1, odd widths (rows off the 16-byte grid), vocab_start > 0, a shard of
// padding only, the last shards of GPT-2's and Qwen3's padded vocabularies; then the whole
// protocol on the GPU against the unsharded CPU loss, and out-of-range targets (NaN).
// Shape letters: N rows, Vl one shard's width, V the padded vocabulary (tp * Vl).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

// row_max and target_logit copy an input value: exact. sum_exp: f32 sums of up to 38k fast
// exponentials (~2 ulp each) against double, under 1e-6 relative; finish: logf in f32 against
// double. dlogits: as the unsharded test (f32 exp per element 1e-5; bf16 output rounding 2^-9,
// f16 2^-11 with subnormal flushes far below the L2 resolution).
constexpr double kSumTolerance = 1e-5;
double grad_tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
Tensor host_i32(std::vector<int32_t>& v, Shape s) {
  return Tensor(v.data(), DType::i32, Device::cpu, s);
}
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// Equal element for element, NaN matching NaN.
void expect_same_values(const std::vector<float>& got, const std::vector<float>& want,
                        const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i] || (std::isnan(got[i]) && std::isnan(want[i])))) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i];
      return;
    }
  }
}

struct ShardCase {
  int64_t rows, width;  // N, Vl
  int64_t vocab_start;
  int vocab_size;
  float scale;  // logit standard deviation
};
const ShardCase kCases[] = {
    {1, 1, 0, 1, 1.0f},                // N = 1, Vl = 1
    {3, 1, 5, 7, 1.0f},                // Vl = 1 inside a larger vocabulary
    {3, 7, 7, 13, 2.0f},               // odd Vl, vocab_start > 0, 6 of 7 columns real
    {5, 9, 27, 20, 2.0f},              // padding only
    {8, 12576, 37728, 50257, 2.0f},    // GPT-2's 50304 over tp = 4, last shard
    {4, 12565, 12565, 50257, 2.0f},    // odd width: rows off the 16-byte grid
    {2, 37984, 113952, 151665, 3.0f},  // Qwen3's 151936 over tp = 4, last shard
    {64, 1031, 1031, 2000, 30.0f},     // large logits
};

class CrossEntropyShardTest : public ::testing::TestWithParam<DType> {};

TEST_P(CrossEntropyShardTest, PiecesMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(71);
  for (const ShardCase& c : kCases) {
    const int64_t n = c.rows, v = c.width;
    const std::string what =
        std::string(dtype_name(dtype)) + " N=" + std::to_string(n) + " Vl=" + std::to_string(v) +
        " start=" + std::to_string(c.vocab_start) + " vocab=" + std::to_string(c.vocab_size);
    auto logits = testing::random_vector(n * v, rng, c.scale);
    if (n > 3) logits[3 * v + v / 3] = kNaN;  // row 3 NaN (if that column is real)
    logits = testing::round_to(dtype, logits);
    // Targets: in this shard's real columns where it has any, elsewhere in the vocabulary, or
    // ignored.
    const int64_t num_real = std::clamp<int64_t>(int64_t(c.vocab_size) - c.vocab_start, 0, v);
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> anywhere(0, c.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) {
      if (i % 4 == 2)
        targets[i] = -1;
      else if (i % 2 == 0 && num_real > 0)
        targets[i] =
            int32_t(c.vocab_start + std::uniform_int_distribution<int64_t>(0, num_real - 1)(rng));
      else
        targets[i] = anywhere(rng);
    }

    // The global max is at least this shard's: other shards may hold larger logits.
    std::vector<float> shard_max(n), global_max(n), sum_exp(n), target_logit(n);
    cpu::cross_entropy_shard_max(host(shard_max, {n}), host(logits, {n, v}), c.vocab_start,
                                 c.vocab_size);
    std::normal_distribution<float> other(0.0f, c.scale);
    for (int64_t i = 0; i < n; ++i) global_max[i] = std::max(shard_max[i], 2.0f * other(rng));
    cpu::cross_entropy_shard_sums(host(sum_exp, {n}), host(target_logit, {n}), host(logits, {n, v}),
                                  host(global_max, {n}), host_i32(targets, {n}), c.vocab_start,
                                  c.vocab_size);
    // The other shards' share of the softmax denominator: lse is then a valid global lse.
    std::vector<float> total_sum(n), losses(n), lse(n);
    std::uniform_real_distribution<float> rest(0.0f, 3.0f);
    for (int64_t i = 0; i < n; ++i) total_sum[i] = sum_exp[i] + rest(rng) + (num_real ? 0 : 1);
    cpu::cross_entropy_shard_finish(host(losses, {n}), host(lse, {n}), host(global_max, {n}),
                                    host(total_sum, {n}), host(target_logit, {n}),
                                    host_i32(targets, {n}));
    const float dloss = 1.0f / float(n);
    std::vector<float> dlogits(n * v);
    cpu::cross_entropy_backward(host(dlogits, {n, v}), host(logits, {n, v}), host(lse, {n}),
                                host_i32(targets, {n}), c.vocab_size, dloss, c.vocab_start);

    DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), gmax(DType::f32, {n});
    DeviceTensor gglobal(DType::f32, {n}), gsum(DType::f32, {n}), gtl(DType::f32, {n});
    DeviceTensor gtotal(DType::f32, {n}), glosses(DType::f32, {n}), glse(DType::f32, {n});
    DeviceTensor gdlogits(dtype, {n, v});
    glogits.upload(logits);
    gtargets.upload_i32(targets);
    gglobal.upload(global_max);
    settle();

    cuda::cross_entropy_shard_max(gmax, glogits, c.vocab_start, c.vocab_size);
    expect_same_values(gmax.download(), shard_max, "row_max " + what);
    cuda::cross_entropy_shard_sums(gsum, gtl, glogits, gglobal, gtargets, c.vocab_start,
                                   c.vocab_size);
    const auto got_sum = gsum.download();
    EXPECT_LE(testing::rel_l2(got_sum, sum_exp), kSumTolerance) << "sum_exp " << what;
    testing::expect_same_nonfinite(got_sum, sum_exp, "sum_exp");
    expect_same_values(gtl.download(), target_logit, "target_logit " + what);
    if (num_real == 0) {
      for (float s : got_sum) EXPECT_EQ(s, 0.0f) << "padding-only shard: " << what;
    }
    EXPECT_TRUE(gmax.guards_intact() && gsum.guards_intact() && gtl.guards_intact()) << what;

    // finish and backward from the CPU's statistics, so each comparison isolates one kernel.
    gsum.upload(total_sum);
    gtl.upload(target_logit);
    settle();
    cuda::cross_entropy_shard_finish(glosses, glse, gglobal, gsum, gtl, gtargets);
    const auto got_losses = glosses.download(), got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(got_lse, lse), 1e-6) << "lse " << what;
    EXPECT_LE(testing::rel_l2(got_losses, losses), 1e-6) << "losses " << what;
    testing::expect_same_nonfinite(got_losses, losses, "losses");
    for (int64_t i = 0; i < n; ++i) {
      if (targets[i] < 0) {
        EXPECT_EQ(got_losses[i], 0.0f) << "ignored row " << i;
      }
    }
    EXPECT_TRUE(glosses.guards_intact() && glse.guards_intact()) << what;

    glse.upload(lse);
    settle();
    cuda::cross_entropy_backward(gdlogits, glogits, glse, gtargets, c.vocab_size, dloss,
                                 c.vocab_start);
    auto got = gdlogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "dlogits " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits");
    EXPECT_TRUE(gdlogits.guards_intact()) << what;
    for (int64_t i = 0; i < n; ++i) {  // padding columns and ignored rows are exactly zero
      for (int64_t col = 0; col < v; ++col) {
        if ((targets[i] < 0 || col >= num_real) && got[i * v + col] != 0.0f) {
          ADD_FAILURE() << what << ": dlogits[" << i << ", " << col << "] = " << got[i * v + col];
          break;
        }
      }
    }
    cuda::cross_entropy_backward(glogits, glogits, glse, gtargets, c.vocab_size, dloss,
                                 c.vocab_start);
    got = glogits.download();
    EXPECT_LE(testing::rel_l2(got, dlogits), grad_tolerance(dtype)) << "in place " << what;
    testing::expect_same_nonfinite(got, dlogits, "dlogits in place");
    EXPECT_TRUE(glogits.guards_intact()) << what;
  }
}

// The whole protocol on the GPU (max, all-reduce on the host, sums, all-reduce, finish) over tp
// column shards of one (N, V) logits tensor, against the unsharded CPU forward; then every
// shard's backward against the columns of the unsharded CPU backward.
TEST_P(CrossEntropyShardTest, ProtocolMatchesUnshardedCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(72);
  struct Split {
    int64_t rows, width;  // N, Vl
    int tp, vocab_size;
  };
  for (const Split& s : {Split{5, 1031, 3, 3000}, Split{6, 12576, 4, 50257}, Split{3, 5, 4, 11}}) {
    const int64_t n = s.rows, v = s.width, full_v = s.tp * s.width;
    const std::string what =
        std::string(dtype_name(dtype)) + " tp=" + std::to_string(s.tp) + " Vl=" + std::to_string(v);
    const auto logits = testing::round_to(dtype, testing::random_vector(n * full_v, rng, 2.0f));
    std::vector<int32_t> targets(n);
    std::uniform_int_distribution<int> pick(0, s.vocab_size - 1);
    for (int64_t i = 0; i < n; ++i) targets[i] = i == 1 ? -1 : pick(rng);
    targets[0] = s.vocab_size - 1;  // the last real column
    std::vector<float> losses(n), lse(n), dlogits(n * full_v);
    std::vector<float> logits_copy = logits;
    cpu::cross_entropy_forward(host(losses, {n}), host(lse, {n}), host(logits_copy, {n, full_v}),
                               host_i32(targets, {n}), s.vocab_size);
    cpu::cross_entropy_backward(host(dlogits, {n, full_v}), host(logits_copy, {n, full_v}),
                                host(lse, {n}), host_i32(targets, {n}), s.vocab_size, 0.5f);

    std::vector<std::unique_ptr<DeviceTensor>> shards;
    for (int r = 0; r < s.tp; ++r) {
      std::vector<float> part(n * v);
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(logits.begin() + i * full_v + r * v, v, part.begin() + i * v);
      shards.push_back(std::make_unique<DeviceTensor>(dtype, Shape{n, v}));
      shards.back()->upload(part);
    }
    DeviceTensor gtargets(DType::i32, {n}), gmax(DType::f32, {n}), gsum(DType::f32, {n});
    DeviceTensor gtl(DType::f32, {n}), glosses(DType::f32, {n}), glse(DType::f32, {n});
    gtargets.upload_i32(targets);
    settle();
    std::vector<float> row_max(n, -INFINITY), sum_exp(n, 0.0f), target_logit(n, 0.0f);
    for (int r = 0; r < s.tp; ++r) {
      cuda::cross_entropy_shard_max(gmax, *shards[r], r * v, s.vocab_size);
      const auto part = gmax.download();
      for (int64_t i = 0; i < n; ++i) row_max[i] = std::max(row_max[i], part[i]);
    }
    gmax.upload(row_max);
    for (int r = 0; r < s.tp; ++r) {
      cuda::cross_entropy_shard_sums(gsum, gtl, *shards[r], gmax, gtargets, r * v, s.vocab_size);
      const auto part_sum = gsum.download(), part_tl = gtl.download();
      for (int64_t i = 0; i < n; ++i) {
        sum_exp[i] += part_sum[i];
        target_logit[i] += part_tl[i];
      }
    }
    gsum.upload(sum_exp);
    gtl.upload(target_logit);
    settle();
    cuda::cross_entropy_shard_finish(glosses, glse, gmax, gsum, gtl, gtargets);
    const auto got_lse = glse.download();
    EXPECT_LE(testing::rel_l2(glosses.download(), losses), kSumTolerance) << "losses " << what;
    EXPECT_LE(testing::rel_l2(got_lse, lse), kSumTolerance) << "lse " << what;

    for (int r = 0; r < s.tp; ++r) {
      cuda::cross_entropy_backward(*shards[r], *shards[r], glse, gtargets, s.vocab_size, 0.5f,
                                   r * v);
      const auto got = shards[r]->download();
      std::vector<float> want(n * v);
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(dlogits.begin() + i * full_v + r * v, v, want.begin() + i * v);
      EXPECT_LE(testing::rel_l2(got, want), grad_tolerance(dtype)) << "rank " << r << " " << what;
      EXPECT_TRUE(shards[r]->guards_intact()) << what;
    }
  }
}

// Targets cannot be checked on the host without a synchronization: one past the real vocabulary
// must give a NaN target_logit (so a NaN loss) and a NaN gradient row on every shard.
TEST_P(CrossEntropyShardTest, OutOfRangeTargetGivesNaN) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(73);
  const int64_t n = 2, v = 32;
  const int vocab = 50;  // shards [0, 32) and [32, 64); 60 is padding, not a class
  auto logits = testing::round_to(dtype, testing::random_vector(n * v, rng));
  DeviceTensor glogits(dtype, {n, v}), gtargets(DType::i32, {n}), gmax(DType::f32, {n});
  DeviceTensor gsum(DType::f32, {n}), gtl(DType::f32, {n}), glse(DType::f32, {n});
  gtargets.upload_i32({3, 60});
  glse.upload({5.0f, 5.0f});
  for (int64_t start : {0, 32}) {
    glogits.upload(logits);
    settle();
    cuda::cross_entropy_shard_max(gmax, glogits, start, vocab);
    cuda::cross_entropy_shard_sums(gsum, gtl, glogits, gmax, gtargets, start, vocab);
    const auto tl = gtl.download();
    EXPECT_TRUE(std::isfinite(tl[0])) << start;
    EXPECT_TRUE(std::isnan(tl[1])) << start;
    cuda::cross_entropy_backward(glogits, glogits, glse, gtargets, vocab, 1.0f, start);
    const auto grad = glogits.download();
    for (int64_t col = 0; col < v; ++col) EXPECT_TRUE(std::isnan(grad[v + col])) << col;
    EXPECT_TRUE(std::isfinite(grad[0])) << start;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CrossEntropyShardTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
