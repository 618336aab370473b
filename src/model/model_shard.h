// ModelShard: the slice of the model one rank holds — its tensor-parallel rank (which heads, FFN
// columns and vocabulary rows), its pipeline stage (which layers) and its expert-parallel rank
// (which routed experts) — plus the tp and ep communicators the layers' collectives run on. The
// default is the whole model in one process.
#pragma once
#include <vector>

#include "parallel/communicator.h"

namespace tessera {

struct ModelConfig;

struct ModelShard {
  int tp_size = 1, tp_rank = 0;
  int pp_size = 1, pp_rank = 0;
  int first_layer = 0;              // global index of this stage's first layer
  int num_layers = -1;              // layers on this stage; -1: every layer (pp_size == 1)
  Communicator* tp_comm = nullptr;  // moves tensors on the model's device; needed when tp_size > 1
  // Expert parallelism: this rank holds routed experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of every
  // MoE layer and exchanges tokens with the ep group. Both communicators are needed when
  // ep_size > 1: ep_comm moves the rows (device tensors), ep_host_comm the per-expert row counts
  // (host memory).
  int ep_size = 1, ep_rank = 0;
  Communicator* ep_comm = nullptr;
  Communicator* ep_host_comm = nullptr;
  // Under ep > 1, the flat-buffer alignment of each run of expert parameters (ParamStore::
  // align_expert_runs): the dp size, so that gradient buckets never mix dense and expert elements.
  int64_t expert_align = 1;

  bool first_stage() const { return pp_rank == 0; }
  bool last_stage() const { return pp_rank == pp_size - 1; }
  // Checks the shard against the config (bug: the recipe's layout check runs first) and fills
  // num_layers = -1 in. Communicators are not needed (declaring shapes and planning memory run
  // without them); check_comms() checks them where the model runs.
  ModelShard resolved(const ModelConfig& cfg) const;
  void check_comms() const;
  // The pipeline split: stage_layers[s] layers on stage s, one entry per stage (the recipe's
  // resolve_stage_layers). Returns this stage's shard for (tp_rank, pp_rank).
  static ModelShard make(const ModelConfig& cfg, int tp_size, int tp_rank, int pp_size, int pp_rank,
                         const std::vector<int>& stage_layers, Communicator* tp_comm);
  // This shard with expert parallelism over `ep` (its rank's ep communicators: ep_size ranks) and
  // expert parameter runs aligned to dp_size elements.
  ModelShard with_ep(int dp_size, Communicator* ep, Communicator* ep_host) const;
  // The same without communicators, for planning: ep rank ep_rank of ep_size.
  ModelShard with_ep_size(int dp_size, int ep_size, int ep_rank) const;
};

// Megatron's conjugate mappings around a column-parallel -> row-parallel pair, as explicit
// forward/backward functions (tests check they are adjoint):
//   copy_to_tp_region:     forward identity (input replicated), backward all-reduce (sum of the
//                          ranks' partial input gradients);
//   reduce_from_tp_region: forward all-reduce (sum of partial outputs), backward identity.
// All are no-ops when tp_size == 1.
void copy_to_tp_region_forward(const ModelShard& s, Tensor x);
void copy_to_tp_region_backward(const ModelShard& s, Tensor dx);
// The same all-reduce, only launched: the caller computes what does not read dx (the weight
// gradients of the column-parallel layers that fed on x) and then waits. Empty when tp = 1.
CommHandle copy_to_tp_region_backward_async(const ModelShard& s, Tensor dx);
void reduce_from_tp_region_forward(const ModelShard& s, Tensor y);
void reduce_from_tp_region_backward(const ModelShard& s, Tensor dy);

}  // namespace tessera
