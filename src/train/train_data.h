// TrainData: the tokens a run trains and evaluates on — the dataset (or mock tokens), its
// tokenizer, and this rank's training and evaluation loaders. Opened before the model is sized
// (the vocabulary comes from the dataset); the loaders follow once the dp rank is known.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/tokenizer.h"

namespace tessera {

class TrainData {
 public:
  // Opens data.path and checks data.tokenizer against it; mock data draws uniform random tokens
  // below model.vocab_size.
  explicit TrainData(const Recipe& r);

  int vocab_size() const { return vocab_size_; }
  const std::string& tokenizer_hash() const { return tokenizer_hash_; }
  const Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }

  // Training and evaluation windows of dp rank `dp_rank` of `dp` (see data/loader.h),
  // `global_batch` sequences of seq_len tokens per step.
  void make_loaders(const Recipe& r, int dp_rank, int dp);
  const Loader& train() const { return *train_; }
  const Loader& val() const { return *val_; }

 private:
  std::optional<TokenDataset> dataset_;
  std::optional<Tokenizer> tokenizer_;
  std::vector<uint32_t> mock_train_, mock_val_;
  std::string tokenizer_hash_ = "mock";
  int vocab_size_ = 0;
  std::unique_ptr<Loader> train_, val_;
};

}  // namespace tessera
