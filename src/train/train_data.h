// TrainData: the tokens a run trains and evaluates on — the datasets of data.path (a blend, or
// mock tokens), their shared tokenizer, and this rank's training and evaluation loaders. Opened
// before the model is sized (the vocabulary comes from the datasets, metadata only); the loaders
// follow once the dp rank is known and read windows on demand. When distilling from a teacher cache
// (distill.teacher_cache), the last stage's training batches also carry the cache's rows of their
// windows.
#pragma once
#include <cstdint>
#include <future>
#include <memory>
#include <optional>
#include <string>

#include "config/recipe.h"
#include "data/data_blend.h"
#include "data/loader.h"
#include "data/teacher_cache.h"
#include "data/tokenizer.h"
#include "model/model_shard.h"
#include "train/batch.h"

namespace tessera {

class TrainData {
 public:
  // Opens data.path and checks data.tokenizer against it; mock data draws uniform random tokens
  // below model.vocab_size, computed per index.
  explicit TrainData(const Recipe& r);

  int vocab_size() const { return int(blend_.vocab_size); }
  const std::string& tokenizer_hash() const { return blend_.tokenizer_hash; }
  const std::string& tokenizer_json() const { return blend_.tokenizer_json; }  // "" for mock
  const Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }
  // distill.teacher_cache, opened and checked against the dataset and the curriculum; null
  // without one.
  const TeacherCache* teacher_cache() const { return cache_ ? &*cache_ : nullptr; }

  // Training and evaluation windows of dp rank `dp_rank` of `dp` (see data/loader.h). `shard`
  // says what this rank's pipeline stage reads: inputs on the first stage, targets on the last,
  // nothing in between.
  // `device`: where the batches go (a teacher cache's staging rows are page-locked for CUDA).
  void make_loaders(const Recipe& r, int dp_rank, int dp, const ModelShard& shard = {},
                    Device device = Device::cpu);
  const Loader& train() const { return *train_; }
  const Loader& val() const { return *val_; }
  // Micro-batch `micro_idx` of step `step` / evaluation batch `batch_idx` into `batch`, only the
  // parts this stage reads (and the cached teacher rows when the batch has room for them).
  void fill_train(int64_t step, int micro_idx, Batch& batch) const;
  void fill_eval(int64_t batch_idx, int micro_idx, Batch& batch) const;

 private:
  int32_t* inputs(Batch& b) const { return reads_inputs_ ? b.inputs.data() : nullptr; }
  int32_t* targets(Batch& b) const { return reads_targets_ ? b.targets.data() : nullptr; }

  DataBlend blend_;
  std::optional<Tokenizer> tokenizer_;
  // Teacher rows are read into two staging buffers in turn: the next micro-batch's on a worker
  // thread while the device runs this one (the cache's only reader then; fill_train waits for it
  // before anything else reads), page-locked on CUDA so the upload is one fast DMA.
  struct Staging {
    TeacherRows rows;
    std::vector<HostPin> pins;
  };
  struct Prefetch {
    int64_t step = -1;
    int micro = -1;
    int buf = 0;  // the staging buffer it fills
    std::future<void> done;
  };
  void read_teacher_rows(int64_t step, int micro_idx, TeacherRows& rows) const;
  bool needs_teacher_rows(int64_t step) const;  // a step of the run with alpha > 0
  void stage_teacher_rows(int64_t step, int micro_idx, Batch& batch) const;
  std::string recipe_file_;
  DistillConfig distill_;
  int64_t steps_ = 0;
  std::optional<TeacherCache> cache_;
  std::unique_ptr<Loader> train_, val_;
  int micro_batch_ = 0;
  bool reads_inputs_ = true, reads_targets_ = true;
  mutable Staging staging_[2];
  mutable Prefetch next_;  // last: destroyed (its read awaited) before what the read uses
};

}  // namespace tessera
