// `tessera serve MODEL --port P`: the inference engine behind an OpenAI-compatible HTTP API
// (POST /v1/completions with streaming, GET /v1/models, GET /health, GET /metrics in the
// Prometheus text format) until SIGINT or SIGTERM. Port 0 takes a free port; the line "serving
// ... on http://HOST:PORT" on stdout says which.
#include <csignal>
#include <cstdio>

#include <fmt/format.h>

#include "cli/command.h"
#include "cli/engine_options.h"
#include "core/error.h"
#include "serve/api_server.h"

namespace tessera::cli {
namespace {

struct ServeArgs {
  std::string model, host = "127.0.0.1", name;
  int port = 8000, workers = 128;
  EngineArgs engine;
  SamplingArgs sampling;
};

int run_serve(const ServeArgs& a) {
  // Block the stop signals in every thread (threads inherit the mask); this one sigwait()s them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  const SamplingParams defaults = sampling_params(a.sampling);  // checked before the model loads
  auto engine =
      std::make_unique<Engine>(load_engine_model(a.engine, a.model), engine_options(a.engine));
  serve::ServedModel served;
  served.name = a.name.empty() ? a.model : a.name;
  served.tokenizer = &engine->tokenizer();
  served.vocab_size = engine->model().vocab_size();
  served.max_context = engine->max_context();
  served.defaults = defaults;
  const std::string weights = engine->model().weight_format();
  const std::string device(device_name(engine->model().device()));
  const int64_t blocks = engine->kv_blocks_total();
  MetricsRegistry metrics;
  serve::EngineService service(std::move(engine), metrics);
  serve::ApiServer server(service, served, metrics, a.workers);
  if (const auto err = server.start(a.host, a.port))
    TS_USER_ERROR("--port {}: cannot listen on {}:{}: {}", a.port, a.host, a.port, *err);
  fmt::print(
      "serving {} as '{}' ({} weights on {}, {} KV blocks of {} tokens, context {}) on "
      "http://{}:{}\n",
      a.model, served.name, weights, device, blocks, a.engine.block_size, served.max_context,
      a.host, server.port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  fmt::print("serve: signal {}: stopping\n", sig);
  server.stop();
  return 0;
}

RunFn setup_serve(CLI::App& sub) {
  auto a = std::make_shared<ServeArgs>();
  sub.add_option("MODEL", a->model,
                 "a Tessera export (tessera export --format tessera) or a training run / "
                 "checkpoint directory")
      ->required();
  sub.add_option("--port", a->port, "TCP port; 0 takes a free one (printed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  sub.add_option("--host", a->host, "address to listen on")->capture_default_str();
  sub.add_option("--served-model-name", a->name,
                 "the name clients pass as \"model\"; default: MODEL as given");
  sub.add_option("--workers", a->workers,
                 "HTTP threads: each open request holds one, so this bounds concurrent clients")
      ->capture_default_str()
      ->check(integer_at_least(1));
  add_engine_options(sub, a->engine);
  add_sampling_options(sub, a->sampling);
  return [a] { return run_serve(*a); };
}

const Command kServe("serve", "serve a model over an OpenAI-compatible HTTP API", setup_serve);

}  // namespace
}  // namespace tessera::cli
