// Tests of the OpenAI request parser and response writers (src/serve/openai_api.cpp): a full
// request maps onto the engine's sampling parameters, defaults fill what is left out, and every
// request of a corpus of malformed ones is refused with its status and a message naming the field.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "serve/openai_api.h"
#include "tests/common/files.h"

namespace tessera::serve {
namespace {

const Tokenizer& ci_tokenizer() {
  static const Tokenizer t =
      Tokenizer::load_hf_json(testing::source_path("data/gutenberg/tokenizer.json"));
  return t;
}

ServedModel served() {
  ServedModel m;
  m.name = "tiny";
  m.tokenizer = &ci_tokenizer();
  m.vocab_size = 4096;
  m.max_context = 128;
  m.defaults.max_tokens = 16;
  m.defaults.temperature = 0.7f;
  return m;
}

TEST(OpenAiApi, AFullRequestMapsOntoTheSamplingParameters) {
  const CompletionRequest r = parse_completion_request(
      R"({"model": "tiny", "prompt": "It was a dark night", "max_tokens": 7,
          "temperature": 0.5, "top_p": 0.9, "top_k": 20, "min_p": 0.1,
          "repetition_penalty": 1.2, "seed": 99, "stop": ["\n\n", "The"],
          "stop_token_ids": [4095], "stream": true,
          "stream_options": {"include_usage": true}, "user": "ignored", "n": 1})",
      served());
  EXPECT_EQ(r.prompt_ids, ci_tokenizer().encode("It was a dark night"));
  EXPECT_EQ(r.params.max_tokens, 7);
  EXPECT_FLOAT_EQ(r.params.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.params.top_p, 0.9f);
  EXPECT_EQ(r.params.top_k, 20);
  EXPECT_FLOAT_EQ(r.params.min_p, 0.1f);
  EXPECT_FLOAT_EQ(r.params.repetition_penalty, 1.2f);
  EXPECT_EQ(r.params.seed, 99u);
  EXPECT_EQ(r.params.stop_strings, (std::vector<std::string>{"\n\n", "The"}));
  EXPECT_EQ(r.params.stop_token_ids, std::vector<int32_t>{4095});
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAiApi, DefaultsFillWhatTheRequestLeavesOutAndTokenPromptsPassThrough) {
  const CompletionRequest r =
      parse_completion_request(R"({"model": "tiny", "prompt": [5, 6, 7], "top_k": -1})", served());
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(r.params.max_tokens, 16);
  EXPECT_FLOAT_EQ(r.params.temperature, 0.7f);
  EXPECT_EQ(r.params.top_k, 0);
  EXPECT_FALSE(r.stream);
  const CompletionRequest one =
      parse_completion_request(R"({"model": "tiny", "prompt": ["Hello"], "stop": "x"})", served());
  EXPECT_EQ(one.prompt_ids, ci_tokenizer().encode("Hello"));
  EXPECT_EQ(one.params.stop_strings, std::vector<std::string>{"x"});
}

struct Bad {
  const char* body;
  int status;
  const char* fragment;
};

