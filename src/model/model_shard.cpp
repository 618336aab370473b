// ModelShard: the pipeline split of layers and the tensor-parallel conjugate mappings.
#include "model/model_shard.h"

#include "config/model_config.h"
#include "core/error.h"

namespace tessera {

ModelShard ModelShard::resolved(const ModelConfig& cfg) const {
  ModelShard s = *this;
  if (s.num_layers < 0) s.num_layers = cfg.num_layers - s.first_layer;
  TS_CHECK(s.tp_size >= 1 && s.tp_rank >= 0 && s.tp_rank < s.tp_size, "tp {}/{}", s.tp_rank,
           s.tp_size);
  TS_CHECK(s.pp_size >= 1 && s.pp_rank >= 0 && s.pp_rank < s.pp_size, "pp {}/{}", s.pp_rank,
           s.pp_size);
  TS_CHECK(
      s.first_layer >= 0 && s.num_layers >= 1 && s.first_layer + s.num_layers <= cfg.num_layers,
      "layers [{}, {}) of {}", s.first_layer, s.first_layer + s.num_layers, cfg.num_layers);
  TS_CHECK(cfg.num_heads % s.tp_size == 0 && cfg.num_kv_heads % s.tp_size == 0 &&
               cfg.ffn_hidden % s.tp_size == 0 && cfg.padded_vocab_size % s.tp_size == 0,
           "layout check let tp={} through for heads {} kv {} ffn {} vocab {}", s.tp_size,
           cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden, cfg.padded_vocab_size);
  TS_CHECK(s.ep_size >= 1 && s.ep_rank >= 0 && s.ep_rank < s.ep_size, "ep {}/{}", s.ep_rank,
           s.ep_size);
  TS_CHECK(s.ep_size == 1 || (cfg.moe.enabled() && cfg.moe.num_experts % s.ep_size == 0),
           "layout check let ep={} through for {} experts", s.ep_size, cfg.moe.num_experts);
  return s;
}

void ModelShard::check_comms() const {
  TS_CHECK(tp_size == 1 || tp_comm != nullptr, "tp={} without a communicator", tp_size);
  TS_CHECK(tp_comm == nullptr || tp_comm->size() == tp_size, "tp comm size {} vs {}",
           tp_comm ? tp_comm->size() : 0, tp_size);
  TS_CHECK(ep_size == 1 || (ep_comm && ep_comm->size() == ep_size && ep_host_comm &&
                            ep_host_comm->size() == ep_size),
           "ep={} without ep communicators of that size", ep_size);
}

ModelShard ModelShard::make(const ModelConfig& cfg, int tp_size, int tp_rank, int pp_size,
                            int pp_rank, const std::vector<int>& stage_layers,
                            Communicator* tp_comm) {
  ModelShard s;
  s.tp_size = tp_size;
  s.tp_rank = tp_rank;
  s.pp_size = pp_size;
  s.pp_rank = pp_rank;
  s.tp_comm = tp_size > 1 ? tp_comm : nullptr;
  const std::vector<int>& counts = stage_layers;
  TS_CHECK(int(counts.size()) == pp_size, "stage_layers has {} entries for pp={}", counts.size(),
           pp_size);
  s.first_layer = 0;
  for (int st = 0; st < pp_rank; ++st) s.first_layer += counts[st];
  s.num_layers = counts[pp_rank];
  return s.resolved(cfg);
}

ModelShard ModelShard::with_ep(int dp_size, Communicator* ep, Communicator* ep_host) const {
  ModelShard s = with_ep_size(dp_size, ep ? ep->size() : 1, ep ? ep->rank() : 0);
  if (s.ep_size > 1) {
    s.ep_comm = ep;
    s.ep_host_comm = ep_host;
  }
  return s;
}

ModelShard ModelShard::with_ep_size(int dp_size, int ep_size, int ep_rank) const {
  ModelShard s = *this;
  s.ep_size = ep_size;
  s.ep_rank = ep_rank;
  s.expert_align = ep_size > 1 ? dp_size : 1;
  return s;
}

void copy_to_tp_region_forward(const ModelShard&, Tensor) {}
void copy_to_tp_region_backward(const ModelShard& s, Tensor dx) {
  if (s.tp_size > 1) s.tp_comm->all_reduce(dx, ReduceOp::sum);
}
CommHandle copy_to_tp_region_backward_async(const ModelShard& s, Tensor dx) {
  if (s.tp_size == 1) return nullptr;
  return s.tp_comm->all_reduce_async(dx, ReduceOp::sum);
}
void reduce_from_tp_region_forward(const ModelShard& s, Tensor y) {
  if (s.tp_size > 1) s.tp_comm->all_reduce(y, ReduceOp::sum);
}
void reduce_from_tp_region_backward(const ModelShard&, Tensor) {}

}  // namespace tessera
