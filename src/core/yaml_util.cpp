// Strict typed reading of YAML scalars with messages that name key, value, expected type and
// origin; mapping entries with duplicate detection; closest-name suggestions; YAML scalar output.
#include "core/yaml_util.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <set>

#include "core/error.h"

namespace tessera {

std::string YamlOrigin::str() const {
  if (!override_text.empty()) return override_text;
  if (line > 0) return fmt::format("{}:{}", file, line);
  return file;
}

YAML::Node yaml_parse(const std::string& text, const std::string& file) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    TS_USER_ERROR("{}:{}:{}: invalid YAML: {}", file, e.mark.line + 1, e.mark.column + 1, e.msg);
  } catch (const YAML::Exception& e) {
    TS_USER_ERROR("{}: invalid YAML: {}", file, e.what());
  }
}

YamlOrigin yaml_origin(const YAML::Node& node, const std::string& file) {
  YamlOrigin o;
  o.file = file;
  const YAML::Mark mark = node.Mark();
  o.line = mark.line >= 0 ? mark.line + 1 : 0;  // yaml-cpp's null mark has line -1
  return o;
}

std::string yaml_describe(const YAML::Node& node) {
  constexpr size_t kMaxChars = 60;
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null: return "nothing";
    case YAML::NodeType::Scalar: {
      std::string s = node.Scalar();
      if (s.size() > kMaxChars) s = s.substr(0, kMaxChars) + "...";
      return node.Tag() == "?" ? fmt::format("'{}'", s) : fmt::format("the string '{}'", s);
    }
    case YAML::NodeType::Sequence:
    case YAML::NodeType::Map: {
      YAML::Emitter out;
      out << YAML::Flow << node;
      std::string s = out.c_str();
      if (s.size() > kMaxChars) s = s.substr(0, kMaxChars) + "...";
      return fmt::format("{} {}", node.IsSequence() ? "a list" : "a mapping", s);
    }
  }
  return "an unknown node";
}

std::vector<YamlEntry> yaml_map_entries(const YAML::Node& map, const std::string& file,
                                        const std::string& map_name) {
  const std::string what = map_name.empty() ? "the document" : fmt::format("'{}'", map_name);
  std::vector<YamlEntry> entries;
  if (!map.IsDefined() || map.IsNull()) return entries;
  if (!map.IsMap())
    TS_USER_ERROR("{}: {} must be a mapping of `key: value` lines, got {}",
                  yaml_origin(map, file).str(), what, yaml_describe(map));
  for (auto it = map.begin(); it != map.end(); ++it) {
    YamlOrigin origin = yaml_origin(it->first, file);
    if (!it->first.IsScalar())
      TS_USER_ERROR("{}: keys of {} must be plain names, got {}", origin.str(), what,
                    yaml_describe(it->first));
    const std::string key = it->first.Scalar();
    for (const YamlEntry& e : entries) {
      if (e.key == key) {
        const std::string full = map_name.empty() ? key : map_name + "." + key;
        TS_USER_ERROR("{}: duplicate key '{}' (first given at {})", origin.str(), full,
                      e.origin.str());
      }
    }
    entries.push_back(YamlEntry{key, it->second, std::move(origin)});
  }
  return entries;
}

namespace {

// Edit distance counting insertions, deletions, substitutions and adjacent transpositions
// ("trian" -> "train" is one edit), the usual typing slips.
int edit_distance(const std::string& a, const std::string& b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<int>> d(n + 1, std::vector<int>(m + 1, 0));
  for (size_t i = 0; i <= n; ++i) d[i][0] = int(i);
  for (size_t j = 0; j <= m; ++j) d[0][j] = int(j);
  for (size_t i = 1; i <= n; ++i) {
    for (size_t j = 1; j <= m; ++j) {
      const int subst = d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, subst});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}

[[noreturn]] void type_error(const YamlField& f, const std::string& expected) {
  TS_USER_ERROR("{}: {}: expected {}, got {}", f.origin.str(), f.name, expected,
                yaml_describe(f.value));
}

// The scalar text of a number or boolean; quoted strings and non-scalars are type errors.
std::string plain_scalar(const YamlField& f, const std::string& expected) {
  if (!f.value.IsScalar() || f.value.Tag() != "?") type_error(f, expected);
  return f.value.Scalar();
}

std::string int_expectation(IntRange r) {
  if (r.lo == 1 && r.hi == kPositiveInt.hi) return "a positive integer";
  if (r.lo == 0 && r.hi == kNonNegativeInt.hi) return "a non-negative integer";
  if (r.lo == kAnyInt.lo && r.hi == kAnyInt.hi) return "an integer";
  return fmt::format("an integer in [{}, {}]", r.lo, r.hi);
}

std::string real_expectation(RealRange r) {
  const bool has_lo = std::isfinite(r.lo), has_hi = std::isfinite(r.hi);
  if (!has_lo && !has_hi) return "a number";
  if (has_lo && !has_hi)
    return r.lo == 0.0 ? (r.lo_open ? "a positive number" : "a non-negative number")
                       : fmt::format("a number {} {}", r.lo_open ? ">" : ">=", r.lo);
  if (!has_lo) return fmt::format("a number {} {}", r.hi_open ? "<" : "<=", r.hi);
  return fmt::format("a number in {}{}, {}{}", r.lo_open ? "(" : "[", r.lo, r.hi,
                     r.hi_open ? ")" : "]");
}

// Skips one leading '+' (from_chars takes only '-'); false when nothing is left or a sign follows.
bool skip_plus(const char** first, const char* last) {
  if (*first != last && **first == '+') {
    ++*first;
    if (*first != last && (**first == '-' || **first == '+')) return false;
  }
  return *first != last;
}

// Parses a decimal integer (optional sign) that fills the whole text.
bool parse_int64(const std::string& text, int64_t* out) {
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (!skip_plus(&first, last)) return false;
  auto [ptr, ec] = std::from_chars(first, last, *out);
  return ec == std::errc() && ptr == last;
}

}  // namespace

