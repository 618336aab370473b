// Deterministic training batches from a token split: which (input, target) windows a given
// (step, dp rank, micro-batch) sees is a pure function of those numbers and the seed, so resume is
// exact and any data-parallel layout with the same global batch sees the same samples.
// Not here: reading the HDF5 file (dataset.h) or moving batches to a device.
//
// Letters: T = seq_len, G = global batch (sequences per optimizer step), W = dp world size,
// B = micro-batch size (sequences).
// Windows: the split's N tokens are cut into num_windows = (N - 1) / T non-overlapping windows;
// window w has inputs tokens[w*T, w*T + T) and targets tokens[w*T + 1, w*T + T + 1) (the last
// token of the split is only ever a target; the tail of fewer than T + 1 tokens is unused).
// Training order: sample j of step s has global index g = s*G + j; its epoch is e = g / num_windows
// and it takes window perm_e[g % num_windows], where perm_e is a Fisher-Yates shuffle of
// [0, num_windows) drawn from CounterRng(seed, "tessera/loader/epoch/<e>"). So every window is seen
// exactly once per epoch, and epochs continue across step boundaries.
// Data parallelism: dp rank r takes the contiguous block j in [r*G/W, (r+1)*G/W) of each step;
// its micro-batch m is j = r*G/W + m*B + b for b in [0, B).
// Evaluation: the same split walked in order, no shuffle (fill_eval).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace tessera {

class Loader {
 public:
  // `tokens` must outlive the Loader (it is viewed, not copied). User errors: seq_len < 1,
  // global_batch_sequences < 1, G not divisible by W, a bad rank, or a split too short for one
  // window (these name `source_name`, e.g. "data.h5 /train").
  Loader(std::span<const uint32_t> tokens, int seq_len, int64_t global_batch_sequences,
         uint64_t seed, int dp_rank, int dp_world, std::string source_name = "token split");

  int seq_len() const { return seq_len_; }
  int64_t num_windows() const { return num_windows_; }
  int64_t global_batch() const { return global_batch_; }
  int64_t local_batch() const { return global_batch_ / dp_world_; }  // G / W sequences per rank
  // Steps whose samples all lie in epoch 0 (num_windows / G, rounded down).
  int64_t steps_per_epoch() const { return num_windows_ / global_batch_; }

  // The window index of global sample g (exposed for tests and for logging the data position).
  int64_t window_of(int64_t global_index) const;

  // Fills micro-batch `micro_idx` of this rank for optimizer step `step`:
  // inputs (B, T) and targets (B, T), row-major, with B = micro_batch. Needs
  // (micro_idx + 1) * B <= G / W. Thread-safe; depends on nothing but its arguments and the
  // constructor's.
  void fill(int64_t step, int micro_idx, int micro_batch, int32_t* inputs, int32_t* targets) const;

  // Evaluation batch `batch_idx`: the eval order is windows 0, 1, 2, ... with no shuffle; batch i
  // covers global windows [i*G, (i+1)*G), split across ranks and micro-batches like fill().
  // Rows past the last window are padding: inputs 0 and targets -1. Returns the number of real
  // rows (a prefix of the micro-batch, possibly 0).
  int fill_eval(int64_t batch_idx, int micro_idx, int micro_batch, int32_t* inputs,
                int32_t* targets) const;
  // Eval batches needed to cover every window once (the last may be partly padding).
  int64_t num_eval_batches() const { return (num_windows_ + global_batch_ - 1) / global_batch_; }

 private:
  // perm_e as described above; computed once per epoch and cached (the two most recent epochs,
  // since one step's batch can straddle an epoch boundary).
  std::shared_ptr<const std::vector<uint32_t>> epoch_permutation(int64_t epoch) const;
  void copy_window(int64_t window, int32_t* inputs, int32_t* targets) const;
  int64_t first_sample(int micro_idx, int micro_batch) const;  // j of row 0, checked

  std::span<const uint32_t> tokens_;  // (N,)
  int seq_len_;
  int64_t global_batch_;
  uint64_t seed_;
  int dp_rank_;
  int dp_world_;
  std::string source_name_;
  int64_t num_windows_;

  // Behind a pointer so the Loader stays movable (a mutex is not).
  struct PermCache {
    std::mutex mutex;
    std::map<int64_t, std::shared_ptr<const std::vector<uint32_t>>> by_epoch;
  };
  std::unique_ptr<PermCache> cache_ = std::make_unique<PermCache>();
};

// The epoch permutation used by Loader, exposed for tests: a Fisher-Yates shuffle of [0, n).
std::vector<uint32_t> loader_epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace tessera
