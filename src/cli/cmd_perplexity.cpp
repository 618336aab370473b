// `tessera perplexity MODEL --text FILE [--quant Q] [--group-size N] [--ctx N] [--logits-out F]
// [--prompt TEXT --generate N] [--json FILE]`: a checkpoint's perplexity over a text file on the
// CPU in f32, with its weights as an export of type Q would hold them (export/reference_eval.h);
// optionally its greedy continuation of a prompt. The Tessera side of checking an export against
// another runtime (llama.cpp: tests/export).
#include <fstream>
#include <memory>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "export/reference_eval.h"
#include "io/fs_util.h"

namespace tessera::cli {
namespace {

using exporting::WeightQuant;

struct PerplexityArgs {
  std::string model, text_path, quant = "f32", logits_out, prompt, json_out;
  int group_size = 0, ctx = 0, generate = 0;
};

WeightQuant parse_quant(const std::string& s) {
  for (WeightQuant q : {WeightQuant::f32, WeightQuant::f16, WeightQuant::bf16, WeightQuant::q8_0,
                        WeightQuant::q4_0, WeightQuant::int8, WeightQuant::int4})
    if (s == exporting::weight_quant_name(q)) return q;
  TS_BUG("--quant {} passed the option check", s);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_USER_ERROR("--text {}: cannot read the file", path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

int run_perplexity(const PerplexityArgs& a) {
  const exporting::ExportModel m = exporting::load_export_model(a.model);
  const Tokenizer tok = Tokenizer::from_hf_json(m.tokenizer_json, a.model + " (tokenizer)");
  const std::vector<int32_t> ids = tok.encode(read_text(a.text_path));
  if (ids.size() < 2) TS_USER_ERROR("--text {}: fewer than 2 tokens", a.text_path);
  const WeightQuant quant = parse_quant(a.quant);
  const exporting::ReferenceModel ref(m, quant, a.group_size, a.ctx, a.model);
  std::vector<float> logits;
  const exporting::PerplexityResult r =
      ref.perplexity(ids, a.logits_out.empty() ? nullptr : &logits);
  fmt::print("perplexity {:.6f} over {} tokens ({} text tokens, weights {}, window {})\n",
             r.perplexity(), r.tokens_scored, ids.size(), a.quant, ref.ctx());
  if (!a.logits_out.empty()) {
    exporting::write_npy_f32(a.logits_out, logits, r.tokens_scored, ref.vocab_size());
    fmt::print("logits ({}, {}) written to {}\n", r.tokens_scored, ref.vocab_size(), a.logits_out);
  }
  std::vector<int32_t> prompt_ids, generated;
  if (a.generate > 0) {
    prompt_ids = tok.encode(a.prompt);
    if (prompt_ids.empty()) TS_USER_ERROR("--generate needs a non-empty --prompt");
    if (int(prompt_ids.size()) + a.generate > ref.ctx())
      TS_USER_ERROR("--prompt ({} tokens) + --generate {} exceed the window {}", prompt_ids.size(),
                    a.generate, ref.ctx());
    generated = ref.greedy(prompt_ids, a.generate);
    fmt::print("greedy: {}\n", fmt::join(generated, " "));
  }
  if (!a.json_out.empty()) {
    const nlohmann::json j = {{"perplexity", r.perplexity()},
                              {"nll_sum", r.nll_sum},
                              {"tokens_scored", r.tokens_scored},
                              {"ctx", ref.ctx()},
                              {"quant", a.quant},
                              {"text_ids", ids},
                              {"prompt_ids", prompt_ids},
                              {"generated", generated},
                              {"nll", r.nll},
                              {"top1", r.top1}};
    io::TempPath tmp(a.json_out);
    io::write_file_synced(tmp.path, j.dump() + "\n");
    io::rename_path(tmp.path, a.json_out);
    tmp.committed = true;
  }
  return 0;
}

RunFn setup_perplexity(CLI::App& sub) {
  auto a = std::make_shared<PerplexityArgs>();
  sub.add_option("MODEL", a->model, "a checkpoint step directory, or a run directory (its latest)")
      ->required();
  sub.add_option("--text", a->text_path,
                 "the text file to score (tokenized by the model's "
                 "tokenizer)")
      ->required();
  sub.add_option("--quant", a->quant,
                 "the weights evaluated: f32 (the checkpoint's), f16/bf16/q8_0/q4_0 (exactly "
                 "those of the GGUF export of that type), int8/int4 (block linears quantized "
                 "row-wise in groups of --group-size)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0", "q4_0", "int8", "int4"}));
  sub.add_option("--group-size", a->group_size,
                 "int8/int4 group along the input dimension; default: int8 per output channel, "
                 "int4 32")
      ->check(integer_at_least(1));
  sub.add_option("--ctx", a->ctx,
                 "window length: the text is scored in consecutive windows of this many tokens; "
                 "default: the model's max_seq_len")
      ->check(integer_at_least(2));
  sub.add_option("--logits-out", a->logits_out,
                 "write the logits of every scored position as .npy, f32 (positions, vocab)");
  sub.add_option("--prompt", a->prompt, "text whose greedy continuation --generate prints");
  sub.add_option("--generate", a->generate,
                 "greedy tokens to generate after --prompt (token ids printed)")
      ->check(integer_at_least(1));
  sub.add_option("--json", a->json_out,
                 "also write the results as JSON: perplexity, nll_sum, tokens_scored, ctx, "
                 "quant, text_ids, prompt_ids, generated, and per scored position nll and top1 "
                 "(the argmax)");
  return [a] { return run_perplexity(*a); };
}

const Command kPerplexity("perplexity",
                          "score a text with a checkpoint's weights as an export would hold them",
                          setup_perplexity);

}  // namespace
}  // namespace tessera::cli
