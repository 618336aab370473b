// Parity of the CUDA token + position embedding (kernels/cuda/embedding.cu) with the CPU
// reference, f32, bf16 and f16: widths that do and do not divide into 16-byte packs, with and
// without wpe, heavily repeated tokens (the sorted, deterministic dwte accumulation), pre-filled
// gradients (+=), bitwise reproducible backward, out-of-range token ids (NaN row forward,
// skipped backward), and vocabulary shards (rows [vocab_start, vocab_start + Vl) of a larger
// table: other shards' tokens give zero rows and no dwte update).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

// The forward copies (f32: exact) or adds two values (bf16: one rounding, 2^-9). The backward
// sums up to N rows in f32 where the CPU uses double, then adds to the pre-filled gradient:
// f32 ~1e-7 * sqrt(repeats); bf16 rounds the result to bf16 (2^-9, ~1.1e-3 in L2), f16 to f16
// (2^-11, ~2.8e-4 in L2; unit-normal tables and gradients summed over at most a few hundred
// repeats stay far inside f16's range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

struct EmbeddingCase {
  int64_t b, t, c, vocab, max_t;
  bool with_wpe;
};
const EmbeddingCase kCases[] = {{1, 1, 1, 1, 1, true},        {2, 7, 5, 11, 9, true},
                                {4, 64, 768, 1000, 64, true}, {2, 33, 1025, 50, 40, false},
                                {8, 128, 256, 3, 128, true},  {3, 100, 64, 50304, 128, false}};

class EmbeddingTest : public ::testing::TestWithParam<DType> {};

TEST_P(EmbeddingTest, ForwardAndBackwardMatchCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(51);
  for (const EmbeddingCase& e : kCases) {
    const int64_t n = e.b * e.t;
    std::vector<int32_t> tokens(n);
    std::uniform_int_distribution<int> pick(0, int(e.vocab) - 1);
    for (auto& tok : tokens) tok = pick(rng);
    if (n > 4) tokens[1] = tokens[4] = tokens[n - 1];  // repeats, also across batch rows
    Tensor tok_host(tokens.data(), DType::i32, Device::cpu, Shape{e.b, e.t});
    auto wte = testing::round_to(dtype, testing::random_vector(e.vocab * e.c, rng));
    auto wpe = testing::round_to(dtype, testing::random_vector(e.max_t * e.c, rng));
    auto dout = testing::round_to(dtype, testing::random_vector(n * e.c, rng));
    auto dwte = testing::round_to(dtype, testing::random_vector(e.vocab * e.c, rng));
    auto dwpe = testing::round_to(dtype, testing::random_vector(e.max_t * e.c, rng));
    const Shape acts{e.b, e.t, e.c}, table{e.vocab, e.c}, pos{e.max_t, e.c};

    std::vector<float> out(n * e.c), dwte_ref = dwte, dwpe_ref = dwpe;
    cpu::embedding_forward(host(out, acts), tok_host, host(wte, table),
                           e.with_wpe ? host(wpe, pos) : Tensor());
    cpu::embedding_backward(host(dwte_ref, table), e.with_wpe ? host(dwpe_ref, pos) : Tensor(),
                            host(dout, acts), tok_host);

    DeviceTensor gtok(DType::i32, {e.b, e.t}), gwte(dtype, table), gwpe(dtype, pos);
    DeviceTensor gout(dtype, acts), gdout(dtype, acts), gdwte(dtype, table), gdwpe(dtype, pos);
    gtok.upload_i32(tokens);
    gwte.upload(wte);
    gwpe.upload(wpe);
    gdout.upload(dout);
    gdwte.upload(dwte);
    gdwpe.upload(dwpe);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " " + acts.str() +
                             " V=" + std::to_string(e.vocab) + (e.with_wpe ? "" : " no wpe");
    cuda::embedding_forward(gout, gtok, gwte, e.with_wpe ? gwpe.t() : Tensor());
    const auto got = gout.download();
    EXPECT_LE(testing::rel_l2(got, out), tolerance(dtype)) << "forward " << what;
    testing::expect_same_nonfinite(got, out, "embedding_forward");
    EXPECT_TRUE(gout.guards_intact()) << what;

    cuda::embedding_backward(gdwte, e.with_wpe ? gdwpe.t() : Tensor(), gdout, gtok);
    const auto got_dwte = gdwte.download();
    EXPECT_LE(testing::rel_l2(got_dwte, dwte_ref), tolerance(dtype)) << "dwte " << what;
    testing::expect_same_nonfinite(got_dwte, dwte_ref, "dwte");
    EXPECT_TRUE(gdwte.guards_intact()) << what;
    if (e.with_wpe) {
      EXPECT_LE(testing::rel_l2(gdwpe.download(), dwpe_ref), tolerance(dtype)) << "dwpe " << what;
      EXPECT_TRUE(gdwpe.guards_intact()) << what;
    } else {
      EXPECT_EQ(gdwpe.download(), dwpe) << "dwpe was not passed but changed: " << what;
    }

    // Reproducible to the bit from the same starting state.
    gdwte.upload(dwte);
    settle();
    cuda::embedding_backward(gdwte, Tensor(), gdout, gtok);
    EXPECT_EQ(gdwte.download(), got_dwte) << "rerun " << what;
  }
}