std::string closest_name(const std::string& name, const std::vector<std::string>& candidates) {
  const int limit = std::max(1, int(name.size()) / 3);
  std::string best;
  int best_distance = limit + 1;
  for (const std::string& c : candidates) {
    const int d = edit_distance(name, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best;
}

std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

int yaml_read_int(const YamlField& f, IntRange range) {
  const std::string expected = int_expectation(range);
  int64_t v = 0;
  if (!parse_int64(plain_scalar(f, expected), &v) || v < range.lo || v > range.hi)
    type_error(f, expected);
  return int(v);
}

int yaml_read_int_or_word(const YamlField& f, IntRange range, const std::string& word,
                          int word_value) {
  if (f.value.IsScalar() && f.value.Tag() == "?" && f.value.Scalar() == word) return word_value;
  const std::string expected = fmt::format("{} or {}", int_expectation(range), word);
  int64_t v = 0;
  if (!parse_int64(plain_scalar(f, expected), &v) || v < range.lo || v > range.hi)
    type_error(f, expected);
  return int(v);
}

uint64_t yaml_read_uint64(const YamlField& f) {
  const std::string expected = "a non-negative 64-bit integer";
  const std::string text = plain_scalar(f, expected);
  uint64_t v = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (!skip_plus(&first, last)) type_error(f, expected);
  auto [ptr, ec] = std::from_chars(first, last, v);
  if (ec != std::errc() || ptr != last) type_error(f, expected);
  return v;
}

float yaml_read_float(const YamlField& f, RealRange range) {
  const std::string expected = real_expectation(range);
  const std::string text = plain_scalar(f, expected);
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (!skip_plus(&first, last)) type_error(f, expected);
  float v = 0.0f;
  // Parsed as float directly (not via double) so that yaml_float_text round-trips bit-exactly.
  auto [ptr, ec] = std::from_chars(first, last, v);
  if (ec != std::errc() || ptr != last || !std::isfinite(v)) type_error(f, expected);
  const double d = v;
  const bool lo_ok = range.lo_open ? d > range.lo : d >= range.lo;
  const bool hi_ok = range.hi_open ? d < range.hi : d <= range.hi;
  if (!lo_ok || !hi_ok) type_error(f, expected);
  return v;
}

bool yaml_read_bool(const YamlField& f) {
  const std::string text = plain_scalar(f, "true or false");
  if (text == "true" || text == "True" || text == "TRUE") return true;
  if (text == "false" || text == "False" || text == "FALSE") return false;
  type_error(f, "true or false");
}

std::string yaml_read_string(const YamlField& f) {
  if (!f.value.IsDefined() || f.value.IsNull()) return "";
  if (!f.value.IsScalar()) type_error(f, "a string");
  return f.value.Scalar();
}

std::string yaml_read_enum(const YamlField& f, const std::vector<std::string>& allowed) {
  const std::string expected = "one of " + join_names(allowed);
  if (!f.value.IsScalar()) type_error(f, expected);
  const std::string v = f.value.Scalar();
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) type_error(f, expected);
  return v;
}

std::vector<std::string> yaml_read_enum_list(const YamlField& f,
                                             const std::vector<std::string>& allowed) {
  const std::string expected = "a list of " + join_names(allowed);
  if (!f.value.IsSequence()) type_error(f, expected);
  std::vector<std::string> out;
  for (size_t i = 0; i < f.value.size(); ++i) {
    const YamlField item{fmt::format("{}[{}]", f.name, i), f.value[i], f.origin};
    const std::string v = yaml_read_enum(item, allowed);
    if (std::find(out.begin(), out.end(), v) != out.end())
      TS_USER_ERROR("{}: {}: '{}' is listed twice", f.origin.str(), f.name, v);
    out.push_back(v);
  }
  return out;
}

std::string yaml_quote(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f)
          out += fmt::format("\\x{:02x}", unsigned(c));
        else
          out += ch;  // UTF-8 bytes pass through unchanged
    }
  }
  return out + "\"";
}

std::string yaml_float_text(float v) {
  TS_CHECK(std::isfinite(v), "yaml_float_text of a non-finite value {}", v);
  return fmt::format("{}", v);  // shortest text that parses back to the same float
}

}  // namespace tessera
