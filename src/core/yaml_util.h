// YAML helpers for typed, validated configuration files: the entries of a mapping with where each
// came from (file line or a `--set` override), strict scalar readers whose errors name the key,
// the value, the expected type and the origin, a closest-name suggestion for misspelt keys, and
// scalar formatting for writing YAML back. What any key means is not here (see train/recipe.cpp).
// Works with yaml-cpp 0.7 and 0.8.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace tessera {

// Where a value came from, for messages.
struct YamlOrigin {
  std::string file;           // the YAML file, as named by the caller
  int line = 0;               // 1-based; 0 when unknown (or the value came from an override)
  std::string override_text;  // "--set train.steps=5" when the value came from the command line

  // "recipes/x.yaml:14" | "--set train.steps=5" | "recipes/x.yaml"
  std::string str() const;
};

// One `key: value` of a mapping, in document order.
struct YamlEntry {
  std::string key;
  YAML::Node value;
  YamlOrigin origin;
};

// Parses YAML text; a syntax error is a user error naming `file`, line and column.
YAML::Node yaml_parse(const std::string& text, const std::string& file);

// Origin of a node inside `file` (its line when yaml-cpp recorded one).
YamlOrigin yaml_origin(const YAML::Node& node, const std::string& file);

// The entries of a mapping node (a null node is an empty mapping). Non-scalar and duplicate keys
// are user errors; `what` names the mapping in messages ("the recipe", "section 'train'").
std::vector<YamlEntry> yaml_map_entries(const YAML::Node& map, const std::string& file,
                                        const std::string& what);

// The candidate closest to `name` by edit distance, or "" when none is plausibly meant.
std::string closest_name(const std::string& name, const std::vector<std::string>& candidates);

// Comma-separated list, e.g. "steps, eval_every, seed".
std::string join_names(const std::vector<std::string>& names);

// A value being read: its dotted name ("train.steps"), the node and where it came from.
struct YamlField {
  std::string name;
  YAML::Node value;
  YamlOrigin origin;
};

// [lo, hi] for integers.
struct IntRange {
  int64_t lo = std::numeric_limits<int32_t>::min();
  int64_t hi = std::numeric_limits<int32_t>::max();
};
inline constexpr IntRange kAnyInt{};
inline constexpr IntRange kPositiveInt{1, std::numeric_limits<int32_t>::max()};
inline constexpr IntRange kNonNegativeInt{0, std::numeric_limits<int32_t>::max()};

// An interval for reals; an infinite bound is unbounded.
struct RealRange {
  double lo = -std::numeric_limits<double>::infinity();
  bool lo_open = false;
  double hi = std::numeric_limits<double>::infinity();
  bool hi_open = false;
};
inline constexpr RealRange kAnyReal{};
inline constexpr RealRange kPositiveReal{0.0, true, std::numeric_limits<double>::infinity(), false};
inline constexpr RealRange kNonNegativeReal{0.0, false, std::numeric_limits<double>::infinity(),
                                            false};

// Strict readers. Numbers and booleans must be plain (unquoted) scalars: `steps: "5"` is a string.
// Integers are decimal (no 1e3, no 1_000); reals reject nan/inf and values outside float range.
int yaml_read_int(const YamlField& f, IntRange range);
// An integer in `range`, or the plain word `word` (e.g. "auto"), which reads as `word_value`.
int yaml_read_int_or_word(const YamlField& f, IntRange range, const std::string& word,
                          int word_value);
uint64_t yaml_read_uint64(const YamlField& f);
float yaml_read_float(const YamlField& f, RealRange range);
bool yaml_read_bool(const YamlField& f);
// Any scalar, verbatim; null reads as "".
std::string yaml_read_string(const YamlField& f);
// One of `allowed`.
std::string yaml_read_enum(const YamlField& f, const std::vector<std::string>& allowed);
// A list (possibly empty) of distinct members of `allowed`.
std::vector<std::string> yaml_read_enum_list(const YamlField& f,
                                             const std::vector<std::string>& allowed);

// Short description of a node for messages: "\"abc\"", "5", "a list [a, b]", "nothing".
std::string yaml_describe(const YAML::Node& node);

// Writing YAML: a double-quoted, escaped string scalar; a float that parses back bit-exactly.
std::string yaml_quote(const std::string& s);
std::string yaml_float_text(float v);

}  // namespace tessera
