// MoeConfig helpers: the field rule's condition and the per-expert capacity.
#include "config/moe_config.h"

#include <algorithm>
#include <cmath>

namespace tessera {

namespace config {
bool moe_enabled(const void* moe) { return static_cast<const MoeConfig*>(moe)->enabled(); }
}  // namespace config

// GShard/Megatron: capacity = ceil(capacity_factor * tokens * K / E), at least one slot.
int64_t MoeConfig::capacity(int64_t tokens) const {
  if (capacity_factor <= 0.0f || !enabled()) return 0;
  const double slots = double(capacity_factor) * double(tokens) * topk / num_experts;
  return std::max<int64_t>(1, int64_t(std::ceil(slots)));
}

}  // namespace tessera
