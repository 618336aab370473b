// The training driver behind `tessera train`: builds a Run from the recipe (resuming when asked)
// and schedules its steps, evaluations, checkpoints and the final samples. One step itself is
// train_step (train_step.h).
#pragma once
#include <cstdint>

#include "config/recipe.h"

namespace tessera {

struct TrainSummary {
  int64_t first_step = 0;  // 0 for a fresh run, the checkpoint's step when resumed
  int64_t last_step = 0;   // optimizer steps completed
  double last_train_loss = 0.0;
  double final_val_loss = 0.0;
  double train_seconds = 0.0;  // wall time of the step loop
};

TrainSummary train(const Recipe& recipe);

}  // namespace tessera
