// Tests of paged_attention_forward (kernels/cpu/paged_attention.cpp,
// kernels/cuda/paged_attention.cu). CPU: against dense causal attention over the K/V gathered
// through the block table (GQA 1, 2, 4; blocks of 1, 3, 16 tokens; shuffled tables; padding rows;
// unused blocks holding NaN), a prefill chunk against ops::attention_forward, batch invariance,
// bf16/f16 against the f32 kernel rounded once, rejected indices, bounds, thread counts. GPU:
// parity with the CPU in f32/bf16/f16 for head dims 32..256 (packed and element-wise loads),
// contexts of one and many partitions, decode and prefill rows; rows bitwise the same alone and
// inside batches.
// Shape letters: M rows, Hq / Hkv heads, D head dim, NB blocks, BS tokens per block, S sequences,
// MB blocks per table row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/infer.h"
#include "kernels/ops_infer.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// A cache of NB blocks shared by S sequences of the given lengths, each owning a shuffled,
// non-contiguous set of blocks; rows (seq, pos) to attend from. Blocks no sequence owns hold NaN.
struct Paged {
  int64_t hq, hkv, d, bs, nb, mb;
  std::vector<int32_t> lengths;   // (S) tokens cached per sequence
  std::vector<int32_t> table;     // (S, MB), -1 past a sequence's blocks
  std::vector<int32_t> seq, pos;  // (M)
  std::vector<float> q, kc, vc;   // (M,Hq,D), (NB,BS,Hkv,D) x 2
  int max_context = 1;

  int64_t m() const { return int64_t(seq.size()); }
  Shape q_shape() const { return {m(), hq, d}; }
  Shape cache_shape() const { return {nb, bs, hkv, d}; }
};

// rows: for each sequence, `decode` gives one row at its last position; otherwise every
// position (a prefill chunk). Extra padding rows (pos -1) are interleaved.
Paged make_paged(int64_t hq, int64_t hkv, int64_t d, int64_t bs, std::vector<int32_t> lengths,
                 bool decode, std::mt19937_64& rng, int padding_rows = 1) {
  Paged p{hq, hkv, d, bs, 0, 0, lengths, {}, {}, {}, {}, {}, {}};
  int64_t needed = 0;
  for (int32_t len : lengths) {
    p.mb = std::max<int64_t>(p.mb, (len + bs - 1) / bs);
    needed += (len + bs - 1) / bs;
  }
  p.nb = needed + 3;  // spare blocks, never referenced
  std::vector<int32_t> blocks(p.nb);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  p.table.assign(lengths.size() * p.mb, -1);
  size_t next = 0;
  std::vector<char> owned(p.nb, 0);
  for (size_t s = 0; s < lengths.size(); ++s)
    for (int64_t j = 0; j < (lengths[s] + bs - 1) / bs; ++j) {
      p.table[s * p.mb + j] = blocks[next];
      owned[blocks[next++]] = 1;
    }
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (int32_t t = decode ? lengths[s] - 1 : 0; t < lengths[s]; ++t) {
      p.seq.push_back(int32_t(s));
      p.pos.push_back(t);
      p.max_context = std::max(p.max_context, t + 1);
    }
    if (padding_rows > 0 && s % 2 == 0) {
      p.seq.push_back(int32_t(s));
      p.pos.push_back(-1);
    }
  }
  p.q = random_vector(p.m() * hq * d, rng);
  p.kc = random_vector(p.nb * bs * hkv * d, rng);
  p.vc = random_vector(p.nb * bs * hkv * d, rng);
  const int64_t per_block = bs * hkv * d;
  for (int64_t b = 0; b < p.nb; ++b)
    if (!owned[b])
      for (int64_t i = 0; i < per_block; ++i)
        p.kc[b * per_block + i] = p.vc[b * per_block + i] = std::numeric_limits<float>::quiet_NaN();
  return p;
}

