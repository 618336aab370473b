// Bucket layout (pure) and bucketed data-parallel gradient synchronisation with early launches.
// Ordering rule: every sum that is not over dp (tp_partial_grad over tp, embedding_group over the
// embedding group) runs on a parameter's full gradient BEFORE the bucket holding it is launched,
// because after a ZeRO-1 reduce-scatter only this rank's chunk holds the dp sum.
#include "optim/data_parallel.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace tessera {

namespace {

int64_t param_numel(const Param& p) { return p.spec.shape.numel(); }

// A parameter's gradient as one flat vector (the collectives take contiguous 1-D tensors).
Tensor flat_grad(const Param& p) { return p.grad.view({p.grad.numel()}); }

}  // namespace

BucketLayout::BucketLayout(const ParamStore& params, int dp_size, int64_t bucket_numel, int ep_size)
    : dp_size_(dp_size), ep_size_(ep_size) {
  TS_CHECK(dp_size >= 1 && ep_size >= 1 && dp_size % ep_size == 0, "dp size {}, ep size {}",
           dp_size, ep_size);
  padded_numel_ = ParamStore::padded(params.num_elements(), dp_size);
  const int64_t target = std::max<int64_t>(bucket_numel, 1);
  const auto round_up = [&](int64_t x) { return ParamStore::padded(x, dp_size); };
  const auto round_down = [&](int64_t x) { return x / dp_size * dp_size; };

  int64_t end = padded_numel_;  // end of the bucket being filled
  const auto close = [&](int64_t begin) {
    if (begin >= end) return;
    GradBucket b;
    b.begin = begin;
    b.end = end;
    buckets_.push_back(b);
    end = begin;
  };
  for (int i = params.size() - 1; i >= 0; --i) {
    const Param& p = params[i];
    const int64_t off = static_cast<int64_t>(p.offset);
    if (i + 1 < params.size() && params[i + 1].spec.expert_parallel != p.spec.expert_parallel) {
      const int64_t start = static_cast<int64_t>(params[i + 1].offset);
      TS_CHECK(start % dp_size == 0, "{} starts a run of {} parameters at {}, not a multiple of dp",
               params[i + 1].spec.name, params[i + 1].spec.expert_parallel ? "expert" : "dense",
               start);
      close(start);  // the kinds reduce over different groups
    }
    if (p.spec.embedding_group) {
      close(round_up(off + param_numel(p)));  // nothing after the embedding waits for it
      close(round_down(off));                 // the whole embedding in one bucket
    } else if (end - round_up(off) >= target) {
      close(round_up(off));
    }
  }
  close(0);

  // The parameters each bucket overlaps, whether it holds an embedding or experts, and where its
  // chunk sits in a rank's shard.
  for (int bi = 0; bi < static_cast<int>(buckets_.size()); ++bi) {
    GradBucket& b = buckets_[bi];
    b.first_param = params.size();
    b.end_param = 0;
    for (int i = 0; i < params.size(); ++i) {
      const int64_t off = static_cast<int64_t>(params[i].offset), n = param_numel(params[i]);
      if (n == 0 || off + n <= b.begin || off >= b.end) continue;
      TS_CHECK(b.end_param == 0 || b.expert == params[i].spec.expert_parallel,
               "bucket [{}, {}) mixes expert and dense parameters", b.begin, b.end);
      b.first_param = std::min(b.first_param, i);
      b.end_param = std::max(b.end_param, i + 1);
      b.held = b.held || params[i].spec.embedding_group;
      b.expert = params[i].spec.expert_parallel;
    }
    if (b.first_param > b.end_param) b.first_param = b.end_param;  // padding only
    b.shard_offset = shard_numel_;
    shard_numel_ += chunk_numel(bi);
  }
}

int64_t BucketLayout::chunk_begin(int b, int rank) const {
  return buckets_.at(b).begin + rank * chunk_numel(b);
}

std::vector<ShardPiece> BucketLayout::shard_pieces(const ParamStore& params, int dp_rank) const {
  TS_CHECK(dp_rank >= 0 && dp_rank < dp_size_, "dp rank {} of {}", dp_rank, dp_size_);
  std::vector<ShardPiece> pieces;
  // Buckets run from the end of the buffer down; walk them backwards for increasing flat order.
  for (int b = static_cast<int>(buckets_.size()) - 1; b >= 0; --b) {
    const GradBucket& bk = buckets_[b];
    const int r = group_rank(b, dp_rank);
    const int64_t begin = chunk_begin(b, r);
    const int64_t end = std::min(chunk_end(b, r), params.num_elements());
    for (int i = bk.first_param; i < bk.end_param; ++i) {
      const int64_t off = static_cast<int64_t>(params[i].offset);
      const int64_t lo = std::max(begin, off), hi = std::min(end, off + param_numel(params[i]));
      if (lo < hi) pieces.push_back({i, lo, hi, bk.shard_offset + (lo - begin)});
    }
  }
  return pieces;
}

