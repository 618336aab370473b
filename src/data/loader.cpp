// Deterministic window sampler over a blend of token sources (the contract is in loader.h).
#include "data/loader.h"

#include <algorithm>

#include "core/error.h"
#include "core/rng.h"
#include "data/permutation.h"

namespace tessera {

namespace {

void check_shape(const LoaderShape& s, const std::string& what) {
  if (s.seq_len < 1) TS_USER_ERROR("{}: seq_len must be at least 1, got {}", what, s.seq_len);
  if (s.global_batch < 1)
    TS_USER_ERROR("{}: global batch must be at least 1 sequence, got {}", what, s.global_batch);
  if (s.dp_world < 1 || s.dp_rank < 0 || s.dp_rank >= s.dp_world)
    TS_USER_ERROR("{}: dp rank {} is not in a dp world of size {}", what, s.dp_rank, s.dp_world);
  if (s.global_batch % s.dp_world != 0)
    TS_USER_ERROR(
        "global batch of {} sequences does not divide among dp={} ranks (it must be a "
        "multiple of dp)",
        s.global_batch, s.dp_world);
}

std::vector<double> weights_of(const std::vector<BlendPart>& parts) {
  std::vector<double> w;
  for (const BlendPart& p : parts) w.push_back(p.weight);
  return w;
}

std::vector<std::string> names_of(const std::vector<BlendPart>& parts) {
  std::vector<std::string> names;
  for (const BlendPart& p : parts) {
    TS_CHECK(p.source != nullptr, "a blend part without a source");
    names.push_back(p.source->name());
  }
  return names;
}

}  // namespace

Loader::Loader(std::vector<BlendPart> parts, const LoaderShape& shape)
    : shape_(shape), schedule_(weights_of(parts), names_of(parts)) {
  check_shape(shape, parts.empty() ? std::string("loader") : parts.front().source->name());
  for (BlendPart& p : parts) {
    const int64_t n = p.source->num_tokens();
    const int64_t windows = n > 0 ? (n - 1) / shape.seq_len : 0;
    if (windows < 1)
      TS_USER_ERROR("{}: {} tokens are too few for one window of seq_len {} (need {} tokens)",
                    p.source->name(), n, shape.seq_len, int64_t{shape.seq_len} + 1);
    parts_.push_back({std::move(p.source), windows});
  }
  // The eval set ends at the first sample some dataset cannot serve (its window num_windows).
  num_eval_samples_ = schedule_.global_index_of(0, parts_[0].num_windows);
  for (int d = 1; d < num_datasets(); ++d)
    num_eval_samples_ =
        std::min(num_eval_samples_, schedule_.global_index_of(d, parts_[size_t(d)].num_windows));
}

Loader::Window Loader::window_of(int64_t global_index) const {
  const BlendSchedule::Pick pick = schedule_.pick(global_index);
  const int64_t n = parts_[size_t(pick.dataset)].num_windows;
  const int64_t epoch = pick.index / n;
  const Permutation perm(
      uint64_t(n),
      CounterRng(shape_.seed, fmt::format("tessera/loader/{}/epoch/{}", pick.dataset, epoch)));
  return {pick.dataset, int64_t(perm(uint64_t(pick.index % n)))};
}

void Loader::read_window(const Part& part, int64_t window, int32_t* inputs,
                         int32_t* targets) const {
  const int T = shape_.seq_len;
  const int64_t begin = window * T;
  if (inputs && targets) {
    // One read of T + 1 tokens; the targets are the inputs shifted by one.
    std::vector<int32_t> tokens(size_t(T) + 1);
    part.source->read(begin, T + 1, tokens.data());
    std::copy(tokens.begin(), tokens.end() - 1, inputs);
    std::copy(tokens.begin() + 1, tokens.end(), targets);
  } else if (inputs) {
    part.source->read(begin, T, inputs);
  } else if (targets) {
    part.source->read(begin + 1, T, targets);
  }
}

int64_t Loader::first_sample(int micro_idx, int micro_batch) const {
  TS_CHECK(micro_batch >= 1 && micro_idx >= 0, "micro_idx={} micro_batch={}", micro_idx,
           micro_batch);
  TS_CHECK((int64_t{micro_idx} + 1) * micro_batch <= local_batch(),
           "micro-batch {} of {} sequences runs past this rank's {} sequences", micro_idx,
           micro_batch, local_batch());
  return shape_.dp_rank * local_batch() + int64_t{micro_idx} * micro_batch;
}

void Loader::fill(int64_t step, int micro_idx, int micro_batch, int32_t* inputs,
                  int32_t* targets) const {
  TS_CHECK(step >= 0, "step {}", step);
  const int64_t first = first_sample(micro_idx, micro_batch);
  if (!inputs && !targets) return;
  const int64_t T = shape_.seq_len;
  for (int b = 0; b < micro_batch; ++b) {
    const Window w = window_of(step * shape_.global_batch + first + b);
    read_window(parts_[size_t(w.dataset)], w.window, inputs ? inputs + b * T : nullptr,
                targets ? targets + b * T : nullptr);
  }
}

std::vector<Loader::Window> Loader::micro_windows(int64_t step, int micro_idx,
                                                  int micro_batch) const {
  TS_CHECK(step >= 0, "step {}", step);
  const int64_t first = step * shape_.global_batch + first_sample(micro_idx, micro_batch);
  std::vector<Window> out(static_cast<size_t>(micro_batch));
  for (int b = 0; b < micro_batch; ++b) out[size_t(b)] = window_of(first + b);
  return out;
}

int Loader::fill_eval(int64_t batch_idx, int micro_idx, int micro_batch, int32_t* inputs,
                      int32_t* targets) const {
  TS_CHECK(batch_idx >= 0, "eval batch {}", batch_idx);
  const int64_t first = first_sample(micro_idx, micro_batch);
  const int64_t T = shape_.seq_len;
  int num_real = 0;
  for (int b = 0; b < micro_batch; ++b) {
    const int64_t i = batch_idx * shape_.global_batch + first + b;
    int32_t* in = inputs ? inputs + b * T : nullptr;
    int32_t* tg = targets ? targets + b * T : nullptr;
    if (i < num_eval_samples_) {
      const BlendSchedule::Pick pick = schedule_.pick(i);
      read_window(parts_[size_t(pick.dataset)], pick.index, in, tg);
      ++num_real;
    } else {
      if (in) std::fill(in, in + T, 0);
      if (tg) std::fill(tg, tg + T, -1);
    }
  }
  return num_real;
}

int64_t Loader::num_eval_batches() const {
  return (num_eval_samples_ + shape_.global_batch - 1) / shape_.global_batch;
}

}  // namespace tessera
