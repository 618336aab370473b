// `tessera generate MODEL --prompt TEXT|- [sampling options]`: the inference engine on one prompt
// (or --n copies with seeds seed, seed + 1, ...), streaming the text to stdout as it is generated
// and printing the token rate to stderr at the end. `--requests FILE.jsonl`: a batch of
// OpenAI completion request bodies, one per line (what POST /v1/completions takes; "model" is not
// looked at), all run together; one JSON result per line, in input order. MODEL is a Tessera
// export file (INT8/INT4/BF16/F16/F32) or a training run / checkpoint directory; CPU or CUDA.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "cli/engine_options.h"
#include "core/error.h"
#include "infer/engine.h"
#include "io/fs_util.h"
#include "serve/openai_api.h"

namespace tessera::cli {
namespace {

struct GenerateArgs {
  std::string model, prompt, requests, out;
  int n = 1;
  EngineArgs engine;
  SamplingArgs sampling;
};

// --requests: every line's request parsed first (a bad line is a user error naming it), then all
// run as one batch.
int run_requests(const GenerateArgs& a) {
  std::ifstream in(a.requests);
  if (!in) TS_USER_ERROR("--requests {}: cannot read the file", a.requests);
  const SamplingParams defaults = sampling_params(a.sampling);  // checked before the model loads
  Engine engine(load_engine_model(a.engine, a.model), engine_options(a.engine));
  serve::ServedModel served;
  served.name = a.model;
  served.tokenizer = &engine.tokenizer();
  served.vocab_size = engine.model().vocab_size();
  served.max_context = engine.max_context();
  served.defaults = defaults;
  served.check_model = false;
  std::vector<serve::CompletionRequest> reqs;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      reqs.push_back(serve::parse_completion_request(line, served));
    } catch (const serve::ApiError& e) {
      TS_USER_ERROR("--requests {}: line {}: {}", a.requests, n, e.what());
    }
  }
  std::map<RequestId, size_t> index;
  for (size_t i = 0; i < reqs.size(); ++i)
    index[engine.add_request(reqs[i].prompt_ids, reqs[i].params)] = i;
  std::vector<std::string> texts(reqs.size());
  std::vector<int64_t> generated(reqs.size(), 0);
  std::vector<FinishReason> reasons(reqs.size(), FinishReason::none);
  while (engine.has_unfinished())
    for (const EngineEvent& e : engine.step()) {
      const size_t i = index.at(e.id);
      texts[i] += e.text;
      generated[i] += e.token >= 0 ? 1 : 0;
      if (e.finished) reasons[i] = e.reason;
    }
  std::string out;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const char* reason = serve::finish_reason_json(reasons[i]);
    out += nlohmann::json({{"index", i},
                           {"text", texts[i]},
                           {"finish_reason", reason ? reason : finish_reason_name(reasons[i])},
                           {"prompt_tokens", reqs[i].prompt_ids.size()},
                           {"completion_tokens", generated[i]}})
               .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
           "\n";
  }
  if (a.out.empty()) {
    fmt::print("{}", out);
  } else {
    io::TempPath tmp(a.out);
    io::write_file_synced(tmp.path, out);
    io::rename_path(tmp.path, a.out);
    tmp.committed = true;
  }
  return 0;
}

int run_generate(const GenerateArgs& a) {
  if (!a.requests.empty()) return run_requests(a);
  std::string prompt = a.prompt;
  if (prompt == "-")
    prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  if (prompt.empty()) TS_USER_ERROR("--prompt: empty (give text, or - to read stdin)");
  const SamplingParams base = sampling_params(a.sampling);  // checked before the model loads
  const auto t_load = std::chrono::steady_clock::now();
  Engine engine(load_engine_model(a.engine, a.model), engine_options(a.engine));
  const std::vector<int32_t> ids = engine.tokenizer().encode(prompt);
  std::map<RequestId, int> index;
  for (int i = 0; i < a.n; ++i) {
    SamplingParams p = base;
    p.seed = base.seed + uint64_t(i);
    index[engine.add_request(ids, p)] = i;
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point first{};
  int64_t generated = 0;
  std::vector<std::string> texts(size_t(a.n));
  std::map<int, FinishReason> reasons;
  while (engine.has_unfinished()) {
    for (const EngineEvent& e : engine.step()) {
      if (e.token >= 0) ++generated;
      if (e.token >= 0 && first == std::chrono::steady_clock::time_point{})
        first = std::chrono::steady_clock::now();
      const int i = index.at(e.id);
      if (a.n == 1) {
        std::fwrite(e.text.data(), 1, e.text.size(), stdout);
        std::fflush(stdout);
      } else {
        texts[size_t(i)] += e.text;
      }
      if (e.finished) reasons[i] = e.reason;
      if (e.finished && e.reason == FinishReason::error)
        TS_USER_ERROR("request {}: {}", i, e.error);
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  if (a.n == 1) {
    fmt::print("\n");
  } else {
    for (int i = 0; i < a.n; ++i)
      fmt::print("--- completion {} (seed {}, {})\n{}\n", i, base.seed + uint64_t(i),
                 finish_reason_name(reasons[i]), texts[size_t(i)]);
  }
  const double total = std::chrono::duration<double>(t1 - t0).count();
  const double ttft = std::chrono::duration<double>(first - t0).count();
  const double decode = total - ttft;
  fmt::print(stderr,
             "generate: {} prompt tokens, {} generated in {:.3f} s ({:.1f} tokens/s; first token "
             "after {:.3f} s, then {:.1f} tokens/s), weights {} on {}, load {:.2f} s\n",
             ids.size(), generated, total, total > 0 ? double(generated) / total : 0.0, ttft,
             decode > 0 ? double(generated - a.n) / decode : 0.0, engine.model().weight_format(),
             device_name(engine.model().device()),
             std::chrono::duration<double>(t0 - t_load).count());
  return 0;
}

RunFn setup_generate(CLI::App& sub) {
  auto a = std::make_shared<GenerateArgs>();
  sub.add_option("MODEL", a->model,
                 "a Tessera export (tessera export --format tessera) or a training run / "
                 "checkpoint directory")
      ->required();
  auto* prompt = sub.add_option("--prompt", a->prompt, "the prompt text; - reads it from stdin");
  auto* requests = sub.add_option(
      "--requests", a->requests,
      "a JSONL file of OpenAI completion request bodies (prompt, max_tokens, temperature, seed, "
      "stop, ...), run as one batch; one JSON result per line");
  prompt->excludes(requests);
  sub.add_option("--out", a->out, "with --requests: write the results here (else stdout)");
  sub.add_option("--n", a->n, "completions of the prompt, batched (seeds seed, seed + 1, ...)")
      ->capture_default_str()
      ->check(integer_at_least(1));
  add_engine_options(sub, a->engine);
  add_sampling_options(sub, a->sampling);
  return [a] {
    if (a->prompt.empty() && a->requests.empty())
      TS_USER_ERROR("generate: give --prompt TEXT (or -) or --requests FILE");
    return run_generate(*a);
  };
}

const Command kGenerate("generate", "generate text from a model with the inference engine",
                        setup_generate);

}  // namespace
}  // namespace tessera::cli
