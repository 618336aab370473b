// DistributedOptimizer: AdamW on pieces (whole parameters, or ZeRO-1 chunk pieces cut at parameter
// boundaries so each piece has one decay class), parameter all-gather, norm and state transfer.
#include "optim/distributed_optimizer.h"

#include <cmath>
#include <cstring>

#include "kernels/ops.h"

namespace tessera {

namespace {

// Moments and masters are f32 whatever the compute dtype (f64 only in the CPU reference tests),
// as in AdamW and ParamStore.
DType state_dtype(DType param_dtype) { return param_dtype == DType::f64 ? DType::f64 : DType::f32; }

char* byte_ptr(const Buffer& b, DType t, int64_t elem) {
  return static_cast<char*>(b.data()) + dtype_storage_bytes(t, elem);
}

}  // namespace

void HostOptimizerState::allocate(DType t, int64_t n) {
  dtype = t;
  numel = n;
  const size_t bytes = dtype_storage_bytes(t, n);
  for (Buffer* b : {&m, &v, &master}) {
    *b = Buffer(Device::cpu, bytes);
    if (bytes > 0) std::memset(b->data(), 0, bytes);
  }
}

Tensor HostOptimizerState::view(const Buffer& b, const Param& p) const {
  const int64_t off = static_cast<int64_t>(p.offset);
  TS_CHECK(off + p.spec.shape.numel() <= numel, "{} beyond the {} state elements", p.spec.name,
           numel);
  return Tensor(byte_ptr(b, dtype, off), dtype, Device::cpu, p.spec.shape);
}

size_t DistributedOptimizer::bytes_for(const BucketLayout& layout, DType param_dtype,
                                       int zero_stage) {
  const DType sdt = state_dtype(param_dtype);
  if (zero_stage == 0) return 2 * Arena::aligned(dtype_storage_bytes(sdt, layout.padded_numel()));
  const size_t shard = Arena::aligned(dtype_storage_bytes(sdt, layout.shard_numel()));
  return (sdt == param_dtype ? 2 : 3) * shard;
}

DistributedOptimizer::DistributedOptimizer(ParamStore& params, const DistributedDataParallel& ddp,
                                           const AdamWConfig& cfg, Arena* arena)
    : ddp_(ddp), cfg_(cfg) {
  const BucketLayout& layout = ddp.layout();
  TS_CHECK(params.padded_num_elements() == layout.padded_numel(),
           "optimizer over {} elements, bucket layout over {}", params.padded_num_elements(),
           layout.padded_numel());
  const DType sdt = state_dtype(params.dtype());
  int64_t state_numel = 0;
  if (ddp.zero_stage() == 0) {
    TS_CHECK(params.has_master(), "ZeRO-0 updates the parameter store's masters; it has none");
    for (int i = 0; i < params.size(); ++i) {
      const int64_t off = static_cast<int64_t>(params[i].offset);
      pieces_.push_back({i, off, off + params[i].spec.shape.numel(), off});
    }
    state_numel = layout.padded_numel();
  } else {
    TS_CHECK(
        !params.has_separate_master(),
        "ZeRO-1 keeps the master shard itself: allocate the parameters with with_master = false");
    pieces_ = layout.shard_pieces(params, ddp.dp_rank());
    state_numel = layout.shard_numel();
  }
  Arena own;
  if (!arena) {
    own = Arena(params.device(), bytes_for(layout, params.dtype(), ddp.zero_stage()), "optimizer");
    arena = &own;
  }
  const auto carve = [&] {
    return Tensor(arena->alloc_bytes(dtype_storage_bytes(sdt, state_numel)), sdt, params.device(),
                  {state_numel});
  };
  m_ = carve();
  v_ = carve();
  if (ddp.zero_stage() == 1 && !params.has_master()) master_shard_ = carve();
  if (own.capacity() > 0) owned_ = own.take_buffer();
  if (state_numel == 0) return;
  zero_tensor(m_);
  zero_tensor(v_);
  if (!master_shard_.empty()) {
    const Tensor values = params.flat_values();
    for (int b = 0; b < static_cast<int>(layout.buckets().size()); ++b) {
      const int64_t chunk = layout.chunk_numel(b), off = layout.buckets()[b].shard_offset;
      const int64_t begin = layout.chunk_begin(b, layout.group_rank(b, ddp.dp_rank()));
      ops::cast(master_shard_.slice(off, off + chunk), values.slice(begin, begin + chunk));
    }
  }
}

Tensor DistributedOptimizer::master_of(const ParamStore& params, const ShardPiece& piece) const {
  if (!master_shard_.empty()) return state(master_shard_, piece);
  // ZeRO-0: the store's masters; ZeRO-1 with f32 compute: the values, which are the masters.
  return params.flat_master().slice(piece.flat_begin, piece.flat_end);
}

void DistributedOptimizer::step(ParamStore& params, float lr, float grad_scale) {
  ++step_;
  const Tensor grads = params.flat_grads(), values = params.flat_values();
  // 16-bit compute: the update also writes the rounded values of what it updates (ZeRO-0: every
  // parameter, as refresh_values would; ZeRO-1: this rank's pieces), in the same pass.
  const bool write_values = params.has_separate_master() || !master_shard_.empty();
  std::vector<ops::AdamWTensors> entries;
  entries.reserve(pieces_.size());
  for (const ShardPiece& piece : pieces_)
    entries.push_back({master_of(params, piece), grads.slice(piece.flat_begin, piece.flat_end),
                       state(m_, piece), state(v_, piece),
                       adamw_step_for(cfg_, params[piece.param_idx].spec, lr, grad_scale, step_),
                       write_values ? values.slice(piece.flat_begin, piece.flat_end) : Tensor()});
  if (!entries.empty()) ops::adamw_update_multi(entries);
  if (ddp_.zero_stage() == 0) return;
  // ZeRO-1: every rank gathers every chunk (this rank's were rounded by the update; the padding
  // in them is zero in both buffers).
  const BucketLayout& layout = ddp_.layout();
  std::vector<CommHandle> gathers;
  for (int b = 0; b < static_cast<int>(layout.buckets().size()); ++b) {
    const GradBucket& bk = layout.buckets()[b];
    Communicator& group = ddp_.bucket_group(b);  // dp, or expert_dp for expert buckets
    const int64_t chunk = layout.chunk_numel(b), begin = layout.chunk_begin(b, group.rank());
    const Tensor mine = values.slice(begin, begin + chunk);
    if (group.size() > 1)
      gathers.push_back(group.all_gather_async(values.slice(bk.begin, bk.end), mine));
  }
  for (CommHandle& h : gathers) h->wait();
}

double DistributedOptimizer::global_grad_norm(const ParamStore& params) const {
  // Owner pieces are adjacent in flat order more often than not: one sum_squares per run.
  // Dense and expert squares apart: under ZeRO-0 every dp rank holds every dense gradient but only
  // its ep rank's experts, so the expert part alone is summed over ep.
  const Tensor grads = params.flat_grads();
  double local[2] = {0.0, 0.0};  // dense, expert
  int64_t run_begin = 0, run_end = 0;
  bool run_expert = false;
  const auto flush = [&] {
    if (run_end > run_begin) local[run_expert] += ops::sum_squares(grads.slice(run_begin, run_end));
  };
  for (const ShardPiece& piece : pieces_) {
    const ParamSpec& spec = params[piece.param_idx].spec;
    if (!spec.owner) continue;
    if (piece.flat_begin == run_end && run_end > run_begin && spec.expert_parallel == run_expert) {
      run_end = piece.flat_end;
    } else {
      flush();
      run_begin = piece.flat_begin;
      run_end = piece.flat_end;
      run_expert = spec.expert_parallel;
    }
  }
  flush();
  const DataParallelGroups& g = ddp_.groups();
  double sum = local[0] + local[1];
  if (ddp_.zero_stage() == 1 && g.dp_host->size() > 1) {
    // Chunks are disjoint over expert_dp and experts over ep: every element counted once over dp.
    sum = g.dp_host->all_reduce_scalar(sum, ReduceOp::sum);
  } else if (ddp_.zero_stage() == 0 && g.ep_size() > 1) {
    sum = local[0] + g.ep_host->all_reduce_scalar(local[1], ReduceOp::sum);
  }
  if (g.model_host->size() > 1) sum = g.model_host->all_reduce_scalar(sum, ReduceOp::sum);
  return std::sqrt(sum);
}

void DistributedOptimizer::gather_state(const ParamStore& params, HostOptimizerState* out) const {
  const BucketLayout& layout = ddp_.layout();
  const DataParallelGroups& g = ddp_.groups();
  // Dense buckets gather on dp rank 0, expert buckets on expert_dp rank 0 (dp ranks 0 .. ep-1);
  // dp rank 0 is both.
  const bool root = g.expert_dp_host->rank() == 0;
  const DType sdt = m_.dtype;
  const Device dev = params.device();
  if (root) out->allocate(sdt, layout.padded_numel());
  if (ddp_.zero_stage() == 0) {  // every rank holds all it updates; the roots copy their own
    if (!root) return;
    copy_bytes(out->m.data(), Device::cpu, m_.data, dev, m_.nbytes());
    copy_bytes(out->v.data(), Device::cpu, v_.data, dev, v_.nbytes());
    copy_bytes(out->master.data(), Device::cpu, params.flat_master().data, dev, m_.nbytes());
    return;
  }
  // ZeRO-1: stage the shards on the host; each group's root receives every other member's and
  // places chunk b of member q at chunk_begin(b, q).
  const int64_t shard = layout.shard_numel();
  const size_t shard_bytes = dtype_storage_bytes(sdt, shard);
  std::vector<const Tensor*> sources = {&m_, &v_};
  if (!master_shard_.empty()) sources.push_back(&master_shard_);
  std::vector<Buffer> staged;
  for (const Tensor* t : sources) {
    staged.emplace_back(Device::cpu, shard_bytes);
    if (shard_bytes > 0) copy_bytes(staged.back().data(), Device::cpu, t->data, dev, shard_bytes);
  }
  const auto host = [&](const Buffer& b) { return Tensor(b.data(), sdt, Device::cpu, {shard}); };
  Buffer* targets[] = {&out->m, &out->v, &out->master};
  const int num_buckets = static_cast<int>(layout.buckets().size());
  const auto gather = [&](Communicator& group, bool expert) {
    bool any = false;
    for (const GradBucket& bk : layout.buckets()) any = any || bk.expert == expert;
    if (!any) return;
    if (group.rank() != 0) {
      for (size_t k = 0; k < staged.size(); ++k)
        group.send(host(staged[k]), 0, static_cast<int>(k));
      return;
    }
    for (int q = 0; q < group.size(); ++q) {
      for (size_t k = 0; k < staged.size(); ++k) {
        if (q > 0) group.recv(host(staged[k]), q, static_cast<int>(k));
        for (int b = 0; b < num_buckets; ++b) {
          if (layout.buckets()[b].expert != expert) continue;
          std::memcpy(byte_ptr(*targets[k], sdt, layout.chunk_begin(b, q)),
                      byte_ptr(staged[k], sdt, layout.buckets()[b].shard_offset),
                      dtype_storage_bytes(sdt, layout.chunk_numel(b)));
        }
      }
    }
  };
  // Every dense transfer completes before any expert one starts: no rank waits in both at once.
  gather(*g.dp_host, /*expert=*/false);
  if (shard_bytes > 0 && g.ep_size() > 1)  // the dense gather may have overwritten the staging
    for (size_t k = 0; k < staged.size(); ++k)
      copy_bytes(staged[k].data(), Device::cpu, sources[k]->data, dev, shard_bytes);
  gather(*g.expert_dp_host, /*expert=*/true);
  // f32 compute: the values are the masters, and after a step every rank holds all of them.
  if (master_shard_.empty() && root)
    copy_bytes(out->master.data(), Device::cpu, params.flat_values().data, dev,
               dtype_storage_bytes(sdt, layout.padded_numel()));
}

void DistributedOptimizer::load_state(ParamStore& params, const HostOptimizerState& state) {
  const BucketLayout& layout = ddp_.layout();
  const DType sdt = m_.dtype;
  const Device dev = params.device();
  TS_CHECK(state.dtype == sdt && state.numel == layout.padded_numel(),
           "optimizer state {} x {}, expected {} x {}", dtype_name(state.dtype), state.numel,
           dtype_name(sdt), layout.padded_numel());
  const size_t full_bytes = dtype_storage_bytes(sdt, layout.padded_numel());
  if (ddp_.zero_stage() == 0) {
    copy_bytes(m_.data, dev, state.m.data(), Device::cpu, full_bytes);
    copy_bytes(v_.data, dev, state.v.data(), Device::cpu, full_bytes);
    copy_bytes(params.flat_master().data, dev, state.master.data(), Device::cpu, full_bytes);
    params.refresh_values();
    return;
  }
  const int dp_rank = ddp_.dp_rank();
  for (int b = 0; b < static_cast<int>(layout.buckets().size()); ++b) {
    const GradBucket& bk = layout.buckets()[b];
    const int64_t begin = layout.chunk_begin(b, layout.group_rank(b, dp_rank));
    const size_t bytes = dtype_storage_bytes(sdt, layout.chunk_numel(b));
    const size_t dst_off = dtype_storage_bytes(sdt, bk.shard_offset);
    copy_bytes(static_cast<char*>(m_.data) + dst_off, dev, byte_ptr(state.m, sdt, begin),
               Device::cpu, bytes);
    copy_bytes(static_cast<char*>(v_.data) + dst_off, dev, byte_ptr(state.v, sdt, begin),
               Device::cpu, bytes);
    if (!master_shard_.empty())
      copy_bytes(static_cast<char*>(master_shard_.data) + dst_off, dev,
                 byte_ptr(state.master, sdt, begin), Device::cpu, bytes);
  }
  // Every rank has the full masters here, so the values need no all-gather: round them on the
  // host exactly as ops::cast would (round to nearest even).
  const int64_t n = layout.padded_numel();
  if (master_shard_.empty()) {
    copy_bytes(params.flat_values().data, dev, state.master.data(), Device::cpu, full_bytes);
  } else {
    Buffer rounded(Device::cpu, dtype_storage_bytes(params.dtype(), n));
    convert_buffer(state.master.data(), sdt, rounded.data(), params.dtype(), n);
    copy_bytes(params.flat_values().data, dev, rounded.data(), Device::cpu, rounded.size());
  }
}

}  // namespace tessera
