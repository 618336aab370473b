// The continuous (iteration-level) batching scheduler of the inference engine: per step it picks
// which requests run and how many tokens each processes (a prefill chunk or one decode token),
// reserves their KV slots, preempts by recompute when the cache runs out, and advances request
// states from what the engine reports. Host bookkeeping only: no model, no tokens, no kernels;
// the engine owns token ids and runs the plan.
#pragma once
#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "infer/kv_cache.h"
#include "infer/sampling.h"

namespace tessera {

// Design (vLLM's v1 scheduler semantics, written afresh).
// Token accounting: a request holds num_prompt + num_generated tokens, of which num_computed have
// their K/V in the cache. Every step a scheduled request processes the next num_tokens of them,
// positions [num_computed, num_computed + num_tokens). When that reaches the last token it holds,
// the step samples a new one (`samples`); a partial prefill chunk samples nothing. So prefill,
// chunked prefill, decode and recompute after preemption are one rule: process what is not in the
// cache yet. A decode is the case num_generated > 0 and exactly one token left.
//
// One step's order (schedule()):
//   1. decodes of running requests, in admission order: they are latency-critical and cost one
//      token each;
//   2. the next prefill chunk of running requests still prefilling, in admission order;
//   3. admissions from the head of the waiting queue, FIFO, while a sequence slot
//      (max_num_seqs), token budget (max_num_batched_tokens) and KV blocks remain. Admission asks
//      KvCacheManager::can_admit for the whole need (prompt + max_tokens), and stops at the first
//      request that does not fit: later, smaller requests never jump the queue, so the head is
//      admitted as soon as enough blocks are free (no starvation). No admission happens in a step
//      that preempted (the blocks just freed are what the running requests need).
// Chunked prefill (on by default) cuts a prompt to the budget left (and to
// long_prefill_token_threshold when set), so a long prompt shares each step with the running
// decodes instead of stalling them; off, a prefill runs whole or waits.
//
// Preemption policy (recompute). When a running request's next chunk cannot get its blocks, the
// most recently admitted running request not yet scheduled this step is preempted, repeatedly,
// until the append fits; if that victim is the request itself, it is preempted and skipped. A
// preempted request's blocks are freed, num_computed drops to 0, and it goes back to the FRONT of
// the waiting queue keeping its generated tokens, so its next prefill covers prompt + generated
// and then sampling continues where it stopped (the engine keeps the token ids). Recompute rather
// than swap: no host copy of the cache, and prefill is compute-bound and cheap per token.
// Newest-first victims protect the oldest requests, which are nearest to completion.
//
// Invariants (check_invariants() tests them; a violation is a bug):
//   - a plan never holds more than max_num_batched_tokens tokens nor more than max_num_seqs
//     requests, and the running set never exceeds max_num_seqs;
//   - every scheduled token has its KV slot reserved when schedule() returns (append is called
//     there): the KV cache holds num_computed + scheduled tokens for each running request;
//   - only running requests hold KV blocks; finishing, cancelling and preempting free them at
//     once, so with no running request the pool is entirely free;
//   - a request that can never run (more blocks than the whole cache, or, with chunked prefill off,
//     a prefill longer than the token budget) is finished with FinishReason::error when added;
//     the scheduler never throws for it.

using RequestId = SeqId;  // a request's KV sequence has the request's id

enum class RequestState { waiting, running, finished };
enum class FinishReason { none, stop, length, cancelled, error };

const char* request_state_name(RequestState s);
const char* finish_reason_name(FinishReason r);

struct SchedulerConfig {
  int64_t max_num_seqs = 256;             // running requests at most
  int64_t max_num_batched_tokens = 2048;  // tokens per step: prefill chunks + decodes
  bool enable_chunked_prefill = true;     // split long prefills over steps
  // With chunked prefill, the most prompt tokens one request takes in a step (vLLM's
  // long_prefill_token_threshold), so several prompts share a step; 0 = no cap beyond the budget.
  int64_t long_prefill_token_threshold = 0;

