// logging.prometheus_port end to end: a client scrapes `tessera train` (ci-tiny's model on mock
// data) until it reports a step and a finite loss, and the run still ends with status 0; under
// mpirun only rank 0 binds the port; a port in use is a user error (status 2) printed once.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include "tests/common/cli.h"

namespace tessera {
namespace {

using testing::run_cli;

// ci-tiny's model with shorter sequences (~0.15 s a step on a CI core) on uniform random tokens:
// no prepared corpus, and steps slow enough that a scraper polling every 20 ms sees the run
// between its first step and its end.
std::string train_args(const std::string& out_dir, int port, int steps) {
  return fmt::format(
      "train recipes/ci-tiny.yaml --set data.path=mock --set model.vocab_size=512"
      " --set data.seq_len=64 --set data.micro_batch=8 --set train.steps={} --set "
      "optim.warmup_steps=1"
      " --set train.eval_every=0 --set train.eval_batches=1 --set train.sample_tokens=0"
      " --set checkpoint.every=0 --set checkpoint.save_final=false --set logging.every=1"
      " --set logging.prometheus_port={} --set train.out_dir={}",
      steps, port, out_dir);
}

// A socket listening on every interface at a port the kernel picked; closed on destruction.
class Listener {
 public:
  Listener() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    socklen_t len = sizeof(addr);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(fd_, 1) != 0 || getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
      ADD_FAILURE() << "cannot open a listening socket";
    port_ = ntohs(addr.sin_port);
  }
  ~Listener() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// A port that was free a moment ago (bound on every interface, then released).
int free_port() {
  Listener l;
  return l.port();
}

// The value of the sample `series` (name with its labels, as rendered) in exposition text.
std::optional<double> sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(series + " ", 0) == 0) return std::strtod(line.c_str() + series.size(), nullptr);
  return std::nullopt;
}

TEST(PrometheusTrain, ScrapedWhileTraining) {
  const std::string dir = testing::fresh_dir("prometheus_scrape");
  const int port = free_port();
  std::atomic<bool> finished{false};
  testing::CliResult run;
  std::thread trainer([&] {
    run = run_cli(train_args(dir, port, 16));
    finished = true;
  });

  // Poll until a scrape shows a completed step with a finite loss, the run ends, or 60 s pass
  // (a loaded 2-core machine builds the Run slowly).
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(1);
  client.set_read_timeout(5);
  std::string seen;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!finished && std::chrono::steady_clock::now() < deadline) {
    if (const httplib::Result r = client.Get("/metrics"); r && r->status == 200) {
      const auto step = sample(r->body, "tessera_train_step");
      const auto loss = sample(r->body, "tessera_train_loss");
      if (step && *step >= 1 && loss && std::isfinite(*loss) && *loss > 0) {
        seen = r->body;
        EXPECT_EQ(r->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  trainer.join();
  ASSERT_EQ(run.status, 0) << run.output;
  ASSERT_FALSE(seen.empty()) << "no scrape showed tessera_train_step >= 1 with a finite loss\n"
                             << run.output;
  EXPECT_NE(run.output.find(fmt::format("prometheus: serving http://0.0.0.0:{}/metrics", port)),
            std::string::npos)
      << run.output;
  EXPECT_GT(sample(seen, "tessera_train_tokens_total").value_or(0), 0) << seen;
  EXPECT_GT(sample(seen, "tessera_train_tokens_per_second").value_or(0), 0) << seen;
  EXPECT_GE(sample(seen, "tessera_train_step_seconds_count").value_or(0), 1) << seen;
  EXPECT_GT(sample(seen, "tessera_train_memory_bytes{kind=\"arena_peak\"}").value_or(0), 0) << seen;
  EXPECT_EQ(sample(seen, "tessera_train_info{model=\"gpt2\",precision=\"fp32\"}"), 1.0) << seen;
  // A CPU fp32 run has no MFU and no loss scale: the families are absent, not 0.
  EXPECT_EQ(seen.find("tessera_train_mfu"), std::string::npos) << seen;
  EXPECT_EQ(seen.find("tessera_train_loss_scale"), std::string::npos) << seen;
  // The endpoint ends with the run.
  EXPECT_FALSE(client.Get("/health")) << "still serving after the run ended";
}

// With two ranks only rank 0 serves: were rank 1 to bind the same port it would fail (the port
// is held exclusively) and the job would end with status 2.
TEST(PrometheusTrain, OnlyRankZeroServesUnderMpirun) {
  const std::string dir = testing::fresh_dir("prometheus_mpi");
  const auto r =
      run_cli(train_args(dir, free_port(), 2) + " --set parallel.dp=2", testing::mpirun(2));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("prometheus: serving"), std::string::npos) << r.output;
}

void expect_port_in_use_error(const testing::CliResult& r, int port) {
  EXPECT_EQ(r.status, 2) << r.output;
  const std::string msg = fmt::format(
      "recipes/ci-tiny.yaml: logging.prometheus_port: cannot serve metrics on port {}: ", port);
  const size_t at = r.output.find(msg);
  ASSERT_NE(at, std::string::npos) << r.output;
  EXPECT_NE(r.output.find("in use", at), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find(msg, at + 1), std::string::npos) << "printed twice:\n" << r.output;
}

TEST(PrometheusTrain, PortInUseIsAUserError) {
  Listener taken;
  const std::string dir = testing::fresh_dir("prometheus_taken");
  expect_port_in_use_error(run_cli(train_args(dir + "/one", taken.port(), 2)), taken.port());
  expect_port_in_use_error(
      run_cli(train_args(dir + "/two", taken.port(), 2) + " --set parallel.dp=2",
              testing::mpirun(2)),
      taken.port());
}

}  // namespace
}  // namespace tessera