DistributedDataParallel::DistributedDataParallel(ParamStore& params,
                                                 const DataParallelGroups& groups,
                                                 const DataParallelConfig& cfg)
    : params_(params),
      groups_(groups),
      cfg_(cfg),
      layout_(params, groups.dp ? groups.dp->size() : 1,
              cfg.bucket_bytes / static_cast<int64_t>(dtype_size(params.grad_dtype())),
              groups.dp ? groups.ep_size() : 1),
      ready_offset_(std::numeric_limits<int64_t>::max()) {
  TS_CHECK(groups.dp && groups.tp && groups.embedding && groups.dp_host && groups.model_host,
           "every data-parallel communicator must be given");
  TS_CHECK(groups.dp_host->size() == groups.dp->size(), "host dp group of {} ranks, device {}",
           groups.dp_host->size(), groups.dp->size());
  if (!groups_.expert_dp) {
    groups_.expert_dp = groups.dp;
    groups_.expert_dp_host = groups.dp_host;
  }
  const int ep = groups_.ep_size();
  TS_CHECK(groups_.expert_dp->size() * ep == groups.dp->size() && groups_.expert_dp_host &&
               groups_.expert_dp_host->size() == groups_.expert_dp->size() &&
               groups_.expert_dp->rank() == groups.dp->rank() / ep &&
               (ep == 1 || (groups_.ep_host && groups_.ep_host->size() == ep)),
           "expert groups: expert_dp {} of {}, dp {} of {}, ep {}", groups_.expert_dp->rank(),
           groups_.expert_dp->size(), groups.dp->rank(), groups.dp->size(), ep);
  TS_CHECK(cfg.zero_stage == 0 || cfg.zero_stage == 1, "zero_stage {}", cfg.zero_stage);
  TS_CHECK(params.padded_num_elements() == layout_.padded_numel(),
           "parameters padded to {} elements; dp {} needs {} (allocate with pad_multiple = dp)",
           params.padded_num_elements(), groups.dp->size(), layout_.padded_numel());
  launched_.assign(layout_.buckets().size(), false);
  tp_summed_.assign(params.size(), false);
}

DistributedDataParallel::~DistributedDataParallel() = default;

void DistributedDataParallel::begin_last_microbatch() { armed_ = true; }

void DistributedDataParallel::grads_ready_from(int param_idx) {
  if (!armed_) return;
  TS_CHECK(param_idx >= 0 && param_idx < params_.size(), "parameter index {} of {}", param_idx,
           params_.size());
  ready_offset_ = std::min(ready_offset_, static_cast<int64_t>(params_[param_idx].offset));
  const auto& buckets = layout_.buckets();
  for (size_t b = 0; b < buckets.size() && buckets[b].begin >= ready_offset_; ++b)
    if (!launched_[b] && !buckets[b].held) launch(static_cast<int>(b));
}

void DistributedDataParallel::launch(int b) {
  const GradBucket& bk = layout_.buckets()[b];
  // A tp_partial_grad parameter is complete once any bucket overlapping it may launch (readiness
  // comes per parameter), so its whole gradient is summed over tp once, before its first bucket.
  for (int i = bk.first_param; i < bk.end_param; ++i) {
    const Param& p = params_[i];
    if (!p.spec.tp_partial_grad || tp_summed_[i]) continue;
    if (groups_.tp->size() > 1) groups_.tp->all_reduce(flat_grad(p), ReduceOp::sum);
    tp_summed_[i] = true;
  }
  launched_[b] = true;
  Communicator& group = bucket_group(b);
  if (group.size() == 1) return;
  const Tensor grads = params_.flat_grads().slice(bk.begin, bk.end);  // (bucket numel)
  if (cfg_.zero_stage == 0) {
    pending_.push_back(group.all_reduce_async(grads, ReduceOp::sum));
  } else {
    const int64_t chunk = layout_.chunk_numel(b);
    const Tensor mine = grads.slice(group.rank() * chunk, (group.rank() + 1) * chunk);
    pending_.push_back(group.reduce_scatter_async(mine, grads, ReduceOp::sum));
  }
}

void DistributedDataParallel::finish() {
  // The tied embedding's copies are summed first: their buckets are still unlaunched (held).
  if (groups_.embedding->size() > 1) {
    std::vector<CommHandle> sums;
    for (const Param& p : params_.all())
      if (p.spec.embedding_group && p.grad.numel() > 0)
        sums.push_back(groups_.embedding->all_reduce_async(flat_grad(p), ReduceOp::sum));
    for (CommHandle& h : sums) h->wait();
  }
  for (size_t b = 0; b < layout_.buckets().size(); ++b)
    if (!launched_[b]) launch(static_cast<int>(b));
  for (CommHandle& h : pending_) h->wait();
  pending_.clear();
  armed_ = false;
  ready_offset_ = std::numeric_limits<int64_t>::max();
  std::fill(launched_.begin(), launched_.end(), false);
  std::fill(tp_summed_.begin(), tp_summed_.end(), false);
}

}  // namespace tessera
