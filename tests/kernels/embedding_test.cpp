// Tests of embedding_forward / embedding_backward (kernels/cpu/embedding.cpp,
// kernels/cuda/embedding.cu). CPU: exact lookup with and without wpe, finite-difference gradients
// in f64 with repeated tokens, accumulation, out-of-range ids named in the error, NaN confinement,
// f32 against f64, the vocabulary-parallel form (row shards summed over tp ranks equal the
// unsharded op bit for bit); bf16/f16 against the f32 kernel rounded once; bounds and thread
// counts. GPU parity: f32, bf16, f16, widths in and out of 16-byte packs, with and without wpe,
// repeated tokens (deterministic dwte), +=, out-of-range ids, vocabulary shards.
// Shape letters: B batch, T time, C channels, V vocabulary, Vl rows of one shard, maxT rows of wpe.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/ops.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- CPU reference -----------------------------------------------------------------------------

struct EmbeddingCase {
  HostTensor tokens, wte, wpe, out;  // (B,T) i32, (V,C), (maxT,C) or empty, (B,T,C)
};

EmbeddingCase make_case(DType dtype, int64_t num_b, int64_t num_t, int64_t num_c, int vocab,
                        int64_t max_t, std::mt19937_64& rng) {
  EmbeddingCase e;
  e.tokens = randint({num_b, num_t}, 0, vocab, rng);
  e.wte = randn(dtype, {vocab, num_c}, rng);
  if (max_t > 0) e.wpe = randn(dtype, {max_t, num_c}, rng);
  e.out = HostTensor(dtype, {num_b, num_t, num_c});
  return e;
}

TEST(Embedding, ForwardLooksUpTokensAndPositions) {
  std::mt19937_64 rng(41);
  for (int64_t max_t : {0, 9}) {
    EmbeddingCase e = make_case(DType::f64, 2, 7, 5, 11, max_t, rng);
    cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe);
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t t = 0; t < 7; ++t) {
        const int64_t tok = int64_t(e.tokens.get(b * 7 + t));
        for (int64_t c = 0; c < 5; ++c) {
          const double pos = max_t > 0 ? e.wpe.get(t * 5 + c) : 0.0;
          EXPECT_EQ(e.out.get((b * 7 + t) * 5 + c), e.wte.get(tok * 5 + c) + pos);
        }
      }
    }
  }
}

// The loss is linear in wte and wpe, so the central difference is exact up to rounding (budget:
// tests/common/tensors.h). V = 4 with 2 x 9 positions forces repeated tokens, whose gradients must
// add up; V = 50 with 5 positions leaves unused rows, whose gradient must stay 0.
TS_FD_TEST(Embedding, GradientsMatchFiniteDifferences, "embedding_forward", "embedding_backward") {
  struct Case {
    int64_t num_b, num_t, num_c;
    int vocab;
    int64_t max_t;
  };
  const Case cases[] = {{2, 9, 3, 4, 12}, {1, 1, 1, 1, 1}, {1, 5, 33, 50, 0}};
  std::mt19937_64 rng(42);
  for (const Case& cs : cases) {
    EmbeddingCase e = make_case(DType::f64, cs.num_b, cs.num_t, cs.num_c, cs.vocab, cs.max_t, rng);
    const HostTensor dout = randn(DType::f64, e.out.t.shape, rng);
    HostTensor dwte(DType::f64, e.wte.t.shape);
    HostTensor dwpe = cs.max_t > 0 ? HostTensor(DType::f64, e.wpe.t.shape) : HostTensor();
    cpu::embedding_backward(dwte, dwpe, dout, e.tokens);
    const auto loss =
        fd_loss(dout, e.out, [&] { cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe); });
    expect_grad_matches(e.wte, dwte, loss, kFdTol, "dwte", kFdStep);
    if (cs.max_t > 0) expect_grad_matches(e.wpe, dwpe, loss, kFdTol, "dwpe", kFdStep);
  }
}

