// The paged KV cache's bookkeeping: sizing by hand for a Llama-3.2-1B-like shape and the
// too-small-budget message; the pool's LIFO reuse and its double-free errors; slot mapping over
// many blocks; admission; fork with copy-on-write; and randomized stress runs against a simple
// model, checking the invariants (and, with forks, the K/V contents a fake arena holds) after
// every operation.
#include "infer/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_error;
using testing::expect_user_error;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;

KvCacheShape llama_1b_shape() {
  KvCacheShape s;
  s.num_layers = 16;
  s.num_kv_heads = 8;
  s.head_dim = 64;
  s.block_size = 16;
  s.dtype = DType::bf16;
  return s;
}

TEST(KvCacheShape, BytesPerBlockLlama1B) {
  const KvCacheShape s = llama_1b_shape();
  // K and V: 2 * 16 layers * 8 heads * 64 dims * 2 bytes = 32 KiB a token; 16 tokens = 512 KiB.
  EXPECT_EQ(s.bytes_per_token(), 32768);
  EXPECT_EQ(s.bytes_per_block(), 524288);
  EXPECT_EQ(s.blocks_for_tokens(0), 0);
  EXPECT_EQ(s.blocks_for_tokens(1), 1);
  EXPECT_EQ(s.blocks_for_tokens(16), 1);
  EXPECT_EQ(s.blocks_for_tokens(17), 2);
  EXPECT_EQ(s.blocks_for_tokens(2048), 128);
  // 4 GiB / 512 KiB = 8192 blocks; a partial block's worth of extra bytes is not a block.
  EXPECT_EQ(s.num_blocks_for_bytes(4 * kGiB, 2048), 8192);
  EXPECT_EQ(s.num_blocks_for_bytes(4 * kGiB + 524287, 2048), 8192);
  EXPECT_EQ(s.num_blocks_for_bytes(64 * kMiB, 2048), 128);  // exactly one full context
  KvCacheShape f32 = s;
  f32.dtype = DType::f32;
  EXPECT_EQ(f32.bytes_per_block(), 1048576);
  EXPECT_EQ(f32.num_blocks_for_bytes(4 * kGiB, 2048), 4096);
  KvCacheShape f16 = s;
  f16.dtype = DType::f16;
  EXPECT_EQ(f16.bytes_per_block(), 524288);
  KvCacheShape block32 = s;
  block32.block_size = 32;
  EXPECT_EQ(block32.bytes_per_block(), 1048576);
  EXPECT_EQ(block32.blocks_for_tokens(2048), 64);
}

TEST(KvCacheShape, BudgetTooSmallNamesBudgetNeedAndShape) {
  const KvCacheShape s = llama_1b_shape();
  // 60 MiB holds 120 blocks; 2048 tokens need 128 blocks = 64 MiB.
  expect_user_error([&] { s.num_blocks_for_bytes(60 * kMiB, 2048); },
                    {"--kv-cache-gb", "62914560 bytes", "holds 120 blocks", "2048 tokens",
                     "needs 128 blocks = 67108864 bytes", "16 layers", "8 kv heads", "head_dim 64",
                     "bf16", "block_size 16", "524288 bytes per block"});
  expect_user_error([&] { s.num_blocks_for_bytes(64 * kMiB - 1, 2048); }, {"holds 127 blocks"});
  expect_user_error([&] { s.num_blocks_for_bytes(0, 1); }, {"0 bytes", "holds 0 blocks"});
  expect_user_error([&] { s.num_blocks_for_bytes(-5, 1); }, {"-5 bytes"});
}

TEST(KvCacheShape, InvalidShapesAreUserErrors) {
  KvCacheShape s = llama_1b_shape();
  s.head_dim = 0;
  expect_user_error([&] { s.bytes_per_block(); }, {"head_dim", "got 0"});
  s = llama_1b_shape();
  s.block_size = -16;
  expect_user_error([&] { s.blocks_for_tokens(5); }, {"block_size", "got -16"});
  s = llama_1b_shape();
  s.dtype = DType::i8;
  expect_user_error([&] { s.bytes_per_block(); }, {"int8", "not built"});
  s.dtype = DType::e4m3;
  expect_user_error([&] { s.bytes_per_block(); }, {"fp8_e4m3", "not supported"});
}

