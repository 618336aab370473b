// Evaluation: the validation loss over train.eval_batches global batches of the val split (the
// same windows under every layout), forward only; FP8 records no amax while it runs.
#pragma once
#include <cstdint>

#include "train/run.h"

namespace tessera {

struct EvalResult {
  double loss = 0.0;   // mean cross-entropy over the evaluated tokens
  int64_t tokens = 0;  // valid target tokens evaluated, over every replica
};

// Collective over the job; every rank returns the same result.
EvalResult evaluate(Run& run);

}  // namespace tessera
