// Learning-rate schedules. Warmup ramps linearly from lr/warmup (step 0) to lr (step warmup-1),
// so the first update is never taken with a zero rate.
#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace tessera {

float LrSchedule::at(int step) const {
  if (step < warmup_steps) return lr * float(step + 1) / float(warmup_steps);
  if (kind == LrScheduleKind::constant) return lr;
  const int decay_begin =
      kind == LrScheduleKind::wsd
          ? std::max(warmup_steps, int(std::lround(total_steps * (1.0 - decay_fraction))))
          : warmup_steps;
  if (step < decay_begin) return lr;
  const int decay_len = std::max(1, total_steps - decay_begin);
  const double progress = std::min(1.0, double(step - decay_begin) / double(decay_len));
  // 1 at the start of decay, 0 at its end
  const double coeff = kind == LrScheduleKind::cosine ? 0.5 * (1.0 + std::cos(M_PI * progress))
                                                      : 1.0 - progress;  // linear, wsd
  return float(min_lr + coeff * (lr - min_lr));
}

}  // namespace tessera