// Dense causal attention of every row over its sequence's gathered K/V, in double.
std::vector<double> dense_reference(const Paged& p, float scale) {
  std::vector<double> out(p.m() * p.hq * p.d, 0.0);
  for (int64_t m = 0; m < p.m(); ++m) {
    if (p.pos[m] < 0) continue;
    const int64_t ctx = p.pos[m] + 1;
    std::vector<const float*> k(ctx), v(ctx);  // the gathered rows, one per position
    for (int64_t t = 0; t < ctx; ++t) {
      const int64_t slot = int64_t(p.table[p.seq[m] * p.mb + t / p.bs]) * p.bs + t % p.bs;
      k[t] = &p.kc[slot * p.hkv * p.d];
      v[t] = &p.vc[slot * p.hkv * p.d];
    }
    for (int64_t h = 0; h < p.hq; ++h) {
      const int64_t g = h / (p.hq / p.hkv);
      const float* q = &p.q[(m * p.hq + h) * p.d];
      std::vector<double> s(ctx);
      for (int64_t t = 0; t < ctx; ++t) {
        double dot = 0.0;
        for (int64_t i = 0; i < p.d; ++i) dot += double(q[i]) * k[t][g * p.d + i];
        s[t] = scale * dot;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0.0;
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int64_t i = 0; i < p.d; ++i) {
        double acc = 0.0;
        for (int64_t t = 0; t < ctx; ++t) acc += s[t] * v[t][g * p.d + i];
        out[(m * p.hq + h) * p.d + i] = acc / z;
      }
    }
  }
  return out;
}

// The CPU op on p (f32 operands).
std::vector<float> run_cpu(Paged& p, float scale, int max_context = 0) {
  std::vector<float> out(p.m() * p.hq * p.d, -1.0f);
  cpu::paged_attention_forward(
      host(out, p.q_shape()), host(p.q, p.q_shape()), host(p.kc, p.cache_shape()),
      host(p.vc, p.cache_shape()),
      Tensor(p.table.data(), DType::i32, Device::cpu, {int64_t(p.lengths.size()), p.mb}),
      Tensor(p.seq.data(), DType::i32, Device::cpu, {p.m()}),
      Tensor(p.pos.data(), DType::i32, Device::cpu, {p.m()}), scale,
      max_context > 0 ? max_context : p.max_context);
  return out;
}

struct Heads {
  int64_t hq, hkv;
};

TS_CPU_VALUE_TEST(PagedAttention, MatchesDenseCausalAttention, "paged_attention_forward") {
  std::mt19937_64 rng(1);
  for (const Heads& h : {Heads{1, 1}, Heads{2, 1}, Heads{4, 2}, Heads{8, 2}})
    for (int64_t bs : {1, 3, 16})
      for (bool decode : {true, false}) {
        Paged p = make_paged(h.hq, h.hkv, 6, bs, {5, 1, 37, 20}, decode, rng);
        const float scale = 0.4f;
        const std::vector<float> got = run_cpu(p, scale);
        const std::vector<double> want = dense_reference(p, scale);
        // Both in double; the op rounds once to f32 (6e-8 relative of outputs below ~4).
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_NEAR(got[i], want[i], 1e-6) << "Hq " << h.hq << " Hkv " << h.hkv << " BS " << bs
                                             << " decode " << decode << " element " << i;
      }
}

// A prefill chunk of a whole sequence: the same as the training attention on the contiguous K/V.
TEST(PagedAttention, PrefillEqualsAttentionForward) {
  std::mt19937_64 rng(2);
  const int64_t t = 29, hq = 4, hkv = 2, d = 8;
  Paged p = make_paged(hq, hkv, d, 3, {int32_t(t)}, false, rng, 0);
  const float scale = 1.0f / std::sqrt(float(d));
  HostTensor q(DType::f64, {1, t, hq, d}), k(DType::f64, {1, t, hkv, d}), v(DType::f64, k.t.shape);
  for (int64_t i = 0; i < q.size(); ++i) q.set(i, p.q[i]);
  for (int64_t tt = 0; tt < t; ++tt) {
    const int64_t slot = int64_t(p.table[tt / 3]) * 3 + tt % 3;
    for (int64_t i = 0; i < hkv * d; ++i) {
      k.set(tt * hkv * d + i, p.kc[slot * hkv * d + i]);
      v.set(tt * hkv * d + i, p.vc[slot * hkv * d + i]);
    }
  }
  HostTensor want(DType::f64, q.t.shape), lse(DType::f64, {1, hq, t});
  cpu::attention_forward(want, lse, q, k, v, scale);
  const std::vector<float> got = run_cpu(p, scale);
  for (int64_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want.get(i), 1e-6) << i;
}

