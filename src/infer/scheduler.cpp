// The continuous batching scheduler: config validation, request admission and rejection, the
// per-step plan (decodes, then running prefill chunks, then FIFO admissions) with recompute
// preemption, and state advance from the engine's step outputs. See scheduler.h for the design.
#include "infer/scheduler.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace tessera {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* request_state_name(RequestState s) {
  switch (s) {
    case RequestState::waiting: return "waiting";
    case RequestState::running: return "running";
    case RequestState::finished: return "finished";
  }
  return "?";
}

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::none: return "none";
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::error: return "error";
  }
  return "?";
}

void SchedulerConfig::validate() const {
  if (max_num_seqs <= 0)
    TS_USER_ERROR("scheduler: max_num_seqs must be positive, got {}", max_num_seqs);
  if (max_num_batched_tokens <= 0)
    TS_USER_ERROR("scheduler: max_num_batched_tokens must be positive, got {}",
                  max_num_batched_tokens);
  if (long_prefill_token_threshold < 0)
    TS_USER_ERROR("scheduler: long_prefill_token_threshold must be >= 0 (0 = off), got {}",
                  long_prefill_token_threshold);
  // Decodes go first and take one token each; a budget below the running set would leave the
  // newest running requests without a decode step after step.
  if (max_num_batched_tokens < max_num_seqs)
    TS_USER_ERROR(
        "scheduler: max_num_batched_tokens ({}) must be >= max_num_seqs ({}) so that every running "
        "request can decode in one step",
        max_num_batched_tokens, max_num_seqs);
}

Scheduler::Scheduler(const SchedulerConfig& config, KvCacheManager& kv) : config_(config), kv_(kv) {
  config_.validate();
  TS_CHECK(kv_.num_sequences() == 0, "the scheduler needs an empty KV cache, it holds {} sequences",
           kv_.num_sequences());
}

RequestInfo& Scheduler::get(RequestId id) {
  const auto it = requests_.find(id);
  TS_CHECK(it != requests_.end(), "request {} is unknown to the scheduler", id);
  return it->second;
}

const RequestInfo& Scheduler::info(RequestId id) const {
  const auto it = requests_.find(id);
  TS_CHECK(it != requests_.end(), "request {} is unknown to the scheduler", id);
  return it->second;
}

int64_t Scheduler::num_remaining(const RequestInfo& r) const {
  return r.num_prompt + r.num_generated - r.num_computed;
}

void Scheduler::add_request(RequestId id, int64_t num_prompt, int64_t max_tokens) {
  if (num_prompt < 1)
    TS_USER_ERROR("request {}: the prompt must hold at least 1 token, got num_prompt = {}", id,
                  num_prompt);
  if (max_tokens < 1) TS_USER_ERROR("request {}: max_tokens must be >= 1, got {}", id, max_tokens);
  TS_CHECK(!requests_.contains(id), "request id {} was already added", id);
  RequestInfo& r = requests_[id];
  r.num_prompt = num_prompt;
  r.max_tokens = max_tokens;
  r.arrival = next_arrival_++;
  waiting_.push_back(id);

  // Rejected here, explicitly, rather than by catching can_admit's error later: such a request
  // would otherwise block the FIFO head forever.
  const int64_t need = num_prompt + max_tokens;
  const int64_t need_blocks = ceil_div(need, kv_.block_size());
  if (need_blocks > kv_.pool().num_blocks()) {
    finish(id, FinishReason::error,
           fmt::format("request {} of {} tokens (prompt {} + max_tokens {}) needs {} KV cache "
                       "blocks, but the whole cache holds {} blocks = {} tokens",
                       id, need, num_prompt, max_tokens, need_blocks, kv_.pool().num_blocks(),
                       kv_.capacity_tokens()));
    return;
  }
  // Without chunking a prefill runs whole; after preemption it covers prompt + up to
  // max_tokens - 1 generated tokens, so that is the longest prefill this request may need.
  if (!config_.enable_chunked_prefill && need - 1 > config_.max_num_batched_tokens) {
    finish(id, FinishReason::error,
           fmt::format("request {} may need a prefill of {} tokens (prompt {} + max_tokens {} - 1) "
                       "but max_num_batched_tokens is {} and chunked prefill is off",
                       id, need - 1, num_prompt, max_tokens, config_.max_num_batched_tokens));
  }
}

void Scheduler::add_request(RequestId id, int64_t num_prompt, const SamplingParams& params) {
  validate(params);
  add_request(id, num_prompt, params.max_tokens);
}

void Scheduler::remove_running(RequestId id) {
  const auto it = std::find(running_.begin(), running_.end(), id);
  TS_CHECK(it != running_.end(), "request {} is not running", id);
  running_.erase(it);
}

