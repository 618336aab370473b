// MoE router metrics of one optimizer step, job-wide: per MoE layer the aux and z losses, the
// expert load (max and mean tokens per expert) and the fraction of routed slots dropped past the
// capacity. Written to metrics.jsonl by RunMetrics.
#pragma once
#include <vector>

#include "model/transformer.h"

namespace tessera {

class Run;

struct MoeLayerMetrics {
  int layer = -1;            // global block index
  double aux_loss = 0.0;     // coefficient included, mean over micro-batches and dp replicas
  double z_loss = 0.0;       // likewise
  double max_tokens = 0.0;   // tokens routed to the busiest expert, mean over micro-batches
  double mean_tokens = 0.0;  // N K / E per micro-batch
  double dropped = 0.0;      // dropped slots / routed slots (0 when dropless)
};

// One stage's records (Transformer::moe_stats) summarised; the dropped count is the brute-force
// sum over experts of max(0, count - capacity).
std::vector<MoeLayerMetrics> summarize_moe_stats(const std::vector<MoeLayerStats>& stats);

// Every MoE layer of the model (all stages), averaged over dp, identical on every rank; resets
// this rank's records. Collective over the world (call on every rank, every step).
std::vector<MoeLayerMetrics> moe_step_metrics(Run& run);

}  // namespace tessera
