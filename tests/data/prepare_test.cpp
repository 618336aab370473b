// Corpus preparation: document chunking, the val assignment, input listing, and
// one small end-to-end run (a tiny trained BPE on synthetic files) whose documents decode back to
// exactly the chunks the rules predict.
#include "data/prepare.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "data/dataset.h"
#include "data/text_normalize.h"
#include "data/tokenizer.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::ScratchDir;
using testing::write_all;

std::string paragraphs(int num, uint32_t seed) {
  std::string s;
  for (int p = 0; p < num; ++p) {
    const int words = 5 + static_cast<int>((seed + 7u * p) % 40);
    for (int w = 0; w < words; ++w) s += (w % 9 == 8 ? "line\n" : "word ");
    s += p % 5 == 4 ? "\n\n\n" : "\n\n";
  }
  return s;
}

bool is_paragraph_end(std::string_view t, int64_t p) {
  return p >= 2 && t[p - 1] == '\n' && t[p - 2] == '\n' && (p == (int64_t)t.size() || t[p] != '\n');
}

void expect_contiguous(const std::vector<Chunk>& chunks, int64_t n) {
  int64_t pos = 0;
  for (const Chunk& c : chunks) {
    EXPECT_EQ(c.begin, pos);
    EXPECT_GT(c.end, c.begin);
    pos = c.end;
  }
  EXPECT_EQ(pos, n);
}

TEST(Prepare, ChunksEndAtTheFirstParagraphBoundaryPastTarget) {
  const std::string text = paragraphs(200, 3);
  const int64_t dc = 300;
  const auto chunks = chunk_text(text, dc);
  expect_contiguous(chunks, static_cast<int64_t>(text.size()));
  ASSERT_GT(chunks.size(), 10u);
  for (size_t i = 0; i + 1 < chunks.size(); ++i) {
    const Chunk& c = chunks[i];
    EXPECT_GE(c.end - c.begin, dc);
    EXPECT_LE(c.end - c.begin, 2 * dc);
    EXPECT_TRUE(is_paragraph_end(text, c.end)) << "chunk " << i;
    for (int64_t p = c.begin + dc; p < c.end; ++p) EXPECT_FALSE(is_paragraph_end(text, p));
  }
}

TEST(Prepare, ChunksFallBackToSpacesAndCharacterBoundaries) {
  std::string words;
  for (int i = 0; i < 2000; ++i) words += "speech ";
  const auto by_space = chunk_text(words, 100);
  expect_contiguous(by_space, static_cast<int64_t>(words.size()));
  for (size_t i = 0; i + 1 < by_space.size(); ++i) {
    EXPECT_EQ(words[by_space[i].end - 1], ' ');
    EXPECT_GE(by_space[i].end - by_space[i].begin, 100);
  }
  std::string accents;
  for (int i = 0; i < 1000; ++i) accents += "\xC3\xA9";  // no whitespace at all
  const auto hard = chunk_text(accents, 101);
  expect_contiguous(hard, static_cast<int64_t>(accents.size()));
  EXPECT_GT(hard.size(), 5u);
  for (const Chunk& c : hard) {
    EXPECT_EQ(first_invalid_utf8(std::string_view(accents).substr(c.begin, c.end - c.begin)), -1);
  }
  // A short tail joins the chunk before it; empty text has no chunks.
  const std::string tail = std::string(100, 'a') + "\n\n" + std::string(10, 'b');
  EXPECT_EQ(chunk_text(tail, 100).size(), 1u);
  EXPECT_TRUE(chunk_text("", 100).empty());
}

TEST(Prepare, ValAssignmentIsDeterministicAndProportional) {
  int num_val = 0;
  for (int64_t i = 0; i < 20000; ++i) num_val += chunk_is_val("book.txt", i, 0.05);
  EXPECT_NEAR(num_val / 20000.0, 0.05, 0.006);
  int num_same = 0;
  for (int64_t i = 0; i < 2000; ++i) {
    EXPECT_EQ(chunk_is_val("book.txt", i, 0.3), chunk_is_val("book.txt", i, 0.3));
    EXPECT_FALSE(chunk_is_val("book.txt", i, 0.0));
    num_same += chunk_is_val("book.txt", i, 0.3) == chunk_is_val("other.txt", i, 0.3);
  }
  EXPECT_LT(num_same, 1800) << "two files should not share one val pattern";
}

