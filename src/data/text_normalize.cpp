// Corpus text normalization: NUL check, strict UTF-8 validation, Latin-1 fallback, BOM and
// line-ending normalization, and the .txt / SOTU .json source readers. The rule is in the header.
#include "data/text_normalize.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace tessera {

namespace {

constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";

// Length of the valid UTF-8 sequence starting at bytes[i], or 0 if it is not valid (RFC 3629:
// rejects overlong forms, UTF-16 surrogates D800-DFFF and code points above U+10FFFF).
int utf8_sequence_length(std::string_view bytes, size_t i) {
  const auto at = [&](size_t k) -> unsigned { return static_cast<unsigned char>(bytes[k]); };
  const unsigned b0 = at(i);
  if (b0 < 0x80) return 1;
  const size_t left = bytes.size() - i;
  const auto cont = [&](size_t k) { return k < bytes.size() && (at(k) & 0xC0) == 0x80; };
  if (b0 >= 0xC2 && b0 <= 0xDF) return left >= 2 && cont(i + 1) ? 2 : 0;
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (left < 3 || !cont(i + 1) || !cont(i + 2)) return 0;
    const unsigned b1 = at(i + 1);
    if (b0 == 0xE0 && b1 < 0xA0) return 0;  // overlong
    if (b0 == 0xED && b1 > 0x9F) return 0;  // surrogate
    return 3;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (left < 4 || !cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
    const unsigned b1 = at(i + 1);
    if (b0 == 0xF0 && b1 < 0x90) return 0;  // overlong
    if (b0 == 0xF4 && b1 > 0x8F) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;  // 0x80-0xC1 (stray continuation or overlong lead) and 0xF5-0xFF
}

std::string latin1_to_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + bytes.size() / 8);
  for (const char c : bytes) {
    const auto b = static_cast<unsigned char>(c);
    if (b < 0x80) {
      out.push_back(c);
    } else {
      out.push_back(static_cast<char>(0xC0 | (b >> 6)));
      out.push_back(static_cast<char>(0x80 | (b & 0x3F)));
    }
  }
  return out;
}

// CRLF -> LF and lone CR -> LF, in place; counts both kinds.
void normalize_line_endings(NormalizedText& t) {
  std::string& s = t.text;
  if (s.find('\r') == std::string::npos) return;
  size_t w = 0;
  for (size_t r = 0; r < s.size(); ++r) {
    if (s[r] != '\r') {
      s[w++] = s[r];
      continue;
    }
    if (r + 1 < s.size() && s[r + 1] == '\n') {
      ++t.num_crlf;
      ++r;
    } else {
      ++t.num_lone_cr;
    }
    s[w++] = '\n';
  }
  s.resize(w);
}

std::string_view extension_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return {};
  return std::string_view(path).substr(dot);
}

}  // namespace

int64_t first_invalid_utf8(std::string_view bytes) {
  size_t i = 0;
  const size_t n = bytes.size();
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t word;
      std::memcpy(&word, bytes.data() + i, 8);
      if (word & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const int len = utf8_sequence_length(bytes, i);
    if (len == 0) return static_cast<int64_t>(i);
    i += static_cast<size_t>(len);
  }
  return -1;
}

NormalizedText normalize_text(std::string_view bytes, std::string_view name) {
  if (const size_t nul = bytes.find('\0'); nul != std::string_view::npos) {
    TS_USER_ERROR("{}: NUL byte at offset {}: not a text file", name, nul);
  }
  NormalizedText out;
  size_t base = 0;
  if (bytes.substr(0, kUtf8Bom.size()) == kUtf8Bom) {
    out.had_bom = true;
    base = kUtf8Bom.size();
  }
  const std::string_view body = bytes.substr(base);
  const int64_t bad = first_invalid_utf8(body);
  if (bad < 0) {
    out.text.assign(body);
  } else {
    int64_t c1 = -1;
    for (size_t k = 0; k < body.size(); ++k) {
      const auto b = static_cast<unsigned char>(body[k]);
      if (b >= 0x80 && b <= 0x9F) {
        c1 = static_cast<int64_t>(k);
        break;
      }
    }
    if (c1 >= 0) {
      TS_USER_ERROR(
          "{}: not valid UTF-8 (byte 0x{:02X} at offset {} starts no valid sequence) and not "
          "Latin-1 either (byte 0x{:02X} at offset {} is a C1 control code, which Latin-1 text "
          "does not use); convert the file to UTF-8",
          name, static_cast<unsigned char>(body[bad]), base + bad,
          static_cast<unsigned char>(body[c1]), base + c1);
    }
    out.encoding = SourceEncoding::latin1;
    out.text = latin1_to_utf8(body);
  }
  normalize_line_endings(out);
  return out;
}

std::string read_file_bytes(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) TS_USER_ERROR("{}: cannot open for reading: {}", path, std::strerror(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) TS_SYSTEM_ERROR("fstat({}) failed: {}", path, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) TS_USER_ERROR("{}: not a regular file", path);
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t got = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) TS_USER_ERROR("{}: read failed: {}", path, std::strerror(errno));
    if (got == 0) break;  // the file shrank while we read it
    done += static_cast<size_t>(got);
  }
  bytes.resize(done);
  return bytes;
}

NormalizedText decode_source(std::string_view bytes, const std::string& path) {
  const std::string_view ext = extension_of(path);
  if (ext == ".txt") return normalize_text(bytes, path);
  if (ext == ".json") {
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(bytes);
    } catch (const nlohmann::json::exception& e) {
      TS_USER_ERROR("{}: not valid JSON: {}", path, e.what());
    }
    if (!doc.is_object() || !doc.contains("text") || !doc["text"].is_string()) {
      TS_USER_ERROR("{}: expected a JSON object with a string field \"text\" (the SOTU form)",
                    path);
    }
    // The JSON parser has already checked the string is valid UTF-8; this applies the NUL and
    // line-ending rules.
    return normalize_text(doc["text"].get_ref<const std::string&>(), path);
  }
  TS_USER_ERROR("{}: unsupported source extension '{}' (expected .txt or .json)", path, ext);
}

NormalizedText load_source_text(const std::string& path) {
  return decode_source(read_file_bytes(path), path);
}

}  // namespace tessera
