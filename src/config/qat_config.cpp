// QatConfig helpers: the field rule's condition and the default layer list.
#include "config/qat_config.h"

namespace tessera {

namespace config {
bool qat_enabled(const void* q) { return static_cast<const QatConfig*>(q)->enabled(); }
}  // namespace config

std::vector<QatLayer> default_qat_layers() {
  return {QatLayer::attention, QatLayer::mlp, QatLayer::experts, QatLayer::shared_experts};
}

}  // namespace tessera
