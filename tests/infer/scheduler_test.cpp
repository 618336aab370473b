// The continuous batching scheduler against a fake engine that "generates" one token per sampling
// chunk: config and request validation, step order (decodes before prefills), chunked prefill
// beside running decodes, FIFO admission, recompute preemption, cancellation, rejection of requests
// that can never fit, and randomized runs to completion checking the invariants after every step.
#include "infer/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_error;
using testing::expect_user_error;

SchedulerConfig make_config(int64_t max_num_seqs, int64_t max_num_batched_tokens,
                            bool chunked = true) {
  SchedulerConfig c;
  c.max_num_seqs = max_num_seqs;
  c.max_num_batched_tokens = max_num_batched_tokens;
  c.enable_chunked_prefill = chunked;
  return c;
}

// The plan-level invariants, checked from outside the scheduler: budget, max_num_seqs, decodes
// before prefills, one chunk per request, and a reserved KV slot for every scheduled position.
void check_plan(const StepPlan& plan, const SchedulerConfig& config, const KvCacheManager& kv) {
  EXPECT_LE(plan.num_batched_tokens, config.max_num_batched_tokens);
  EXPECT_LE(static_cast<int64_t>(plan.chunks.size()), config.max_num_seqs);
  int64_t sum = 0;
  bool seen_prefill = false;
  std::set<RequestId> ids;
  for (const ScheduledChunk& c : plan.chunks) {
    EXPECT_GE(c.num_tokens, 1);
    sum += c.num_tokens;
    if (c.is_prefill) seen_prefill = true;
    EXPECT_FALSE(!c.is_prefill && seen_prefill) << "decode of " << c.id << " after a prefill";
    if (!c.is_prefill) {
      EXPECT_EQ(c.num_tokens, 1);
    }
    EXPECT_TRUE(ids.insert(c.id).second) << "request " << c.id << " scheduled twice";
    ASSERT_TRUE(kv.contains(c.id));
    EXPECT_EQ(kv.num_tokens(c.id), c.start_pos + c.num_tokens);
    for (int64_t p = c.start_pos; p < c.start_pos + c.num_tokens; ++p)
      EXPECT_GE(kv.slot(c.id, p).block, 0);
  }
  EXPECT_EQ(sum, plan.num_batched_tokens);
}

// The fake engine: one token per sampling chunk, `stop` for the ids in `stops`.
std::vector<StepOutput> outputs_for(const StepPlan& plan, const std::set<RequestId>& stops = {}) {
  std::vector<StepOutput> out;
  for (const ScheduledChunk& c : plan.chunks)
    if (c.samples) out.push_back({c.id, stops.count(c.id) != 0});
  return out;
}

const ScheduledChunk* find_chunk(const StepPlan& plan, RequestId id) {
  for (const ScheduledChunk& c : plan.chunks)
    if (c.id == id) return &c;
  return nullptr;
}

// schedule + check + on_step_done with the fake engine; returns the plan.
StepPlan step(Scheduler& s, KvCacheManager& kv, const std::set<RequestId>& stops = {}) {
  StepPlan plan = s.schedule();
  check_plan(plan, s.config(), kv);
  s.check_invariants();
  s.on_step_done(outputs_for(plan, stops));
  s.check_invariants();
  return plan;
}

TEST(SchedulerConfig, ValidationNamesFieldAndValue) {
  make_config(4, 64).validate();
  SchedulerConfig c = make_config(0, 64);
  expect_user_error([&] { c.validate(); }, {"max_num_seqs", "0"});
  c = make_config(4, -3);
  expect_user_error([&] { c.validate(); }, {"max_num_batched_tokens", "-3"});
  c = make_config(8, 4);
  expect_user_error([&] { c.validate(); }, {"max_num_batched_tokens (4)", "max_num_seqs (8)"});
  c = make_config(4, 64);
  c.long_prefill_token_threshold = -1;
  expect_user_error([&] { c.validate(); }, {"long_prefill_token_threshold", "-1"});
  KvCacheManager kv(8, 4);
  expect_user_error([&] { Scheduler s(make_config(0, 64), kv); }, {"max_num_seqs"});
}

