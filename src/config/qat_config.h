// QatConfig (the recipe's `qat` section): quantization-aware training — the linears' weights (and
// optionally their inputs) fake-quantized to int8 or int4 by the rules the exporters write
// (kernels/quant_math.h), trained through with the straight-through estimator
// (optim/qat_linear.h, docs/QAT.md). weights none (the default) means no QAT, and every other key
// then is an error. group_size auto resolves at parse time (int4: 32, int8: 0 = per channel).
#pragma once
#include <cstdint>
#include <vector>

#include "config/enums.h"
#include "config/field.h"

namespace tessera {

namespace config {
// `r` that applies only when the section's qat.weights is not none.
bool qat_enabled(const void* qat);
constexpr Rule qat_rule(Rule r) {
  r.when = qat_enabled;
  r.when_doc = "qat.weights is int8 or int4";
  return r;
}
}  // namespace config

// The layers QAT quantizes unless the recipe names others: every block linear and the experts.
std::vector<QatLayer> default_qat_layers();

// clang-format off
#define TESSERA_QAT_FIELDS(X)                                                                     \
  X(QatBits, weights, QatBits::none, config::kAny,                                                \
    "fake-quantized weights, symmetric with FP16 scales: int8 (GGUF Q8_0 rules) or int4 (Q4_0); none: no QAT") \
  X(int, group_size, -1, config::qat_rule(config::or_auto(config::int_range(0, 128), -1.0)),       \
    "input columns per scale: 32, 64 or 128, or 0 (int8 only) for one scale per output channel; auto: int4 32, int8 0") \
  X(QatActivations, activations, QatActivations::none, config::qat_rule(config::kAny),            \
    "int8: each linear's input fake-quantized per token (row), dynamic (W8A8)")                  \
  X(std::vector<QatLayer>, layers, default_qat_layers(), config::qat_rule(config::kAny),          \
    "linears to fake-quantize; lm_head and embedding are not built")                             \
  X(int, start_step, 0, config::qat_rule(config::kNonNegative),                                   \
    "QAT begins at this step (a full-precision phase before it), < train.steps")
// clang-format on

struct QatConfig {
  TESSERA_CONFIG_FIELDS(QatConfig, TESSERA_QAT_FIELDS)
  bool enabled() const { return weights != QatBits::none; }
  bool quantizes(QatLayer layer) const {
    for (QatLayer l : layers)
      if (l == layer) return true;
    return false;
  }
  // Whether step (0-based) trains against quantized weights.
  bool active_at(int64_t step) const { return enabled() && step >= start_step; }
  // The group the ops take for a linear with `in_features` input columns (per channel: all).
  int64_t group_for(int64_t in_features) const {
    return group_size == 0 ? in_features : group_size;
  }
};

}  // namespace tessera
