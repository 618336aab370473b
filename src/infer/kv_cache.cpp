// The paged KV cache's bookkeeping: shape sizing, the block pool's free list and reference counts,
// and the per-sequence block tables with copy-on-write of shared partial blocks. See kv_cache.h
// for the design.
#include "infer/kv_cache.h"

#include <limits>
#include <utility>

#include "core/error.h"

namespace tessera {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void KvCacheShape::validate() const {
  const std::pair<const char*, int64_t> counts[] = {{"num_layers", num_layers},
                                                    {"num_kv_heads", num_kv_heads},
                                                    {"head_dim", head_dim},
                                                    {"block_size", block_size}};
  for (const auto& [name, value] : counts)
    if (value <= 0) TS_USER_ERROR("KV cache shape: {} must be positive, got {}", name, value);
  if (dtype == DType::i8)
    TS_USER_ERROR(
        "KV cache dtype int8 is not built yet (it needs per-block scales); use bf16, "
        "fp16 or fp32");
  if (dtype != DType::bf16 && dtype != DType::f16 && dtype != DType::f32)
    TS_USER_ERROR("KV cache dtype {} is not supported; use bf16, fp16 or fp32", dtype_name(dtype));
}

int64_t KvCacheShape::bytes_per_token() const {
  validate();
  return 2 * num_layers * num_kv_heads * head_dim * static_cast<int64_t>(dtype_size(dtype));
}

int64_t KvCacheShape::bytes_per_block() const { return bytes_per_token() * block_size; }

int64_t KvCacheShape::blocks_for_tokens(int64_t num_tokens) const {
  validate();
  TS_CHECK(num_tokens >= 0, "token count {}", num_tokens);
  return ceil_div(num_tokens, block_size);
}

int64_t KvCacheShape::num_blocks_for_bytes(int64_t budget_bytes, int64_t max_context_tokens) const {
  TS_CHECK(max_context_tokens > 0, "max_context_tokens {}", max_context_tokens);
  const int64_t per_block = bytes_per_block();
  const int64_t blocks = budget_bytes > 0 ? budget_bytes / per_block : 0;
  const int64_t need = blocks_for_tokens(max_context_tokens);
  if (blocks < need) {
    constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
    TS_USER_ERROR(
        "KV cache budget (--kv-cache-gb) of {} bytes ({:.3f} GiB) holds {} blocks, but one "
        "sequence of the full context of {} tokens needs {} blocks = {} bytes ({:.3f} GiB); shape: "
        "{} layers x {} kv heads x head_dim {} x {} x K and V, block_size {}, {} bytes per block",
        budget_bytes, budget_bytes / kGiB, blocks, max_context_tokens, need, need * per_block,
        need * per_block / kGiB, num_layers, num_kv_heads, head_dim, dtype_name(dtype), block_size,
        per_block);
  }
  // Block ids are int32; a budget this large would need ~2^31 blocks, far past any device.
  TS_CHECK(blocks <= std::numeric_limits<BlockId>::max(), "{} blocks", blocks);
  return blocks;
}

BlockPool::BlockPool(int64_t num_blocks) {
  TS_CHECK(num_blocks > 0 && num_blocks <= std::numeric_limits<BlockId>::max(), "num_blocks {}",
           num_blocks);
  ref_counts_.assign(static_cast<size_t>(num_blocks), 0);
  // Pushed in reverse so a fresh pool hands out 0, 1, 2, ...
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<BlockId>(b));
}

void BlockPool::check_range(BlockId block) const {
  TS_CHECK(block >= 0 && block < num_blocks(), "block id {} outside the pool [0, {})", block,
           num_blocks());
}

int32_t BlockPool::ref_count(BlockId block) const {
  check_range(block);
  return ref_counts_[static_cast<size_t>(block)];
}

BlockId BlockPool::allocate() {
  TS_CHECK(!free_.empty(), "no free KV cache block (all {} in use)", num_blocks());
  const BlockId block = free_.back();
  free_.pop_back();
  TS_CHECK(ref_counts_[static_cast<size_t>(block)] == 0, "free-list block {} has references",
           block);
  ref_counts_[static_cast<size_t>(block)] = 1;
  return block;
}

void BlockPool::share(BlockId block) {
  check_range(block);
  int32_t& refs = ref_counts_[static_cast<size_t>(block)];
  if (refs == 0) TS_BUG("share of KV cache block {}, which is not allocated", block);
  ++refs;
}

void BlockPool::free(BlockId block) {
  check_range(block);
  int32_t& refs = ref_counts_[static_cast<size_t>(block)];
  if (refs == 0) TS_BUG("free of KV cache block {}, which is not allocated (double free?)", block);
  if (--refs == 0) free_.push_back(block);
}

