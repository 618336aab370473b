// DistributedOptimizer: AdamW over the buckets of a DistributedDataParallel (Megatron-Core's
// DistributedOptimizer). ZeRO-0: every dp rank updates every parameter (the same arithmetic as
// AdamW, bit for bit). ZeRO-1: dp rank r keeps m, v (and, for 16-bit compute, the f32 master) only
// for its chunk of each bucket, updates that, and all-gathers the new values over dp.
// Also the layout-independent global gradient norm and checkpoint gather/load of the state.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "optim/adamw.h"
#include "optim/data_parallel.h"

namespace tessera {

// This rank's (one tp/pp position's) full optimizer state on the host, indexed like the flat
// parameter buffers (padded_num_elements long; Param::offset locates a parameter): what a
// checkpoint stores. dtype is the master dtype (f32; f64 in CPU tests).
struct HostOptimizerState {
  DType dtype = DType::f32;
  int64_t numel = 0;
  Buffer m, v, master;

  void allocate(DType dtype, int64_t numel);  // zero-filled
  // Views shaped like the parameter.
  Tensor m_of(const Param& p) const { return view(m, p); }
  Tensor v_of(const Param& p) const { return view(v, p); }
  Tensor master_of(const Param& p) const { return view(master, p); }

 private:
  Tensor view(const Buffer& b, const Param& p) const;
};

class DistributedOptimizer {
 public:
  // ZeRO-0: `params` keeps its masters (allocated with with_master = true).
  // ZeRO-1: `params` has no separate masters (with_master = false); for 16-bit compute the f32
  // master shard starts as the values cast up (load_state() replaces it with exact masters).
  // State comes from `arena` when given (bytes_for()), else from a buffer the optimizer owns.
  // `ddp` must outlive the optimizer.
  DistributedOptimizer(ParamStore& params, const DistributedDataParallel& ddp,
                       const AdamWConfig& cfg, Arena* arena = nullptr);
  static size_t bytes_for(const BucketLayout& layout, DType param_dtype, int zero_stage);

  // One AdamW step (gradients multiplied by grad_scale first) of the parameters this rank
  // updates, after ddp.finish(); on return every rank holds the full updated values.
  void step(ParamStore& params, float lr, float grad_scale);

  // L2 norm of the step's gradient over the whole model, the same on every rank and for every
  // layout: each rank sums the squares it is responsible for (owner parameters; under ZeRO-1 only
  // their pieces in its chunks), then the partial sums are added over dp (ZeRO-1; ZeRO-0: the
  // expert squares over ep) and over the replica's tp x pp ranks. Collective over those groups.
  double global_grad_norm(const ParamStore& params) const;

  // Checkpoints. gather_state: collective over the dp group; fills `out` on expert_dp rank 0 only
  // (other ranks leave it untouched): its dense parameters are valid on dp rank 0, its expert
  // parameters (this ep rank's experts) on every expert_dp rank 0, i.e. dp ranks 0 .. ep-1.
  // load_state: every dp rank passes the full state of its parameters (read by the caller); each
  // keeps what it updates and rewrites the values from the masters.
  void gather_state(const ParamStore& params, HostOptimizerState* out) const;
  void load_state(ParamStore& params, const HostOptimizerState& state);

  int64_t step_count() const { return step_; }
  void set_step_count(int64_t s) { step_ = s; }
  const AdamWConfig& config() const { return cfg_; }
  int zero_stage() const { return ddp_.zero_stage(); }
  // What this rank updates, in increasing flat order (ZeRO-0: every parameter whole).
  const std::vector<ShardPiece>& pieces() const { return pieces_; }

 private:
  Tensor master_of(const ParamStore& params, const ShardPiece& piece) const;
  Tensor state(const Tensor& t, const ShardPiece& piece) const {
    return t.slice(piece.state_offset, piece.state_offset + piece.numel());
  }

  const DistributedDataParallel& ddp_;
  AdamWConfig cfg_;
  int64_t step_ = 0;
  std::vector<ShardPiece> pieces_;
  Buffer owned_;
  Tensor m_, v_;         // (state numel): ZeRO-0 padded_numel, ZeRO-1 shard_numel
  Tensor master_shard_;  // (shard_numel) ZeRO-1 with 16-bit compute only; empty otherwise
};

}  // namespace tessera
