// Learning-rate schedules: linear warmup followed by cosine, linear or constant decay to min_lr,
// or warmup-stable-decay (WSD: constant after warmup, linear decay over the last fraction).
#pragma once
#include "config/enums.h"

namespace tessera {

struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::cosine;
  float lr = 3e-4f;
  float min_lr = 0.0f;
  int warmup_steps = 0;
  int total_steps = 1;
  float decay_fraction = 0.2f;  // wsd only

  // Learning rate for 0-based optimizer step `step`.
  float at(int step) const;
};

}  // namespace tessera
