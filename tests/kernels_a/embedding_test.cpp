// embedding_forward / embedding_backward: exact lookup with and without wpe, finite-difference
// gradients in f64 with repeated tokens, accumulation into existing gradients, out-of-range ids
// named in the error, NaN confinement, f32 against f64, and the vocabulary-parallel form (row
// shards of a padded table summed over tp ranks equal the unsharded op bit for bit).
// Shape letters: B batch, T time, C channels, V vocabulary, Vl rows of one shard, maxT rows of wpe.
#include <random>
#include <string>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

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
// kernels_a_util.h). V = 4 with 2 x 9 positions forces repeated tokens, whose gradients must add
// up; V = 50 with 5 positions leaves unused rows, whose gradient must stay 0.
TEST(Embedding, GradientsMatchFiniteDifferences) {
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
TEST(Embedding, VocabShardGradientsMatchFiniteDifferences) {
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

}  // namespace
}  // namespace tessera::testing
