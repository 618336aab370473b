// MoE router metrics: a stage's records summarised, then combined over the world.
#include "train/moe_metrics.h"

#include <algorithm>

#include "train/run.h"

namespace tessera {

std::vector<MoeLayerMetrics> summarize_moe_stats(const std::vector<MoeLayerStats>& stats) {
  std::vector<MoeLayerMetrics> out;
  for (const MoeLayerStats& st : stats) {
    MoeLayerMetrics m;
    m.layer = st.layer;
    const size_t n = st.aux.size();
    if (n == 0) {
      out.push_back(m);
      continue;
    }
    int64_t dropped = 0, routed = 0;
    for (size_t r = 0; r < n; ++r) {
      m.aux_loss += st.aux[r] / double(n);
      m.z_loss += st.z[r] / double(n);
      const std::vector<int32_t>& c = st.tokens_per_expert[r];
      m.max_tokens += double(*std::max_element(c.begin(), c.end())) / double(n);
      for (int32_t count : c) {
        routed += count;
        if (st.capacity > 0) dropped += std::max<int64_t>(0, count - st.capacity);
      }
    }
    m.mean_tokens = double(st.tokens) * st.topk / st.num_experts;
    m.dropped = routed > 0 ? double(dropped) / double(routed) : 0.0;
    out.push_back(m);
  }
  return out;
}

std::vector<MoeLayerMetrics> moe_step_metrics(Run& run) {
  Transformer& model = run.model();
  const ModelConfig& cfg = model.config();
  std::vector<MoeLayerMetrics> local = summarize_moe_stats(model.moe_stats());
  model.reset_moe_stats();
  // One row of five per MoE layer of the whole model; each (stage, dp replica) fills its layers
  // from tp rank 0 (tp ranks route identically), the world sums, and dp replicas are averaged.
  std::vector<int> layers;
  for (int l = 0; l < cfg.num_layers; ++l)
    if (cfg.moe.is_moe_layer(l)) layers.push_back(l);
  std::vector<double> rows(layers.size() * 5, 0.0);
  if (model.shard().tp_rank == 0)
    for (const MoeLayerMetrics& m : local) {
      const size_t i = size_t(std::find(layers.begin(), layers.end(), m.layer) - layers.begin());
      const double v[5] = {m.aux_loss, m.z_loss, m.max_tokens, m.mean_tokens, m.dropped};
      std::copy(v, v + 5, rows.begin() + i * 5);
    }
  Communicator& world = run.ctx().host_comm(Group::world);
  if (world.size() > 1)
    world.all_reduce(Tensor(rows.data(), DType::f64, Device::cpu, {int64_t(rows.size())}),
                     ReduceOp::sum);
  std::vector<MoeLayerMetrics> out(layers.size());
  const double dp = run.recipe().parallel.dp;
  for (size_t i = 0; i < layers.size(); ++i) {
    const double* v = rows.data() + i * 5;
    out[i] = MoeLayerMetrics{layers[i], v[0] / dp, v[1] / dp, v[2] / dp, v[3] / dp, v[4] / dp};
  }
  return out;
}

}  // namespace tessera
