// Distillation's part of a training step: the curriculum's alpha and temperature for the step set
// on the objective (cross-entropy weight 1 - alpha, the KD term alpha at T), its hidden-loss
// weight beta on the model's hidden-state term, and the teacher handed to the pipeline for the
// steps whose alpha or beta is > 0. The teacher is freed for good before the first step from which
// no later step needs it. With a teacher cache there is no teacher to run: the last stage's
// batches carry its rows.
#pragma once
#include <cstdint>

#include "config/distill_config.h"
#include "train/run.h"

namespace tessera {

// No-op without distill (returns alpha 0). `step` is 0-based.
DistillWeights begin_distill_step(Run& run, int64_t step);

}  // namespace tessera