TEST(Scheduler, RequestValidation) {
  KvCacheManager kv(8, 4);
  Scheduler s(make_config(4, 64), kv);
  expect_user_error([&] { s.add_request(1, 0, 4); }, {"num_prompt = 0"});
  expect_user_error([&] { s.add_request(2, 3, 0); }, {"max_tokens", "0"});
  SamplingParams p;
  p.max_tokens = 0;
  expect_user_error([&] { s.add_request(3, 3, p); }, {"max_tokens"});
  p.max_tokens = 5;
  s.add_request(4, 3, p);
  EXPECT_EQ(s.info(4).max_tokens, 5);
  expect_error([&] { s.add_request(4, 3, 2); }, ErrorKind::bug, {"already added"});
}

TEST(Scheduler, SingleRequestPrefillThenDecodes) {
  KvCacheManager kv(8, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(7, 5, 3);
  StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].start_pos, 0);
  EXPECT_EQ(p.chunks[0].num_tokens, 5);
  EXPECT_TRUE(p.chunks[0].is_prefill);
  EXPECT_TRUE(p.chunks[0].samples);
  EXPECT_EQ(s.info(7).num_generated, 1);
  for (int64_t pos : {5, 6}) {
    p = step(s, kv);
    ASSERT_EQ(p.chunks.size(), 1u);
    EXPECT_EQ(p.chunks[0].start_pos, pos);
    EXPECT_EQ(p.chunks[0].num_tokens, 1);
    EXPECT_FALSE(p.chunks[0].is_prefill);
  }
  EXPECT_EQ(s.info(7).state, RequestState::finished);
  EXPECT_EQ(s.info(7).finish_reason, FinishReason::length);
  EXPECT_EQ(s.info(7).num_generated, 3);
  EXPECT_EQ(kv.pool().num_free(), 8);
  const auto fin = s.take_finished();
  ASSERT_EQ(fin.size(), 1u);
  EXPECT_EQ(fin[0].id, 7);
  EXPECT_EQ(fin[0].num_generated, 3);
  EXPECT_TRUE(s.schedule().empty());
  s.on_step_done({});
}

TEST(Scheduler, StopFinishesEarly) {
  KvCacheManager kv(8, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 4, 10);
  step(s, kv);
  step(s, kv, {1});
  EXPECT_EQ(s.info(1).finish_reason, FinishReason::stop);
  EXPECT_EQ(s.info(1).num_generated, 2);
  EXPECT_EQ(kv.pool().num_free(), 8);
}

TEST(Scheduler, DecodesBeforePrefills) {
  KvCacheManager kv(64, 4);
  Scheduler s(make_config(8, 64), kv);
  s.add_request(1, 6, 10);
  s.add_request(2, 6, 10);
  step(s, kv);  // both prefill whole
  s.add_request(3, 20, 4);
  const StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 3u);
  EXPECT_EQ(p.chunks[0].id, 1);
  EXPECT_FALSE(p.chunks[0].is_prefill);
  EXPECT_EQ(p.chunks[1].id, 2);
  EXPECT_FALSE(p.chunks[1].is_prefill);
  EXPECT_EQ(p.chunks[2].id, 3);
  EXPECT_TRUE(p.chunks[2].is_prefill);
  EXPECT_EQ(p.num_batched_tokens, 22);
}

TEST(Scheduler, ChunkedPrefillSplitsLongPromptWhileDecodesContinue) {
  KvCacheManager kv(64, 4);
  Scheduler s(make_config(4, 16), kv);
  s.add_request(1, 4, 20);
  step(s, kv);
  s.add_request(2, 100, 2);
  // Each step: request 1 decodes (1 token), request 2 takes the other 15 of the budget.
  int64_t expect_pos = 0;
  int64_t num_steps = 0;
  while (s.info(2).num_generated == 0) {
    const int64_t gen1 = s.info(1).num_generated;
    const StepPlan p = step(s, kv);
    ++num_steps;
    EXPECT_EQ(s.info(1).num_generated, gen1 + 1) << "the decode stalled at step " << num_steps;
    const ScheduledChunk* c = find_chunk(p, 2);
    ASSERT_NE(c, nullptr);
    EXPECT_EQ(c->start_pos, expect_pos);
    EXPECT_EQ(c->num_tokens, std::min<int64_t>(15, 100 - expect_pos));
    EXPECT_EQ(c->samples, expect_pos + c->num_tokens == 100);
    EXPECT_EQ(p.num_batched_tokens, 1 + c->num_tokens);
    expect_pos += c->num_tokens;
    ASSERT_LT(num_steps, 20);
  }
  EXPECT_EQ(num_steps, 7);  // ceil(100 / 15)
  EXPECT_EQ(s.info(2).num_computed, 100);
}