TEST(Embedding, BackwardAccumulates) {
  std::mt19937_64 rng(43);
  EmbeddingCase e = make_case(DType::f64, 3, 4, 6, 5, 4, rng);
  const HostTensor dout = randn(DType::f64, {3, 4, 6}, rng);
  HostTensor dwte(DType::f64, {5, 6}), dwpe(DType::f64, {4, 6});
  cpu::embedding_backward(dwte, dwpe, dout, e.tokens);
  const HostTensor dwte1 = dwte, dwpe1 = dwpe;
  cpu::embedding_backward(dwte, dwpe, dout, e.tokens);
  for (int64_t i = 0; i < dwte.size(); ++i) EXPECT_EQ(dwte.get(i), 2 * dwte1.get(i));
  for (int64_t i = 0; i < dwpe.size(); ++i) EXPECT_EQ(dwpe.get(i), 2 * dwpe1.get(i));
}

TEST(Embedding, OutOfRangeTokenIsNamed) {
  std::mt19937_64 rng(44);
  EmbeddingCase e = make_case(DType::f32, 2, 3, 4, 6, 0, rng);
  for (int bad : {6, -1}) {
    HostTensor tokens = e.tokens;
    tokens.set(4, bad);
    try {
      cpu::embedding_forward(e.out, tokens, e.wte, e.wpe);
      ADD_FAILURE() << "token id " << bad << " was accepted";
    } catch (const Error& err) {
      const std::string what = err.what();
      EXPECT_NE(what.find("token id " + std::to_string(bad)), std::string::npos) << what;
      EXPECT_NE(what.find("b=1, t=1"), std::string::npos) << what;
    }
    HostTensor dwte(DType::f32, {6, 4});
    EXPECT_THROW(cpu::embedding_backward(dwte, Tensor(), e.out, tokens), Error);
  }
}

TEST(Embedding, RejectsShortPositionTable) {
  std::mt19937_64 rng(45);
  EmbeddingCase e = make_case(DType::f32, 1, 8, 4, 6, 7, rng);  // T = 8 > maxT = 7
  EXPECT_THROW(cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe), Error);
}

TEST(Embedding, NaNRowReachesOnlyItsTokens) {
  std::mt19937_64 rng(46);
  EmbeddingCase e = make_case(DType::f32, 2, 6, 3, 4, 6, rng);
  for (int64_t c = 0; c < 3; ++c) e.wte.set(2 * 3 + c, kNaN);  // token 2's row
  cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe);
  for (int64_t i = 0; i < 12; ++i)
    EXPECT_EQ(count_nan(e.out, i * 3, i * 3 + 3), e.tokens.get(i) == 2 ? 3 : 0) << "position " << i;
}

// f32 against f64: the forward adds two f32 values (one rounding) and backward sums at most
// B = 4 rows per position in double; both agree to a few f32 ulps of O(1) values.
TEST(Embedding, F32AgreesWithF64) {
  std::mt19937_64 rng(47);
  EmbeddingCase e32 = make_case(DType::f32, 4, 16, 24, 10, 16, rng);
  EmbeddingCase e64{e32.tokens, to_dtype(e32.wte, DType::f64), to_dtype(e32.wpe, DType::f64),
                    HostTensor(DType::f64, {4, 16, 24})};
  cpu::embedding_forward(e32.out, e32.tokens, e32.wte, e32.wpe);
  cpu::embedding_forward(e64.out, e64.tokens, e64.wte, e64.wpe);
  expect_close(e32.out, e64.out, 1e-7, 1e-7, "embedding out");
  const HostTensor dout32 = randn(DType::f32, {4, 16, 24}, rng);
  HostTensor dwte32(DType::f32, {10, 24}), dwpe32(DType::f32, {16, 24});
  HostTensor dwte64(DType::f64, {10, 24}), dwpe64(DType::f64, {16, 24});
  cpu::embedding_backward(dwte32, dwpe32, dout32, e32.tokens);
  cpu::embedding_backward(dwte64, dwpe64, to_dtype(dout32, DType::f64), e64.tokens);
  expect_close(dwte32, dwte64, 1e-7, 1e-7, "embedding dwte");
  expect_close(dwpe32, dwpe64, 1e-7, 1e-7, "embedding dwpe");
}

