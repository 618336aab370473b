// The inference engine: an EngineModel, its paged KV cache, the continuous-batching scheduler and
// per-request sampling, driven one iteration at a time (step()). Requests join and leave the
// running batch every step; each step's tokens and finished requests come back as events, with
// the text each token adds (UTF-8 complete, stop strings withheld). Used by `tessera generate`
// and `tessera serve` (one thread drives it; others hand requests over through that thread).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"
#include "infer/engine_model.h"
#include "infer/sampling.h"
#include "infer/scheduler.h"

namespace tessera {

struct EngineOptions {
  // KV cache budget in bytes; 0: CPU 1 GiB, GPU 90% of the device memory free after the weights
  // and the workspace.
  int64_t kv_cache_bytes = 0;
  int64_t block_size = 16;    // tokens per KV block
  int64_t max_context = 0;    // tokens per sequence (prompt + generated); 0: the model's max
  SchedulerConfig scheduler;  // max_num_seqs, max_num_batched_tokens, chunked prefill
  bool ignore_eos = false;    // true: the tokenizer's end-of-text token does not stop generation
};

// What one step did for one request.
struct EngineEvent {
  RequestId id = -1;
  int32_t token = -1;  // the token sampled this step, or -1 (finished without one)
  std::string text;    // the text this step releases (may be empty)
  bool finished = false;
  FinishReason reason = FinishReason::none;
  std::string error;  // FinishReason::error: why
  int64_t num_prompt = 0, num_generated = 0;
};

class Engine {
 public:
  Engine(std::shared_ptr<EngineModel> model, const EngineOptions& options);

  // Queues a request; returns its id. User errors (naming the field and value): invalid sampling
  // parameters, an empty prompt, a token id outside the vocabulary, or prompt + max_tokens longer
  // than the context.
  RequestId add_request(std::vector<int32_t> prompt, const SamplingParams& params);
  // Cancels a waiting or running request: it finishes with FinishReason::cancelled in the next
  // step's events. Unknown or finished ids are ignored.
  void abort(RequestId id);
  // One iteration: schedule, run the model on every scheduled row, sample, and report.
  std::vector<EngineEvent> step();
  bool has_unfinished() const { return scheduler_->has_unfinished() || !pending_.empty(); }

  const EngineModel& model() const { return *model_; }
  // The model's tokenizer; a synthetic model has none (events then carry no text).
  bool has_tokenizer() const { return has_tokenizer_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  int64_t max_context() const { return max_context_; }
  int64_t num_running() const { return scheduler_->num_running(); }
  int64_t num_waiting() const { return scheduler_->num_waiting(); }
  int64_t kv_blocks_total() const { return kv_manager_->pool().num_blocks(); }
  int64_t kv_blocks_used() const { return kv_manager_->pool().num_used(); }
  int64_t last_batch_rows() const { return last_rows_; }    // tokens of the last step
  int64_t last_batch_seqs() const { return last_seqs_; }    // requests of the last step
  int64_t num_preemptions() const { return preemptions_; }  // since construction

 private:
  struct Request {
    std::vector<int32_t> ids;  // prompt then generated tokens
    int64_t num_prompt = 0;
    SamplingParams params;
    std::string text;     // decoded generated tokens (stop tokens excluded)
    size_t released = 0;  // bytes of text already returned
  };
  // Text of `r` that can be returned now (complete UTF-8, no possible start of a stop string).
  std::string release_text(Request& r, bool final, size_t keep);

  std::shared_ptr<EngineModel> model_;
  EngineOptions options_;
  Tokenizer tokenizer_;
  bool has_tokenizer_ = false;
  int64_t max_context_ = 0;
  KvCacheArena kv_;
  std::unique_ptr<KvCacheManager> kv_manager_;
  std::unique_ptr<Scheduler> scheduler_;
  Sampler sampler_;
  std::unordered_map<RequestId, Request> requests_;
  std::vector<EngineEvent> pending_;  // events produced outside step() (cancellations)
  RequestId next_id_ = 0;
  int64_t last_rows_ = 0, last_seqs_ = 0, preemptions_ = 0;
};

}  // namespace tessera