TEST_P(EmbeddingTest, OutOfRangeTokenIsNaNForwardAndSkippedBackward) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(52);
  const int64_t b = 2, t = 6, c = 16, vocab = 10;
  std::vector<int32_t> tokens = {1, 2, 3, 10, 5, 1, 7, -4, 1, 9, 0, 2};  // 10 and -4 invalid
  auto wte = testing::round_to(dtype, testing::random_vector(vocab * c, rng));
  auto wpe = testing::round_to(dtype, testing::random_vector(t * c, rng));
  auto dout = testing::round_to(dtype, testing::random_vector(b * t * c, rng));
  std::vector<float> dwte(vocab * c, 0.0f), dwpe(t * c, 0.0f);
  DeviceTensor gtok(DType::i32, {b, t}), gwte(dtype, {vocab, c}), gwpe(dtype, {t, c});
  DeviceTensor gout(dtype, {b, t, c}), gdout(dtype, {b, t, c}), gdwte(dtype, {vocab, c});
  DeviceTensor gdwpe(dtype, {t, c});
  gtok.upload_i32(tokens);
  gwte.upload(wte);
  gwpe.upload(wpe);
  gdout.upload(dout);
  gdwte.upload(dwte);
  gdwpe.upload(dwpe);
  settle();
  cuda::embedding_forward(gout, gtok, gwte, gwpe);
  const auto out = gout.download();
  for (int64_t row : {3, 7})
    for (int64_t k = 0; k < c; ++k) EXPECT_TRUE(std::isnan(out[row * c + k])) << row;
  EXPECT_TRUE(std::isfinite(out[0]));
  cuda::embedding_backward(gdwte, gdwpe, gdout, gtok);
  // Reference: the invalid positions contribute nothing to dwte, but their dout still reaches
  // dwpe (positions do not depend on the token).
  std::vector<int32_t> valid = tokens;
  std::vector<float> dout_valid = dout;
  for (int64_t row : {3, 7}) {
    valid[row] = 0;
    for (int64_t k = 0; k < c; ++k) dout_valid[row * c + k] = 0.0f;
  }
  std::vector<float> dwte_ref(vocab * c, 0.0f), dwpe_ref(t * c, 0.0f), scratch(vocab * c, 0.0f);
  Tensor valid_host(valid.data(), DType::i32, Device::cpu, Shape{b, t});
  cpu::embedding_backward(host(dwte_ref, {vocab, c}), Tensor(), host(dout_valid, {b, t, c}),
                          valid_host);
  cpu::embedding_backward(host(scratch, {vocab, c}), host(dwpe_ref, {t, c}), host(dout, {b, t, c}),
                          valid_host);
  EXPECT_LE(testing::rel_l2(gdwte.download(), dwte_ref), tolerance(dtype));
  EXPECT_LE(testing::rel_l2(gdwpe.download(), dwpe_ref), tolerance(dtype));
}

struct ShardCase {
  int64_t b, t, c, vocab_total, vocab_start, rows;  // rows = Vl
  bool with_wpe;
};
const ShardCase kShardCases[] = {
    {1, 1, 1, 4, 3, 1, true},                 // Vl = 1, the last row
    {2, 7, 5, 12, 4, 4, true},                // odd C: no 16-byte packs
    {4, 64, 768, 1000, 250, 250, true},       // tp = 4, second shard
    {2, 33, 1025, 50, 0, 13, false},          // first shard
    {8, 128, 256, 6, 3, 3, true},             // heavy repeats
    {3, 100, 64, 50304, 37728, 12576, false}  // GPT-2's padded table over tp = 4, last shard
};

