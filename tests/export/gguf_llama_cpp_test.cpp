// GGUF export checked by llama.cpp itself (node-llama-cpp 3.21.1's prebuilt CPU build, fetched by
// scripts/fetch-llama-cpp.sh; without Node.js >= 20 or the fetched package every case SKIPS):
//  * ci-tiny (gpt2) trained briefly, exported as F16, Q8_0 and Q4_0: each file loads with no
//    warning in llama.cpp's log; llama.cpp tokenizes the prompt and the held-out text into
//    Tessera's ids; greedy 32 tokens equal Tessera's for F16; llama.cpp's perplexity on held-out
//    text (a State of the Union address: not in the training corpus) is within 1% of
//    `tessera perplexity --quant <type>` (the same dequantized weights) for F16 and Q8_0 and
//    within 2% for Q4_0 (llama.cpp rounds activations to 8 bits in quantized matmuls);
//  * a llama-family model (GQA, untied head) as `llama` and one with QK-norm, a tied head and
//    head_dim != hidden / heads as `qwen3`, F16: greedy and perplexity match, which is what
//    proves llama's Q/K row permutation and both architectures' names and hyperparameters.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "export/export_model.h"
#include "export/gguf_writer.h"
#include "tests/common/cli.h"

namespace tessera {
namespace {

using nlohmann::json;
using testing::run_cli;

constexpr const char* kPrompt = "Once upon a time, the old man said that";
constexpr int kGenerate = 32;

std::string heldout_text() {
  return std::string(TESSERA_SOURCE_DIR) + "/data/raw/sotu/data/1790_george_washington_n.txt";
}

std::string llama_cpp_dir() {
  const char* env = std::getenv("TESSERA_LLAMA_CPP_DIR");
  return env && *env ? env : std::string(TESSERA_SOURCE_DIR) + "/data/llama-cpp";
}

std::string shell_output(const std::string& cmd, int* status) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = pclose(p);
  *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// Why llama.cpp cannot run here, or "" when it can.
std::string llama_cpp_missing() {
  int status = 0;
  const std::string v = shell_output("node -p 'process.versions.node' 2>/dev/null", &status);
  if (status != 0 || v.empty()) return "node is not installed";
  if (std::atoi(v.c_str()) < 20) return "node " + v + " is older than node-llama-cpp's >= 20";
  const std::string entry = llama_cpp_dir() + "/node_modules/node-llama-cpp/dist/index.js";
  if (!std::filesystem::exists(entry))
    return entry + " is absent (run scripts/fetch-llama-cpp.sh)";
  return "";
}

#define SKIP_WITHOUT_LLAMA_CPP()                                                  \
  do {                                                                            \
    const std::string why = llama_cpp_missing();                                  \
    if (!why.empty()) GTEST_SKIP() << "llama.cpp unavailable: " << why;           \
    ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset()))                   \
        << "run scripts/prepare-data.sh";                                         \
    ASSERT_TRUE(std::filesystem::exists(heldout_text())) << "run scripts/fetch-data.sh"; \
  } while (0)

// A short ci-tiny run (seq 64, 8 sequences a step, a high learning rate so that the model's
// predictions are peaked enough for greedy decoding to be robust to F16 rounding).
std::string train(const std::string& dir, int steps, const std::string& extra) {
  const auto r = run_cli(fmt::format(
      "train recipes/ci-tiny.yaml --set train.steps={} --set data.micro_batch=8 "
      "--set data.seq_len=64 --set train.eval_every=0 --set train.sample_tokens=0 "
      "--set optim.warmup_steps=3 --set optim.lr=5e-3 --set logging.every=10 "
      "--set checkpoint.every=0 --set train.out_dir={}{}",
      steps, dir, extra));
  EXPECT_EQ(r.status, 0) << r.output;
  return dir;
}

json tessera_side(const std::string& ckpt, const std::string& quant, const std::string& out) {
  const auto r = run_cli(fmt::format(
      "perplexity {} --text {} --quant {} --ctx 64 --prompt '{}' --generate {} --json {}", ckpt,
      heldout_text(), quant, kPrompt, kGenerate, out));
  EXPECT_EQ(r.status, 0) << r.output;
  std::ifstream in(out);
  return json::parse(in);
}