void Scheduler::finish(RequestId id, FinishReason reason, std::string error) {
  RequestInfo& r = get(id);
  if (r.state == RequestState::running) {
    kv_.free(id);
    remove_running(id);
  } else if (r.state == RequestState::waiting) {
    const auto it = std::find(waiting_.begin(), waiting_.end(), id);
    TS_CHECK(it != waiting_.end(), "waiting request {} is not in the waiting queue", id);
    waiting_.erase(it);
  } else {
    TS_BUG("request {} finished twice ({} then {})", id, finish_reason_name(r.finish_reason),
           finish_reason_name(reason));
  }
  r.state = RequestState::finished;
  r.finish_reason = reason;
  r.error = error;
  finished_.push_back({id, reason, r.num_generated, std::move(error)});
}

void Scheduler::abort(RequestId id) {
  if (get(id).state == RequestState::finished) return;
  finish(id, FinishReason::cancelled);
}

RequestId Scheduler::preempt_newest(const std::vector<RequestId>& scheduled, StepPlan& plan) {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    const RequestId id = *it;
    if (std::find(scheduled.begin(), scheduled.end(), id) != scheduled.end()) continue;
    RequestInfo& r = get(id);
    kv_.free(id);
    running_.erase(std::next(it).base());
    r.state = RequestState::waiting;
    r.num_computed = 0;
    ++r.num_preemptions;
    waiting_.push_front(id);  // a later victim (older) lands in front of an earlier one
    plan.preempted.push_back(id);
    return id;
  }
  TS_BUG("preemption found no unscheduled running request ({} running)", running_.size());
}

StepPlan Scheduler::schedule() {
  TS_CHECK(!step_pending_, "schedule() called again before on_step_done()");
  StepPlan plan;
  int64_t budget = config_.max_num_batched_tokens;
  std::vector<RequestId> scheduled;

  auto chunk_cap = [&](int64_t remaining) {
    int64_t n = std::min(remaining, budget);
    if (config_.long_prefill_token_threshold > 0)
      n = std::min(n, config_.long_prefill_token_threshold);
    return n;
  };
  auto reserve = [&](RequestId id, int64_t n, bool is_prefill) {
    RequestInfo& r = get(id);
    kv_.append(id, n);
    plan.chunks.push_back(
        {id, r.num_computed, n, is_prefill, r.num_computed + n == r.num_prompt + r.num_generated});
    plan.num_batched_tokens += n;
    budget -= n;
    scheduled.push_back(id);
  };
  // Frees blocks for a running request's append by preempting the newest others; false when the
  // request itself had to go.
  auto make_room = [&](RequestId id, int64_t n) {
    while (!kv_.can_append(id, n))
      if (preempt_newest(scheduled, plan) == id) return false;
    return true;
  };
  auto is_decode = [&](const RequestInfo& r) {
    return r.num_generated > 0 && num_remaining(r) == 1;
  };

  // 1. Decodes. A copy of the running list: preemption edits it while we walk.
  const std::vector<RequestId> running = running_;
  for (RequestId id : running) {
    const RequestInfo& r = get(id);
    if (r.state != RequestState::running || !is_decode(r)) continue;
    if (budget < 1) break;  // unreachable while max_num_batched_tokens >= max_num_seqs
    if (make_room(id, 1)) reserve(id, 1, false);
  }
  // 2. Prefill chunks of running requests.
  for (RequestId id : running) {
    const RequestInfo& r = get(id);
    if (r.state != RequestState::running || is_decode(r)) continue;
    if (budget < 1) break;
    int64_t n = num_remaining(r);
    if (config_.enable_chunked_prefill) {
      n = chunk_cap(n);
    } else if (n > budget) {
      continue;  // a whole prefill only; it started whole, so this does not occur
    }
    if (make_room(id, n)) reserve(id, n, true);
  }
  // 3. Admissions, FIFO; none after a preemption, which just gave its blocks to running requests.
  while (plan.preempted.empty() && !waiting_.empty() && num_running() < config_.max_num_seqs &&
         budget > 0) {
    const RequestId id = waiting_.front();
    RequestInfo& r = get(id);
    // The whole need, so that an admitted request usually runs to its end without preemption.
    if (!kv_.can_admit(r.num_prompt + r.max_tokens)) break;
    int64_t n = num_remaining(r);
    if (config_.enable_chunked_prefill) {
      n = chunk_cap(n);
    } else if (n > budget) {
      break;  // FIFO: the head waits for a step with room rather than being overtaken
    }
    waiting_.pop_front();
    kv_.add_sequence(id);
    running_.push_back(id);
    r.state = RequestState::running;
    reserve(id, n, true);
  }

  plan.copies = kv_.take_copies();
  TS_CHECK(plan.num_batched_tokens <= config_.max_num_batched_tokens, "plan of {} tokens",
           plan.num_batched_tokens);
  in_flight_ = plan.chunks;
  step_pending_ = true;
  return plan;
}