TEST(Scheduler, LongPrefillThresholdSharesAStep) {
  KvCacheManager kv(64, 4);
  SchedulerConfig c = make_config(4, 32);
  c.long_prefill_token_threshold = 10;
  Scheduler s(c, kv);
  for (RequestId id = 1; id <= 4; ++id) s.add_request(id, 25, 2);
  // Capped at 10 tokens each, three prompts share the first step; the fourth gets the last 2.
  const StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 4u);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(p.chunks[i].id, i + 1);
    EXPECT_EQ(p.chunks[i].num_tokens, 10);
  }
  EXPECT_EQ(p.chunks[3].num_tokens, 2);
  EXPECT_EQ(p.num_batched_tokens, 32);
}

TEST(Scheduler, ChunkedPrefillOffRunsWholePrefills) {
  KvCacheManager kv(64, 4);
  Scheduler s(make_config(4, 32, /*chunked=*/false), kv);
  s.add_request(1, 20, 3);
  s.add_request(2, 20, 3);  // does not fit beside request 1 in 32 tokens: waits a step
  StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].num_tokens, 20);
  p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].id, 1);
  EXPECT_EQ(p.chunks[1].id, 2);
  EXPECT_EQ(p.chunks[1].num_tokens, 20);
  // A prompt whose prefill (with recompute) could exceed the budget can never run.
  s.add_request(3, 30, 4);
  EXPECT_EQ(s.info(3).state, RequestState::finished);
  EXPECT_EQ(s.info(3).finish_reason, FinishReason::error);
  EXPECT_NE(s.info(3).error.find("max_num_batched_tokens is 32"), std::string::npos)
      << s.info(3).error;
}

TEST(Scheduler, BudgetAndMaxNumSeqsRespectedEveryStep) {
  KvCacheManager kv(256, 4);
  Scheduler s(make_config(3, 12), kv);
  for (RequestId id = 0; id < 10; ++id) s.add_request(id, 7 + id, 5);
  int64_t num_steps = 0;
  bool budget_full = false;
  while (s.has_unfinished()) {
    const StepPlan p = step(s, kv);
    EXPECT_LE(s.num_running(), 3);
    budget_full = budget_full || p.num_batched_tokens == 12;
    ASSERT_LT(++num_steps, 200);
  }
  EXPECT_TRUE(budget_full);  // the budget binds, so the bound is tested
  for (RequestId id = 0; id < 10; ++id) EXPECT_EQ(s.info(id).num_generated, 5);
}

TEST(Scheduler, FifoAdmission) {
  KvCacheManager kv(256, 4);
  Scheduler s(make_config(2, 64), kv);
  for (RequestId id = 10; id < 14; ++id) s.add_request(id, 3, 2);
  StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].id, 10);
  EXPECT_EQ(p.chunks[1].id, 11);
  p = step(s, kv);  // 10 and 11 finish
  EXPECT_EQ(s.num_running(), 0);
  p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].id, 12);
  EXPECT_EQ(p.chunks[1].id, 13);
}