// Rows [begin, begin + rows) of a (V, C) table.
HostTensor slice_rows(const HostTensor& table, int64_t begin, int64_t rows) {
  const int64_t num_c = table.t.dim(1);
  HostTensor out(table.t.dtype, {rows, num_c});
  for (int64_t i = 0; i < rows * num_c; ++i) out.set(i, table.get(begin * num_c + i));
  return out;
}

// The table (V = 12 rows, divisible by every tp) split into tp row shards; wpe goes to rank 0
// only, as the caller passes it. Adding the ranks' outputs in f32 adds one nonzero wte row to
// zeros (and wpe), so the sum must equal the unsharded output exactly; each rank's dwte is the
// same grouped, ordered sum as the unsharded dwte's rows, so the slices match exactly too.
TEST(Embedding, VocabShardsSumToTheFullEmbedding) {
  std::mt19937_64 rng(48);
  constexpr int64_t kB = 3, kT = 5, kC = 7, kV = 12;
  for (int tp = 1; tp <= 4; ++tp) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    EmbeddingCase e = make_case(DType::f32, kB, kT, kC, kV, kT + 1, rng);
    e.tokens.set(0, 0);
    e.tokens.set(1, kV - 1);  // the first and the last row of the table
    e.tokens.set(2, kV - 1);  // a repeat
    cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe);
    const HostTensor dout = randn(DType::f32, e.out.t.shape, rng);
    const HostTensor dwte_init = randn(DType::f32, e.wte.t.shape, rng);  // backward accumulates
    const HostTensor dwpe_init = randn(DType::f32, e.wpe.t.shape, rng);
    HostTensor dwte = dwte_init, dwpe = dwpe_init;
    cpu::embedding_backward(dwte, dwpe, dout, e.tokens);

    const int64_t rows = kV / tp;
    HostTensor sum(DType::f32, e.out.t.shape);
    for (int r = 0; r < tp; ++r) {
      const int64_t start = r * rows;
      const HostTensor wte = slice_rows(e.wte, start, rows);
      const bool with_wpe = r == 0;
      HostTensor out(DType::f32, e.out.t.shape);
      cpu::embedding_forward(out, e.tokens, wte, with_wpe ? e.wpe.t : Tensor(), start, kV);
      for (int64_t i = 0; i < sum.size(); ++i) sum.set(i, sum.get(i) + out.get(i));
      // A position whose token another rank holds is exactly zero (or wpe on rank 0).
      for (int64_t pos = 0; pos < kB * kT; ++pos) {
        const int64_t local = int64_t(e.tokens.get(pos)) - start;
        const bool here = local >= 0 && local < rows;
        for (int64_t c = 0; c < kC; ++c) {
          const double w = here ? wte.get(local * kC + c) : 0.0;
          const double p = with_wpe ? e.wpe.get((pos % kT) * kC + c) : 0.0;
          if (here && with_wpe) continue;  // a rounded sum, covered by the total below
          EXPECT_EQ(out.get(pos * kC + c), w + p) << "rank " << r << " position " << pos;
        }
      }
      HostTensor dwte_r = slice_rows(dwte_init, start, rows), dwpe_r = dwpe_init;
      cpu::embedding_backward(dwte_r, with_wpe ? dwpe_r.t : Tensor(), dout, e.tokens, start, kV);
      expect_identical(dwte_r, slice_rows(dwte, start, rows), "sharded dwte");
      if (with_wpe)
        expect_identical(dwpe_r, dwpe, "dwpe on the rank holding wpe");
      else
        expect_identical(dwpe_r, dwpe_init, "dwpe untouched without wpe");
    }
    expect_identical(sum, e.out, "sum of the sharded outputs");
  }
}

