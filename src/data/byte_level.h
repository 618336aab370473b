// GPT-2's byte-level alphabet: the reversible map between the 256 byte values and 256 printable
// Unicode characters that byte-level BPE vocabularies (GPT-2, Qwen, tokenizer.json "ByteLevel")
// are written in. Holds only the mapping; BPE itself lives in tokenizer.cpp.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tessera {

// The code point that stands for byte `b` (e.g. 0x20 -> U+0120 'Ġ', 'a' -> 'a').
char32_t byte_to_unicode(uint8_t b);

// `bytes` rewritten in the byte-level alphabet, UTF-8 encoded (the form vocab files use).
std::string bytes_to_byte_level(std::string_view bytes);

// The inverse: the raw bytes of a byte-level string, or nullopt when `text` is not valid UTF-8 or
// holds a character outside the 256-character alphabet.
std::optional<std::string> byte_level_to_bytes(std::string_view text);

}  // namespace tessera
