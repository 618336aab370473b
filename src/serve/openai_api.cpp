// Parsing and checking OpenAI completion requests (nlohmann::json, no exceptions escape but
// ApiError), and writing the response, chunk and error bodies.
#include "serve/openai_api.h"

#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace tessera::serve {
namespace {

using json = nlohmann::json;

json parse_object(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw ApiError(400, "the request body is not valid JSON");
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object");
  return j;
}

[[noreturn]] void bad(const std::string& field, const std::string& what) {
  throw ApiError(400, fmt::format("'{}' {}", field, what), field);
}

// The field when present and not null, else nullptr.
const json* field(const json& j, const char* name) {
  const auto it = j.find(name);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

double number(const json& j, const char* name, double lo, double hi, bool lo_open = false) {
  const json& v = *field(j, name);
  if (!v.is_number()) bad(name, fmt::format("must be a number, got {}", v.dump()));
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi || (lo_open && x == lo))
    bad(name, fmt::format("must be in {}{}, {}], got {}", lo_open ? "(" : "[", lo, hi, v.dump()));
  return x;
}

int64_t integer(const json& j, const char* name, int64_t lo, int64_t hi) {
  const json& v = *field(j, name);
  if (!v.is_number_integer()) bad(name, fmt::format("must be an integer, got {}", v.dump()));
  const bool too_big = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX);
  if (too_big || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
    bad(name, fmt::format("must be in [{}, {}], got {}", lo, hi, v.dump()));
  return v.get<int64_t>();
}

// Fields accepted only at the value that changes nothing.
void check_neutral(const json& j) {
  if (const json* n = field(j, "n"); n && *n != 1)
    bad("n", fmt::format("must be 1 (one completion per request), got {}", n->dump()));
  if (const json* b = field(j, "best_of"); b && *b != 1)
    bad("best_of", fmt::format("must be 1, got {}", b->dump()));
  if (const json* e = field(j, "echo"); e && *e != false)
    bad("echo", "is not supported (must be false)");
  if (field(j, "logprobs")) bad("logprobs", "is not supported (must be null)");
  if (field(j, "suffix")) bad("suffix", "is not supported");
  for (const char* p : {"presence_penalty", "frequency_penalty"})
    if (const json* v = field(j, p); v && !(v->is_number() && v->get<double>() == 0.0))
      bad(p, "is not supported (must be 0; use repetition_penalty)");
}

std::vector<int32_t> prompt_ids(const json& j, const ServedModel& m) {
  const json* p = field(j, "prompt");
  if (!p) bad("prompt", "is required");
  std::vector<int32_t> ids;
  if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
  if (p->is_string()) {
    ids = m.tokenizer->encode(p->get<std::string>());
  } else if (p->is_array()) {
    for (const json& t : *p) {
      if (!t.is_number_integer())
        bad("prompt", "must be a string, an array of one string, or an array of token ids");
      const int64_t id = t.get<int64_t>();
      if (id < 0 || id >= m.vocab_size)
        bad("prompt",
            fmt::format("token id {} is outside the vocabulary [0, {})", id, m.vocab_size));
      ids.push_back(int32_t(id));
    }
  } else {
    bad("prompt", "must be a string, an array of one string, or an array of token ids");
  }
  if (ids.empty()) bad("prompt", "is empty");
  return ids;
}

std::vector<std::string> stop_strings(const json& j) {
  const json* s = field(j, "stop");
  if (!s) return {};
  if (s->is_string()) return {s->get<std::string>()};
  if (!s->is_array()) bad("stop", "must be a string or an array of strings");
  std::vector<std::string> out;
  for (const json& x : *s) {
    if (!x.is_string() || x.get<std::string>().empty())
      bad("stop", "must hold non-empty strings only");
    out.push_back(x.get<std::string>());
  }
  return out;
}

}  // namespace