json llama_cpp_side(const std::string& gguf, const json& tessera, const std::string& dir) {
  std::ifstream text_in(heldout_text());
  const std::string text((std::istreambuf_iterator<char>(text_in)), {});
  const json input = {{"model", gguf},
                      {"threads", 2},
                      {"tokenize", {kPrompt, text}},
                      {"prompt_ids", tessera["prompt_ids"]},
                      {"generate", kGenerate},
                      {"text_ids", tessera["text_ids"]},
                      {"ctx", 64}};
  const std::string input_path = dir + "/llama-input.json";
  std::ofstream(input_path) << input.dump();
  int status = 0;
  const std::string out = shell_output(
      fmt::format("node '{}/tests/export/llama_cpp_check.mjs' '{}' '{}' 2>&1", TESSERA_SOURCE_DIR,
                  llama_cpp_dir(), input_path),
      &status);
  EXPECT_EQ(status, 0) << out;
  const size_t line = out.rfind("\n{");
  return json::parse(line == std::string::npos ? out : out.substr(line + 1));
}

double rel(double a, double b) { return std::abs(a - b) / std::abs(b); }

// Exports `ckpt` as `type`, runs both sides and checks loading, tokenization and (optionally)
// greedy equality; returns {Tessera's, llama.cpp's} perplexity.
std::pair<double, double> compare(const std::string& ckpt, exporting::GgufType type,
                                  bool greedy_must_match) {
  const exporting::ExportModel m = exporting::load_export_model(ckpt);
  const std::string name = exporting::gguf_type_name(type);
  const std::string gguf = ckpt + "/model-" + name + ".gguf";
  exporting::write_gguf(m, type, gguf);
  const json t = tessera_side(ckpt, name, ckpt + "/tessera-" + name + ".json");
  const json l = llama_cpp_side(gguf, t, ckpt);
  SCOPED_TRACE(name);
  EXPECT_TRUE(l["load_warnings"].empty()) << l["load_warnings"].dump(1);
  EXPECT_EQ(l["tokenized"][0], t["prompt_ids"]) << "llama.cpp tokenizes the prompt differently";
  EXPECT_EQ(l["tokenized"][1], t["text_ids"]) << "llama.cpp tokenizes the text differently";
  if (greedy_must_match) {
    EXPECT_EQ(l["generated"], t["generated"]);
  }
  EXPECT_EQ(l["zero_probability"].get<int>(), 0);
  EXPECT_EQ(l["tokens_scored"].get<int64_t>(), t["tokens_scored"].get<int64_t>());
  const double pt = t["perplexity"].get<double>(), pl = l["perplexity"].get<double>();
  std::printf("[gguf %s] %s: Tessera perplexity %.4f, llama.cpp %.4f (%+.3f%%) over %lld tokens; "
              "greedy %s\n",
              m.recipe.model.family == ModelFamily::gpt2 ? "gpt2" : "llama-family", name.c_str(),
              pt, pl, 100.0 * (pl - pt) / pt, (long long)t["tokens_scored"].get<int64_t>(),
              l["generated"] == t["generated"] ? "equal" : "differs");
  return {pt, pl};
}

TEST(GgufLlamaCpp, Gpt2F16Q8Q4LoadGenerateAndScore) {
  SKIP_WITHOUT_LLAMA_CPP();
  const std::string ckpt = train(testing::fresh_dir("gguf-gpt2"), 40, "");
  const auto [f16_t, f16_l] = compare(ckpt, exporting::GgufType::f16, true);
  EXPECT_LE(rel(f16_l, f16_t), 0.01);
  const auto [q8_t, q8_l] = compare(ckpt, exporting::GgufType::q8_0, false);
  EXPECT_LE(rel(q8_l, q8_t), 0.01);
  const auto [q4_t, q4_l] = compare(ckpt, exporting::GgufType::q4_0, false);
  EXPECT_LE(rel(q4_l, q4_t), 0.02);
  // The quantized files are not the f16 one: their weights, and so their perplexities, differ.
  EXPECT_NE(q4_t, f16_t);
}

TEST(GgufLlamaCpp, LlamaArchitectureF16) {
  SKIP_WITHOUT_LLAMA_CPP();
  const std::string ckpt =
      train(testing::fresh_dir("gguf-llama"), 30,
            " --set model.family=llama --set model.ffn_hidden=256 --set model.num_kv_heads=2");
  const auto [t, l] = compare(ckpt, exporting::GgufType::f16, true);
  EXPECT_LE(rel(l, t), 0.01);
}

TEST(GgufLlamaCpp, Qwen3ArchitectureF16) {
  SKIP_WITHOUT_LLAMA_CPP();
  const std::string ckpt = train(
      testing::fresh_dir("gguf-qwen3"), 30,
      " --set model.family=llama --set model.ffn_hidden=256 --set model.num_kv_heads=2"
      " --set model.qk_norm=true --set model.head_dim=48 --set model.tied_embeddings=true");
  const auto [t, l] = compare(ckpt, exporting::GgufType::f16, true);
  EXPECT_LE(rel(l, t), 0.01);
}

}  // namespace
}  // namespace tessera