TEST(Scheduler, HeadIsNotOvertakenAndIsAdmittedWhenBlocksFree) {
  // 8 blocks of 4 = 32 tokens. Request 1 holds 16 tokens' worth; request 2 needs 24 and must wait;
  // request 3 (small) behind it must not overtake it.
  KvCacheManager kv(8, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 8, 8);
  step(s, kv);
  s.add_request(2, 20, 4);
  s.add_request(3, 2, 2);
  while (s.info(1).state != RequestState::finished) {
    step(s, kv);
    EXPECT_EQ(s.info(2).state, RequestState::waiting);
    EXPECT_EQ(s.info(3).state, RequestState::waiting);
  }
  const StepPlan p = step(s, kv);  // all blocks free now: the head goes first
  ASSERT_GE(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].id, 2);
}

TEST(Scheduler, PreemptsNewestAndRecomputes) {
  // 6 blocks of 4. Each request needs 4 blocks in all (4 + 12 tokens), so each is admitted while 4
  // blocks are free, but three of them outgrow the cache by their 9th token.
  KvCacheManager kv(6, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 4, 12);
  s.add_request(2, 4, 12);
  s.add_request(3, 4, 12);
  // can_admit looks at free blocks only as requests are admitted one by one in a step.
  StepPlan p = step(s, kv);
  ASSERT_EQ(p.chunks.size(), 3u);
  s.add_request(4, 4, 12);  // 3 blocks free: waits, behind which request 3 must be put back
  bool preempted = false;
  int64_t gen_at_preemption = 0;
  for (int i = 0; i < 20 && !preempted; ++i) {
    p = s.schedule();
    check_plan(p, s.config(), kv);
    if (!p.preempted.empty()) {
      preempted = true;
      EXPECT_EQ(p.preempted, std::vector<RequestId>{3});
      EXPECT_EQ(find_chunk(p, 3), nullptr);
      EXPECT_EQ(s.info(3).state, RequestState::waiting);
      EXPECT_EQ(s.info(3).num_computed, 0);
      EXPECT_EQ(s.info(3).num_preemptions, 1);
      EXPECT_FALSE(kv.contains(3));
      EXPECT_EQ(s.waiting(), (std::deque<RequestId>{3, 4}));
      gen_at_preemption = s.info(3).num_generated;
      EXPECT_GT(gen_at_preemption, 0);  // kept
    }
    s.check_invariants();
    s.on_step_done(outputs_for(p));
  }
  ASSERT_TRUE(preempted);
  // Runs on; request 3's first chunk after readmission recomputes prompt + generated.
  bool recomputed = false;
  int64_t num_steps = 0;
  while (s.has_unfinished()) {
    p = step(s, kv);
    const ScheduledChunk* c = find_chunk(p, 3);
    if (c != nullptr && !recomputed) {
      recomputed = true;
      EXPECT_EQ(c->start_pos, 0);
      EXPECT_TRUE(c->is_prefill);
      EXPECT_EQ(c->num_tokens, 4 + gen_at_preemption);
      EXPECT_TRUE(c->samples);
    }
    ASSERT_LT(++num_steps, 100);
  }
  EXPECT_TRUE(recomputed);
  EXPECT_EQ(s.info(4).num_preemptions, 0);
  for (RequestId id : {1, 2, 3, 4}) {
    EXPECT_EQ(s.info(id).finish_reason, FinishReason::length);
    EXPECT_EQ(s.info(id).num_generated, 12);
  }
  EXPECT_EQ(kv.pool().num_free(), 6);
}

TEST(Scheduler, CancelMidPrefillFreesBlocksAtOnce) {
  KvCacheManager kv(64, 4);
  Scheduler s(make_config(4, 16), kv);
  s.add_request(1, 100, 4);
  step(s, kv);
  step(s, kv);
  EXPECT_EQ(s.info(1).num_computed, 32);
  EXPECT_EQ(kv.pool().num_free(), 64 - 8);
  s.abort(1);
  EXPECT_EQ(kv.pool().num_free(), 64);
  EXPECT_FALSE(kv.contains(1));
  EXPECT_EQ(s.info(1).finish_reason, FinishReason::cancelled);
  const auto fin = s.take_finished();
  ASSERT_EQ(fin.size(), 1u);
  EXPECT_EQ(fin[0].reason, FinishReason::cancelled);
  s.check_invariants();
  s.abort(1);  // a no-op once finished
  EXPECT_TRUE(s.take_finished().empty());
  EXPECT_TRUE(s.schedule().empty());
}

