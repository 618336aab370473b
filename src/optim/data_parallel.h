// Data-parallel gradient synchronisation in buckets (Megatron-Core's DistributedDataParallel over
// param-and-grad buckets): the flat gradient buffer of a ParamStore is cut into contiguous buckets
// that are all-reduced (ZeRO-0) or reduce-scattered (ZeRO-1) over the dp group as soon as backward
// has produced their final gradients. The optimizer that consumes them is distributed_optimizer.h.
// Lives in src/optim (not src/parallel) because it needs ParamStore; src/parallel stays below
// model.
#pragma once
#include <cstdint>
#include <vector>

#include "model/params.h"
#include "parallel/communicator.h"
#include "parallel/parallel_context.h"

namespace tessera {

// The communicators gradient synchronisation and the distributed optimizer use. Passed in, so
// tests can substitute recording or in-process fakes; from() takes them from a ParallelContext.
// Expert parallelism (ep = dp.size / expert_dp.size > 1): the buckets of expert_parallel
// parameters reduce over expert_dp, the dp ranks holding the same experts. Without it the three
// expert groups may be left null (expert_dp is then dp, and ep the rank alone).
struct DataParallelGroups {
  Communicator* dp = nullptr;          // device tensors: gradient buckets, parameter all-gathers
  Communicator* tp = nullptr;          // tp_partial_grad sums
  Communicator* embedding = nullptr;   // tied-embedding sums (first and last pipeline stage)
  Communicator* dp_host = nullptr;     // host memory: grad-norm partials, checkpoint gathers
  Communicator* model_host = nullptr;  // host memory, tp x pp ranks of one replica: grad norm
  Communicator* expert_dp = nullptr;   // device tensors: expert buckets and all-gathers
  Communicator* expert_dp_host = nullptr;  // host memory: expert checkpoint gathers
  Communicator* ep_host = nullptr;         // host memory: expert grad-norm partials (ZeRO-0)

  static DataParallelGroups from(const ParallelContext& ctx) {
    return {&ctx.comm(Group::dp),
            &ctx.comm(Group::tp),
            &ctx.comm(Group::embedding),
            &ctx.host_comm(Group::dp),
            &ctx.host_comm(Group::model),
            &ctx.comm(Group::expert_dp),
            &ctx.host_comm(Group::expert_dp),
            &ctx.host_comm(Group::ep)};
  }
  int ep_size() const { return expert_dp ? dp->size() / expert_dp->size() : 1; }
};

struct DataParallelConfig {
  // 0: buckets are all-reduced and every rank keeps the full optimizer state.
  // 1: buckets are reduce-scattered; dp rank r owns chunk r of every bucket (optimizer state too).
  int zero_stage = 0;
  // Target bucket size in bytes of gradient (the store's gradient dtype). Big enough that each
  // collective runs near bandwidth, small enough that the first buckets start while backward is
  // still running.
  int64_t bucket_bytes = int64_t(25) << 20;
};

// One bucket: [begin, end) of the flat buffers, both multiples of dp. It reduces over its group:
// dp, or expert_dp when it holds expert_parallel parameters (a bucket never holds both kinds);
// each rank of that group owns a chunk of numel / group size elements under ZeRO-1.
struct GradBucket {
  int64_t begin = 0, end = 0;
  int64_t shard_offset = 0;  // where this bucket's chunk starts in a rank's ZeRO-1 shard buffers
  int first_param = 0, end_param = 0;  // the parameters [first_param, end_param) overlap it
  bool held = false;    // overlaps an embedding_group parameter: launched in finish()
  bool expert = false;  // holds expert_parallel parameters: reduces over expert_dp
  int64_t numel() const { return end - begin; }
};

// A contiguous run of one parameter that one dp rank updates (ZeRO-1: part of its chunk of one
// bucket; ZeRO-0: a whole parameter).
struct ShardPiece {
  int param_idx = 0;
  int64_t flat_begin = 0, flat_end = 0;  // elements of the flat buffers
  int64_t state_offset = 0;              // where they start in the optimizer's m, v, master
  int64_t numel() const { return flat_end - flat_begin; }
};

// Buckets as a pure function of the registered parameters, the dp size and the bucket size, so
// every dp rank (and every tp rank, whose stores have the same shapes) derives the same layout,
// and tests can examine any rank's ownership in one process. The parameters need not be
// allocated yet (the trainer sizes its arena from this).
//
// Buckets are laid out from the end of the buffer backwards (bucket 0 ends at the padded end),
// because backward produces gradients in reverse parameter order. A bucket is closed at the first
// parameter start (rounded up to a multiple of dp) that makes it at least `bucket_numel` long, and
// always around an embedding_group parameter (its start rounded down, its end rounded up), so the
// tied embedding sits in one held bucket that delays nothing else. Rounding an ordinary start UP
// means a bucket's elements are all final as soon as the parameter at its boundary is; the < dp
// elements of that parameter below the boundary join the next bucket. Under ep > 1 a bucket is
// also closed where expert and dense parameters meet (the store aligns those starts to dp:
// ParamStore::align_expert_runs).
class BucketLayout {
 public:
  // ep divides dp; expert buckets split over the dp / ep ranks of expert_dp.
  BucketLayout(const ParamStore& params, int dp_size, int64_t bucket_numel, int ep_size = 1);