TEST(OpenAiApi, MalformedRequestsAreRefusedWithTheirStatusNamingTheField) {
  const Bad cases[] = {
      {"", 400, "not valid JSON"},
      {"{\"model\": \"tiny\", ", 400, "not valid JSON"},
      {"[1, 2]", 400, "JSON object"},
      {"null", 400, "JSON object"},
      {R"({"prompt": "x"})", 400, "'model' is required"},
      {R"({"model": 3, "prompt": "x"})", 400, "'model' must be a string"},
      {R"({"model": "other", "prompt": "x"})", 404, "'other' does not exist"},
      {R"({"model": "tiny"})", 400, "'prompt' is required"},
      {R"({"model": "tiny", "prompt": ""})", 400, "'prompt' is empty"},
      {R"({"model": "tiny", "prompt": []})", 400, "'prompt' is empty"},
      {R"({"model": "tiny", "prompt": 12})", 400, "'prompt' must be"},
      {R"({"model": "tiny", "prompt": ["a", "b"]})", 400, "'prompt' must be"},
      {R"({"model": "tiny", "prompt": [1, 4096]})", 400, "token id 4096"},
      {R"({"model": "tiny", "prompt": [1, -1]})", 400, "token id -1"},
      {R"({"model": "tiny", "prompt": [1.5]})", 400, "'prompt' must be"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": 0})", 400, "'max_tokens' must be in"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": "5"})", 400, "'max_tokens' must be an"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": 2.5})", 400, "'max_tokens' must be an"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": 1e30})", 400, "'max_tokens'"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": 18446744073709551615})", 400,
       "'max_tokens' must be in"},
      {R"({"model": "tiny", "prompt": "x", "temperature": -1})", 400, "'temperature' must be"},
      {R"({"model": "tiny", "prompt": "x", "temperature": "hot"})", 400, "'temperature' must"},
      {R"({"model": "tiny", "prompt": "x", "top_p": 0})", 400, "'top_p' must be in (0"},
      {R"({"model": "tiny", "prompt": "x", "top_p": 1.5})", 400, "'top_p'"},
      {R"({"model": "tiny", "prompt": "x", "top_k": -2})", 400, "'top_k'"},
      {R"({"model": "tiny", "prompt": "x", "min_p": 2})", 400, "'min_p'"},
      {R"({"model": "tiny", "prompt": "x", "repetition_penalty": 0})", 400, "'repetition_penalty'"},
      {R"({"model": "tiny", "prompt": "x", "seed": -3})", 400, "'seed' must be in"},
      {R"({"model": "tiny", "prompt": "x", "stop": 5})", 400, "'stop' must be"},
      {R"({"model": "tiny", "prompt": "x", "stop": ["ok", ""]})", 400, "'stop' must hold"},
      {R"({"model": "tiny", "prompt": "x", "stop_token_ids": [99999]})", 400, "'stop_token_ids'"},
      {R"({"model": "tiny", "prompt": "x", "stop_token_ids": 3})", 400, "'stop_token_ids'"},
      {R"({"model": "tiny", "prompt": "x", "stream": "yes"})", 400, "'stream' must be"},
      {R"({"model": "tiny", "prompt": "x", "stream_options": 1})", 400, "'stream_options'"},
      {R"({"model": "tiny", "prompt": "x", "n": 2})", 400, "'n' must be 1"},
      {R"({"model": "tiny", "prompt": "x", "best_of": 3})", 400, "'best_of'"},
      {R"({"model": "tiny", "prompt": "x", "echo": true})", 400, "'echo' is not supported"},
      {R"({"model": "tiny", "prompt": "x", "logprobs": 2})", 400, "'logprobs'"},
      {R"({"model": "tiny", "prompt": "x", "suffix": "y"})", 400, "'suffix'"},
      {R"({"model": "tiny", "prompt": "x", "presence_penalty": 0.5})", 400, "'presence_penalty'"},
      {R"({"model": "tiny", "prompt": "x", "max_tokens": 128})", 400, "context is 128 tokens"},
  };
  for (const Bad& b : cases) {
    SCOPED_TRACE(b.body);
    try {
      parse_completion_request(b.body, served());
      ADD_FAILURE() << "accepted";
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status(), b.status);
      EXPECT_NE(std::string(e.what()).find(b.fragment), std::string::npos) << e.what();
      const nlohmann::json j = nlohmann::json::parse(error_json(e));
      EXPECT_EQ(j["error"]["code"], b.status);
      EXPECT_EQ(j["error"]["message"], e.what());
    }
  }
}

TEST(OpenAiApi, ChatIsRefusedWithAReasonAndAMalformedChatBodyAsMalformed) {
  try {
    refuse_chat_request(R"({"model": "tiny", "messages": []})");
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    EXPECT_NE(std::string(e.what()).find("chat template"), std::string::npos);
  }
  try {
    refuse_chat_request("{{");
  } catch (const ApiError& e) {
    EXPECT_NE(std::string(e.what()).find("not valid JSON"), std::string::npos);
  }
}

TEST(OpenAiApi, ResponsesHaveTheOpenAiShape) {
  const nlohmann::json c = nlohmann::json::parse(
      completion_json("cmpl-1", 1700000000, "tiny", "hi \xff", FinishReason::length, {3, 2}));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c["choices"][0]["text"], "hi \xEF\xBF\xBD");  // invalid UTF-8 replaced, not thrown
  EXPECT_EQ(c["usage"]["total_tokens"], 5);
  const std::string ev = completion_chunk_event("cmpl-1", 1, "tiny", "a", FinishReason::none);
  ASSERT_EQ(ev.rfind("data: ", 0), 0u);
  ASSERT_EQ(ev.substr(ev.size() - 2), "\n\n");
  const nlohmann::json chunk = nlohmann::json::parse(ev.substr(6));
  EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(std::string(kDoneEvent), "data: [DONE]\n\n");
}

}  // namespace
}  // namespace tessera::serve
