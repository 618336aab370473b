// The paged KV cache's block bookkeeping (PagedAttention style): the cache's shape and sizing
// from a byte budget, a pool of fixed-size physical blocks with reference counts, and per
// sequence a block table mapping logical token positions to physical slots.
// Host-side only: no device memory and no attention kernel here; the engine owns the K/V arena
// and uses these slots to index it.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"

namespace tessera {

// Design.
// The engine allocates one K/V arena per layer up front, each K and V of shape
// (num_blocks, block_size, num_kv_heads, head_dim), and never allocates during generation.
// A sequence's cache is a list of whole blocks (its block table) that need not be contiguous:
//   - fixed-size blocks leave no external fragmentation (any free block serves any sequence) and
//     waste at most block_size - 1 token slots per sequence (the last block's tail), instead of
//     reserving max_context tokens per sequence up front;
//   - allocation and freeing are O(1) pops and pushes on a free list;
//   - a block can be shared by several tables (reference counts): fork() shares a prefix for
//     parallel sampling, and a full block is never written again, so only a shared *partial* last
//     block needs copy-on-write.
// block_size trade-off: larger blocks mean shorter tables and fewer, longer contiguous reads per
// attention step, but more slots wasted in each sequence's last block and coarser sharing; 16 is
// the usual choice. For each new token the engine writes K and V at the row
// slot(seq, pos).flat(block_size) of the arena viewed as (num_blocks * block_size, num_kv_heads,
// head_dim), and passes block_table(seq) to the attention kernel, which reads the sequence's
// tokens block by block.

// What one block holds, and the sizing of the cache from a byte budget.
struct KvCacheShape {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 16;  // tokens per block
  DType dtype = DType::bf16;

  // User error naming the field when a count is not positive or the dtype is not bf16, fp16 or
  // fp32 (an int8 cache, with scales, is not built yet).
  void validate() const;
  int64_t bytes_per_token() const;  // K and V of every layer: 2 * L * H_kv * D * dtype size
  int64_t bytes_per_block() const;  // bytes_per_token() * block_size
  int64_t blocks_for_tokens(int64_t num_tokens) const;  // ceil(num_tokens / block_size)
  // Whole blocks that fit in `budget_bytes` (the --kv-cache-gb budget). User error naming the
  // budget, the need and the shape when they cannot hold one sequence of `max_context_tokens`.
  int64_t num_blocks_for_bytes(int64_t budget_bytes, int64_t max_context_tokens) const;
};

using BlockId = int32_t;
using SeqId = int64_t;

// A fixed set of physical blocks [0, num_blocks) with a free list and a reference count each.
// Reuse order is LIFO and deterministic: a fresh pool hands out 0, 1, 2, ...; after frees, the
// most recently freed block comes back first (the same runs give the same tables).
class BlockPool {
 public:
  explicit BlockPool(int64_t num_blocks);

  int64_t num_blocks() const { return static_cast<int64_t>(ref_counts_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used() const { return num_blocks() - num_free(); }
  int32_t ref_count(BlockId block) const;  // 0 for a free block

  BlockId allocate();         // reference count 1; a bug when none is free (check num_free)
  void share(BlockId block);  // one more reference to an allocated block
  void free(BlockId block);   // drops one reference; at 0 the block returns to the free list
                              // (a bug for a free block: double free or never allocated)

 private:
  void check_range(BlockId block) const;

  std::vector<BlockId> free_;        // a stack: allocate pops the back, free pushes
  std::vector<int32_t> ref_counts_;  // (num_blocks)
};

// A token's physical place: row `offset` of block `block`.
struct KvSlot {
  BlockId block = -1;
  int32_t offset = 0;  // in [0, block_size)
  // The row in the arena viewed as (num_blocks * block_size, ...): vLLM's "slot mapping".
  int64_t flat(int64_t block_size) const { return int64_t{block} * block_size + offset; }
  bool operator==(const KvSlot&) const = default;
};

// A block the engine must copy (all block_size rows of K and V, every layer) before it writes new
// tokens: copy-on-write of a shared partial block.
struct BlockCopy {
  BlockId src = -1;
  BlockId dst = -1;
  bool operator==(const BlockCopy&) const = default;
};

// Per sequence, its block table and token count over one BlockPool. Blocks are reserved as
// tokens are appended (a new block only when the last one is full), never ahead of need; so
// can_admit checks a request's whole need (prompt + max new tokens) against the blocks free now,
// and running sequences may still grow past the free blocks later: then can_append is false and
// the engine must wait or preempt (free a sequence and recompute it later).
// Unknown sequence ids, an existing id added again and appends that do not fit are bugs in the
// caller (TS_CHECK): the scheduler asks can_admit / can_append first.
class KvCacheManager {
 public:
  KvCacheManager(int64_t num_blocks, int64_t block_size);

  int64_t block_size() const { return block_size_; }
  int64_t capacity_tokens() const { return pool_.num_blocks() * block_size_; }
  const BlockPool& pool() const { return pool_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  bool contains(SeqId seq) const { return seqs_.count(seq) != 0; }

  // Whether a new request of `num_tokens` (prompt + max new tokens) fits in the blocks free now;
  // false means wait. User error when it needs more blocks than the whole cache has.
  bool can_admit(int64_t num_tokens) const;
  void add_sequence(SeqId seq);  // an empty table

  // Blocks an append of `num_tokens` would take from the pool (new blocks plus a copy-on-write).
  int64_t blocks_needed(SeqId seq, int64_t num_tokens) const;
  bool can_append(SeqId seq, int64_t num_tokens) const;
  // Reserves slots for tokens [num_tokens(seq), num_tokens(seq) + num_tokens). When the last
  // block is shared and partial it is first replaced by a private copy, queued for take_copies().
  void append(SeqId seq, int64_t num_tokens);
  // `child` (new) gets `parent`'s table and length, every block shared (parallel sampling).
  void fork(SeqId parent, SeqId child);
  // Returns every block of `seq` (last block first, so the next allocations get them back in table
  // order) and forgets the sequence.
  void free(SeqId seq);

  // The copies queued by append since the last call, in order; the engine runs them all before
  // any K/V write of the next step (a source block freed meanwhile still holds its rows then).
  std::vector<BlockCopy> take_copies();

  int64_t num_tokens(SeqId seq) const;
  const std::vector<BlockId>& block_table(SeqId seq) const;
  KvSlot slot(SeqId seq, int64_t position) const;  // position in [0, num_tokens(seq))

 private:
  struct Sequence {
    std::vector<BlockId> blocks;  // block i holds positions [i * block_size, (i + 1) * block_size)
    int64_t num_tokens = 0;
  };
  const Sequence& get(SeqId seq) const;
  Sequence& get(SeqId seq);
  bool needs_copy(const Sequence& s) const;

  int64_t block_size_;
  BlockPool pool_;
  std::unordered_map<SeqId, Sequence> seqs_;
  std::vector<BlockCopy> copies_;
};

}  // namespace tessera