TEST(PagedAttention, RowAloneEqualsRowInBatch) {
  std::mt19937_64 rng(3);
  Paged p = make_paged(4, 2, 8, 3, {17, 4, 40}, false, rng);
  const std::vector<float> all = run_cpu(p, 0.3f);
  const int64_t row = p.hq * p.d;
  for (int64_t m : {int64_t(0), int64_t(5), p.m() - 1}) {
    Paged one = p;
    one.seq = {p.seq[m]};
    one.pos = {p.pos[m]};
    one.q.assign(p.q.begin() + m * row, p.q.begin() + (m + 1) * row);
    const std::vector<float> got = run_cpu(one, 0.3f, std::max(1, p.pos[m] + 1));
    for (int64_t i = 0; i < row; ++i) ASSERT_EQ(got[i], all[m * row + i]) << "row " << m;
  }
}

TEST(PagedAttention, PaddingRowsAreZero) {
  std::mt19937_64 rng(4);
  Paged p = make_paged(2, 2, 4, 2, {3, 6}, true, rng);
  const std::vector<float> got = run_cpu(p, 0.5f);
  for (int64_t m = 0; m < p.m(); ++m) {
    if (p.pos[m] >= 0) continue;
    for (int64_t i = 0; i < p.hq * p.d; ++i) EXPECT_EQ(got[m * p.hq * p.d + i], 0.0f);
  }
}

TEST(PagedAttention, RejectsBadIndices) {
  std::mt19937_64 rng(5);
  Paged p = make_paged(2, 1, 4, 2, {3, 6}, true, rng, 0);
  EXPECT_THROW(run_cpu(p, 1.0f, 5), Error);  // pos 5 needs max_context 6
  Paged bad_seq = p;
  bad_seq.seq[0] = 2;
  EXPECT_THROW(run_cpu(bad_seq, 1.0f), Error);
  Paged bad_block = p;
  bad_block.table[0] = int32_t(p.nb);
  EXPECT_THROW(run_cpu(bad_block, 1.0f), Error);
  Paged past_table = p;
  past_table.pos[1] = int32_t(p.mb * p.bs);  // beyond the table's blocks
  EXPECT_THROW(run_cpu(past_table, 1.0f, 100), Error);
  Paged bad_heads = p;  // Hq = 3 is not a multiple of Hkv = 2
  bad_heads.hq = 3, bad_heads.hkv = 2;
  bad_heads.q.resize(bad_heads.m() * 3 * 4);
  bad_heads.kc.resize(p.kc.size() * 2), bad_heads.vc.resize(p.vc.size() * 2);
  EXPECT_THROW(run_cpu(bad_heads, 1.0f), Error);
}

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, PagedAttention) {
  // NB = 6 blocks of 2 tokens, S = 3 table rows of 3 random blocks: any table entry is valid, so
  // random positions up to MB * BS = 6 are too (and -1: padding).
  for (DType dt : kNarrowTypes)
    expect_contract(
        "paged_attention_forward", dt,
        {narrow({5, 4, 8}), narrow({5, 4, 8}), narrow({6, 2, 2, 8}), narrow({6, 2, 2, 8}),
         ints({3, 3}, 0, 6), ints({5}, 0, 3), ints({5}, -1, 6)},
        [](const auto& t) {
          ops::paged_attention_forward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], 0.35f, 6,
                                       Tensor());
        },
        70);
}

}  // namespace narrow_cases

TEST(PagedAttention, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(97);
  Paged p = make_paged(4, 2, 8, 3, {7, 12}, false, rng);
  Guarded out(p.q_shape());
  cpu::paged_attention_forward(
      out, host(p.q, p.q_shape()), host(p.kc, p.cache_shape()), host(p.vc, p.cache_shape()),
      Tensor(p.table.data(), DType::i32, Device::cpu, {2, p.mb}),
      Tensor(p.seq.data(), DType::i32, Device::cpu, {p.m()}),
      Tensor(p.pos.data(), DType::i32, Device::cpu, {p.m()}), 0.5f, p.max_context);
  expect_guards_intact({&out}, "paged_attention_forward");
}

TEST(PagedAttention, IsThreadCountIndependent) {
  std::mt19937_64 rng(98);
  Paged p = make_paged(8, 2, 16, 16, {100, 64, 3}, false, rng);
  HostTensor out(DType::f32, p.q_shape());
  expect_thread_independent("paged_attention_forward", {&out}, [&] {
    cpu::paged_attention_forward(
        out, host(p.q, p.q_shape()), host(p.kc, p.cache_shape()), host(p.vc, p.cache_shape()),
        Tensor(p.table.data(), DType::i32, Device::cpu, {3, p.mb}),
        Tensor(p.seq.data(), DType::i32, Device::cpu, {p.m()}),
        Tensor(p.pos.data(), DType::i32, Device::cpu, {p.m()}), 0.25f, p.max_context);
  });
}

}  // namespace
}  // namespace tessera::testing

