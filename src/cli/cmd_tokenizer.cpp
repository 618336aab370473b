// `tessera tokenizer train|encode|decode`: train a byte-level BPE vocabulary on text files, or try
// a tokenizer on a string. The tokenizer itself is src/data/tokenizer.h; this file parses
// arguments and prints. Bad arguments are user errors (exit status 2, via main()).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
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

constexpr const char* kUsage =
    "usage: tessera tokenizer <subcommand> ...\n"
    "  train --vocab-size N --out tokenizer.json [--pre gpt2|qwen2] [--min-frequency K] FILES...\n"
    "      train a byte-level BPE vocabulary of N tokens (256 bytes + merges + <|endoftext|>)\n"
    "      on .txt files (UTF-8 or Latin-1, any line endings) or SOTU .json files\n"
    "  encode --tokenizer SPEC [--no-special] TEXT     print the ids of TEXT ('-' reads stdin)\n"
    "  decode --tokenizer SPEC IDS...                  print the text of the ids\n"
    "SPEC: gpt2, qwen3 (read from data/raw/, see scripts/fetch-data.sh) or a tokenizer.json path\n";

// Flags of the form --name VALUE, in any order, with the positional arguments left over.
struct Args {
  std::vector<std::pair<std::string, std::string>> flags;
  std::vector<std::string> positional;
  std::vector<std::string> switches;
};

Args parse(const std::vector<std::string>& args, size_t first,
           const std::vector<std::string>& value_flags,
           const std::vector<std::string>& switch_flags, const char* sub) {
  Args out;
  for (size_t i = first; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool is_value = std::find(value_flags.begin(), value_flags.end(), a) != value_flags.end();
    const bool is_switch =
        std::find(switch_flags.begin(), switch_flags.end(), a) != switch_flags.end();
    if (is_value) {
      if (i + 1 >= args.size()) TS_USER_ERROR("tessera tokenizer {}: {} needs a value", sub, a);
      out.flags.emplace_back(a, args[++i]);
    } else if (is_switch) {
      out.switches.push_back(a);
    } else if (a.size() > 1 && a[0] == '-' && !(a[1] >= '0' && a[1] <= '9')) {
      TS_USER_ERROR("tessera tokenizer {}: unknown option '{}'\n{}", sub, a, kUsage);
    } else {
      out.positional.push_back(a);
    }
  }
  return out;
}

std::string flag(const Args& a, const std::string& name, const char* sub, bool required,
                 const std::string& fallback = "") {
  std::string value;
  int seen = 0;
  for (const auto& [k, v] : a.flags)
    if (k == name) value = v, ++seen;
  if (seen > 1) TS_USER_ERROR("tessera tokenizer {}: {} given {} times", sub, name, seen);
  if (seen == 0 && required)
    TS_USER_ERROR("tessera tokenizer {}: {} is required\n{}", sub, name, kUsage);
  return seen ? value : fallback;
}

bool has_switch(const Args& a, const std::string& name) {
  return std::find(a.switches.begin(), a.switches.end(), name) != a.switches.end();
}

int parse_int(const std::string& text, const std::string& what, const char* sub) {
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty())
    TS_USER_ERROR("tessera tokenizer {}: {} '{}' is not an integer", sub, what, text);
  return value;
}

int run_train(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"--vocab-size", "--out", "--pre", "--min-frequency"}, {}, "train");
  BpeTrainOptions opt;
  opt.vocab_size = parse_int(flag(a, "--vocab-size", "train", true), "--vocab-size", "train");
  const std::string out = flag(a, "--out", "train", true);
  const std::string pre = flag(a, "--pre", "train", false, "gpt2");
  const auto parsed_pre = parse_pre_tokenizer_name(pre);
  if (!parsed_pre) TS_USER_ERROR("tessera tokenizer train: --pre '{}' is not gpt2 or qwen2", pre);
  opt.pre = *parsed_pre;
  opt.min_frequency =
      parse_int(flag(a, "--min-frequency", "train", false, "2"), "--min-frequency", "train");
  if (a.positional.empty()) TS_USER_ERROR("tessera tokenizer train: no input files\n{}", kUsage);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> texts;
  size_t num_bytes = 0;
  for (const auto& path : a.positional) {
    texts.push_back(load_source_text(path).text);
    num_bytes += texts.back().size();
  }
  const Tokenizer tok = train_bpe(texts, opt);
  tok.save_hf_json(out);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("trained a %d-token vocabulary on %zu files (%.1f MB) in %.1f s -> %s\nsha256 %s\n",
              tok.vocab_size(), texts.size(), double(num_bytes) / 1e6, seconds, out.c_str(),
              tok.hash().c_str());
  return 0;
}

int run_encode(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"--tokenizer"}, {"--no-special"}, "encode");
  const std::string spec = flag(a, "--tokenizer", "encode", true);
  if (a.positional.size() != 1)
    TS_USER_ERROR("tessera tokenizer encode: give exactly one TEXT argument (got {}); quote it\n{}",
                  a.positional.size(), kUsage);
  std::string text = a.positional[0];
  if (text == "-") text.assign(std::istreambuf_iterator<char>(std::cin), {});
  const Tokenizer tok = load_tokenizer_spec(spec);
  const std::vector<int32_t> ids = tok.encode(text, !has_switch(a, "--no-special"));
  std::string line;
  for (size_t k = 0; k < ids.size(); ++k) {
    if (k) line += ' ';
    line += std::to_string(ids[k]);
  }
  std::printf("%s\n", line.c_str());
  return 0;
}

int run_decode(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"--tokenizer"}, {}, "decode");
  const std::string spec = flag(a, "--tokenizer", "decode", true);
  // Ids may come as separate arguments or as one argument separated by spaces or commas.
  std::vector<int32_t> ids;
  for (const auto& arg : a.positional) {
    std::string cur;
    for (size_t k = 0; k <= arg.size(); ++k) {
      const char c = k < arg.size() ? arg[k] : ' ';
      if (c == ' ' || c == ',') {
        if (!cur.empty()) ids.push_back(parse_int(cur, "id", "decode"));
        cur.clear();
      } else {
        cur.push_back(c);
      }
    }
  }
  if (ids.empty()) TS_USER_ERROR("tessera tokenizer decode: no ids given\n{}", kUsage);
  const Tokenizer tok = load_tokenizer_spec(spec);
  const std::string text = tok.decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

int run_tokenizer(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string& sub = args[0];
  if (sub == "-h" || sub == "--help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  for (const auto& arg : args)
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  if (sub == "train") return run_train(args);
  if (sub == "encode") return run_encode(args);
  if (sub == "decode") return run_decode(args);
  TS_USER_ERROR("tessera tokenizer: unknown subcommand '{}'\n{}", sub, kUsage);
}

const Command kTokenizerCommand("tokenizer", "train a BPE vocabulary; encode or decode text",
                                run_tokenizer);

}  // namespace

}  // namespace tessera::cli
