// tokenizer.json and GPT-2 file I/O: save/load round trips (same text, same ids, same hash), the
// structure of the canonical file, tokenizer specs, and user errors that name the file and field.
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_spec.h"
#include "tests/common/errors.h"
#include "tokenizer_test_util.h"

namespace tessera {
namespace {

using nlohmann::json;
using testing::expect_user_error;
using testing::gpt2_tokenizer;
using testing::qwen3_tokenizer;
using testing::read_all;
using testing::ScratchDir;
using testing::source_path;
using testing::write_all;

std::string conformance_text() {
  return read_all(source_path("tests/fixtures/tokenizer/conformance.txt"));
}

TEST(TokenizerJson, Gpt2SurvivesSaveAndLoad) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  const ScratchDir scratch;
  const std::string path = scratch.file("tokenizer.json");
  tok->save_hf_json(path);
  const Tokenizer back = Tokenizer::load_hf_json(path);
  EXPECT_EQ(back.to_hf_json(), tok->to_hf_json());
  EXPECT_EQ(back.hash(), tok->hash());
  EXPECT_EQ(tok->hash(), sha256_hex(tok->to_hf_json()));
  EXPECT_EQ(back.vocab_size(), 50257);
  EXPECT_EQ(back.eot_id(), 50256);
  const std::string text = conformance_text();
  EXPECT_EQ(back.encode(text), tok->encode(text));
}

TEST(TokenizerJson, Qwen3SurvivesSerialization) {
  const Tokenizer* tok = qwen3_tokenizer();
  if (!tok) return;
  const std::string text = tok->to_hf_json();
  const Tokenizer back = Tokenizer::from_hf_json(text, "qwen3 (re-serialized)");
  EXPECT_EQ(back.to_hf_json(), text);
  EXPECT_EQ(back.vocab_size(), tok->vocab_size());
  EXPECT_EQ(back.eot_id(), tok->eot_id());
  const std::string sample = conformance_text();
  EXPECT_EQ(back.encode(sample), tok->encode(sample));
  EXPECT_NE(tok->hash(), gpt2_tokenizer() ? gpt2_tokenizer()->hash() : std::string());
}

TEST(TokenizerJson, CanonicalFileHasTheHuggingFaceShape) {
  const Tokenizer* tok = qwen3_tokenizer();
  if (!tok) return;
  const json j = json::parse(tok->to_hf_json());
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["model"]["vocab"].size(), 151643u);
  EXPECT_EQ(j["model"]["merges"].size(), 151387u);
  EXPECT_EQ(j["model"]["vocab"]["\u0120the"], 279);
  EXPECT_EQ(j["model"]["merges"][0], "\u0120 \u0120");
  EXPECT_EQ(j["normalizer"]["type"], "NFC");
  EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
            std::string(kQwen2PreTokenizerRegex));
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  ASSERT_EQ(j["added_tokens"].size(), 26u);
  EXPECT_EQ(j["added_tokens"][0]["content"], "<|endoftext|>");
  EXPECT_EQ(j["added_tokens"][0]["special"], true);
  EXPECT_EQ(j["added_tokens"][24]["content"], "<think>");
  EXPECT_EQ(j["added_tokens"][24]["special"], false);
}

TEST(TokenizerJson, MergesMayBeStringsOrPairs) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  json j = json::parse(tok->to_hf_json());
  for (auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t space = s.find(' ');
    m = json::array({s.substr(0, space), s.substr(space + 1)});
  }
  const Tokenizer pairs = Tokenizer::from_hf_json(j.dump(), "pairs.json");
  EXPECT_EQ(pairs.to_hf_json(), tok->to_hf_json());
}

TEST(TokenizerJson, SplitFormOfTheGpt2PatternLoads) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  json j = json::parse(tok->to_hf_json());
  j["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": ""}, "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
       "use_regex": false}]})");
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = std::string(kGpt2PreTokenizerRegex);
  const Tokenizer split = Tokenizer::from_hf_json(j.dump(), "split.json");
  const std::string text = conformance_text();
  EXPECT_EQ(split.encode(text), tok->encode(text));
}

