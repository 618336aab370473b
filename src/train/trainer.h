// The training driver behind `tessera train`: builds model, optimizer and loaders from a Recipe,
// resumes from a checkpoint if asked, runs the step loop (gradient accumulation, clipping, LR
// schedule, AdamW), evaluates, writes metrics.jsonl and checkpoints, and prints samples at the end.
#pragma once
#include <cstdint>

#include "train/recipe.h"

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
