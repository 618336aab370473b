// Tests of the engine (src/infer/engine.cpp) on the CPU with synthetic checkpoints: a request's
// tokens are the same alone and inside a batch of 32 mixed requests (greedy and seeded sampling,
// chunked prefill, preemption by a small cache), paging over many small blocks that are freed and
// reused, the streamed text equals the decoded tokens and stops before a stop string,
// cancellation frees the request's blocks, and bad requests are user errors.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "infer/engine.h"
#include "tests/common/errors.h"
#include "tests/infer/engine_test_util.h"

namespace tessera {
namespace {

using testing::ScratchDir;

const char* kQwen3 = testing::kEngineQwen3;
const char* kGpt2 = testing::kEngineGpt2;
const char* kMoe = testing::kEngineMoe;
using testing::alone;
using testing::greedy;
using testing::Output;
using testing::random_tokens;
using testing::run_all;
using testing::sampled;
using testing::small_options;
using testing::synthetic_model;

class EngineBatch : public ::testing::TestWithParam<const char*> {};

// The same tokens alone and among 31 other requests of mixed lengths and sampling settings, with
// prefill chunked by a 48-token budget and a cache small enough that requests get preempted and
// recomputed.
TEST_P(EngineBatch, ARequestGivesTheSameTokensAloneAndInABatchOf32) {
  ScratchDir dir;
  const bool moe = std::string(GetParam()) == "qwen3_moe";
  const std::shared_ptr<EngineModel> m = synthetic_model(dir, kQwen3, moe ? kMoe : "");
  std::mt19937 gen(17);
  const std::vector<int32_t> prompt_a = random_tokens(37, gen), prompt_b = random_tokens(5, gen);
  const SamplingParams pa = greedy(24), pb = sampled(24, 1234);
  const std::vector<int32_t> want_a = alone(m, prompt_a, pa), want_b = alone(m, prompt_b, pb);
  ASSERT_EQ(want_a.size(), 24u);

  Engine e(m, small_options(4, 40, 48));
  std::map<RequestId, int64_t> max_tokens;
  RequestId id_a = -1, id_b = -1;
  for (int i = 0; i < 32; ++i) {
    if (i == 9) id_a = e.add_request(prompt_a, pa);
    if (i == 21) id_b = e.add_request(prompt_b, pb);
    if (i == 9 || i == 21) continue;
    const int len = 1 + int(gen() % 40), n = 1 + int(gen() % 30);
    const SamplingParams p = i % 3 == 0 ? greedy(n) : sampled(n, uint64_t(i));
    max_tokens[e.add_request(random_tokens(len, gen), p)] = n;
  }
  const std::map<RequestId, Output> out = run_all(e);
  EXPECT_EQ(out.at(id_a).tokens, want_a);
  EXPECT_EQ(out.at(id_b).tokens, want_b);
  EXPECT_GT(e.num_preemptions(), 0) << "the cache was meant to be too small for the batch";
  for (const auto& [id, n] : max_tokens) {
    const Output& o = out.at(id);
    EXPECT_TRUE(o.reason == FinishReason::length || o.reason == FinishReason::stop) << id;
    if (o.reason == FinishReason::length) {
      EXPECT_EQ(int64_t(o.tokens.size()), n) << id;
    }
  }
  EXPECT_EQ(e.kv_blocks_used(), 0);
}

INSTANTIATE_TEST_SUITE_P(Models, EngineBatch, ::testing::Values("qwen3", "qwen3_moe"),
                         [](const auto& info) { return std::string(info.param); });

// Blocks of one token: every sequence spans dozens of blocks; a second wave of the same requests
// runs on blocks the first freed (in another order) and gives the same tokens.
TEST(EnginePaging, ManySmallBlocksFreedAndReusedGiveTheSameTokens) {
  ScratchDir dir;
  const std::shared_ptr<EngineModel> m = synthetic_model(dir, kGpt2);
  Engine e(m, small_options(1, 400, 256));
  std::mt19937 gen(5);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 6; ++i) prompts.push_back(random_tokens(20 + 9 * i, gen));
  std::vector<std::vector<int32_t>> first;
  for (int wave = 0; wave < 2; ++wave) {
    std::vector<RequestId> ids;
    for (size_t i = 0; i < prompts.size(); ++i)
      ids.push_back(e.add_request(prompts[wave == 0 ? i : prompts.size() - 1 - i], greedy(16)));
    const std::map<RequestId, Output> out = run_all(e);
    EXPECT_EQ(e.kv_blocks_used(), 0);
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::vector<int32_t>& t = out.at(ids[i]).tokens;
      if (wave == 0) {
        first.push_back(t);
      } else {
        EXPECT_EQ(t, first[prompts.size() - 1 - i]) << "prompt " << i;
      }
    }
  }
  EXPECT_EQ(first[2], alone(m, prompts[2], greedy(16)));
}