TEST(TokenizerJson, UnsupportedFeaturesNameFieldAndFile) {
  const Tokenizer* tok = gpt2_tokenizer();
  if (!tok) return;
  const json base = json::parse(tok->to_hf_json());
  struct Case {
    const char* pointer;
    json value;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"/normalizer", json::parse(R"({"type": "NFKC"})"), {"normalizer.type", "NFKC"}},
      {"/model/type", "WordPiece", {"model.type", "WordPiece"}},
      {"/model/byte_fallback", true, {"model.byte_fallback"}},
      {"/model/unk_token", "<unk>", {"model.unk_token"}},
      {"/model/continuing_subword_prefix", "##", {"model.continuing_subword_prefix"}},
      {"/pre_tokenizer/add_prefix_space", true, {"pre_tokenizer.add_prefix_space"}},
      {"/pre_tokenizer",
       json::parse(R"({"type": "Metaspace"})"),
       {"pre_tokenizer.type", "Metaspace"}},
      {"/decoder", json::parse(R"({"type": "WordPiece"})"), {"decoder.type"}},
      {"/added_tokens/0/lstrip", true, {"added_tokens[0].lstrip"}},
      {"/model/vocab", json::parse(R"({"中": 0})"), {"model.vocab", "byte-level"}},
      {"/model/merges/0", 42, {"model.merges[0]"}},
  };
  for (const auto& c : cases) {
    json j = base;
    j[json::json_pointer(c.pointer)] = c.value;
    std::vector<std::string> needles = c.needles;
    needles.push_back("edited.json");
    expect_user_error([&] { Tokenizer::from_hf_json(j.dump(), "edited.json"); }, needles);
  }
  // A regex other than the two known patterns (here Llama 3's digit groups).
  json j = base;
  j["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated",
       "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})");
  expect_user_error([&] { Tokenizer::from_hf_json(j.dump(), "llama.json"); },
                    {"pre_tokenizer.pretokenizers[0].pattern.Regex", "llama.json"});
}

TEST(TokenizerJson, MissingAndMalformedFilesAreUserErrors) {
  const ScratchDir scratch;
  const std::string dir = scratch.str();
  expect_user_error([&] { Tokenizer::load_hf_json(dir + "/absent.json"); }, {dir + "/absent.json"});
  write_all(dir + "/bad.json", "{\"model\": {\"vocab\": {\"a\": 1,}}");
  expect_user_error([&] { Tokenizer::load_hf_json(dir + "/bad.json"); },
                    {dir + "/bad.json", "malformed JSON"});
  write_all(dir + "/list.json", "[1, 2, 3]");
  expect_user_error([&] { Tokenizer::load_hf_json(dir + "/list.json"); }, {dir + "/list.json"});
  write_all(dir + "/encoder.json", "{\"a\": 0");
  write_all(dir + "/vocab.bpe", "#version: 0.2\na b\n");
  expect_user_error([&] { Tokenizer::load_gpt2(dir + "/encoder.json", dir + "/vocab.bpe"); },
                    {dir + "/encoder.json"});
  if (!testing::have_files({testing::gpt2_encoder_path()})) return;
  expect_user_error(
      [&] { Tokenizer::load_gpt2(testing::gpt2_encoder_path(), dir + "/absent.bpe"); },
      {dir + "/absent.bpe"});
  write_all(dir + "/three.bpe", "#version: 0.2\n\u0120 t\na b c\n");
  expect_user_error([&] { Tokenizer::load_gpt2(testing::gpt2_encoder_path(), dir + "/three.bpe"); },
                    {dir + "/three.bpe", "line 3"});
}

TEST(TokenizerSpecTest, NamesPathsAndMissingData) {
  expect_user_error([] { load_tokenizer_spec("no/such/tokenizer.json"); },
                    {"no/such/tokenizer.json"});
  const ScratchDir scratch;
  const std::string empty = scratch.str();
  ::setenv("TESSERA_DATA_DIR", empty.c_str(), 1);
  expect_user_error([] { load_tokenizer_spec("gpt2"); }, {"fetch-data.sh", "encoder.json"});
  expect_user_error([] { load_tokenizer_spec("qwen3"); }, {"fetch-data.sh", "tokenizer.json"});
  ::setenv("TESSERA_DATA_DIR", (std::string(TESSERA_SOURCE_DIR) + "/data").c_str(), 1);
  if (testing::have_files({testing::gpt2_encoder_path(), testing::gpt2_vocab_path()})) {
    const Tokenizer tok = load_tokenizer_spec("gpt2");
    EXPECT_EQ(tok.eot_id(), 50256);
  }
  ::unsetenv("TESSERA_DATA_DIR");
}

}  // namespace
}  // namespace tessera