TEST(Prepare, ListsSourcesSortedSkippingJsonTwins) {
  ScratchDir dir;
  std::filesystem::create_directories(dir.path() / "a");
  std::filesystem::create_directories(dir.path() / "b");
  std::filesystem::create_directories(dir.path() / "empty");
  for (const char* f : {"a/z.txt", "a/m.json", "a/z.json", "a/README", "a/notes.md", "b/x.txt"}) {
    write_all(dir.file(f), "x");
  }
  const auto files = list_source_files({dir.file("a"), dir.file("b/x.txt")});
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(std::filesystem::path(files[0]).filename(), "m.json");
  EXPECT_EQ(std::filesystem::path(files[1]).filename(), "z.txt");
  EXPECT_EQ(std::filesystem::path(files[2]).filename(), "x.txt");
  write_all(dir.file("b/z.txt"), "y");
  expect_user_error(
      [&] {
        list_source_files({dir.file("a"), dir.file("b")});
      },
      {"'z.txt'", "unique"});
  expect_user_error([&] { list_source_files({dir.file("nope")}); }, {"nope", "does not exist"});
  expect_user_error([&] { list_source_files({dir.file("empty")}); }, {"empty", "no .txt"});
}

TEST(Prepare, EndToEndWithATrainedTokenizer) {
  ScratchDir dir;
  std::filesystem::create_directories(dir.path() / "corpus");
  std::string latin1 = paragraphs(30, 5);
  for (size_t i = 0; i < latin1.size(); i += 97) latin1[i] = '\xE6';  // sprinkle 'æ' (Latin-1)
  std::string crlf;
  for (const char c : paragraphs(40, 9))
    crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
  write_all(dir.file("corpus/a.txt"), paragraphs(60, 1));
  write_all(dir.file("corpus/b.txt"), latin1);
  write_all(dir.file("corpus/c.txt"), crlf);
  write_all(dir.file("corpus/d.json"), R"({"text": "A speech, with no newline at all. )" +
                                           std::string(2000, 'w') + " The end.\"}");

  PrepareOptions opt;
  opt.inputs = {dir.file("corpus")};
  opt.out = dir.file("out/ds.h5");
  opt.train_vocab = 280;
  opt.val_fraction = 0.3f;
  opt.doc_chars = 400;
  opt.num_threads = 2;
  const PrepareSummary summary = prepare_dataset(opt);
  EXPECT_EQ(summary.num_files, 4);
  EXPECT_EQ(summary.tokenizer_path, dir.file("out/tokenizer.json"));

  const TokenDataset ds = TokenDataset::open(opt.out);
  const Tokenizer tok = Tokenizer::load_hf_json(summary.tokenizer_path);
  ds.check_tokenizer(tok, summary.tokenizer_path);
  EXPECT_EQ(ds.vocab_size(), tok.vocab_size());
  ASSERT_GE(ds.meta().eot_id, 0);
  ASSERT_EQ(ds.meta().sources.size(), 4u);
  EXPECT_EQ(ds.meta().sources[3].name, "d.json");

  // Rebuild each split's expected documents from the rules and compare, decoding every document.
  std::vector<std::string> expected[2];
  for (const char* f : {"a.txt", "b.txt", "c.txt", "d.json"}) {
    const std::string text = load_source_text(dir.file(std::string("corpus/") + f)).text;
    const auto chunks = chunk_text(text, opt.doc_chars);
    for (size_t i = 0; i < chunks.size(); ++i) {
      expected[chunk_is_val(f, static_cast<int64_t>(i), opt.val_fraction) ? 1 : 0].push_back(
          text.substr(chunks[i].begin, chunks[i].end - chunks[i].begin));
    }
  }
  for (int s = 0; s < 2; ++s) {
    const TokenSplit split = ds.read_split(s == 0 ? "train" : "val");
    ASSERT_EQ(split.num_docs(), static_cast<int64_t>(expected[s].size())) << "split " << s;
    EXPECT_EQ(static_cast<int64_t>(split.tokens.size()), summary.num_tokens[s]);
    for (int64_t d = 0; d < split.num_docs(); ++d) {
      const int64_t b = split.doc_offsets[d], e = split.doc_offsets[d + 1];
      ASSERT_GT(e, b);
      EXPECT_EQ(split.tokens[e - 1], static_cast<uint32_t>(ds.meta().eot_id));
      const std::vector<int32_t> ids(split.tokens.begin() + b, split.tokens.begin() + e - 1);
      EXPECT_EQ(tok.decode(ids), expected[s][d]) << "split " << s << " doc " << d;
    }
  }
  EXPECT_GT(ds.num_docs("val"), 0);

  // Same inputs with the saved tokenizer: the identical token stream.
  PrepareOptions again = opt;
  again.train_vocab = 0;
  again.tokenizer_spec = summary.tokenizer_path;
  again.out = dir.file("out/again.h5");
  prepare_dataset(again);
  const TokenDataset ds2 = TokenDataset::open(again.out);
  EXPECT_EQ(ds2.read_split("train").tokens, ds.read_split("train").tokens);
  EXPECT_EQ(ds2.read_split("val").doc_offsets, ds.read_split("val").doc_offsets);
  EXPECT_EQ(ds2.tokenizer_hash(), ds.tokenizer_hash());
}

}  // namespace
}  // namespace tessera
