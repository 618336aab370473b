// The training driver behind `tessera train`: builds a Run from the recipe (resuming when asked)
// and schedules its steps, evaluations, checkpoints and the final samples. One step itself is
// train_step (train_step.h).
#pragma once
#include <cstdint>
#include <string>

#include "config/recipe.h"

namespace tessera {

struct TrainSummary {
  int64_t first_step = 0;  // 0 for a fresh run, the checkpoint's step when resumed
  int64_t last_step = 0;   // optimizer steps completed
  double last_train_loss = 0.0;
  double final_val_loss = 0.0;
  double train_seconds = 0.0;  // wall time of the step loop
  // Stopped early, by a stop signal or the deadline (stop_rule.h): last_step's checkpoint is in
  // `checkpoint` (every rank), and neither the final evaluation nor the samples ran.
  bool preempted = false;
  std::string stop_reason;  // "SIGTERM", "SIGUSR1", "train.time_limit 3600 s: 12 s left"
  std::string checkpoint;
};

// Stops early, with a checkpoint, at the first step boundary where any rank has received SIGTERM
// or SIGUSR1 (install_stop_signal_handlers, stop_signals.h) or the deadline is near (stop_rule.h).
TrainSummary train(const Recipe& recipe);

}  // namespace tessera
