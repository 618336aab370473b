// Opening the trainer's data blend (contract in data_blend.h).
#include "data/data_blend.h"

#include <memory>

#include <fmt/ranges.h>

#include "core/error.h"
#include "data/dataset.h"

namespace tessera {

namespace {

DataBlend open_mock(const DataPathWeight& p, uint64_t seed, int64_t vocab_size) {
  if (vocab_size < 1)
    TS_USER_ERROR("data.path 'mock' needs the vocabulary size (model.vocab_size), got {}",
                  vocab_size);
  DataBlend b;
  b.paths = {p.path};
  b.tokenizer_hash = "mock";
  b.vocab_size = vocab_size;
  b.train = {{std::make_shared<MockTokenSource>(seed, "mock/train", vocab_size, kMockTrainTokens),
              p.weight}};
  b.val = {
      {std::make_shared<MockTokenSource>(seed, "mock/val", vocab_size, kMockValTokens), p.weight}};
  return b;
}

}  // namespace

void DataBlend::check_tokenizer_hash(std::string_view hash,
                                     std::string_view tokenizer_source) const {
  if (hash == tokenizer_hash) return;
  TS_USER_ERROR(
      "tokenizer mismatch: dataset {} was tokenized with tokenizer hash {}, but the "
      "tokenizer from '{}' has hash {}; use the tokenizer the dataset was prepared with "
      "(its tokenizer.json is stored in the dataset's tokenizer_json attribute) or "
      "re-run tessera prepare",
      fmt::join(paths, ", "), tokenizer_hash, tokenizer_source, hash);
}

DataBlend open_data_blend(const std::vector<DataPathWeight>& paths, uint64_t seed,
                          int64_t mock_vocab_size) {
  if (paths.empty()) TS_USER_ERROR("data.path: no dataset given");
  for (const DataPathWeight& p : paths)
    if (p.path == "mock" && paths.size() > 1)
      TS_USER_ERROR(
          "data.path: 'mock' cannot be blended with other datasets (it has no tokenizer)");
  if (paths.front().path == "mock") return open_mock(paths.front(), seed, mock_vocab_size);
  DataBlend b;
  const TokenDataset first = TokenDataset::open(paths.front().path);
  b.tokenizer_json = first.tokenizer_json();
  b.tokenizer_hash = first.tokenizer_hash();
  b.vocab_size = first.vocab_size();
  for (const DataPathWeight& p : paths) {
    const TokenDataset ds = TokenDataset::open(p.path);
    if (ds.tokenizer_hash() != first.tokenizer_hash())
      TS_USER_ERROR(
          "data.path: the datasets of a blend must share one tokenizer, but {} was tokenized "
          "with tokenizer hash {} and {} with {}; prepare them with one tokenizer",
          first.path(), first.tokenizer_hash(), ds.path(), ds.tokenizer_hash());
    b.paths.push_back(p.path);
    b.train.push_back({ds.source("train"), p.weight});
    b.val.push_back({ds.source("val"), p.weight});
  }
  return b;
}

}  // namespace tessera