TEST(BlockPool, CountsAndLifoReuse) {
  BlockPool pool(6);
  EXPECT_EQ(pool.num_blocks(), 6);
  EXPECT_EQ(pool.num_free(), 6);
  EXPECT_EQ(pool.allocate(), 0);
  EXPECT_EQ(pool.allocate(), 1);
  EXPECT_EQ(pool.allocate(), 2);
  EXPECT_EQ(pool.num_used(), 3);
  EXPECT_EQ(pool.num_free(), 3);
  EXPECT_EQ(pool.ref_count(1), 1);
  EXPECT_EQ(pool.ref_count(4), 0);
  pool.free(1);
  pool.free(0);
  EXPECT_EQ(pool.ref_count(1), 0);
  // Most recently freed first, then untouched blocks in order.
  EXPECT_EQ(pool.allocate(), 0);
  EXPECT_EQ(pool.allocate(), 1);
  EXPECT_EQ(pool.allocate(), 3);
  EXPECT_EQ(pool.num_used(), 4);
}

TEST(BlockPool, SharedBlockReturnsAtLastReference) {
  BlockPool pool(2);
  const BlockId b = pool.allocate();
  pool.share(b);
  pool.share(b);
  EXPECT_EQ(pool.ref_count(b), 3);
  pool.free(b);
  pool.free(b);
  EXPECT_EQ(pool.num_free(), 1);
  pool.free(b);
  EXPECT_EQ(pool.num_free(), 2);
  EXPECT_EQ(pool.ref_count(b), 0);
}

TEST(BlockPool, DoubleFreeAndUnallocatedAreBugs) {
  BlockPool pool(4);
  const BlockId b = pool.allocate();
  pool.free(b);
  expect_error([&] { pool.free(b); }, ErrorKind::bug, {"block 0", "not allocated", "double free"});
  expect_error([&] { pool.free(3); }, ErrorKind::bug, {"block 3", "not allocated"});
  expect_error([&] { pool.share(2); }, ErrorKind::bug, {"block 2", "not allocated"});
  expect_error([&] { pool.free(4); }, ErrorKind::bug, {"block id 4 outside the pool [0, 4)"});
  expect_error([&] { pool.free(-1); }, ErrorKind::bug, {"block id -1"});
  // The failed frees changed nothing.
  EXPECT_EQ(pool.num_free(), 4);
  for (int i = 0; i < 4; ++i) pool.allocate();
  expect_error([&] { pool.allocate(); }, ErrorKind::bug, {"no free KV cache block"});
}

// Every position's slot is (table[pos / B], pos % B); slots of all sequences are distinct.
void expect_slots_consistent(const KvCacheManager& m, const std::vector<SeqId>& seqs) {
  const int64_t bs = m.block_size();
  std::set<int64_t> flats;
  int64_t total = 0;
  for (SeqId seq : seqs) {
    const std::vector<BlockId>& table = m.block_table(seq);
    const int64_t n = m.num_tokens(seq);
    EXPECT_EQ(static_cast<int64_t>(table.size()), (n + bs - 1) / bs) << "sequence " << seq;
    for (int64_t pos = 0; pos < n; ++pos) {
      const KvSlot s = m.slot(seq, pos);
      EXPECT_EQ(s.block, table[static_cast<size_t>(pos / bs)]) << seq << " " << pos;
      EXPECT_EQ(s.offset, pos % bs) << seq << " " << pos;
      EXPECT_EQ(s.flat(bs), int64_t{s.block} * bs + pos % bs);
      flats.insert(s.flat(bs));
    }
    total += n;
  }
  EXPECT_EQ(static_cast<int64_t>(flats.size()), total) << "two tokens share a slot";
}