TEST_P(EmbeddingTest, VocabShardMatchesCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(53);
  for (const ShardCase& e : kShardCases) {
    const int64_t n = e.b * e.t;
    std::vector<int32_t> tokens(n);
    std::uniform_int_distribution<int64_t> anywhere(0, e.vocab_total - 1);
    std::uniform_int_distribution<int64_t> here(e.vocab_start, e.vocab_start + e.rows - 1);
    for (int64_t i = 0; i < n; ++i) tokens[i] = int32_t(i % 2 == 0 ? here(rng) : anywhere(rng));
    if (n > 4) tokens[1] = tokens[4] = tokens[n - 1];
    Tensor tok_host(tokens.data(), DType::i32, Device::cpu, Shape{e.b, e.t});
    auto wte = testing::round_to(dtype, testing::random_vector(e.rows * e.c, rng));
    auto wpe = testing::round_to(dtype, testing::random_vector(e.t * e.c, rng));
    auto dout = testing::round_to(dtype, testing::random_vector(n * e.c, rng));
    auto dwte = testing::round_to(dtype, testing::random_vector(e.rows * e.c, rng));
    auto dwpe = testing::round_to(dtype, testing::random_vector(e.t * e.c, rng));
    const Shape acts{e.b, e.t, e.c}, table{e.rows, e.c}, pos{e.t, e.c};
    const Tensor wpe_host = e.with_wpe ? host(wpe, pos) : Tensor();

    std::vector<float> out(n * e.c), dwte_ref = dwte, dwpe_ref = dwpe;
    cpu::embedding_forward(host(out, acts), tok_host, host(wte, table), wpe_host, e.vocab_start,
                           e.vocab_total);
    cpu::embedding_backward(host(dwte_ref, table), e.with_wpe ? host(dwpe_ref, pos) : Tensor(),
                            host(dout, acts), tok_host, e.vocab_start, e.vocab_total);

    DeviceTensor gtok(DType::i32, {e.b, e.t}), gwte(dtype, table), gwpe(dtype, pos);
    DeviceTensor gout(dtype, acts), gdout(dtype, acts), gdwte(dtype, table), gdwpe(dtype, pos);
    gtok.upload_i32(tokens);
    gwte.upload(wte);
    gwpe.upload(wpe);
    gdout.upload(dout);
    gdwte.upload(dwte);
    gdwpe.upload(dwpe);
    settle();
    const std::string what = std::string(dtype_name(dtype)) + " " + acts.str() + " rows [" +
                             std::to_string(e.vocab_start) + ", +" + std::to_string(e.rows) +
                             ") of " + std::to_string(e.vocab_total);
    cuda::embedding_forward(gout, gtok, gwte, e.with_wpe ? gwpe.t() : Tensor(), e.vocab_start,
                            e.vocab_total);
    const auto got = gout.download();
    EXPECT_LE(testing::rel_l2(got, out), tolerance(dtype)) << "forward " << what;
    testing::expect_same_nonfinite(got, out, "sharded embedding_forward");
    EXPECT_TRUE(gout.guards_intact()) << what;
    if (!e.with_wpe) {  // another shard's token is an exact zero row
      for (int64_t i = 0; i < n; ++i) {
        const bool in_shard = tokens[i] >= e.vocab_start && tokens[i] < e.vocab_start + e.rows;
        for (int64_t k = 0; k < e.c && !in_shard; ++k) {
          if (got[i * e.c + k] != 0.0f) {
            ADD_FAILURE() << what << ": position " << i << " is not a zero row";
            break;
          }
        }
      }
    }

    cuda::embedding_backward(gdwte, e.with_wpe ? gdwpe.t() : Tensor(), gdout, gtok, e.vocab_start,
                             e.vocab_total);
    const auto got_dwte = gdwte.download();
    EXPECT_LE(testing::rel_l2(got_dwte, dwte_ref), tolerance(dtype)) << "dwte " << what;
    testing::expect_same_nonfinite(got_dwte, dwte_ref, "sharded dwte");
    EXPECT_TRUE(gdwte.guards_intact()) << what;
    if (e.with_wpe) {
      EXPECT_LE(testing::rel_l2(gdwpe.download(), dwpe_ref), tolerance(dtype)) << "dwpe " << what;
      EXPECT_TRUE(gdwpe.guards_intact()) << what;
    }
    gdwte.upload(dwte);  // reproducible to the bit
    settle();
    cuda::embedding_backward(gdwte, Tensor(), gdout, gtok, e.vocab_start, e.vocab_total);
    EXPECT_EQ(gdwte.download(), got_dwte) << "rerun " << what;
  }
}

// Sharded bounds: rows [4, 8) of a 10-row table. Ids 10 and -4 lie outside the whole table (NaN
// rows, no update); id 2 belongs to another shard (zero row, no update); id 5 is local row 1.
TEST_P(EmbeddingTest, VocabShardOutOfRangeAndForeignTokens) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(54);
  const int64_t b = 1, t = 4, c = 8, start = 4, rows = 4, total = 10;
  std::vector<int32_t> tokens = {10, 2, 5, -4};
  auto wte = testing::round_to(dtype, testing::random_vector(rows * c, rng));
  auto dout = testing::round_to(dtype, testing::random_vector(b * t * c, rng));
  DeviceTensor gtok(DType::i32, {b, t}), gwte(dtype, {rows, c}), gout(dtype, {b, t, c});
  DeviceTensor gdout(dtype, {b, t, c}), gdwte(dtype, {rows, c});
  gtok.upload_i32(tokens);
  gwte.upload(wte);
  gdout.upload(dout);
  gdwte.upload(std::vector<float>(rows * c, 0.0f));
  settle();
  cuda::embedding_forward(gout, gtok, gwte, Tensor(), start, total);
  const auto out = gout.download();
  for (int64_t k = 0; k < c; ++k) {
    EXPECT_TRUE(std::isnan(out[0 * c + k]) && std::isnan(out[3 * c + k])) << k;
    EXPECT_EQ(out[1 * c + k], 0.0f) << k;
    EXPECT_EQ(out[2 * c + k], wte[1 * c + k]) << k;
  }
  cuda::embedding_backward(gdwte, Tensor(), gdout, gtok, start, total);
  const auto dwte = gdwte.download();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < c; ++k)
      EXPECT_EQ(dwte[r * c + k], r == 1 ? dout[2 * c + k] : 0.0f) << r << ", " << k;
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EmbeddingTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
