// TrainData: the blend (or mock tokens), the tokenizer check, and the per-rank loaders.
#include "train/train_data.h"

#include <fmt/ranges.h>

#include "core/error.h"
#include "data/dataset.h"
#include "data/tokenizer_spec.h"

namespace tessera {

namespace {

std::vector<DataPathWeight> paths_of(const DataConfig& d) {
  std::vector<DataPathWeight> out;
  for (const DataSource& s : d.path) out.push_back({s.path, s.weight});
  return out;
}

// distill.teacher_cache: one token dataset, the cache made for it at data.seq_len, and every
// temperature a step with alpha > 0 uses among the cached ones.
TeacherCache open_teacher_cache(const Recipe& r) {
  const std::string& path = r.distill.teacher_cache;
  const std::string who = fmt::format("{}: distill.teacher_cache", r.file);
  if (r.data.mock() || r.data.path.size() != 1)
    TS_USER_ERROR("{} = {} needs data.path to be one token dataset (the cache is of its windows)",
                  who, path);
  TeacherCache cache = TeacherCache::open(path);
  cache.check_dataset(TokenDataset::open(r.data.path[0].path), r.data.seq_len, who);
  for (int64_t step = 0; step < r.train.steps; ++step) {
    const DistillWeights w = curriculum_at(r.distill, step, r.train.steps);
    if (w.alpha > 0.0f && cache.temperature_index(w.temperature) < 0)
      TS_USER_ERROR(
          "{} = {}: step {} distils at temperature {}, which the cache lacks (it holds the lse "
          "at {}); rebuild it with tessera distill-cache --temperature for each, or change the "
          "curriculum (a ramp between temperatures needs every step's value)",
          who, path, step + 1, w.temperature, fmt::join(cache.meta().temperatures, ", "));
  }
  return cache;
}

}  // namespace

TrainData::TrainData(const Recipe& r)
    : blend_(open_data_blend(paths_of(r.data), r.train.seed, r.model.vocab_size)),
      recipe_file_(r.file),
      distill_(r.distill),
      steps_(r.train.steps) {
  if (!r.distill.teacher_cache.empty()) cache_.emplace(open_teacher_cache(r));
  if (r.data.mock()) return;  // no tokenizer to decode with
  tokenizer_ = Tokenizer::from_hf_json(blend_.tokenizer_json, r.data.path[0].path);
  if (!r.data.tokenizer.empty())
    blend_.check_tokenizer_hash(load_tokenizer_spec(r.data.tokenizer).hash(),
                                "data.tokenizer = " + r.data.tokenizer);
}

void TrainData::make_loaders(const Recipe& r, int dp_rank, int dp, const ModelShard& shard,
                             Device device) {
  const LoaderShape shape{r.data.seq_len, r.global_batch(), r.train.seed, dp_rank, dp};
  train_ = std::make_unique<Loader>(blend_.train, shape);
  // Evaluation batch i is the i-th run of G eval samples, split over dp ranks and micro-batches
  // exactly like a training step, so every layout evaluates the same windows.
  val_ = std::make_unique<Loader>(blend_.val, shape);
  micro_batch_ = r.data.micro_batch;
  reads_inputs_ = shard.first_stage();
  reads_targets_ = shard.last_stage();
  if (!cache_ || !reads_targets_) return;
  for (Staging& st : staging_) {
    TeacherCache::resize(st.rows, cache_->meta(), micro_batch_);
    if (device != Device::cuda) continue;
    for (auto* v : {&st.rows.topk_logits, &st.rows.lse})
      st.pins.emplace_back(v->data(), v->size() * sizeof(float));
    st.pins.emplace_back(st.rows.topk_ids.data(), st.rows.topk_ids.size() * sizeof(int32_t));
  }
}

void TrainData::fill_train(int64_t step, int micro_idx, Batch& batch) const {
  train_->fill(step, micro_idx, micro_batch_, inputs(batch), targets(batch));
  // Steps without KD read no rows (a cache made for the run lacks their windows).
  if (batch.has_teacher_rows() && needs_teacher_rows(step))
    stage_teacher_rows(step, micro_idx, batch);
}

void TrainData::stage_teacher_rows(int64_t step, int micro_idx, Batch& batch) const {
  TS_CHECK(cache_, "a batch with room for teacher rows but no teacher cache");
  if (next_.done.valid()) next_.done.get();  // a read error surfaces here, for its micro-batch
  int buf = next_.buf;
  if (next_.step != step || next_.micro != micro_idx) {  // not prefetched: read it now
    buf = 1 - next_.buf;
    read_teacher_rows(step, micro_idx, staging_[buf].rows);
  }
  batch.stage(staging_[buf].rows);
  // The next micro-batch's rows into the other buffer (this one is uploaded before the next
  // fill_train: the executor fills and uploads each micro-batch back to back).
  const bool last_micro = int64_t(micro_idx + 1) * micro_batch_ >= train_->local_batch();
  next_.step = last_micro ? step + 1 : step;
  next_.micro = last_micro ? 0 : micro_idx + 1;
  next_.buf = 1 - buf;
  if (!needs_teacher_rows(next_.step)) return;
  next_.done = std::async(std::launch::async, [this] {
    read_teacher_rows(next_.step, next_.micro, staging_[next_.buf].rows);
  });
}

bool TrainData::needs_teacher_rows(int64_t step) const {
  return step < steps_ && curriculum_at(distill_, step, steps_).alpha > 0.0f;
}

void TrainData::read_teacher_rows(int64_t step, int micro_idx, TeacherRows& rows) const {
  const std::vector<Loader::Window> windows = train_->micro_windows(step, micro_idx, micro_batch_);
  const std::string context = fmt::format("{}: step {}", recipe_file_, step + 1);
  for (int b = 0; b < micro_batch_; ++b)
    cache_->read(windows[size_t(b)].window, b, micro_batch_, rows, context);
}

void TrainData::fill_eval(int64_t batch_idx, int micro_idx, Batch& batch) const {
  val_->fill_eval(batch_idx, micro_idx, micro_batch_, inputs(batch), targets(batch));
}

}  // namespace tessera