// The streamed text is the tokens' decoded text; with a stop string taken from it, the text ends
// just before the string's first occurrence.
TEST(EngineText, StreamedTextIsTheDecodedTokensAndStopsBeforeAStopString) {
  ScratchDir dir;
  const std::shared_ptr<EngineModel> m = synthetic_model(dir, kGpt2);
  std::mt19937 gen(9);
  const std::vector<int32_t> prompt = random_tokens(12, gen);
  Engine e(m, small_options(16, 64, 256));
  const RequestId id = e.add_request(prompt, greedy(30));
  const Output full = run_all(e)[id];
  ASSERT_EQ(full.reason, FinishReason::length);
  ASSERT_EQ(full.text, e.tokenizer().decode(full.tokens));
  ASSERT_GT(full.text.size(), 12u);
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  SamplingParams p = greedy(30);
  p.stop_strings = {stop};
  const RequestId id2 = e.add_request(prompt, p);
  const Output cut = run_all(e)[id2];
  EXPECT_EQ(cut.reason, FinishReason::stop);
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
}

TEST(EngineAbort, ACancelledRequestFinishesAndFreesItsBlocks) {
  ScratchDir dir;
  const std::shared_ptr<EngineModel> m = synthetic_model(dir, kGpt2);
  Engine e(m, small_options(4, 64, 256));
  std::mt19937 gen(1);
  const RequestId a = e.add_request(random_tokens(10, gen), greedy(40));
  const RequestId b = e.add_request(random_tokens(10, gen), greedy(8));
  int64_t early = 0;  // b's tokens of the first two steps (one prefill, one decode)
  for (int i = 0; i < 2; ++i)
    for (const EngineEvent& ev : e.step()) early += ev.id == b && ev.token >= 0 ? 1 : 0;
  EXPECT_EQ(early, 2);
  EXPECT_GT(e.kv_blocks_used(), 0);
  e.abort(a);
  const std::map<RequestId, Output> out = run_all(e);
  EXPECT_EQ(out.at(a).reason, FinishReason::cancelled);
  EXPECT_EQ(out.at(b).reason, FinishReason::length);
  EXPECT_EQ(int64_t(out.at(b).tokens.size()) + early, 8);
  EXPECT_EQ(e.kv_blocks_used(), 0);
  e.abort(a);  // finished: ignored
  EXPECT_FALSE(e.has_unfinished());
}

TEST(EngineErrors, BadRequestsAreUserErrorsNamingTheValue) {
  ScratchDir dir;
  const std::shared_ptr<EngineModel> m = synthetic_model(dir, kGpt2);
  Engine e(m, small_options(16, 64, 256));
  testing::expect_user_error([&] { e.add_request(std::vector<int32_t>(90, 1), greedy(10)); },
                             {"90 tokens", "max_tokens 10", "96"});
  testing::expect_user_error([&] { e.add_request({1, 4096}, greedy(1)); }, {"4096"});
  testing::expect_user_error([&] { e.add_request({}, greedy(1)); }, {"empty"});
  SamplingParams p = greedy(1);
  p.temperature = -1.0f;
  testing::expect_user_error([&] { e.add_request({1}, p); }, {"temperature", "-1"});
  EXPECT_FALSE(e.has_unfinished());
}

}  // namespace
}  // namespace tessera