  // User error naming the field and value: counts not positive, a negative threshold, or a token
  // budget below max_num_seqs (a full set of decodes must fit one step, or some would starve).
  void validate() const;
};

// One request's part of a step: process positions [start_pos, start_pos + num_tokens).
struct ScheduledChunk {
  RequestId id = -1;
  int64_t start_pos = 0;
  int64_t num_tokens = 0;
  bool is_prefill = false;  // false: a one-token decode
  bool samples = false;     // the step's logits for its last position yield a new token
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;  // decodes first, then prefill chunks, then admissions
  int64_t num_batched_tokens = 0;      // sum of chunks' num_tokens
  std::vector<RequestId> preempted;    // preempted this step; the engine keeps their token ids
  std::vector<BlockCopy> copies;       // KV block copies to run before the step's writes
  bool empty() const { return chunks.empty(); }
};

// What the engine reports for a request whose chunk sampled a token.
struct StepOutput {
  RequestId id = -1;
  bool stop = false;  // the new token met a stop condition (stop token or string; check_stop)
};

struct RequestInfo {
  RequestState state = RequestState::waiting;
  FinishReason finish_reason = FinishReason::none;
  int64_t num_prompt = 0;
  int64_t max_tokens = 0;
  int64_t num_generated = 0;
  int64_t num_computed = 0;     // tokens with K/V in the cache
  int64_t num_preemptions = 0;  // times preempted (recomputed)
  int64_t arrival = 0;          // order of add_request
  std::string error;            // why, for FinishReason::error
};

struct FinishedRequest {
  RequestId id = -1;
  FinishReason reason = FinishReason::none;
  int64_t num_generated = 0;
  std::string error;
};

class Scheduler {
 public:
  // `kv` is the engine's cache bookkeeping; the scheduler adds, appends and frees its sequences
  // and must be its only user. Validates `config`.
  Scheduler(const SchedulerConfig& config, KvCacheManager& kv);

  // Queues a request at the back of the waiting queue. User error for num_prompt < 1 or
  // max_tokens < 1 (naming the field and value); a duplicate id is a bug. A request that can never
  // fit is finished at once with FinishReason::error (see take_finished()).
  void add_request(RequestId id, int64_t num_prompt, int64_t max_tokens);
  void add_request(RequestId id, int64_t num_prompt, const SamplingParams& params);

  // Cancels a waiting or running request: its blocks are freed now and it finishes with
  // FinishReason::cancelled. A no-op for a finished request. Call it between steps; if a step is
  // in flight, on_step_done ignores the request (the engine must not reuse the freed blocks before
  // that step's writes complete, which holds when it schedules only after on_step_done).
  void abort(RequestId id);

  // Plans one step and reserves its KV slots. Call on_step_done before the next schedule().
  StepPlan schedule();

  // The engine ran the last plan: every chunk's tokens are now computed; `outputs` holds exactly
  // the requests of the plan whose chunk samples (minus any aborted since). A request finishes on
  // `stop` or when num_generated reaches max_tokens, and its blocks are freed.
  void on_step_done(const std::vector<StepOutput>& outputs);

  // Requests finished (any reason) since the last call, in finishing order.
  std::vector<FinishedRequest> take_finished();

  const RequestInfo& info(RequestId id) const;  // any request ever added
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  const std::deque<RequestId>& waiting() const { return waiting_; }   // admission order
  const std::vector<RequestId>& running() const { return running_; }  // oldest first
  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }
  const SchedulerConfig& config() const { return config_; }

  // TS_BUG on a broken invariant (see the design note above). For tests and debug builds.
  void check_invariants() const;

 private:
  RequestInfo& get(RequestId id);
  int64_t num_remaining(const RequestInfo& r) const;  // tokens not yet in the cache
  // Preempts the newest running request not in `scheduled`; returns its id.
  RequestId preempt_newest(const std::vector<RequestId>& scheduled, StepPlan& plan);
  void finish(RequestId id, FinishReason reason, std::string error = {});
  void remove_running(RequestId id);

  SchedulerConfig config_;
  KvCacheManager& kv_;
  std::unordered_map<RequestId, RequestInfo> requests_;
  std::deque<RequestId> waiting_;   // FIFO; preempted requests return to the front
  std::vector<RequestId> running_;  // admission order, oldest first
  std::vector<FinishedRequest> finished_;
  std::vector<ScheduledChunk> in_flight_;  // the last plan's chunks, until on_step_done
  bool step_pending_ = false;
  int64_t next_arrival_ = 0;
};

}  // namespace tessera