CompletionRequest parse_completion_request(const std::string& body, const ServedModel& m) {
  const json j = parse_object(body);
  const json* model = m.check_model ? field(j, "model") : nullptr;
  if (!model && m.check_model) bad("model", "is required");
  if (model && !model->is_string()) bad("model", "must be a string");
  if (model && model->get<std::string>() != m.name)
    throw ApiError(404,
                   fmt::format("the model '{}' does not exist (this server serves '{}')",
                               model->get<std::string>(), m.name),
                   "model", "not_found_error");
  check_neutral(j);
  CompletionRequest r;
  r.prompt_ids = prompt_ids(j, m);
  SamplingParams& p = r.params;
  p = m.defaults;
  if (field(j, "max_tokens")) p.max_tokens = integer(j, "max_tokens", 1, m.max_context);
  if (field(j, "temperature")) p.temperature = float(number(j, "temperature", 0.0, 100.0));
  if (field(j, "top_p")) p.top_p = float(number(j, "top_p", 0.0, 1.0, /*lo_open=*/true));
  if (field(j, "top_k")) p.top_k = int32_t(std::max<int64_t>(0, integer(j, "top_k", -1, 1 << 30)));
  if (field(j, "min_p")) p.min_p = float(number(j, "min_p", 0.0, 1.0));
  if (field(j, "repetition_penalty"))
    p.repetition_penalty = float(number(j, "repetition_penalty", 0.0, 100.0, true));
  if (field(j, "seed")) p.seed = uint64_t(integer(j, "seed", 0, INT64_MAX));
  if (field(j, "stop")) p.stop_strings = stop_strings(j);
  if (const json* ids = field(j, "stop_token_ids")) {
    if (!ids->is_array()) bad("stop_token_ids", "must be an array of token ids");
    p.stop_token_ids.clear();
    for (const json& t : *ids) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= m.vocab_size)
        bad("stop_token_ids",
            fmt::format("holds {}, not a token id in [0, {})", t.dump(), m.vocab_size));
      p.stop_token_ids.push_back(t.get<int32_t>());
    }
  }
  if (const json* s = field(j, "stream")) {
    if (!s->is_boolean()) bad("stream", "must be true or false");
    r.stream = s->get<bool>();
  }
  if (const json* o = field(j, "stream_options")) {
    if (!o->is_object()) bad("stream_options", "must be an object");
    const json* u = field(*o, "include_usage");
    if (u && !u->is_boolean()) bad("stream_options", "include_usage must be true or false");
    r.include_usage = u && u->get<bool>();
  }
  const int64_t need = int64_t(r.prompt_ids.size()) + p.max_tokens;
  if (need > m.max_context)
    throw ApiError(400,
                   fmt::format("this model's context is {} tokens, but the request needs {} ({} "
                               "in the prompt, max_tokens {})",
                               m.max_context, need, r.prompt_ids.size(), p.max_tokens),
                   "max_tokens");
  return r;
}

void refuse_chat_request(const std::string& body) {
  parse_object(body);
  throw ApiError(400,
                 "chat completions are not available: the model's tokenizer.json has no chat "
                 "template to render the messages with; use /v1/completions",
                 "messages");
}

const char* finish_reason_json(FinishReason r) {
  switch (r) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    default: return nullptr;
  }
}

namespace {

json reason_value(FinishReason r) {
  const char* s = finish_reason_json(r);
  return s ? json(s) : json(nullptr);
}

json usage_value(const CompletionUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

json envelope(const std::string& id, int64_t created, const std::string& model) {
  return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model}};
}

}  // namespace

std::string completion_json(const std::string& id, int64_t created, const std::string& model,
                            const std::string& text, FinishReason reason,
                            const CompletionUsage& usage) {
  json j = envelope(id, created, model);
  j["choices"] = json::array({{{"index", 0},
                               {"text", text},
                               {"logprobs", nullptr},
                               {"finish_reason", reason_value(reason)}}});
  j["usage"] = usage_value(usage);
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string completion_chunk_event(const std::string& id, int64_t created, const std::string& model,
                                   const std::string& text, FinishReason reason) {
  json j = envelope(id, created, model);
  j["choices"] = json::array({{{"index", 0},
                               {"text", text},
                               {"logprobs", nullptr},
                               {"finish_reason", reason_value(reason)}}});
  return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

std::string usage_chunk_event(const std::string& id, int64_t created, const std::string& model,
                              const CompletionUsage& usage) {
  json j = envelope(id, created, model);
  j["choices"] = json::array();
  j["usage"] = usage_value(usage);
  return "data: " + j.dump() + "\n\n";
}

std::string error_json(const ApiError& e) {
  const json j = {{"error",
                   {{"message", e.what()},
                    {"type", e.type()},
                    {"param", e.param().empty() ? json(nullptr) : json(e.param())},
                    {"code", e.status()}}}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string error_event(const ApiError& e) { return "data: " + error_json(e) + "\n\n"; }

}  // namespace tessera::serve
