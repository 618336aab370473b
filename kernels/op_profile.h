// Per-op time accounting for the flame-style breakdown of a training step: when enabled, every
// call through kernels/ops.h is timed (CUDA events on the op's stream, or the host clock on the
// CPU) and the times are summed by op name. Off by default: then a scope costs one branch.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/op_types.h"

namespace tessera::ops {

struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0.0;
};

void profile_enable(bool on);
bool profile_enabled();
void profile_reset();
// Waits for the device, resolves pending events, returns totals sorted by time (largest first).
std::vector<OpTime> profile_report();

// RAII timer used by the dispatch (kernels/dispatch.h): on CUDA, events on the op's stream.
class ProfileScope {
 public:
  ProfileScope(const char* op, Device device, Stream stream = {});
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  const char* op_;
  Device device_;
  Stream stream_;
  int slot_ = -1;
  double t0_ = 0.0;
};

}  // namespace tessera::ops