KvCacheManager::KvCacheManager(int64_t num_blocks, int64_t block_size)
    : block_size_(block_size), pool_(num_blocks) {
  TS_CHECK(block_size > 0, "block_size {}", block_size);
}

bool KvCacheManager::can_admit(int64_t num_tokens) const {
  TS_CHECK(num_tokens >= 0, "token count {}", num_tokens);
  const int64_t need = ceil_div(num_tokens, block_size_);
  if (need > pool_.num_blocks())
    TS_USER_ERROR(
        "request of {} tokens (prompt + max new tokens) needs {} KV cache blocks of {} tokens, but "
        "the whole cache holds {} blocks = {} tokens; lower the request's max tokens or raise "
        "--kv-cache-gb",
        num_tokens, need, block_size_, pool_.num_blocks(), capacity_tokens());
  return need <= pool_.num_free();
}

void KvCacheManager::add_sequence(SeqId seq) {
  TS_CHECK(!contains(seq), "sequence {} is already in the KV cache", seq);
  seqs_.emplace(seq, Sequence{});
}

const KvCacheManager::Sequence& KvCacheManager::get(SeqId seq) const {
  const auto it = seqs_.find(seq);
  TS_CHECK(it != seqs_.end(), "sequence {} is not in the KV cache (never added, or freed)", seq);
  return it->second;
}

KvCacheManager::Sequence& KvCacheManager::get(SeqId seq) {
  return const_cast<Sequence&>(static_cast<const KvCacheManager*>(this)->get(seq));
}

bool KvCacheManager::needs_copy(const Sequence& s) const {
  // Full blocks are never written again, so only a partial last block shared with another table
  // must be made private before the next token lands in it.
  return s.num_tokens % block_size_ != 0 && pool_.ref_count(s.blocks.back()) > 1;
}

int64_t KvCacheManager::blocks_needed(SeqId seq, int64_t num_tokens) const {
  TS_CHECK(num_tokens >= 0, "token count {}", num_tokens);
  const Sequence& s = get(seq);
  if (num_tokens == 0) return 0;
  const int64_t grow =
      ceil_div(s.num_tokens + num_tokens, block_size_) - static_cast<int64_t>(s.blocks.size());
  return grow + (needs_copy(s) ? 1 : 0);
}

bool KvCacheManager::can_append(SeqId seq, int64_t num_tokens) const {
  return blocks_needed(seq, num_tokens) <= pool_.num_free();
}

void KvCacheManager::append(SeqId seq, int64_t num_tokens) {
  TS_CHECK(can_append(seq, num_tokens),
           "append of {} tokens to sequence {} needs {} blocks, {} free", num_tokens, seq,
           blocks_needed(seq, num_tokens), pool_.num_free());
  Sequence& s = get(seq);
  if (num_tokens == 0) return;
  if (needs_copy(s)) {
    const BlockId shared = s.blocks.back();
    const BlockId own = pool_.allocate();
    copies_.push_back({shared, own});
    pool_.free(shared);  // drops this table's reference; the other holders keep it
    s.blocks.back() = own;
  }
  s.num_tokens += num_tokens;
  while (static_cast<int64_t>(s.blocks.size()) < ceil_div(s.num_tokens, block_size_))
    s.blocks.push_back(pool_.allocate());
}

void KvCacheManager::fork(SeqId parent, SeqId child) {
  TS_CHECK(!contains(child), "fork: sequence {} is already in the KV cache", child);
  Sequence copy = get(parent);
  for (BlockId b : copy.blocks) pool_.share(b);
  seqs_.emplace(child, std::move(copy));
}

void KvCacheManager::free(SeqId seq) {
  const Sequence& s = get(seq);
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) pool_.free(*it);
  seqs_.erase(seq);
}

std::vector<BlockCopy> KvCacheManager::take_copies() {
  std::vector<BlockCopy> out;
  out.swap(copies_);
  return out;
}

int64_t KvCacheManager::num_tokens(SeqId seq) const { return get(seq).num_tokens; }

const std::vector<BlockId>& KvCacheManager::block_table(SeqId seq) const { return get(seq).blocks; }

KvSlot KvCacheManager::slot(SeqId seq, int64_t position) const {
  const Sequence& s = get(seq);
  TS_CHECK(position >= 0 && position < s.num_tokens, "position {} of sequence {} with {} tokens",
           position, seq, s.num_tokens);
  return {s.blocks[static_cast<size_t>(position / block_size_)],
          static_cast<int32_t>(position % block_size_)};
}

}  // namespace tessera
