// GPT-2's bytes <-> unicode table. Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
// themselves; the other 68 bytes (controls, space, soft hyphen, ...) are given U+0100 upwards in
// byte order, so every byte has a visible, non-whitespace character.
#include "data/byte_level.h"

#include <array>

namespace tessera {

namespace {

struct Tables {
  std::array<char32_t, 256> to_unicode{};
  std::array<int16_t, 324> from_unicode{};  // code point -> byte, -1 if not in the alphabet
};

bool stands_for_itself(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

const Tables& tables() {
  static const Tables t = [] {
    Tables r;
    r.from_unicode.fill(-1);
    int num_shifted = 0;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = stands_for_itself(b) ? char32_t(b) : char32_t(256 + num_shifted++);
      r.to_unicode[b] = cp;
      r.from_unicode[cp] = int16_t(b);
    }
    return r;
  }();
  return t;
}

void append_utf8(std::string& out, char32_t cp) {
  // Only U+0021..U+0143 occur here: one or two UTF-8 bytes.
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

char32_t byte_to_unicode(uint8_t b) { return tables().to_unicode[b]; }

std::string bytes_to_byte_level(std::string_view bytes) {
  const Tables& t = tables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) append_utf8(out, t.to_unicode[c]);
  return out;
}

std::optional<std::string> byte_level_to_bytes(std::string_view text) {
  const Tables& t = tables();
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c0 = static_cast<unsigned char>(text[i]);
    char32_t cp;
    if (c0 < 0x80) {
      cp = c0;
      i += 1;
    } else if ((c0 & 0xE0) == 0xC0 && i + 1 < text.size() &&
               (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80) {
      cp = (char32_t(c0 & 0x1F) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3F);
      if (cp < 0x80) return std::nullopt;  // overlong
      i += 2;
    } else {
      return std::nullopt;  // three- and four-byte characters are never in the alphabet
    }
    if (cp >= t.from_unicode.size() || t.from_unicode[cp] < 0) return std::nullopt;
    out.push_back(char(t.from_unicode[cp]));
  }
  return out;
}

}  // namespace tessera
