// Evaluation: batch i is the i-th run of G val windows in order, split over dp ranks and
// micro-batches like a training step, so every layout evaluates the same windows.
#include "train/evaluate.h"

#include <algorithm>

namespace tessera {

EvalResult evaluate(Run& run) {
  const int M = run.num_micro();
  const Loader& val = run.data().val();
  const int64_t num_batches =
      std::min<int64_t>(run.recipe().train.eval_batches, val.num_eval_batches());
  const auto fill = [&](int m, Batch& batch) { run.data().fill_eval(m / M, m % M, batch); };
  if (run.fp8()) run.fp8()->set_recording(false);  // evaluation must not steer the scales
  const PipelineExecutor::Result res = run.pipe().eval(fill, static_cast<int>(num_batches * M));
  if (run.fp8()) run.fp8()->set_recording(true);
  const double loss_sum = run.replica_sum(res.loss_sum);
  const double tokens = run.replica_sum(double(res.valid));
  return {tokens > 0 ? loss_sum / tokens : 0.0, int64_t(tokens)};
}

}  // namespace tessera
