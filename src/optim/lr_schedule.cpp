// Learning-rate schedules. Warmup ramps linearly from lr/warmup (step 0) to lr (step warmup-1),
// so the first update is never taken with a zero rate.
#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace tessera {

float LrSchedule::at(int step) const {
  if (step < warmup_steps) return lr * float(step + 1) / float(warmup_steps);
  if (kind == "constant") return lr;
  const int decay_begin =
      kind == "wsd" ? std::max(warmup_steps, int(std::lround(total_steps * (1.0 - decay_fraction))))
                    : warmup_steps;
  if (step < decay_begin) return lr;
  const int decay_len = std::max(1, total_steps - decay_begin);
  const double progress = std::min(1.0, double(step - decay_begin) / double(decay_len));
  double coeff;  // 1 at the start of decay, 0 at its end
  if (kind == "cosine")
    coeff = 0.5 * (1.0 + std::cos(M_PI * progress));
  else if (kind == "linear" || kind == "wsd")
    coeff = 1.0 - progress;
  else
    TS_BUG("unknown schedule {}", kind);
  return float(min_lr + coeff * (lr - min_lr));
}

}  // namespace tessera
