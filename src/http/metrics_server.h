// MetricsServer: a MetricsRegistry (core/prometheus.h) over HTTP — GET /metrics in the Prometheus
// text format 0.0.4 and GET /health — answered by a background thread, for `tessera train`'s
// logging.prometheus_port and, with its own routes added, `tessera serve`.
#pragma once
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "core/prometheus.h"

namespace httplib {
class Server;
}

namespace tessera {

class MetricsServer {
 public:
  // What GET /metrics answers with, as Prometheus expects for format 0.0.4.
  static constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

  // `registry` must outlive the server. `workers`: threads answering requests; a scrape renders
  // in microseconds, so a few serve any number of scrapers (more wait in a queue).
  explicit MetricsServer(const MetricsRegistry& registry, int workers = 2);
  ~MetricsServer();  // stop()
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Other routes (tessera serve's API) are added on this before start(); /metrics and /health
  // are there already. Every other path answers 404.
  httplib::Server& routes() { return *server_; }

  // Binds host:port (port 0: the kernel picks a free port, see port()) and starts serving in a
  // background thread. The port is held exclusively (no SO_REUSEPORT): a second server on a
  // port in use fails here instead of sharing its connections. On failure nothing runs and the
  // reason is returned (e.g. "Address already in use"); the caller words the user error. Once
  // per server: a second start() is a check error.
  [[nodiscard]] std::optional<std::string> start(const std::string& host, int port);
  // Stops accepting, finishes the requests in flight and joins the thread; the port is free
  // again when it returns. Does nothing when not running.
  void stop();

  bool running() const { return thread_.joinable(); }
  int port() const { return port_; }  // the bound port; 0 before start()

 private:
  const MetricsRegistry& registry_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> listen_returned_{false};
  int socket_ = -1;  // the listening socket (cpp-httplib owns and closes it)
  int port_ = 0;
  bool started_ = false;
};

}  // namespace tessera