TEST(Scheduler, CancelMidDecodeAndWaitingAndInFlight) {
  KvCacheManager kv(64, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 10, 20);
  s.add_request(2, 10, 20);
  step(s, kv);
  step(s, kv);
  const int64_t before = kv.pool().num_free();
  const int64_t held = static_cast<int64_t>(kv.block_table(1).size());
  s.abort(1);  // mid-decode
  EXPECT_EQ(kv.pool().num_free(), before + held);
  s.add_request(3, 5, 5);
  s.abort(3);  // waiting
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_EQ(s.info(3).finish_reason, FinishReason::cancelled);
  // Aborted while its step is in flight: its output is dropped, the others advance.
  const StepPlan p = s.schedule();
  ASSERT_EQ(p.chunks.size(), 1u);
  s.abort(2);
  EXPECT_EQ(kv.pool().num_free(), 64);
  s.on_step_done(outputs_for(p));
  s.check_invariants();
  EXPECT_EQ(s.info(2).num_generated, 2);
  EXPECT_FALSE(s.has_unfinished());
}

TEST(Scheduler, RequestLargerThanCacheFinishesWithErrorOthersProceed) {
  KvCacheManager kv(4, 4);  // 16 tokens
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 3, 3);
  s.add_request(2, 10, 10);  // 20 tokens: 5 blocks > 4
  s.add_request(3, 3, 3);
  EXPECT_EQ(s.info(2).state, RequestState::finished);
  EXPECT_EQ(s.info(2).finish_reason, FinishReason::error);
  EXPECT_NE(s.info(2).error.find("needs 5 KV cache blocks"), std::string::npos) << s.info(2).error;
  EXPECT_NE(s.info(2).error.find("holds 4 blocks"), std::string::npos) << s.info(2).error;
  const auto fin = s.take_finished();
  ASSERT_EQ(fin.size(), 1u);
  EXPECT_EQ(fin[0].id, 2);
  EXPECT_EQ(fin[0].reason, FinishReason::error);
  int64_t num_steps = 0;
  while (s.has_unfinished()) {
    step(s, kv);
    ASSERT_LT(++num_steps, 50);
  }
  EXPECT_EQ(s.info(1).num_generated, 3);
  EXPECT_EQ(s.info(3).num_generated, 3);
}

TEST(Scheduler, MisuseIsABug) {
  KvCacheManager kv(8, 4);
  Scheduler s(make_config(4, 64), kv);
  s.add_request(1, 4, 4);
  expect_error([&] { s.on_step_done({}); }, ErrorKind::bug, {"without a scheduled step"});
  const StepPlan p = s.schedule();
  expect_error([&] { s.schedule(); }, ErrorKind::bug, {"before on_step_done"});
  expect_error([&] { s.on_step_done({}); }, ErrorKind::bug, {"got no output"});
  (void)p;
  expect_error([&] { s.info(99); }, ErrorKind::bug, {"unknown"});
}

struct SimOptions {
  uint64_t seed = 1;
  int64_t num_requests = 200;
  int64_t num_blocks = 64;
  int64_t block_size = 4;
  int64_t max_num_seqs = 8;
  int64_t max_num_batched_tokens = 48;
  bool chunked = true;
  int64_t long_prefill_token_threshold = 0;
  double abort_prob = 0.0;  // per step, of one random live request
};

struct SimResult {
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;
};

