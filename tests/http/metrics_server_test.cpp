// MetricsServer: /metrics is the registry's text with Prometheus's content type, /health is 200,
// other paths 404; 8 threads scraping at once; stop() frees the port; a port in use is refused
// (also by a second MetricsServer: no SO_REUSEPORT sharing).
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "http/metrics_server.h"

namespace tessera {
namespace {

constexpr const char* kHost = "127.0.0.1";

// A registry with one family of each kind and some values.
void fill(MetricsRegistry& reg) {
  reg.add_counter("t_requests_total", "Requests.", {"code"}).labels({"200"}).add(3);
  reg.add_gauge("t_loss", "Loss.").get().set(2.5);
  reg.add_histogram("t_seconds", "Latency.", {0.1, 1.0}).get().observe(0.3);
}

httplib::Client client(int port) {
  httplib::Client c(kHost, port);
  c.set_connection_timeout(5);
  c.set_read_timeout(10);
  return c;
}

TEST(MetricsServer, ServesMetricsHealthAnd404) {
  MetricsRegistry reg;
  fill(reg);
  MetricsServer server(reg);
  ASSERT_FALSE(server.start(kHost, 0));
  ASSERT_TRUE(server.running());
  ASSERT_GT(server.port(), 0);
  httplib::Client c = client(server.port());

  const httplib::Result m = c.Get("/metrics");
  ASSERT_TRUE(m) << httplib::to_string(m.error());
  EXPECT_EQ(m->status, 200);
  EXPECT_EQ(m->body, reg.render());
  EXPECT_EQ(m->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");

  // The body is rendered per scrape: a later value shows.
  reg.add_gauge("t_late", "Registered after start.").get().set(7);
  const httplib::Result m2 = c.Get("/metrics");
  ASSERT_TRUE(m2);
  EXPECT_NE(m2->body.find("t_late 7\n"), std::string::npos) << m2->body;

  const httplib::Result h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(h->body, "ok\n");

  for (const char* path : {"/", "/metric", "/metrics/x", "/healthz"}) {
    const httplib::Result r = c.Get(path);
    ASSERT_TRUE(r) << path;
    EXPECT_EQ(r->status, 404) << path;
  }
  server.stop();
  EXPECT_FALSE(server.running());
}

TEST(MetricsServer, ConcurrentScrapesFromEightThreads) {
  MetricsRegistry reg;
  fill(reg);
  const std::string want = reg.render();
  MetricsServer server(reg);
  ASSERT_FALSE(server.start(kHost, 0));
  constexpr int kThreads = 8, kScrapes = 25;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] {
      httplib::Client c = client(server.port());
      for (int i = 0; i < kScrapes; ++i) {
        const httplib::Result r = c.Get("/metrics");
        if (r && r->status == 200 && r->body == want) ++ok;
      }
    });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), kThreads * kScrapes);
}

TEST(MetricsServer, StopReleasesThePort) {
  MetricsRegistry reg;
  fill(reg);
  int port = 0;
  {
    MetricsServer first(reg);
    ASSERT_FALSE(first.start(kHost, 0));
    port = first.port();
    ASSERT_TRUE(client(port).Get("/health"));  // leaves a connection behind (TIME_WAIT)
    first.stop();
    EXPECT_FALSE(first.running());
    first.stop();  // a second stop does nothing
    EXPECT_FALSE(client(port).Get("/health")) << "still answering after stop()";
  }
  MetricsServer second(reg);
  const auto err = second.start(kHost, port);
  ASSERT_FALSE(err) << *err;
  EXPECT_EQ(second.port(), port);
  const httplib::Result r = client(port).Get("/metrics");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->body, reg.render());
}

TEST(MetricsServer, StopRightAfterStartReturns) {
  MetricsRegistry reg;
  for (int i = 0; i < 20; ++i) {
    MetricsServer s(reg);
    ASSERT_FALSE(s.start(kHost, 0));
  }  // each destructor stops and joins
}

TEST(MetricsServer, PortInUseByAnotherServerFails) {
  MetricsRegistry reg;
  fill(reg);
  MetricsServer first(reg);
  ASSERT_FALSE(first.start(kHost, 0));
  MetricsServer second(reg);
  const auto err = second.start(kHost, first.port());
  ASSERT_TRUE(err) << "a second server bound port " << first.port();
  EXPECT_NE(err->find("in use"), std::string::npos) << *err;
  EXPECT_FALSE(second.running());
  EXPECT_EQ(second.port(), 0);
  const httplib::Result r = client(first.port()).Get("/health");  // the first is unharmed
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
}

TEST(MetricsServer, PortInUseByAPlainSocketFails) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  MetricsRegistry reg;
  MetricsServer server(reg);
  const auto err = server.start(kHost, port);
  close(fd);
  ASSERT_TRUE(err);
  EXPECT_NE(err->find("in use"), std::string::npos) << *err;
}

}  // namespace
}  // namespace tessera
