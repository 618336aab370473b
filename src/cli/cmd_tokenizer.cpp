// `tessera tokenizer train|encode|decode`: train a byte-level BPE vocabulary on text files, or try
// a tokenizer on a string. The tokenizer itself is src/data/tokenizer.h; this file declares the
// command lines and prints. Bad arguments are user errors (exit status 2, via main()).
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "cli/command.h"
#include "core/error.h"
#include "data/bpe_trainer.h"
#include "data/pretokenizer.h"
#include "data/text_normalize.h"
#include "data/tokenizer.h"
#include "data/tokenizer_spec.h"

namespace tessera::cli {
namespace {

constexpr const char* kSpecHelp =
    "the tokenizer: gpt2, qwen3 (read from data/raw/, see scripts/fetch-data.sh) or a "
    "tokenizer.json path";

struct TrainArgs {
  BpeTrainOptions opt;
  std::string out, pre = "gpt2";
  std::vector<std::string> files;
};

// Files are read one at a time into pre-token counts: the corpus text is never held whole.
int run_train(TrainArgs& a) {
  a.opt.pre = *parse_pre_tokenizer_name(a.pre);  // checked by the option's validator
  const auto t0 = std::chrono::steady_clock::now();
  PreTokenCounts counts(a.opt);
  size_t num_bytes = 0;
  for (const auto& path : a.files) {
    const NormalizedText norm = load_source_text(path);
    counts.add_text(norm.text);
    num_bytes += norm.text.size();
  }
  const Tokenizer tok = train_bpe(counts, a.opt);
  tok.save_hf_json(a.out);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("trained a %d-token vocabulary on %zu files (%.1f MB) in %.1f s -> %s\nsha256 %s\n",
              tok.vocab_size(), a.files.size(), double(num_bytes) / 1e6, seconds, a.out.c_str(),
              tok.hash().c_str());
  return 0;
}

RunFn setup_train(CLI::App& sub) {
  auto a = std::make_shared<TrainArgs>();
  sub.add_option("--vocab-size", a->opt.vocab_size,
                 "vocabulary size: 256 bytes + merges + the special token <|endoftext|>")
      ->type_name("N")
      ->required()
      ->check(integer_at_least(1));
  sub.add_option("--out", a->out, "where tokenizer.json goes")->type_name("FILE")->required();
  sub.add_option("--pre", a->pre, "pre-tokenizer regex family")
      ->check(CLI::IsMember({"gpt2", "qwen2"}))
      ->capture_default_str();
  sub.add_option("--min-frequency", a->opt.min_frequency,
                 "a pair must occur at least this often to be merged")
      ->type_name("K")
      ->check(integer_at_least(1))
      ->capture_default_str();
  sub.add_option("FILES", a->files,
                 ".txt files (UTF-8 or Latin-1, any line endings) or SOTU .json files")
      ->required();
  return [a] { return run_train(*a); };
}

struct EncodeArgs {
  std::string spec, text;
  bool no_special = false;
};

int run_encode(const EncodeArgs& a) {
  std::string text = a.text;
  if (text == "-") text.assign(std::istreambuf_iterator<char>(std::cin), {});
  const Tokenizer tok = load_tokenizer_spec(a.spec);
  const std::vector<int32_t> ids = tok.encode(text, !a.no_special);
  std::string line;
  for (size_t k = 0; k < ids.size(); ++k) line += (k ? " " : "") + std::to_string(ids[k]);
  std::printf("%s\n", line.c_str());
  return 0;
}

RunFn setup_encode(CLI::App& sub) {
  auto a = std::make_shared<EncodeArgs>();
  sub.add_option("--tokenizer", a->spec, kSpecHelp)->type_name("SPEC")->required();
  sub.add_flag("--no-special", a->no_special,
               "encode special-token spellings such as <|endoftext|> as plain text");
  sub.add_option("TEXT", a->text, "the text to encode, quoted ('-' reads stdin)")->required();
  return [a] { return run_encode(*a); };
}

struct DecodeArgs {
  std::string spec;
  std::vector<std::string> ids;
};

// Ids may come as separate arguments or as one argument separated by spaces or commas.
std::vector<int32_t> parse_ids(const std::vector<std::string>& args) {
  std::vector<int32_t> ids;
  for (const auto& arg : args) {
    std::string cur;
    for (size_t k = 0; k <= arg.size(); ++k) {
      const char c = k < arg.size() ? arg[k] : ' ';
      if (c != ' ' && c != ',') {
        cur.push_back(c);
        continue;
      }
      if (cur.empty()) continue;
      int32_t id = 0;
      if (!CLI::detail::lexical_cast(cur, id))
        TS_USER_ERROR("tessera tokenizer decode: IDS: '{}' is not an integer", cur);
      ids.push_back(id);
      cur.clear();
    }
  }
  if (ids.empty()) TS_USER_ERROR("tessera tokenizer decode: IDS: no ids given");
  return ids;
}

int run_decode(const DecodeArgs& a) {
  const std::vector<int32_t> ids = parse_ids(a.ids);
  const Tokenizer tok = load_tokenizer_spec(a.spec);
  const std::string text = tok.decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

RunFn setup_decode(CLI::App& sub) {
  auto a = std::make_shared<DecodeArgs>();
  sub.add_option("--tokenizer", a->spec, kSpecHelp)->type_name("SPEC")->required();
  sub.add_option("IDS", a->ids, "token ids, as separate arguments or separated by commas")
      ->required();
  return [a] { return run_decode(*a); };
}

RunFn setup_tokenizer(CLI::App& sub) {
  sub.require_subcommand(1);
  const auto add = [&](const char* name, const char* summary, RunFn (*setup)(CLI::App&)) {
    CLI::App* child = sub.add_subcommand(name, summary);
    return std::make_pair(child, setup(*child));
  };
  auto subs = std::make_shared<std::vector<std::pair<CLI::App*, RunFn>>>();
  subs->push_back(add("train", "train a byte-level BPE vocabulary on text files", setup_train));
  subs->push_back(add("encode", "print the token ids of a text", setup_encode));
  subs->push_back(add("decode", "print the text of token ids", setup_decode));
  return [subs] {
    for (const auto& [child, run] : *subs)
      if (child->parsed()) return run();
    TS_BUG("tessera tokenizer: no subcommand parsed");
  };
}

const Command kTokenizer("tokenizer", "train a BPE vocabulary; encode or decode text",
                         setup_tokenizer);

}  // namespace
}  // namespace tessera::cli