// The sharded op's gradients by finite differences (f64): rows [3, 7) of a 10-row table, tokens
// over the whole table with repeats, so some positions belong to the shard and some do not.
TS_FD_TEST(Embedding, VocabShardGradientsMatchFiniteDifferences, "embedding_forward",
           "embedding_backward") {
  std::mt19937_64 rng(49);
  constexpr int64_t kB = 2, kT = 9, kC = 3, kStart = 3, kRows = 4, kTotal = 10;
  HostTensor tokens = randint({kB, kT}, 0, kTotal, rng);
  tokens.set(0, kStart);
  tokens.set(1, kStart);
  tokens.set(2, kStart + kRows - 1);
  tokens.set(3, kStart - 1);
  tokens.set(4, kStart + kRows);
  HostTensor wte = randn(DType::f64, {kRows, kC}, rng), wpe = randn(DType::f64, {kT, kC}, rng);
  HostTensor out(DType::f64, {kB, kT, kC});
  const HostTensor dout = randn(DType::f64, {kB, kT, kC}, rng);
  HostTensor dwte(DType::f64, {kRows, kC}), dwpe(DType::f64, {kT, kC});
  cpu::embedding_backward(dwte, dwpe, dout, tokens, kStart, kTotal);
  const auto loss =
      fd_loss(dout, out, [&] { cpu::embedding_forward(out, tokens, wte, wpe, kStart, kTotal); });
  expect_grad_matches(wte, dwte, loss, kFdTol, "sharded dwte", kFdStep);
  expect_grad_matches(wpe, dwpe, loss, kFdTol, "sharded dwpe", kFdStep);
}

// Under vocabulary parallelism the bound is the whole table: a token of another shard is fine, a
// token >= vocab_total (or negative) is named, and a shard must fit inside the table.
TEST(Embedding, VocabShardBoundsAreTheWholeTable) {
  std::mt19937_64 rng(50);
  constexpr int64_t kStart = 4, kRows = 4, kTotal = 10;
  EmbeddingCase e = make_case(DType::f32, 2, 3, 4, kRows, 0, rng);
  e.tokens.set(0, kTotal - 1);  // another shard's token: accepted
  cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe, kStart, kTotal);
  for (int bad : {int(kTotal), -1}) {
    HostTensor tokens = e.tokens;
    tokens.set(4, bad);
    try {
      cpu::embedding_forward(e.out, tokens, e.wte, e.wpe, kStart, kTotal);
      ADD_FAILURE() << "token id " << bad << " was accepted";
    } catch (const Error& err) {
      const std::string what = err.what();
      EXPECT_NE(what.find("token id " + std::to_string(bad)), std::string::npos) << what;
      EXPECT_NE(what.find("outside [0, 10)"), std::string::npos) << what;
    }
    HostTensor dwte(DType::f32, {kRows, 4});
    EXPECT_THROW(cpu::embedding_backward(dwte, Tensor(), e.out, tokens, kStart, kTotal), Error);
  }
  EXPECT_THROW(cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe, 7, kTotal), Error);
  EXPECT_THROW(cpu::embedding_forward(e.out, e.tokens, e.wte, e.wpe, -1, kTotal), Error);
  HostTensor dwte(DType::f32, {kRows, 4});
  EXPECT_THROW(cpu::embedding_backward(dwte, Tensor(), e.out, e.tokens, 7, kTotal), Error);
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, Embedding) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_c = 129;
    // wte (V=7, C), wpe (maxT=5, C), tokens (B=2, T=3)
    expect_contract(
        "embedding_forward", dt,
        {narrow({2, 3, num_c}), ints({2, 3}, 0, 7), narrow({7, num_c}), narrow({5, num_c})},
        [](const auto& t) { ops::embedding_forward(t[0], t[1], t[2], t[3]); }, 1);
    // vocabulary-parallel shard [3, 10) of 12 rows, tokens outside it included, no wpe
    expect_contract(
        "embedding_forward shard", dt,
        {narrow({2, 3, num_c}), ints({2, 3}, 0, 12), narrow({7, num_c})},
        [](const auto& t) { ops::embedding_forward(t[0], t[1], t[2], Tensor(), 3, 12); }, 2);
    // dwte and dwpe accumulate (+=) onto their random contents; tokens repeat (V = 4)
    expect_contract(
        "embedding_backward", dt,
        {narrow({4, num_c}), narrow({5, num_c}), narrow({2, 3, num_c}), ints({2, 3}, 0, 4)},
        [](const auto& t) { ops::embedding_backward(t[0], t[1], t[2], t[3]); }, 3);
    expect_contract(
        "embedding_backward shard", dt,
        {narrow({4, num_c}), narrow({2, 3, num_c}), ints({2, 3}, 0, 9)},
        [](const auto& t) { ops::embedding_backward(t[0], Tensor(), t[1], t[2], 2, 9); }, 4);
  }
}

