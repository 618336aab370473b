// TrainData: the blend (or mock tokens), the tokenizer check, and the per-rank loaders.
#include "train/train_data.h"

#include "core/error.h"
#include "data/tokenizer_spec.h"

namespace tessera {

namespace {

std::vector<DataPathWeight> paths_of(const DataConfig& d) {
  std::vector<DataPathWeight> out;
  for (const DataSource& s : d.path) out.push_back({s.path, s.weight});
  return out;
}

}  // namespace

TrainData::TrainData(const Recipe& r)
    : blend_(open_data_blend(paths_of(r.data), r.train.seed, r.model.vocab_size)) {
  if (r.data.mock()) return;  // no tokenizer to decode with
  tokenizer_ = Tokenizer::from_hf_json(blend_.tokenizer_json, r.data.path[0].path);
  if (!r.data.tokenizer.empty())
    blend_.check_tokenizer_hash(load_tokenizer_spec(r.data.tokenizer).hash(),
                                "data.tokenizer = " + r.data.tokenizer);
}

void TrainData::make_loaders(const Recipe& r, int dp_rank, int dp, const ModelShard& shard) {
  const LoaderShape shape{r.data.seq_len, r.global_batch(), r.train.seed, dp_rank, dp};
  train_ = std::make_unique<Loader>(blend_.train, shape);
  // Evaluation batch i is the i-th run of G eval samples, split over dp ranks and micro-batches
  // exactly like a training step, so every layout evaluates the same windows.
  val_ = std::make_unique<Loader>(blend_.val, shape);
  micro_batch_ = r.data.micro_batch;
  reads_inputs_ = shard.first_stage();
  reads_targets_ = shard.last_stage();
}

void TrainData::fill_train(int64_t step, int micro_idx, Batch& batch) const {
  train_->fill(step, micro_idx, micro_batch_, inputs(batch), targets(batch));
}

void TrainData::fill_eval(int64_t batch_idx, int micro_idx, Batch& batch) const {
  val_->fill_eval(batch_idx, micro_idx, micro_batch_, inputs(batch), targets(batch));
}

}  // namespace tessera