TEST(KvCacheManager, SlotsAcrossManyBlocks) {
  KvCacheManager m(64, 16);
  EXPECT_EQ(m.capacity_tokens(), 1024);
  m.add_sequence(7);
  m.add_sequence(9);
  // Interleaved appends, hand-traced: a new block only when the last one is full.
  m.append(7, 20);  // 7: [0, 1]
  m.append(9, 5);   // 9: [2]
  m.append(7, 12);  // 32 tokens: blocks 0 and 1 exactly full
  EXPECT_EQ(m.block_table(7), (std::vector<BlockId>{0, 1}));
  m.append(7, 1);   // 7: [0, 1, 3]
  m.append(9, 11);  // 16 tokens: still [2]
  EXPECT_EQ(m.block_table(9), (std::vector<BlockId>{2}));
  m.append(9, 1);  // 9: [2, 4]
  EXPECT_EQ(m.block_table(7), (std::vector<BlockId>{0, 1, 3}));
  EXPECT_EQ(m.block_table(9), (std::vector<BlockId>{2, 4}));
  EXPECT_EQ(m.slot(7, 0), (KvSlot{0, 0}));
  EXPECT_EQ(m.slot(7, 31), (KvSlot{1, 15}));
  EXPECT_EQ(m.slot(7, 32), (KvSlot{3, 0}));
  EXPECT_EQ(m.slot(9, 15), (KvSlot{2, 15}));
  EXPECT_EQ(m.slot(9, 16), (KvSlot{4, 0}));
  EXPECT_EQ(m.slot(9, 16).flat(16), 64);

  // Long sequences over many blocks, grown in uneven chunks side by side.
  m.add_sequence(11);
  const int64_t chunks[] = {1, 15, 16, 17, 3, 64, 31, 33, 2, 100};
  for (int64_t c : chunks) {
    m.append(11, c);
    m.append(7, c / 2 + 1);
  }
  EXPECT_EQ(m.num_tokens(11), 282);
  EXPECT_EQ(m.block_table(11).size(), 18u);
  expect_slots_consistent(m, {7, 9, 11});
  EXPECT_EQ(m.pool().num_used(),
            static_cast<int64_t>(m.block_table(7).size() + m.block_table(9).size() + 18));

  m.free(7);
  m.free(9);
  m.free(11);
  EXPECT_EQ(m.pool().num_free(), 64);
  EXPECT_EQ(m.num_sequences(), 0);
}