// FP32 main gradients beside 16-bit dout: dwte and dwpe f32, accumulated (twice) in f32, equal to
// the f32 kernel on the widened dout; a vocabulary shard too.
TEST(NarrowDtype, EmbeddingF32TableGradients) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_c = 129;
    const std::vector<Operand> specs{f32({4, num_c}), f32({5, num_c}), narrow({2, 3, num_c}),
                                     ints({2, 3}, 0, 4)};
    const OpFn backward = [](const auto& t) { ops::embedding_backward(t[0], t[1], t[2], t[3]); };
    expect_contract("embedding_backward f32 dwte, dwpe", dt, specs, backward, 5);
    expect_steps("embedding_backward f32 dwte, dwpe, twice", dt, specs, {backward, backward}, 6);
    expect_contract(
        "embedding_backward shard f32 dwte", dt,
        {f32({4, num_c}), narrow({2, 3, num_c}), ints({2, 3}, 0, 9)},
        [](const auto& t) { ops::embedding_backward(t[0], Tensor(), t[1], t[2], 2, 9); }, 7);
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(Embedding, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kB = 2, kT = 5, kC = 19, kV = 7;
  const HostTensor tokens = randint({kB, kT}, 0, kV, rng);
  const HostTensor wte = randn(DType::f32, {kV, kC}, rng), wpe = randn(DType::f32, {kT, kC}, rng);
  const HostTensor x = randn(DType::f32, {kB, kT, kC}, rng);
  Guarded emb({kB, kT, kC}), dwte({kV, kC}), dwpe({kT, kC});
  cpu::embedding_forward(emb, tokens, wte, wpe);
  cpu::embedding_backward(dwte, dwpe, x, tokens);
  emb.expect_guards_intact("embedding out");
  dwte.expect_guards_intact("dwte");
  dwpe.expect_guards_intact("dwpe");
  // Vocabulary-parallel: rows [2, 5) of the table; the other tokens read as zero rows.
  const HostTensor wte_shard = randn(DType::f32, {3, kC}, rng);
  Guarded emb_shard({kB, kT, kC}), dwte_shard({3, kC});
  cpu::embedding_forward(emb_shard, tokens, wte_shard, Tensor(), 2, kV);
  cpu::embedding_backward(dwte_shard, Tensor(), x, tokens, 2, kV);
  emb_shard.expect_guards_intact("sharded embedding out");
  dwte_shard.expect_guards_intact("sharded dwte");
}

TEST(Embedding, ForwardIsThreadCountIndependent) {
  std::mt19937_64 rng(85);
  const HostTensor tokens = randint({4, 128}, 0, 37, rng);
  const HostTensor wte = randn(DType::f32, {37, 96}, rng), wpe = randn(DType::f32, {128, 96}, rng);
  HostTensor out(DType::f32, {4, 128, 96});
  expect_thread_independent("embedding_forward", {&out},
                            [&] { cpu::embedding_forward(out, tokens, wte, wpe); });
  const HostTensor wte_shard = randn(DType::f32, {13, 96}, rng);
  expect_thread_independent("embedding_forward, vocabulary shard", {&out}, [&] {
    cpu::embedding_forward(out, tokens, wte_shard, Tensor(), 20, 37);
  });
}

