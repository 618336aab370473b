// `tessera serve` end to end: the CI-trained model exported as INT8 is served on a free port; 64
// clients send completions at once (streaming and not, greedy and seeded sampling, mixed lengths,
// some cancelled mid-stream) beside a corpus of malformed requests. Every completed request's text
// equals `tessera generate --requests` on the same bodies, every malformed one gets a 4xx JSON
// error, /health, /v1/models and /metrics answer, and the server stays up and stops on SIGTERM.
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <thread>

#include <nlohmann/json.hpp>

#include "serve/sse_reader.h"
#include "tests/common/cli.h"
#include "tests/common/files.h"

extern char** environ;

namespace tessera {
namespace {

using json = nlohmann::json;

// The server process: started with its output in a log file, whose "on http://HOST:PORT" line
// gives the port.
class ServerProcess {
 public:
  ServerProcess(const std::vector<std::string>& args, const std::string& log) : log_(log) {
    std::vector<std::string> argv = {testing::tessera_binary()};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargv;
    for (std::string& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    EXPECT_EQ(posix_spawn(&pid_, cargv[0], &fa, nullptr, cargv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
  }
  ~ServerProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // The port once the server says it listens (0 after timeout or if it exited).
  int wait_port(std::chrono::seconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    const std::regex line("on http://[0-9.]+:([0-9]+)");
    while (std::chrono::steady_clock::now() < end && alive()) {
      std::smatch m;
      const std::string log = testing::read_all(log_);
      if (std::regex_search(log, m, line)) return std::stoi(m[1]);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return 0;
  }
  bool alive() {
    if (exited_) return false;
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      exited_ = true;
      status_ = st;
    }
    return !exited_;
  }
  int terminate() {  // SIGTERM, then the exit status
    if (alive()) {
      kill(pid_, SIGTERM);
      waitpid(pid_, &status_, 0);
      exited_ = true;
    }
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  }
  std::string log() const { return testing::read_all(log_); }

 private:
  std::string log_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = 0;
};

struct Result {
  int status = 0;
  std::string text;
  std::string finish_reason;
  bool cancelled = false;
};

// One completion over HTTP; streamed ones are read event by event (and abandoned after the first
// text chunk when `cancel`).
Result complete(int port, const json& body, bool cancel) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_read_timeout(300, 0);
  Result r;
  if (!body.value("stream", false)) {
    const auto res = cli.Post("/v1/completions", body.dump(), "application/json");
    if (!res) return r;
    r.status = res->status;
    if (res->status == 200) {
      const json j = json::parse(res->body);
      r.text = j["choices"][0]["text"];
      r.finish_reason = j["choices"][0]["finish_reason"].is_null()
                            ? "null"
                            : j["choices"][0]["finish_reason"].get<std::string>();
    }
    return r;
  }
  serve::SseReader sse;
  bool done = false;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    for (const std::string& payload : sse.feed(data, n)) {
      if (payload == "[DONE]") {
        done = true;
        continue;
      }
      const json j = json::parse(payload);
      if (j.contains("error")) return false;
      r.text += j["choices"][0]["text"].get<std::string>();
      if (!j["choices"][0]["finish_reason"].is_null())
        r.finish_reason = j["choices"][0]["finish_reason"];
      if (cancel && !r.text.empty()) {
        r.cancelled = true;
        return false;  // hang up mid-stream
      }
    }
    return true;
  };
  const auto res = cli.send(req);
  r.status = res ? res->status : (r.cancelled ? 200 : 0);
  if (!r.cancelled && !done) r.status = -1;
  return r;
}

const char* kPrompts[] = {
    "It was",
    "The old man looked at the sea and said",
    "Chapter I.\n\nIn the beginning of the year there was a great deal of talk in the village "
    "about the new mill, and",
    "\"Where are you going?\" she asked. \"To the",
    "Once upon a time",
    "The ship sailed on through the night, and the captain stood on the deck watching the "
    "stars, thinking of the long voyage home and of the people who waited for him there, and "
    "of",
};

TEST(ServeCli, SixtyFourClientsGetWhatGenerateGivesAndBadRequestsGet4xx) {
  const std::string dir = testing::fresh_dir("serve-cli");
  const std::string model = dir + "/model.h5";
  const testing::CliResult ex = testing::run_cli("export '" + testing::ci_trained_run() +
                                                 "' --format tessera --quant int8 --out " + model);
  ASSERT_EQ(ex.status, 0) << ex.output;
  ServerProcess server({"serve", model, "--port", "0", "--device", "cpu", "--served-model-name",
                        "ci-tiny", "--max-num-seqs", "16", "--max-batched-tokens", "256",
                        "--block-size", "8", "--kv-cache-gb", "0.01"},
                       dir + "/serve.log");
  const int port = server.wait_port(std::chrono::seconds(120));
  ASSERT_GT(port, 0) << server.log();

  // 64 clients: a quarter streaming, an eighth streaming and hanging up mid-stream.
  std::vector<json> bodies;
  for (int i = 0; i < 64; ++i) {
    json b = {{"model", "ci-tiny"},
              {"prompt", kPrompts[i % 6]},
              {"max_tokens", 1 + (i * 7) % 40},
              {"temperature", i % 3 == 0 ? 0.0 : 0.8},
              {"top_p", 0.95},
              {"seed", 1000 + i}};
    if (i % 4 == 0 || i % 8 == 4) b["stream"] = true;
    if (i % 5 == 0) b["stop"] = json::array({"\n\n", " the "});
    bodies.push_back(b);
  }
  const std::vector<std::string> malformed = {
      "{",
      "[]",
      R"({"model": "nope", "prompt": "x"})",
      R"({"model": "ci-tiny"})",
      R"({"model": "ci-tiny", "prompt": "x", "max_tokens": -1})",
      R"({"model": "ci-tiny", "prompt": "x", "max_tokens": 1000})",
      R"({"model": "ci-tiny", "prompt": [1, 99999]})",
      R"({"model": "ci-tiny", "prompt": "x", "temperature": "warm"})",
      R"({"model": "ci-tiny", "prompt": "x", "n": 3})"};
  std::vector<Result> results(bodies.size());
  std::vector<int> bad_status(malformed.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < bodies.size(); ++i)
    clients.emplace_back([&, i] { results[i] = complete(port, bodies[i], i % 8 == 4); });
  for (size_t i = 0; i < malformed.size(); ++i)
    clients.emplace_back([&, i] {
      httplib::Client cli("127.0.0.1", port);
      const auto res = cli.Post("/v1/completions", malformed[i], "application/json");
      bad_status[i] = res ? res->status : 0;
      if (res) {
        EXPECT_TRUE(json::parse(res->body).contains("error")) << res->body;
      }
    });
  for (std::thread& t : clients) t.join();
  ASSERT_TRUE(server.alive()) << server.log();
  for (size_t i = 0; i < malformed.size(); ++i)
    EXPECT_TRUE(bad_status[i] >= 400 && bad_status[i] < 500)
        << malformed[i] << " -> " << bad_status[i];

  // The same bodies through tessera generate --requests (the cancelled ones left out).
  std::string lines;
  std::vector<size_t> completed;
  for (size_t i = 0; i < bodies.size(); ++i) {
    if (results[i].cancelled) continue;
    EXPECT_EQ(results[i].status, 200) << bodies[i].dump();
    completed.push_back(i);
    lines += bodies[i].dump() + "\n";
  }
  EXPECT_GE(completed.size(), 56u);
  testing::write_file(dir + "/requests.jsonl", lines);
  const testing::CliResult gen =
      testing::run_cli("generate " + model + " --device cpu --requests " + dir +
                       "/requests.jsonl --out " + dir + "/results.jsonl");
  ASSERT_EQ(gen.status, 0) << gen.output;
  std::ifstream in(dir + "/results.jsonl");
  std::string line;
  for (size_t k = 0; std::getline(in, line); ++k) {
    ASSERT_LT(k, completed.size());
    const json want = json::parse(line);
    const Result& got = results[completed[k]];
    EXPECT_EQ(got.text, want["text"].get<std::string>()) << bodies[completed[k]].dump();
    EXPECT_EQ(got.finish_reason, want["finish_reason"].get<std::string>());
  }

  httplib::Client cli("127.0.0.1", port);
  const auto health = cli.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  const auto models = cli.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "ci-tiny");
  const auto chat = cli.Post("/v1/chat/completions", R"({"model": "ci-tiny", "messages": []})",
                             "application/json");
  ASSERT_TRUE(chat);
  EXPECT_EQ(chat->status, 400);
  const auto metrics = cli.Get("/metrics");
  ASSERT_TRUE(metrics);
  const std::string& text = metrics->body;
  for (const char* m :
       {"tessera_http_requests_total{route=\"/v1/completions\",status=\"200\"} 64",
        "tessera_http_requests_total{route=\"/v1/completions\",status=\"400\"}",
        "tessera_http_requests_total{route=\"/v1/completions\",status=\"404\"} 1",
        "tessera_time_to_first_token_seconds_count", "tessera_inter_token_latency_seconds_bucket",
        "tessera_kv_cache_blocks_used 0", "tessera_kv_cache_blocks_free",
        "tessera_requests_running 0", "tessera_requests_waiting 0", "tessera_batch_size",
        "tessera_request_finished_total{reason=\"cancelled\"}", "tessera_prompt_tokens_total",
        "tessera_generation_tokens_total"})
    EXPECT_NE(text.find(m), std::string::npos) << m << "\n" << text;
  EXPECT_EQ(server.terminate(), 0) << server.log();
}

}  // namespace
}  // namespace tessera
