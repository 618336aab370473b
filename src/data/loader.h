// Deterministic training batches from one token source or a weighted blend of several: which
// (input, target) windows a given (step, dp rank, micro-batch) sees is a pure function of those
// numbers and the seed, so resume is exact and any data-parallel layout with the same global batch
// sees the same samples. Each rank reads only the windows it uses, on demand; memory does not grow
// with the corpus or the run. Not here: reading files (dataset.h, token_source.h), which weights
// mean what (blend.h), or moving batches to a device.
//
// Letters: T = seq_len, G = global batch (sequences per optimizer step), W = dp world size,
// B = micro-batch size (sequences), K = datasets in the blend.
// Windows: a source's N tokens are cut into num_windows = (N - 1) / T non-overlapping windows;
// window w has inputs tokens[w*T, w*T + T) and targets tokens[w*T + 1, w*T + T + 1) (the last
// token of a source is only ever a target; the tail of fewer than T + 1 tokens is unused).
// Training order: sample j of step s has global index g = s*G + j. The blend schedule maps g to
// (dataset d, its own sample index k); with num_windows_d windows, k falls in epoch
// e = k / num_windows_d and takes window perm_{d,e}(k % num_windows_d), where perm_{d,e} is the
// Permutation (permutation.h) keyed by CounterRng(seed, "tessera/loader/<d>/epoch/<e>"). So each
// dataset shows every window once per epoch of its own, epochs continue across step boundaries,
// and nothing is materialized. Indices, offsets and counts are 64-bit throughout.
// Data parallelism: dp rank r takes the contiguous block j in [r*G/W, (r+1)*G/W) of each step;
// its micro-batch m is j = r*G/W + m*B + b for b in [0, B). tp peers pass the same dp rank and so
// read the same windows.
// Evaluation: the val sources blended with the same schedule but not shuffled: eval sample i is
// window k of dataset d for (d, k) = pick(i), so each dataset's val windows are walked in order in
// the training mix. The eval set ends where the first dataset runs out of windows (for one dataset:
// all its windows once); later rows are padding. Eval batch i covers eval samples [i*G, (i+1)*G),
// split across ranks and micro-batches like fill().
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/blend.h"
#include "data/token_source.h"

namespace tessera {

struct LoaderShape {
  int seq_len = 0;           // T
  int64_t global_batch = 0;  // G sequences per optimizer step
  uint64_t seed = 0;
  int dp_rank = 0;
  int dp_world = 1;  // W
};

struct BlendPart {
  std::shared_ptr<const TokenSource> source;
  double weight = 1.0;  // relative; normalised over the blend
};

class Loader {
 public:
  // User errors: seq_len < 1, G < 1, G not divisible by W, a bad rank, a source too short for one
  // window (naming the source), weights the blend refuses (blend.h).
  Loader(std::vector<BlendPart> parts, const LoaderShape& shape);

  int seq_len() const { return shape_.seq_len; }
  int64_t global_batch() const { return shape_.global_batch; }
  int64_t local_batch() const { return shape_.global_batch / shape_.dp_world; }  // G / W
  int num_datasets() const { return int(parts_.size()); }
  int64_t num_windows(int dataset = 0) const { return parts_[size_t(dataset)].num_windows; }
  const BlendSchedule& schedule() const { return schedule_; }

  // Where global training sample g comes from (for tests and for logging the data position).
  struct Window {
    int dataset = 0;
    int64_t window = 0;
  };
  Window window_of(int64_t global_index) const;
  // The windows of the rows of micro-batch `micro_idx` of this rank at optimizer step `step`, in
  // row order (what fill() reads).
  std::vector<Window> micro_windows(int64_t step, int micro_idx, int micro_batch) const;

  // Fills micro-batch `micro_idx` of this rank for optimizer step `step`: inputs (B, T) and
  // targets (B, T), row-major, with B = micro_batch. Either pointer may be null, and only what is
  // asked for is read (a first pipeline stage needs inputs, a last stage targets, a middle stage
  // neither). Needs (micro_idx + 1) * B <= G / W. Thread-safe; depends only on its arguments and
  // the constructor's.
  void fill(int64_t step, int micro_idx, int micro_batch, int32_t* inputs, int32_t* targets) const;

  // Evaluation batch `batch_idx` (see above), filled like fill(). Padding rows get inputs 0 and
  // targets -1. Returns the number of real rows (a prefix of the micro-batch, possibly 0).
  int fill_eval(int64_t batch_idx, int micro_idx, int micro_batch, int32_t* inputs,
                int32_t* targets) const;
  int64_t num_eval_samples() const { return num_eval_samples_; }
  // Eval batches needed to cover the eval set once (the last may be partly padding).
  int64_t num_eval_batches() const;

 private:
  struct Part {
    std::shared_ptr<const TokenSource> source;
    int64_t num_windows = 0;
  };
  int64_t first_sample(int micro_idx, int micro_batch) const;  // j of row 0, checked
  void read_window(const Part& part, int64_t window, int32_t* inputs, int32_t* targets) const;

  std::vector<Part> parts_;
  LoaderShape shape_;
  BlendSchedule schedule_;
  int64_t num_eval_samples_ = 0;
};

}  // namespace tessera