TEST(Embedding, BackwardIsThreadCountIndependent) {
  std::mt19937_64 rng(82);
  const HostTensor tokens = randint({4, 128}, 0, 37, rng);  // many repeats
  const HostTensor dout = randn(DType::f32, {4, 128, 96}, rng);
  HostTensor dwte = randn(DType::f32, {37, 96}, rng), dwpe = randn(DType::f32, {128, 96}, rng);
  expect_thread_independent("embedding_backward", {&dwte, &dwpe},
                            [&] { cpu::embedding_backward(dwte, dwpe, dout, tokens); });
  HostTensor dwte_shard = randn(DType::f32, {13, 96}, rng);  // rows [20, 33) of the 37
  expect_thread_independent("embedding_backward, vocabulary shard", {&dwte_shard, &dwpe}, [&] {
    cpu::embedding_backward(dwte_shard, dwpe, dout, tokens, 20, 37);
  });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/embedding.cu)
// ----------------------------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::host;
using testing::settle;

// The forward copies (f32: exact) or adds two values (bf16: one rounding, 2^-9). The backward
// sums up to N rows in f32 where the CPU uses double, then adds to the pre-filled gradient:
// f32 ~1e-7 * sqrt(repeats); bf16 rounds the result to bf16 (2^-9, ~1.1e-3 in L2), f16 to f16
// (2^-11, ~2.8e-4 in L2; unit-normal tables and gradients summed over at most a few hundred
// repeats stay far inside f16's range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct EmbeddingCase {
  int64_t b, t, c, vocab, max_t;
  bool with_wpe;
};
const EmbeddingCase kCases[] = {{1, 1, 1, 1, 1, true},        {2, 7, 5, 11, 9, true},
                                {4, 64, 768, 1000, 64, true}, {2, 33, 1025, 50, 40, false},
                                {8, 128, 256, 3, 128, true},  {3, 100, 64, 50304, 128, false}};

class EmbeddingGpu : public testing::GpuCaseP<DType> {};

TS_GPU_PARITY_TEST_P(EmbeddingGpu, ForwardAndBackwardMatchCpu, "embedding_forward",
                     "embedding_backward") {
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
    ops::embedding_forward(gout, gtok, gwte, e.with_wpe ? gwpe.t() : Tensor());
    const auto got = gout.download();
    EXPECT_LE(testing::rel_l2(got, out), tolerance(dtype)) << "forward " << what;
    testing::expect_same_nonfinite(got, out, "embedding_forward");
    EXPECT_TRUE(gout.guards_intact()) << what;

    ops::embedding_backward(gdwte, e.with_wpe ? gdwpe.t() : Tensor(), gdout, gtok);
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
    ops::embedding_backward(gdwte, Tensor(), gdout, gtok);
    EXPECT_EQ(gdwte.download(), got_dwte) << "rerun " << what;
  }
}

