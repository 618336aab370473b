// TrainData: dataset or mock tokens, the tokenizer check, and the per-rank loaders.
#include "train/train_data.h"

#include <algorithm>

#include "core/error.h"
#include "core/rng.h"
#include "data/tokenizer_spec.h"

namespace tessera {

namespace {

// Uniform random token ids for data.path: mock, capped at 64M tokens (the loader wraps around).
std::vector<uint32_t> mock_tokens(const Recipe& r, int64_t n, const char* stream) {
  n = std::min<int64_t>(n, int64_t(1) << 26);
  const CounterRng rng(r.train.seed, stream);
  std::vector<uint32_t> out(n);
#pragma omp parallel for schedule(static)  // each id depends on its index only
  for (int64_t i = 0; i < n; ++i) out[i] = rng.bits(uint64_t(i)) % uint32_t(r.model.vocab_size);
  return out;
}

}  // namespace

TrainData::TrainData(const Recipe& r) {
  if (r.data.mock()) {
    const int64_t per_step = r.global_batch() * r.data.seq_len;
    mock_train_ = mock_tokens(r, int64_t(r.train.steps) * per_step + 1, "mock/train");
    mock_val_ = mock_tokens(r, int64_t(r.train.eval_batches) * per_step + 1, "mock/val");
    vocab_size_ = r.model.vocab_size;  // the recipe validation demands it for mock data
    return;
  }
  if (r.data.path.size() != 1)
    TS_USER_ERROR("{}: data.path lists {} datasets: data blends are not built yet", r.file,
                  r.data.path.size());
  const std::string& path = r.data.path[0].path;
  dataset_ = TokenDataset::open(path);
  tokenizer_ = Tokenizer::from_hf_json(dataset_->tokenizer_json(), path);
  if (!r.data.tokenizer.empty())
    dataset_->check_tokenizer(load_tokenizer_spec(r.data.tokenizer),
                              "data.tokenizer = " + r.data.tokenizer);
  vocab_size_ = static_cast<int>(dataset_->vocab_size());
  tokenizer_hash_ = dataset_->tokenizer_hash();
}

void TrainData::make_loaders(const Recipe& r, int dp_rank, int dp) {
  const std::string name = r.data.mock() ? "mock" : r.data.path[0].path;
  const auto tokens = [&](bool train) -> std::span<const uint32_t> {
    if (!dataset_) return train ? mock_train_ : mock_val_;
    return train ? dataset_->train().tokens : dataset_->val().tokens;
  };
  // Evaluation batch i is the i-th run of G windows in order, split over dp ranks and
  // micro-batches exactly like a training step, so every layout evaluates the same windows.
  train_ = std::make_unique<Loader>(tokens(true), r.data.seq_len, r.global_batch(), r.train.seed,
                                    dp_rank, dp, name + " /train");
  val_ = std::make_unique<Loader>(tokens(false), r.data.seq_len, r.global_batch(), r.train.seed,
                                  dp_rank, dp, name + " /val");
}

}  // namespace tessera
