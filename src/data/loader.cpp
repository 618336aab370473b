// Deterministic window sampler over a token split (the contract is in loader.h).
#include "data/loader.h"

#include <algorithm>
#include <iterator>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"

namespace tessera {

namespace {

constexpr size_t kMaxCachedEpochs = 2;

// Uniform integer in [0, range) for range in [1, 2^32], unbiased: Lemire's multiply-shift with
// rejection. Each retry draws the next `sub` counter, so the result stays a pure function of
// (rng, index).
uint32_t uniform_below(const CounterRng& rng, uint64_t index, uint64_t range) {
  const uint64_t threshold = ((uint64_t{1} << 32) - range) % range;  // 2^32 mod range
  for (uint32_t sub = 0;; ++sub) {
    const uint64_t m = static_cast<uint64_t>(rng.bits(index, sub)) * range;
    if (static_cast<uint32_t>(m) >= threshold) return static_cast<uint32_t>(m >> 32);
  }
}

}  // namespace

std::vector<uint32_t> loader_epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  TS_CHECK(n >= 0 && n <= std::numeric_limits<uint32_t>::max(), "n={}", n);
  std::vector<uint32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0u);
  const CounterRng rng(seed, fmt::format("tessera/loader/epoch/{}", epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    const uint32_t j = uniform_below(rng, static_cast<uint64_t>(i), static_cast<uint64_t>(i) + 1);
    std::swap(perm[static_cast<size_t>(i)], perm[j]);
  }
  return perm;
}

Loader::Loader(std::span<const uint32_t> tokens, int seq_len, int64_t global_batch_sequences,
               uint64_t seed, int dp_rank, int dp_world, std::string source_name)
    : tokens_(tokens),
      seq_len_(seq_len),
      global_batch_(global_batch_sequences),
      seed_(seed),
      dp_rank_(dp_rank),
      dp_world_(dp_world),
      source_name_(std::move(source_name)),
      num_windows_(0) {
  if (seq_len_ < 1) TS_USER_ERROR("{}: seq_len must be at least 1, got {}", source_name_, seq_len_);
  if (global_batch_ < 1) {
    TS_USER_ERROR("{}: global batch must be at least 1 sequence, got {}", source_name_,
                  global_batch_);
  }
  if (dp_world_ < 1 || dp_rank_ < 0 || dp_rank_ >= dp_world_) {
    TS_USER_ERROR("{}: dp rank {} is not in a dp world of size {}", source_name_, dp_rank_,
                  dp_world_);
  }
  if (global_batch_ % dp_world_ != 0) {
    TS_USER_ERROR(
        "global batch of {} sequences does not divide among dp={} ranks (it must be a "
        "multiple of dp)",
        global_batch_, dp_world_);
  }
  const int64_t n = static_cast<int64_t>(tokens_.size());
  num_windows_ = n > 0 ? (n - 1) / seq_len_ : 0;
  if (num_windows_ < 1) {
    TS_USER_ERROR("{}: {} tokens are too few for one window of seq_len {} (need {} tokens)",
                  source_name_, n, seq_len_, int64_t{seq_len_} + 1);
  }
  if (num_windows_ > std::numeric_limits<uint32_t>::max()) {
    TS_USER_ERROR("{}: {} windows of seq_len {} exceed the loader's limit of 2^32 - 1",
                  source_name_, num_windows_, seq_len_);
  }
}

std::shared_ptr<const std::vector<uint32_t>> Loader::epoch_permutation(int64_t epoch) const {
  std::lock_guard<std::mutex> lock(cache_->mutex);
  auto& cache = cache_->by_epoch;
  if (auto it = cache.find(epoch); it != cache.end()) return it->second;
  auto perm = std::make_shared<const std::vector<uint32_t>>(
      loader_epoch_permutation(num_windows_, seed_, epoch));
  cache[epoch] = perm;
  // Evict the epoch furthest from the one just asked for (training moves forward, so this is
  // normally the oldest).
  while (cache.size() > kMaxCachedEpochs) {
    auto far = cache.begin();
    if (std::prev(cache.end())->first - epoch > epoch - far->first) far = std::prev(cache.end());
    cache.erase(far);
  }
  return perm;
}

int64_t Loader::window_of(int64_t global_index) const {
  TS_CHECK(global_index >= 0, "global sample index {}", global_index);
  const int64_t epoch = global_index / num_windows_;
  return (*epoch_permutation(epoch))[static_cast<size_t>(global_index % num_windows_)];
}

void Loader::copy_window(int64_t window, int32_t* inputs, int32_t* targets) const {
  const uint32_t* src = tokens_.data() + window * seq_len_;
  for (int t = 0; t < seq_len_; ++t) {
    inputs[t] = static_cast<int32_t>(src[t]);
    targets[t] = static_cast<int32_t>(src[t + 1]);
  }
}

int64_t Loader::first_sample(int micro_idx, int micro_batch) const {
  TS_CHECK(micro_batch >= 1 && micro_idx >= 0, "micro_idx={} micro_batch={}", micro_idx,
           micro_batch);
  TS_CHECK((int64_t{micro_idx} + 1) * micro_batch <= local_batch(),
           "micro-batch {} of {} sequences runs past this rank's {} sequences", micro_idx,
           micro_batch, local_batch());
  return dp_rank_ * local_batch() + int64_t{micro_idx} * micro_batch;
}

void Loader::fill(int64_t step, int micro_idx, int micro_batch, int32_t* inputs,
                  int32_t* targets) const {
  TS_CHECK(step >= 0, "step {}", step);
  const int64_t first = first_sample(micro_idx, micro_batch);
  for (int b = 0; b < micro_batch; ++b) {
    const int64_t g = step * global_batch_ + first + b;
    copy_window(window_of(g), inputs + int64_t{b} * seq_len_, targets + int64_t{b} * seq_len_);
  }
}

int Loader::fill_eval(int64_t batch_idx, int micro_idx, int micro_batch, int32_t* inputs,
                      int32_t* targets) const {
  TS_CHECK(batch_idx >= 0, "eval batch {}", batch_idx);
  const int64_t first = first_sample(micro_idx, micro_batch);
  int num_real = 0;
  for (int b = 0; b < micro_batch; ++b) {
    const int64_t w = batch_idx * global_batch_ + first + b;
    int32_t* in = inputs + int64_t{b} * seq_len_;
    int32_t* tg = targets + int64_t{b} * seq_len_;
    if (w < num_windows_) {
      copy_window(w, in, tg);
      ++num_real;
    } else {
      std::fill(in, in + seq_len_, 0);
      std::fill(tg, tg + seq_len_, -1);
    }
  }
  return num_real;
}

}  // namespace tessera
