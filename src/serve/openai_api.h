// The OpenAI-compatible bodies of `tessera serve`: a /v1/completions request parsed and checked
// into an engine request (every problem an ApiError naming the field, never a crash), and the JSON
// of responses, streamed chunks (server-sent events) and errors.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "infer/sampling.h"
#include "infer/scheduler.h"

namespace tessera::serve {

// A request the server refuses: the HTTP status and the OpenAI error object's fields.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = {},
           std::string type = "invalid_request_error")
      : std::runtime_error(message),
        status_(status),
        param_(std::move(param)),
        type_(std::move(type)) {}
  int status() const { return status_; }
  const std::string& param() const { return param_; }
  const std::string& type() const { return type_; }

 private:
  int status_;
  std::string param_, type_;
};

// What the parser needs to know about the served model.
struct ServedModel {
  std::string name;  // the id clients pass as "model"
  const Tokenizer* tokenizer = nullptr;
  int64_t vocab_size = 0;
  int64_t max_context = 0;  // prompt + max_tokens at most
  SamplingParams defaults;  // fields the request leaves out
  bool check_model = true;  // false: "model" is not looked at (tessera generate --requests)
};

struct CompletionRequest {
  std::vector<int32_t> prompt_ids;
  SamplingParams params;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage
};

// POST /v1/completions: model (must equal the served name: 404 otherwise), prompt (a string, one
// string in an array, or an array of token ids), max_tokens, temperature, top_p, top_k (-1 or 0:
// off), min_p, repetition_penalty, seed, stop (a string or an array of strings), stop_token_ids,
// stream, stream_options. Accepted only at their neutral values: n, best_of (1), echo (false),
// logprobs (null), presence_penalty, frequency_penalty (0), suffix (absent). Other fields are
// ignored, as OpenAI's server does. Throws ApiError (400 or 404).
CompletionRequest parse_completion_request(const std::string& body, const ServedModel& model);

// POST /v1/chat/completions: always ApiError 400 — a tokenizer.json carries no chat template, so
// no conversation can be rendered the way the model was trained to read it. Parsed first, so a
// malformed body still gets its own 400.
[[noreturn]] void refuse_chat_request(const std::string& body);

// The OpenAI finish_reason of an engine reason ("stop", "length"; cancelled and error have none).
const char* finish_reason_json(FinishReason r);

struct CompletionUsage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// The non-streaming response body.
std::string completion_json(const std::string& id, int64_t created, const std::string& model,
                            const std::string& text, FinishReason reason,
                            const CompletionUsage& usage);
// One server-sent event of a streamed response: "data: {...}\n\n". `reason` none: a text chunk.
std::string completion_chunk_event(const std::string& id, int64_t created, const std::string& model,
                                   const std::string& text, FinishReason reason);
std::string usage_chunk_event(const std::string& id, int64_t created, const std::string& model,
                              const CompletionUsage& usage);
constexpr const char* kDoneEvent = "data: [DONE]\n\n";

// {"error": {"message", "type", "param", "code"}}.
std::string error_json(const ApiError& e);
// An error inside a stream (after the 200 header was sent): "data: {"error": ...}\n\n".
std::string error_event(const ApiError& e);

}  // namespace tessera::serve