TEST_P(EmbeddingGpu, OutOfRangeTokenIsNaNForwardAndSkippedBackward) {
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
  ops::embedding_forward(gout, gtok, gwte, gwpe);
  const auto out = gout.download();
  for (int64_t row : {3, 7})
    for (int64_t k = 0; k < c; ++k) EXPECT_TRUE(std::isnan(out[row * c + k])) << row;
  EXPECT_TRUE(std::isfinite(out[0]));
  ops::embedding_backward(gdwte, gdwpe, gdout, gtok);
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

TS_GPU_PARITY_TEST_P(EmbeddingGpu, VocabShardMatchesCpu, "embedding_forward",
                     "embedding_backward") {
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
    ops::embedding_forward(gout, gtok, gwte, e.with_wpe ? gwpe.t() : Tensor(), e.vocab_start,
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

    ops::embedding_backward(gdwte, e.with_wpe ? gdwpe.t() : Tensor(), gdout, gtok, e.vocab_start,
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
    ops::embedding_backward(gdwte, Tensor(), gdout, gtok, e.vocab_start, e.vocab_total);
    EXPECT_EQ(gdwte.download(), got_dwte) << "rerun " << what;
  }
}

// Sharded bounds: rows [4, 8) of a 10-row table. Ids 10 and -4 lie outside the whole table (NaN
// rows, no update); id 2 belongs to another shard (zero row, no update); id 5 is local row 1.
TEST_P(EmbeddingGpu, VocabShardOutOfRangeAndForeignTokens) {
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
  ops::embedding_forward(gout, gtok, gwte, Tensor(), start, total);
  const auto out = gout.download();
  for (int64_t k = 0; k < c; ++k) {
    EXPECT_TRUE(std::isnan(out[0 * c + k]) && std::isnan(out[3 * c + k])) << k;
    EXPECT_EQ(out[1 * c + k], 0.0f) << k;
    EXPECT_EQ(out[2 * c + k], wte[1 * c + k]) << k;
  }
  ops::embedding_backward(gdwte, Tensor(), gdout, gtok, start, total);
  const auto dwte = gdwte.download();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < c; ++k)
      EXPECT_EQ(dwte[r * c + k], r == 1 ? dout[2 * c + k] : 0.0f) << r << ", " << k;
}

// FP32 main gradients (kernels/ops.h): dwte and dwpe f32 beside bf16/f16 dout, pre-filled and
// accumulated twice in f32 (two 16-byte f32 packs per 16-bit pack of dout on the vector path).
// Reference: the CPU backward in f32 on the same rounded dout; bound: f32's.
TS_GPU_PARITY_TEST(EmbeddingMainGrad, F32TableGradientsAccumulate, "embedding_backward") {
  std::mt19937_64 rng(55);
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (const EmbeddingCase& e : kCases) {
      const int64_t n = e.b * e.t;
      std::vector<int32_t> tokens(n);
      std::uniform_int_distribution<int> pick(0, int(e.vocab) - 1);
      for (auto& tok : tokens) tok = pick(rng);
      if (n > 4) tokens[1] = tokens[4] = tokens[n - 1];
      Tensor tok_host(tokens.data(), DType::i32, Device::cpu, Shape{e.b, e.t});
      auto dout = testing::round_to(dtype, testing::random_vector(n * e.c, rng));
      const auto dwte = testing::random_vector(e.vocab * e.c, rng);
      const auto dwpe = testing::random_vector(e.max_t * e.c, rng);
      const Shape acts{e.b, e.t, e.c}, table{e.vocab, e.c}, pos{e.max_t, e.c};
      std::vector<float> dwte_ref = dwte, dwpe_ref = dwpe;
      for (int rep = 0; rep < 2; ++rep)
        cpu::embedding_backward(host(dwte_ref, table), e.with_wpe ? host(dwpe_ref, pos) : Tensor(),
                                host(dout, acts), tok_host);
      DeviceTensor gtok(DType::i32, {e.b, e.t}), gdout(dtype, acts), gdwte(DType::f32, table),
          gdwpe(DType::f32, pos);
      gtok.upload_i32(tokens);
      gdout.upload(dout);
      gdwte.upload(dwte);
      gdwpe.upload(dwpe);
      settle();
      for (int rep = 0; rep < 2; ++rep)
        ops::embedding_backward(gdwte, e.with_wpe ? gdwpe.t() : Tensor(), gdout, gtok);
      const std::string what = std::string(dtype_name(dtype)) + " dout, f32 dwte " + acts.str() +
                               " V=" + std::to_string(e.vocab);
      EXPECT_LE(testing::rel_l2(gdwte.download(), dwte_ref), tolerance(DType::f32)) << what;
      EXPECT_TRUE(gdwte.guards_intact()) << what;
      if (e.with_wpe) {
        EXPECT_LE(testing::rel_l2(gdwpe.download(), dwpe_ref), tolerance(DType::f32))
            << "dwpe " << what;
        EXPECT_TRUE(gdwpe.guards_intact()) << what;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EmbeddingGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
