// MetricsServer on cpp-httplib: the two routes, the listening socket's options, and a start/stop
// that cannot lose the race between a stop() and the listener thread starting up.
#include "http/metrics_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace tessera {

MetricsServer::MetricsServer(const MetricsRegistry& registry, int workers)
    : registry_(registry), server_(std::make_unique<httplib::Server>()) {
  TS_CHECK(workers >= 1, "workers {}", workers);
  server_->new_task_queue = [workers] { return new httplib::ThreadPool(size_t(workers)); };
  // cpp-httplib sets SO_REUSEPORT by default, with which a second process binds a port already
  // served and the kernel splits the scrapes between the two. SO_REUSEADDR alone still lets a
  // restarted run take its port back while old connections sit in TIME_WAIT.
  server_->set_socket_options([this](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    socket_ = sock;  // of the addresses tried in turn, the last is the one bound
  });
  // An idle keep-alive connection holds its worker until this runs out, and stop() waits for the
  // workers: 1 s bounds how long stopping takes (Prometheus reconnects per scrape, which is cheap).
  server_->set_keep_alive_timeout(1);
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry_.render(), kContentType);
  });
  server_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain; charset=utf-8");
  });
}

MetricsServer::~MetricsServer() { stop(); }

std::optional<std::string> MetricsServer::start(const std::string& host, int port) {
  TS_CHECK(!started_, "MetricsServer::start called twice");
  TS_CHECK(port >= 0 && port <= 65535, "port {}", port);
  started_ = true;
  errno = 0;
  int bound = -1;
  if (port == 0)
    bound = server_->bind_to_any_port(host);
  else if (server_->bind_to_port(host, port))
    bound = port;
  if (bound < 0) {
    // The failed bind()'s errno (closing its socket keeps it); a host that does not resolve
    // leaves it 0.
    const int err = errno;
    return err != 0 ? std::string(std::strerror(err))
                    : std::string("cannot resolve or bind the address");
  }
  port_ = bound;
  // cpp-httplib 0.11 listens with a backlog of 5, compiled into the library: a burst of more
  // connections loses SYNs, each retried by its client only after a second. Listening again on
  // the bound socket raises the backlog.
  ::listen(socket_, SOMAXCONN);
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_ = true;
  });
  // httplib's stop() does nothing until the listener has marked itself running; a stop() in that
  // gap would leave the thread accepting forever and the join hanging. Wait for the mark (or for
  // the listener to have given up).
  while (!server_->is_running() && !listen_returned_)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return std::nullopt;
}

void MetricsServer::stop() {
  if (!thread_.joinable()) return;
  server_->stop();  // closes the listening socket: accept() returns and the worker pool drains
  thread_.join();
}

}  // namespace tessera