// Random requests arrive over time; the fake engine tracks each request's computed length on its
// own and checks every chunk continues where the last one ended (or from 0 after a preemption).
SimResult simulate(const SimOptions& o) {
  SCOPED_TRACE(::testing::Message() << "seed " << o.seed);
  std::mt19937_64 rng(o.seed);
  KvCacheManager kv(o.num_blocks, o.block_size);
  SchedulerConfig c = make_config(o.max_num_seqs, o.max_num_batched_tokens, o.chunked);
  c.long_prefill_token_threshold = o.long_prefill_token_threshold;
  Scheduler s(c, kv);
  std::map<RequestId, int64_t> max_tokens;
  std::map<RequestId, int64_t> engine_computed;
  std::set<RequestId> aborted;
  const int64_t max_total = o.num_blocks * o.block_size / 2;
  RequestId next_id = 0;
  SimResult res;
  while (next_id < o.num_requests || s.has_unfinished()) {
    const int64_t arrivals = next_id < o.num_requests ? static_cast<int64_t>(rng() % 3) : 0;
    for (int64_t i = 0; i < arrivals && next_id < o.num_requests; ++i, ++next_id) {
      const int64_t prompt = 1 + static_cast<int64_t>(rng() % 40);
      const int64_t out = 1 + static_cast<int64_t>(rng() % 30);
      const int64_t total = std::min(prompt + out, max_total);
      const int64_t p = std::min(prompt, total - 1);
      max_tokens[next_id] = total - p;
      s.add_request(next_id, p, total - p);
    }
    if (o.abort_prob > 0 && next_id > 0 &&
        std::uniform_real_distribution<>(0, 1)(rng) < o.abort_prob) {
      const RequestId victim = static_cast<RequestId>(rng() % static_cast<uint64_t>(next_id));
      if (s.info(victim).state != RequestState::finished) {
        s.abort(victim);
        aborted.insert(victim);
        EXPECT_FALSE(kv.contains(victim));
      }
    }
    const StepPlan plan = s.schedule();
    check_plan(plan, c, kv);
    s.check_invariants();
    for (RequestId id : plan.preempted) engine_computed[id] = 0;
    res.num_preemptions += static_cast<int64_t>(plan.preempted.size());
    // Progress: with requests left, a step always runs something.
    if (s.has_unfinished()) {
      EXPECT_FALSE(plan.empty()) << "idle step with work left";
    }
    for (const ScheduledChunk& ch : plan.chunks) {
      EXPECT_EQ(ch.start_pos, engine_computed[ch.id]) << "request " << ch.id;
      engine_computed[ch.id] = ch.start_pos + ch.num_tokens;
    }
    s.on_step_done(outputs_for(plan));
    s.check_invariants();
    for (const FinishedRequest& f : s.take_finished()) {
      if (aborted.count(f.id)) {
        EXPECT_EQ(f.reason, FinishReason::cancelled);
      } else {
        EXPECT_EQ(f.reason, FinishReason::length) << "request " << f.id;
        EXPECT_EQ(f.num_generated, max_tokens[f.id]) << "request " << f.id;
      }
    }
    if (++res.num_steps > 20000) {
      ADD_FAILURE() << "no completion after 20000 steps";
      break;
    }
  }
  for (const auto& [id, m] : max_tokens) {
    EXPECT_EQ(s.info(id).state, RequestState::finished);
    if (!aborted.count(id)) {
      EXPECT_EQ(s.info(id).num_generated, m) << "request " << id;
    }
  }
  EXPECT_EQ(kv.pool().num_free(), o.num_blocks);
  return res;
}

TEST(SchedulerSim, RandomRunsCompleteWithExactlyMaxTokens) {
  int64_t preemptions = 0;
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    SimOptions o;
    o.seed = seed;
    preemptions += simulate(o).num_preemptions;
  }
  EXPECT_GT(preemptions, 0);  // the cache is small enough that preemption is exercised
}

TEST(SchedulerSim, RandomRunsVariants) {
  SimOptions o;
  o.seed = 11;
  o.chunked = false;
  o.max_num_batched_tokens = 160;  // >= the longest recompute prefill (max_total - 1 = 127)
  simulate(o);
  o.seed = 12;
  o.chunked = true;
  o.max_num_batched_tokens = 16;
  o.long_prefill_token_threshold = 5;
  simulate(o);
  o.seed = 13;
  o.max_num_seqs = 1;
  o.max_num_batched_tokens = 8;
  o.long_prefill_token_threshold = 0;
  simulate(o);
  o.seed = 14;
  o.max_num_seqs = 16;
  o.max_num_batched_tokens = 64;
  o.num_blocks = 40;
  o.abort_prob = 0.3;
  simulate(o);
}

}  // namespace
}  // namespace tessera