  int dp_size() const { return dp_size_; }
  int ep_size() const { return ep_size_; }
  int64_t padded_numel() const { return padded_numel_; }  // num_elements padded to dp
  int64_t shard_numel() const { return shard_numel_; }    // one rank's ZeRO-1 share
  const std::vector<GradBucket>& buckets() const { return buckets_; }
  // The ranks bucket b reduces over (dp, or expert_dp's dp / ep), and the rank within them of the
  // rank at dp coordinate dp_rank (expert_dp: dp_rank / ep, as Topology::expert_dp_group).
  int group_size(int b) const { return buckets_.at(b).expert ? dp_size_ / ep_size_ : dp_size_; }
  int group_rank(int b, int dp_rank) const {
    return buckets_.at(b).expert ? dp_rank / ep_size_ : dp_rank;
  }
  int64_t chunk_numel(int b) const { return buckets_.at(b).numel() / group_size(b); }
  // Chunk of bucket b that rank `rank` of the bucket's group owns under ZeRO-1: [begin, end) of
  // the flat buffers.
  int64_t chunk_begin(int b, int rank) const;
  int64_t chunk_end(int b, int rank) const { return chunk_begin(b, rank + 1); }

  // The pieces dp rank `dp_rank` updates under ZeRO-1: its chunk of every bucket cut at parameter
  // boundaries (padding belongs to no piece), in increasing flat order; state offsets index the
  // rank's shard buffers (shard_numel long, chunk b at buckets()[b].shard_offset).
  std::vector<ShardPiece> shard_pieces(const ParamStore& params, int dp_rank) const;

 private:
  int dp_size_, ep_size_;
  int64_t padded_numel_, shard_numel_ = 0;
  std::vector<GradBucket> buckets_;
};

class DistributedDataParallel {
 public:
  // `params` must be allocated with pad_multiple = groups.dp->size(). The groups must outlive this.
  DistributedDataParallel(ParamStore& params, const DataParallelGroups& groups,
                          const DataParallelConfig& cfg);
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // Call before the backward of the step's last micro-batch: from then on grads_ready_from()
  // launches buckets. Earlier micro-batches only accumulate into the gradient buffer.
  void begin_last_microbatch();
  // Every parameter with index >= param_idx has its final gradient for this step: launches every
  // bucket lying entirely at or after params[param_idx].offset that is not held or launched yet.
  // Does nothing before begin_last_microbatch().
  void grads_ready_from(int param_idx);
  // Sums embedding_group gradients over `embedding`, launches every bucket not launched yet, and
  // waits for all of them. Afterwards ZeRO-0 gradients are summed over dp everywhere; ZeRO-1
  // gradients are summed only in this rank's chunk of each bucket (the rest is stale).
  // Gradients must already be averaged by the loss scale: nothing is divided here.
  void finish();

  const BucketLayout& layout() const { return layout_; }
  const DataParallelGroups& groups() const { return groups_; }
  const DataParallelConfig& config() const { return cfg_; }
  int dp_rank() const { return groups_.dp->rank(); }
  int zero_stage() const { return cfg_.zero_stage; }
  // The device communicator bucket b reduces and gathers over: dp, or expert_dp.
  Communicator& bucket_group(int b) const {
    return layout_.buckets().at(b).expert ? *groups_.expert_dp : *groups_.dp;
  }

 private:
  void launch(int bucket_idx);

  ParamStore& params_;
  DataParallelGroups groups_;
  DataParallelConfig cfg_;
  BucketLayout layout_;
  bool armed_ = false;
  int64_t ready_offset_;             // every gradient element at or after it is final
  std::vector<bool> launched_;       // per bucket, this step
  std::vector<bool> tp_summed_;      // per parameter, this step
  std::vector<CommHandle> pending_;  // dp operations in flight
};

}  // namespace tessera