void Scheduler::on_step_done(const std::vector<StepOutput>& outputs) {
  TS_CHECK(step_pending_, "on_step_done() without a scheduled step");
  step_pending_ = false;
  std::unordered_map<RequestId, bool> stops;  // id -> stop
  for (const StepOutput& o : outputs) {
    TS_CHECK(!stops.contains(o.id), "request {} reported twice in one step", o.id);
    stops[o.id] = o.stop;
  }
  int64_t num_matched = 0;
  for (const ScheduledChunk& c : in_flight_) {
    RequestInfo& r = get(c.id);
    const auto out = stops.find(c.id);
    if (r.state != RequestState::running) {
      // Aborted after schedule(): its blocks are gone and its output, if any, is dropped.
      TS_CHECK(r.state == RequestState::finished, "scheduled request {} is {}", c.id,
               request_state_name(r.state));
      if (out != stops.end()) ++num_matched;
      continue;
    }
    r.num_computed += c.num_tokens;
    if (!c.samples) {
      TS_CHECK(out == stops.end(), "request {} reported a token after a partial prefill chunk",
               c.id);
      continue;
    }
    TS_CHECK(out != stops.end(), "request {} sampled this step but got no output", c.id);
    ++num_matched;
    ++r.num_generated;
    if (out->second) {
      finish(c.id, FinishReason::stop);
    } else if (r.num_generated == r.max_tokens) {
      finish(c.id, FinishReason::length);
    }
  }
  TS_CHECK(num_matched == static_cast<int64_t>(outputs.size()),
           "{} outputs reported, {} match a sampling chunk of the step", outputs.size(),
           num_matched);
  in_flight_.clear();
}

std::vector<FinishedRequest> Scheduler::take_finished() {
  std::vector<FinishedRequest> out;
  out.swap(finished_);
  return out;
}

void Scheduler::check_invariants() const {
  if (num_running() > config_.max_num_seqs)
    TS_BUG("{} running requests, max_num_seqs {}", num_running(), config_.max_num_seqs);
  if (kv_.num_sequences() != num_running())
    TS_BUG("KV cache holds {} sequences, {} requests run", kv_.num_sequences(), num_running());
  int64_t in_flight_tokens = 0;
  for (const ScheduledChunk& c : in_flight_) in_flight_tokens += c.num_tokens;
  if (in_flight_tokens > config_.max_num_batched_tokens ||
      static_cast<int64_t>(in_flight_.size()) > config_.max_num_seqs)
    TS_BUG("step of {} tokens over {} requests exceeds the budget", in_flight_tokens,
           in_flight_.size());
  int64_t num_blocks = 0;
  for (RequestId id : running_) {
    const RequestInfo& r = info(id);
    if (r.state != RequestState::running)
      TS_BUG("request {} in the running list is {}", id, request_state_name(r.state));
    int64_t scheduled = 0;
    for (const ScheduledChunk& c : in_flight_)
      if (c.id == id) scheduled += c.num_tokens;
    // Every scheduled token has its slot: the cache holds exactly computed + in flight.
    if (kv_.num_tokens(id) != r.num_computed + scheduled)
      TS_BUG("request {}: KV cache holds {} tokens, {} computed + {} scheduled", id,
             kv_.num_tokens(id), r.num_computed, scheduled);
    if (r.num_computed + scheduled > r.num_prompt + r.num_generated ||
        r.num_generated >= r.max_tokens)
      TS_BUG("request {}: computed {} + scheduled {}, prompt {}, generated {} of {}", id,
             r.num_computed, scheduled, r.num_prompt, r.num_generated, r.max_tokens);
    num_blocks += static_cast<int64_t>(kv_.block_table(id).size());
  }
  // Only running requests hold blocks (no forks here, so no sharing): nothing leaks.
  if (num_blocks != kv_.pool().num_used())
    TS_BUG("running requests hold {} blocks, the pool has {} in use", num_blocks,
           kv_.pool().num_used());
  for (RequestId id : waiting_) {
    const RequestInfo& r = info(id);
    if (r.state != RequestState::waiting || r.num_computed != 0 || kv_.contains(id))
      TS_BUG("waiting request {} is {} with {} computed tokens", id, request_state_name(r.state),
             r.num_computed);
  }
  int64_t num_finished = 0;
  for (const auto& [id, r] : requests_) num_finished += r.state == RequestState::finished ? 1 : 0;
  if (num_finished + num_waiting() + num_running() != static_cast<int64_t>(requests_.size()))
    TS_BUG("{} finished + {} waiting + {} running != {} requests", num_finished, num_waiting(),
           num_running(), requests_.size());
}

}  // namespace tessera