TEST(KvCacheManager, FreedBlocksComeBackInTableOrder) {
  KvCacheManager m(8, 16);
  m.add_sequence(1);
  m.add_sequence(2);
  m.append(1, 64);
  m.append(2, 17);
  EXPECT_EQ(m.block_table(1), (std::vector<BlockId>{0, 1, 2, 3}));
  EXPECT_EQ(m.block_table(2), (std::vector<BlockId>{4, 5}));
  m.free(1);
  EXPECT_EQ(m.pool().num_free(), 6);
  m.add_sequence(3);
  m.append(3, 50);
  EXPECT_EQ(m.block_table(3), (std::vector<BlockId>{0, 1, 2, 3}));
  m.free(2);
  m.free(3);
  m.add_sequence(4);
  m.append(4, 16 * 8);
  // 3's blocks were freed last, so they come first, then 2's, then the never-used 6 and 7.
  EXPECT_EQ(m.block_table(4), (std::vector<BlockId>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_FALSE(m.can_append(4, 1));
}

TEST(KvCacheManager, AdmissionWaitsForFreesAndRejectsWhatNeverFits) {
  KvCacheManager m(8, 16);  // 128 tokens
  EXPECT_TRUE(m.can_admit(128));
  m.add_sequence(1);
  m.append(1, 100);  // 7 blocks
  EXPECT_TRUE(m.can_admit(16));
  EXPECT_FALSE(m.can_admit(17));
  EXPECT_FALSE(m.can_admit(128));
  m.add_sequence(2);
  m.append(2, 1);
  EXPECT_FALSE(m.can_admit(1));  // full: wait, no error
  EXPECT_TRUE(m.can_admit(0));
  m.free(1);
  EXPECT_TRUE(m.can_admit(112));
  EXPECT_FALSE(m.can_admit(113));
  m.free(2);
  EXPECT_TRUE(m.can_admit(128));
  expect_user_error([&] { m.can_admit(129); },
                    {"request of 129 tokens", "needs 9 KV cache blocks of 16 tokens",
                     "holds 8 blocks = 128 tokens", "--kv-cache-gb"});
}

TEST(KvCacheManager, ForkSharesBlocksAndCopiesOnWrite) {
  KvCacheManager m(8, 16);
  m.add_sequence(1);
  m.append(1, 20);  // [0, 1], block 1 holds 4 tokens
  m.fork(1, 2);
  EXPECT_EQ(m.block_table(2), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(m.num_tokens(2), 20);
  EXPECT_EQ(m.pool().ref_count(0), 2);
  EXPECT_EQ(m.pool().ref_count(1), 2);
  EXPECT_EQ(m.pool().num_used(), 2);
  // The child's next token would land in the shared partial block 1: it gets a private copy.
  EXPECT_EQ(m.blocks_needed(2, 1), 1);
  EXPECT_EQ(m.blocks_needed(2, 13), 2);
  m.append(2, 1);
  EXPECT_EQ(m.take_copies(), (std::vector<BlockCopy>{{1, 2}}));
  EXPECT_TRUE(m.take_copies().empty());
  EXPECT_EQ(m.block_table(2), (std::vector<BlockId>{0, 2}));
  EXPECT_EQ(m.block_table(1), (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(m.pool().ref_count(0), 2);  // full blocks stay shared
  EXPECT_EQ(m.pool().ref_count(1), 1);
  EXPECT_EQ(m.pool().ref_count(2), 1);
  // The parent now owns block 1 alone and writes in place.
  EXPECT_EQ(m.blocks_needed(1, 1), 0);
  m.append(1, 1);
  EXPECT_TRUE(m.take_copies().empty());
  EXPECT_EQ(m.block_table(1), (std::vector<BlockId>{0, 1}));

  // At a block boundary nothing is partial: the fork's next token opens a fresh block.
  m.add_sequence(3);
  m.append(3, 32);  // [3, 4]
  m.fork(3, 4);
  EXPECT_EQ(m.blocks_needed(4, 1), 1);
  m.append(4, 1);
  EXPECT_TRUE(m.take_copies().empty());
  EXPECT_EQ(m.block_table(4), (std::vector<BlockId>{3, 4, 5}));

  m.free(1);
  EXPECT_EQ(m.pool().ref_count(0), 1);  // still held by 2
  m.free(2);
  m.free(3);
  m.free(4);
  EXPECT_EQ(m.pool().num_free(), 8);
  expect_error([&] { m.fork(9, 10); }, ErrorKind::bug, {"sequence 9 is not in the KV cache"});
}

TEST(KvCacheManager, UnknownSequencesAndMisuseAreBugs) {
  KvCacheManager m(4, 16);
  m.add_sequence(5);
  m.append(5, 10);
  expect_error([&] { m.add_sequence(5); }, ErrorKind::bug, {"sequence 5 is already"});
  expect_error([&] { m.append(6, 1); }, ErrorKind::bug, {"sequence 6 is not in the KV cache"});
  expect_error([&] { m.slot(6, 0); }, ErrorKind::bug, {"sequence 6"});
  expect_error([&] { m.block_table(6); }, ErrorKind::bug, {"sequence 6"});
  expect_error([&] { m.slot(5, 10); }, ErrorKind::bug, {"position 10 of sequence 5 with 10"});
  expect_error([&] { m.slot(5, -1); }, ErrorKind::bug, {"position -1"});
  expect_error([&] { m.append(5, 60); }, ErrorKind::bug, {"append of 60 tokens", "3 free"});
  EXPECT_EQ(m.num_tokens(5), 10);  // the refused append changed nothing
  m.free(5);
  expect_error([&] { m.free(5); }, ErrorKind::bug, {"sequence 5 is not in the KV cache"});
  EXPECT_EQ(m.pool().num_free(), 4);
}

// Invariants without sharing: tables hold ceil(len / B) blocks, no block is in two tables, the
// blocks in tables are exactly the pool's used blocks.
void check_unshared(const KvCacheManager& m, const std::map<SeqId, int64_t>& lengths) {
  ASSERT_EQ(m.num_sequences(), static_cast<int64_t>(lengths.size()));
  std::set<BlockId> seen;
  int64_t sum = 0;
  for (const auto& [seq, len] : lengths) {
    ASSERT_TRUE(m.contains(seq));
    ASSERT_EQ(m.num_tokens(seq), len);
    const std::vector<BlockId>& table = m.block_table(seq);
    ASSERT_EQ(static_cast<int64_t>(table.size()), (len + m.block_size() - 1) / m.block_size());
    for (BlockId b : table) {
      ASSERT_TRUE(seen.insert(b).second) << "block " << b << " in two tables";
      ASSERT_EQ(m.pool().ref_count(b), 1);
    }
    sum += static_cast<int64_t>(table.size());
  }
  ASSERT_EQ(sum, m.pool().num_used());
}

TEST(KvCacheManager, RandomStressAgainstAModel) {
  constexpr int64_t kBlocks = 48, kBlockSize = 4;
  KvCacheManager m(kBlocks, kBlockSize);
  std::map<SeqId, int64_t> lengths;
  std::mt19937_64 rng(20240616);
  SeqId next_id = 100;
  int refused = 0, appended = 0, freed = 0;
  for (int op = 0; op < 5000; ++op) {
    const int kind = static_cast<int>(rng() % 10);
    if (kind == 0 && lengths.size() < 12) {
      m.add_sequence(next_id);
      lengths[next_id++] = 0;
    } else if (kind <= 7 && !lengths.empty()) {
      auto it = std::next(lengths.begin(), static_cast<long>(rng() % lengths.size()));
      const int64_t n = static_cast<int64_t>(rng() % 23);
      const int64_t need = (it->second + n + kBlockSize - 1) / kBlockSize -
                           (it->second + kBlockSize - 1) / kBlockSize;
      ASSERT_EQ(m.blocks_needed(it->first, n), need);
      ASSERT_EQ(m.can_append(it->first, n), need <= m.pool().num_free());
      if (m.can_append(it->first, n)) {
        m.append(it->first, n);
        it->second += n;
        ++appended;
      } else {
        ++refused;
      }
    } else if (!lengths.empty()) {
      auto it = std::next(lengths.begin(), static_cast<long>(rng() % lengths.size()));
      m.free(it->first);
      lengths.erase(it);
      ++freed;
    }
    check_unshared(m, lengths);
    if (::testing::Test::HasFatalFailure()) FAIL() << "after operation " << op;
  }
  // The run must have exercised every path, including a full pool.
  EXPECT_GT(appended, 1000);
  EXPECT_GT(refused, 50);
  EXPECT_GT(freed, 100);
  EXPECT_TRUE(m.take_copies().empty());
  for (const auto& [seq, len] : lengths) m.free(seq);
  EXPECT_EQ(m.pool().num_free(), kBlocks);
}

// With forks: a fake arena holds one token value per slot; the test writes each appended token's
// value at its slot after running the queued copies, then every sequence must read back its own
// tokens. Reference counts must equal the number of tables holding each block.
TEST(KvCacheManager, RandomStressWithForksKeepsContents) {
  constexpr int64_t kBlocks = 40, kBlockSize = 4;
  KvCacheManager m(kBlocks, kBlockSize);
  std::vector<int64_t> arena(kBlocks * kBlockSize, -1);
  std::map<SeqId, std::vector<int64_t>> tokens;  // the model: each sequence's token values
  std::mt19937_64 rng(7);
  SeqId next_id = 0;
  int64_t next_token = 0;
  int forks = 0, copies = 0;
  auto pick = [&] {
    return std::next(tokens.begin(), static_cast<long>(rng() % tokens.size()))->first;
  };
  for (int op = 0; op < 4000; ++op) {
    const int kind = static_cast<int>(rng() % 10);
    if (kind == 0 && tokens.size() < 10) {
      m.add_sequence(next_id);
      tokens[next_id++] = {};
    } else if (kind <= 2 && !tokens.empty() && tokens.size() < 10) {
      const SeqId parent = pick();
      m.fork(parent, next_id);
      tokens[next_id++] = tokens[parent];
      ++forks;
    } else if (kind <= 7 && !tokens.empty()) {
      const SeqId seq = pick();
      const int64_t n = static_cast<int64_t>(rng() % 9);
      if (!m.can_append(seq, n)) continue;
      const int64_t start = m.num_tokens(seq);
      m.append(seq, n);
      for (const BlockCopy& c : m.take_copies()) {
        std::copy_n(arena.begin() + c.src * kBlockSize, kBlockSize,
                    arena.begin() + c.dst * kBlockSize);
        ++copies;
      }
      for (int64_t pos = start; pos < start + n; ++pos) {
        arena[static_cast<size_t>(m.slot(seq, pos).flat(kBlockSize))] = next_token;
        tokens[seq].push_back(next_token++);
      }
    } else if (!tokens.empty()) {
      const SeqId seq = pick();
      m.free(seq);
      tokens.erase(seq);
    }
    std::map<BlockId, int32_t> holders;
    for (const auto& [seq, values] : tokens) {
      const int64_t len = static_cast<int64_t>(values.size());
      ASSERT_EQ(m.num_tokens(seq), len);
      const std::vector<BlockId>& table = m.block_table(seq);
      ASSERT_EQ(static_cast<int64_t>(table.size()), (len + kBlockSize - 1) / kBlockSize);
      ASSERT_EQ(std::set<BlockId>(table.begin(), table.end()).size(), table.size());
      for (BlockId b : table) ++holders[b];
      for (int64_t pos = 0; pos < len; ++pos)
        ASSERT_EQ(arena[static_cast<size_t>(m.slot(seq, pos).flat(kBlockSize))],
                  values[static_cast<size_t>(pos)])
            << "sequence " << seq << " position " << pos << " after operation " << op;
    }
    ASSERT_EQ(static_cast<int64_t>(holders.size()), m.pool().num_used()) << op;
    for (const auto& [b, count] : holders) ASSERT_EQ(m.pool().ref_count(b), count) << b;
  }
  EXPECT_GT(forks, 100);
  EXPECT_GT(copies, 50);
  for (const auto& [seq, values] : tokens) m.free(seq);
  EXPECT_EQ(m.pool().num_free(), kBlocks);
}

}  // namespace
}  // namespace tessera
