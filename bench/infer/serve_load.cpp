// A load generator for `tessera serve` (any OpenAI-compatible /v1/completions server): N requests
// with ShareGPT-like lengths (log-normal prompt and output lengths, capped by the context), sent
// as token-id prompts at a Poisson rate (or all at once), streamed; measures output tokens/s,
// requests/s, time to first token, inter-token latency and end-to-end latency (p50/p99).
// bench/gpu_infer.sh runs it at increasing rates; it runs against a CPU server as well.
#include <httplib.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "serve/sse_reader.h"

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct Args {
  std::string host = "127.0.0.1", model;
  int port = 8000, requests = 1000, max_context = 2048, vocab = 4096;
  double rate = 0.0;  // requests/s; 0: all at once
  double prompt_median = 220, output_median = 180, sigma = 0.9;
  uint64_t seed = 1;
};

struct Sample {
  bool ok = false;
  int64_t output_tokens = 0;
  double ttft = 0, e2e = 0;
  std::vector<double> itl;  // seconds between consecutive streamed chunks
};

Sample one(const Args& a, const json& body) {
  httplib::Client cli(a.host, a.port);
  cli.set_read_timeout(3600, 0);
  Sample s;
  const auto t0 = Clock::now();
  auto last = t0;
  bool first = true;
  tessera::serve::SseReader sse;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    for (const std::string& payload : sse.feed(data, n)) {
      if (payload == "[DONE]") continue;
      const json j = json::parse(payload, nullptr, false);
      if (j.is_discarded() || j.contains("error")) return false;
      if (j.contains("usage") && j["usage"].is_object())
        s.output_tokens = j["usage"]["completion_tokens"].get<int64_t>();
      if (!j["choices"].empty() && !j["choices"][0]["text"].get<std::string>().empty()) {
        const auto now = Clock::now();
        if (first)
          s.ttft = std::chrono::duration<double>(now - t0).count();
        else
          s.itl.push_back(std::chrono::duration<double>(now - last).count());
        first = false;
        last = now;
      }
    }
    return true;
  };
  const auto res = cli.send(req);
  s.e2e = std::chrono::duration<double>(Clock::now() - t0).count();
  s.ok = res && res->status == 200 && s.output_tokens > 0;
  return s;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size())))];
}

int run(const Args& a) {
  std::mt19937_64 gen(a.seed);
  std::lognormal_distribution<double> prompt_len(std::log(a.prompt_median), a.sigma);
  std::lognormal_distribution<double> output_len(std::log(a.output_median), a.sigma);
  std::uniform_int_distribution<int> token(0, a.vocab - 1);
  std::exponential_distribution<double> gap(a.rate > 0 ? a.rate : 1.0);
  std::vector<json> bodies;
  std::vector<double> arrivals;
  double t = 0.0;
  int64_t prompt_total = 0;
  for (int i = 0; i < a.requests; ++i) {
    int p = std::clamp(int(prompt_len(gen)), 4, a.max_context / 2);
    int o = std::clamp(int(output_len(gen)), 1, a.max_context - p);
    std::vector<int> ids(static_cast<size_t>(p));
    for (int& x : ids) x = token(gen);
    prompt_total += p;
    bodies.push_back({{"model", a.model},
                      {"prompt", ids},
                      {"max_tokens", o},
                      {"temperature", 0.0},
                      {"stream", true},
                      {"stream_options", {{"include_usage", true}}}});
    arrivals.push_back(t);
    if (a.rate > 0) t += gap(gen);
  }
  // The serving engine stops at end-of-text; --ignore-eos on the server keeps lengths as drawn.
  std::vector<Sample> samples(bodies.size());
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  for (size_t i = 0; i < bodies.size(); ++i) {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(arrivals[i])));
    threads.emplace_back([&, i] { samples[i] = one(a, bodies[i]); });
  }
  for (std::thread& th : threads) th.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> ttft, itl, e2e;
  int64_t out_tokens = 0, ok = 0;
  for (const Sample& s : samples) {
    if (!s.ok) continue;
    ++ok;
    out_tokens += s.output_tokens;
    ttft.push_back(s.ttft);
    e2e.push_back(s.e2e);
    itl.insert(itl.end(), s.itl.begin(), s.itl.end());
  }
  fmt::print(
      "serve_load: {} requests ({} ok), rate {}, {} prompt tokens, {} output tokens in "
      "{:.2f} s\n",
      a.requests, ok, a.rate > 0 ? fmt::format("{:.2f}/s", a.rate) : "all at once", prompt_total,
      out_tokens, wall);
  fmt::print(
      "  output {:.1f} tokens/s, {:.2f} requests/s; TTFT p50 {:.1f} ms p99 {:.1f} ms; "
      "ITL p50 {:.2f} ms p99 {:.2f} ms; latency p50 {:.2f} s p99 {:.2f} s\n",
      out_tokens / wall, ok / wall, percentile(ttft, 0.5) * 1e3, percentile(ttft, 0.99) * 1e3,
      percentile(itl, 0.5) * 1e3, percentile(itl, 0.99) * 1e3, percentile(e2e, 0.5),
      percentile(e2e, 0.99));
  fmt::print(
      "RESULT rate={} ok={} output_tokens_per_s={:.2f} ttft_p50_ms={:.2f} "
      "ttft_p99_ms={:.2f} itl_p50_ms={:.3f} itl_p99_ms={:.3f}\n",
      a.rate, ok, out_tokens / wall, percentile(ttft, 0.5) * 1e3, percentile(ttft, 0.99) * 1e3,
      percentile(itl, 0.5) * 1e3, percentile(itl, 0.99) * 1e3);
  return ok == a.requests ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app("load generator for an OpenAI-compatible /v1/completions server");
  app.add_option("--host", a.host)->capture_default_str();
  app.add_option("--port", a.port)->capture_default_str();
  app.add_option("--model", a.model, "the served model name")->required();
  app.add_option("--requests", a.requests)->capture_default_str();
  app.add_option("--rate", a.rate, "Poisson arrivals per second; 0: all at once")
      ->capture_default_str();
  app.add_option("--max-context", a.max_context, "prompt + output at most")->capture_default_str();
  app.add_option("--vocab", a.vocab, "token ids are drawn below this")->capture_default_str();
  app.add_option("--prompt-median", a.prompt_median, "log-normal prompt length median")
      ->capture_default_str();
  app.add_option("--output-median", a.output_median, "log-normal output length median")
      ->capture_default_str();
  app.add_option("--sigma", a.sigma, "log-normal sigma of both lengths")->capture_default_str();
  app.add_option("--seed", a.seed)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return run(a);
}