// ---- GPU parity (kernels/cuda/paged_attention.cu) ---------------------------------------------

namespace tessera {
namespace {

using testing::DeviceTensor;
using testing::Paged;
using testing::settle;

// Everything p needs on the device (inputs rounded to dtype in p itself, so the CPU sees them).
struct DevicePaged {
  DeviceTensor q, kc, vc, table, seq, pos, out;
  std::unique_ptr<DeviceTensor> scratch;

  DevicePaged(Paged& p, DType dtype, int max_context)
      : q(dtype, p.q_shape()),
        kc(dtype, p.cache_shape()),
        vc(dtype, p.cache_shape()),
        table(DType::i32, {int64_t(p.lengths.size()), p.mb}),
        seq(DType::i32, {p.m()}),
        pos(DType::i32, {p.m()}),
        out(dtype, p.q_shape()) {
    p.q = testing::round_to(dtype, p.q);
    p.kc = testing::round_to(dtype, p.kc);
    p.vc = testing::round_to(dtype, p.vc);
    q.upload(p.q), kc.upload(p.kc), vc.upload(p.vc);
    table.upload_i32(p.table), seq.upload_i32(p.seq), pos.upload_i32(p.pos);
    const int64_t bytes = ops::paged_attention_scratch_bytes(p.m(), p.hq, p.d, max_context);
    if (bytes > 0) scratch = std::make_unique<DeviceTensor>(DType::f32, Shape{bytes / 4});
  }
  void run(float scale, int max_context) {
    ops::paged_attention_forward(out, q, kc, vc, table, seq, pos, scale, max_context,
                                 scratch ? scratch->t() : Tensor());
  }
};

// The CPU works in double and rounds once; the GPU's scores are f32 dot products (pre-scaled by
// scale * log2 e), exp2f (2 ulp) and f32 sums over <= 1100 positions, a few 1e-7 relative, so
// f32 is held to 2e-5 in L2. bf16 / f16 outputs add their rounding: 2^-9 and 2^-11 per element
// (~2.3e-3 and ~6e-4 in L2).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-5, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

struct GpuPagedCase {
  int64_t hq, hkv, d, bs;
  std::vector<int32_t> lengths;
  bool decode;
};

class PagedAttentionGpu : public testing::GpuCaseP<DType> {};

// One-partition contexts (<= 256, the direct path) and many (up to 1100: partials and the
// combine); D 64/128 (packed), 32, 80, 96, 256, and 33 (element-wise loads); 1, 2, 4 and 12
// query heads per KV head (12: two head chunks of a block).
TS_GPU_PARITY_TEST_P(PagedAttentionGpu, MatchesCpu, "paged_attention_forward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(61);
  const GpuPagedCase cases[] = {
      {8, 8, 64, 16, {200, 1, 77}, true}, {32, 8, 128, 16, {1100, 513, 256, 257}, true},
      {4, 1, 32, 3, {90, 31}, false},     {6, 2, 80, 1, {300, 5}, true},
      {12, 1, 96, 16, {520}, true},       {2, 2, 256, 16, {600, 40}, true},
      {4, 2, 33, 3, {70, 9}, false},      {8, 2, 128, 16, {700}, false},
  };
  for (const GpuPagedCase& c : cases) {
    Paged p = testing::make_paged(c.hq, c.hkv, c.d, c.bs, c.lengths, c.decode, rng);
    DevicePaged g(p, dtype, p.max_context);
    const float scale = 1.0f / std::sqrt(float(c.d));
    const std::vector<float> want = testing::run_cpu(p, scale);
    settle();
    g.run(scale, p.max_context);
    const auto got = g.out.download();
    const std::string what = std::string(dtype_name(dtype)) + " Hq " + std::to_string(c.hq) +
                             " Hkv " + std::to_string(c.hkv) + " D " + std::to_string(c.d) +
                             " BS " + std::to_string(c.bs) + " max_context " +
                             std::to_string(p.max_context);
    EXPECT_LE(testing::rel_l2(got, want), tolerance(dtype)) << what;
    testing::expect_same_nonfinite(got, want, what);  // unused (NaN) blocks never read
    EXPECT_TRUE(g.out.guards_intact()) << what;
    if (g.scratch) {
      EXPECT_TRUE(g.scratch->guards_intact()) << what;
    }
  }
}

// Rows [begin, end) of p (its q, seq, pos) run against the cache already on the device in g,
// with the given max_context; returns the output's bytes.
std::vector<unsigned char> run_rows(const Paged& p, DevicePaged& g, DType dtype, int64_t begin,
                                    int64_t end, int max_context, float scale) {
  const int64_t m = end - begin, row = p.hq * p.d;
  DeviceTensor q(dtype, {m, p.hq, p.d}), seq(DType::i32, {m}), pos(DType::i32, {m}),
      out(dtype, {m, p.hq, p.d});
  q.upload(std::vector<float>(p.q.begin() + begin * row, p.q.begin() + end * row));
  seq.upload_i32(std::vector<int32_t>(p.seq.begin() + begin, p.seq.begin() + end));
  pos.upload_i32(std::vector<int32_t>(p.pos.begin() + begin, p.pos.begin() + end));
  const int64_t bytes = ops::paged_attention_scratch_bytes(m, p.hq, p.d, max_context);
  std::unique_ptr<DeviceTensor> scratch;
  if (bytes > 0) scratch = std::make_unique<DeviceTensor>(DType::f32, Shape{bytes / 4});
  ops::paged_attention_forward(out, q, g.kc, g.vc, g.table, seq, pos, scale, max_context,
                               scratch ? scratch->t() : Tensor());
  EXPECT_TRUE(out.guards_intact());
  return out.download_bytes();
}

// Bitwise: a row computed alone (max_context its own context) equals that row inside batches of
// 3, 8, 9, 33 and 300 rows whose max_context is larger (one-partition rows then take the combine
// kernel's path instead of the direct one).
TEST_P(PagedAttentionGpu, RowsAreBatchInvariantBitwise) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(62);
  std::vector<int32_t> lengths(300);
  for (auto& len : lengths) len = std::uniform_int_distribution<int32_t>(1, 700)(rng);
  lengths[0] = 100, lengths[1] = 256, lengths[2] = 257, lengths[3] = 699;
  Paged p = testing::make_paged(8, 2, 128, 16, lengths, true, rng, 0);
  DevicePaged g(p, dtype, p.max_context);
  settle();
  const float scale = 0.088f;
  for (int64_t m : {3, 8, 9, 33, 300}) {
    const auto batch = run_rows(p, g, dtype, 0, m, p.max_context, scale);
    const size_t row_bytes = batch.size() / m;
    for (int64_t r : {int64_t(0), int64_t(1), int64_t(2), m - 1}) {
      const auto alone = run_rows(p, g, dtype, r, r + 1, p.pos[r] + 1, scale);
      EXPECT_TRUE(std::equal(alone.begin(), alone.end(), batch.begin() + r * row_bytes))
          << dtype_name(dtype) << " row " << r << " (context " << p.pos[r] + 1
          << ") alone differs from inside M = " << m;
    }
  }
}

// Padding rows are zero; positions at or past max_context and bad table entries give NaN rows
// without reading out of bounds.
TEST_P(PagedAttentionGpu, PaddingZeroAndCallerBugsNaN) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(63);
  for (int max_context : {100, 700}) {
    Paged p = testing::make_paged(4, 2, 64, 16, {50, 60, 70}, true, rng, 0);
    p.seq.push_back(0), p.pos.push_back(-1);           // padding
    p.seq.push_back(0), p.pos.push_back(max_context);  // past max_context
    p.q.resize(p.m() * p.hq * p.d, 0.5f);
    p.table[1 * p.mb + 1] = int32_t(p.nb + 5);  // sequence 1's second block: out of range
    DevicePaged g(p, dtype, max_context);
    settle();
    g.run(0.125f, max_context);
    const auto got = g.out.download();
    const int64_t row = p.hq * p.d;
    for (int64_t i = 0; i < row; ++i) {
      EXPECT_TRUE(std::isfinite(got[0 * row + i]));
      EXPECT_TRUE(std::isnan(got[1 * row + i])) << "bad block, max_context " << max_context;
      EXPECT_EQ(got[3 * row + i], 0.0f) << "padding";
      EXPECT_TRUE(std::isnan(got[4 * row + i])) << "pos past max_context " << max_context;
    }
    EXPECT_TRUE(g.out.guards_intact());
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PagedAttentionGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
