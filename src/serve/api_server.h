// The HTTP face of `tessera serve`: OpenAI-compatible routes (POST /v1/completions, streaming by
// server-sent events; POST /v1/chat/completions, refused with a 400 that says why; GET
// /v1/models) added to a MetricsServer (GET /metrics, GET /health), with requests counted by
// route and status. Handler threads parse and check requests, hand them to the EngineService and
// relay its events; a client that disconnects mid-stream cancels its request.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "core/prometheus.h"
#include "http/metrics_server.h"
#include "serve/engine_service.h"
#include "serve/openai_api.h"

namespace tessera::serve {

class ApiServer {
 public:
  // `workers`: HTTP threads; each open request (streaming or waiting for its completion) holds
  // one, so it bounds the concurrent clients (more wait in the accept queue).
  ApiServer(EngineService& service, ServedModel model, MetricsRegistry& metrics, int workers);
  ~ApiServer();

  // As MetricsServer::start: the reason when host:port cannot be bound.
  [[nodiscard]] std::optional<std::string> start(const std::string& host, int port);
  void stop();
  int port() const { return http_.port(); }

 private:
  void add_routes();

  EngineService& service_;
  ServedModel model_;
  CounterFamily& requests_;
  MetricsServer http_;
};

}  // namespace tessera::serve
