// ApiServer's routes: parse -> submit -> relay (a whole JSON response, or server-sent events).
#include "serve/api_server.h"

#include <atomic>
#include <chrono>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

namespace tessera::serve {
namespace {

constexpr auto kPoll = std::chrono::milliseconds(50);
constexpr const char* kJson = "application/json";

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string next_id() {
  static std::atomic<int64_t> n{0};
  return fmt::format("cmpl-{}", n++);
}

// An engine-side refusal (FinishReason::error) as the API reports it.
ApiError engine_error(const EngineEvent& e) { return ApiError(400, e.error); }

}  // namespace

ApiServer::ApiServer(EngineService& service, ServedModel model, MetricsRegistry& metrics,
                     int workers)
    : service_(service),
      model_(std::move(model)),
      requests_(metrics.add_counter("tessera_http_requests_total",
                                    "HTTP requests answered, by route and status",
                                    {"route", "status"})),
      http_(metrics, workers) {
  add_routes();
}

ApiServer::~ApiServer() { stop(); }

std::optional<std::string> ApiServer::start(const std::string& host, int port) {
  return http_.start(host, port);
}

void ApiServer::stop() { http_.stop(); }

void ApiServer::add_routes() {
  httplib::Server& s = http_.routes();
  s.set_payload_max_length(size_t(16) << 20);
  const auto count = [this](const char* route, int status) {
    requests_.labels({route, std::to_string(status)}).add();
  };
  const auto fail = [count](httplib::Response& res, const char* route, const ApiError& e) {
    res.status = e.status();
    res.set_content(error_json(e), kJson);
    count(route, e.status());
  };

  s.Get("/v1/models", [this, count](const httplib::Request&, httplib::Response& res) {
    const nlohmann::json j = {
        {"object", "list"},
        {"data", nlohmann::json::array({{{"id", model_.name},
                                         {"object", "model"},
                                         {"owned_by", "tessera"},
                                         {"max_model_len", model_.max_context}}})}};
    res.set_content(j.dump(), kJson);
    count("/v1/models", 200);
  });

  s.Post("/v1/chat/completions", [fail](const httplib::Request& req, httplib::Response& res) {
    try {
      refuse_chat_request(req.body);
    } catch (const ApiError& e) {
      fail(res, "/v1/chat/completions", e);
    }
  });

  s.Post(
      "/v1/completions", [this, count, fail](const httplib::Request& req, httplib::Response& res) {
        const char* route = "/v1/completions";
        CompletionRequest r;
        try {
          r = parse_completion_request(req.body, model_);
        } catch (const ApiError& e) {
          fail(res, route, e);
          return;
        }
        const CompletionUsage start{int64_t(r.prompt_ids.size()), 0};
        const std::shared_ptr<RequestStream> stream = service_.submit(r.prompt_ids, r.params);
        const std::string id = next_id();
        const int64_t created = unix_now();
        if (!r.stream) {
          std::string text;
          EngineEvent last;
          int64_t generated = 0;
          while (!last.finished) {
            for (EngineEvent& e : stream->wait(kPoll)) {
              text += e.text;
              generated += e.token >= 0 ? 1 : 0;
              if (e.finished) last = std::move(e);
            }
          }
          if (last.reason == FinishReason::error) {
            fail(res, route, engine_error(last));
            return;
          }
          res.set_content(completion_json(id, created, model_.name, text, last.reason,
                                          {start.prompt_tokens, generated}),
                          kJson);
          count(route, 200);
          return;
        }
        count(route, 200);
        // Events are relayed as they come; the provider runs on this handler's thread until done.
        auto generated = std::make_shared<int64_t>(0);
        const bool usage = r.include_usage;
        res.set_chunked_content_provider(
            "text/event-stream",
            [this, stream, id, created, usage, start, generated](size_t, httplib::DataSink& sink) {
              for (const EngineEvent& e : stream->wait(kPoll)) {
                *generated += e.token >= 0 ? 1 : 0;
                std::string out;
                if (e.finished && e.reason == FinishReason::error) {
                  out = error_event(engine_error(e));
                } else {
                  if (!e.text.empty() || e.finished)
                    out = completion_chunk_event(id, created, model_.name, e.text,
                                                 e.finished ? e.reason : FinishReason::none);
                  if (e.finished && usage)
                    out += usage_chunk_event(id, created, model_.name,
                                             {start.prompt_tokens, *generated});
                }
                if (e.finished) out += kDoneEvent;
                if (!out.empty() && !sink.write(out.data(), out.size())) return false;
                if (e.finished) {
                  sink.done();
                  return true;
                }
              }
              return sink.is_writable();  // false: the client is gone (the releaser cancels)
            },
            [this, stream](bool success) {
              if (!success || !stream->done()) service_.cancel(stream);
            });
      });
}

}  // namespace tessera::serve
