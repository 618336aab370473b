// recipe_to_yaml and recipe_keys_markdown: both walk the field tables (recipe.h), so every field
// appears in declaration order with no list of keys to keep in step.
// parse_recipe(recipe_to_yaml(r))
// == r because strings are double-quoted and floats use the shortest text that parses back to the
// same float.
#include <fmt/format.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "config/recipe.h"
#include "config/yaml_field.h"

namespace tessera {

namespace {

using config::FieldInfo;
using ::tessera::IntRange;
using ::tessera::RealRange;

template <class T>
concept Section = requires(T t) {
  T::visit(t, [](const FieldInfo&, auto&, auto&) {});
};

// "key: value" lines at `indent`; a sub-section as "key:" and its fields one level deeper. Fields
// that apply only under a condition (Rule::when) are left out when it does not hold.
template <class S>
void emit(const S& section, const std::string& indent, std::string& out) {
  S::visit(section, [&](const FieldInfo& fi, const auto& value, const auto& self) {
    if (fi.rule.when && !fi.rule.when(&self)) return;
    using T = std::decay_t<decltype(value)>;
    if constexpr (Section<T>) {
      out += fmt::format("{}{}:\n", indent, fi.name);
      emit(value, indent + "  ", out);
    } else if constexpr (std::is_same_v<T, int>) {
      // Sizes the recipe may leave to be derived print as the word that asks for that.
      out += fmt::format("{}{}: {}\n", indent, fi.name,
                         fi.rule.auto_word && value == int(fi.rule.auto_value)
                             ? fi.rule.auto_word
                             : config::yaml_value(value));
    } else {
      out += fmt::format("{}{}: {}\n", indent, fi.name, config::yaml_value(value));
    }
  });
}

// A rule's bounds as text: ">= 1", "[0, 64]", "> 0", "(0, 1)"; "" when unbounded.
std::string int_bounds(const IntRange& r) {
  if (r.lo == kAnyInt.lo && r.hi == kAnyInt.hi) return "";
  if (r.hi == kAnyInt.hi) return fmt::format(">= {}", r.lo);
  return fmt::format("[{}, {}]", r.lo, r.hi);
}
std::string real_bounds(const RealRange& r) {
  const bool lo = std::isfinite(r.lo), hi = std::isfinite(r.hi);
  if (!lo && !hi) return "";
  if (!hi) return fmt::format("{} {}", r.lo_open ? ">" : ">=", r.lo);
  return fmt::format("{}{}, {}{}", r.lo_open ? "(" : "[", r.lo, r.hi, r.hi_open ? ")" : "]");
}
template <class T>
std::string bounds(const config::Rule& rule) {
  std::string b;
  if constexpr (std::is_same_v<T, int> || std::is_same_v<T, std::vector<int>>)
    b = int_bounds(rule.ints);
  else if constexpr (std::is_same_v<T, float>)
    b = real_bounds(rule.reals);
  else if constexpr (std::is_same_v<T, DataSources>)
    b = "weights " + real_bounds(rule.reals);
  if (rule.distinct) b += b.empty() ? "distinct" : ", distinct";
  return b;
}

// Rows "| key | type | range | default | meaning |" for every field of S, sub-sections flattened.
template <class S>
void key_rows(const S& defaults, const std::string& prefix, std::string& out) {
  S::visit(defaults, [&](const FieldInfo& fi, const auto& value, const auto&) {
    using T = std::decay_t<decltype(value)>;
    const std::string key = prefix + fi.name;
    if constexpr (Section<T>) {
      const std::string when =
          fi.rule.when_doc ? fmt::format(" (only when {})", fi.rule.when_doc) : std::string();
      out += fmt::format("| `{}` | section | | | {}{} |\n", key, fi.doc, when);
      key_rows(value, key + ".", out);
    } else {
      std::string def = config::yaml_value(value);
      if (fi.rule.required) {
        def = "required";
      } else if constexpr (std::is_same_v<T, int>) {
        // A default outside the field's own range is a placeholder for a derived value.
        if (fi.rule.auto_word && value == int(fi.rule.auto_value))
          def = fi.rule.auto_word;
        else if (value < fi.rule.ints.lo)
          def = "derived";
      } else if constexpr (std::is_same_v<T, float>) {
        if (fi.rule.auto_word && value == float(fi.rule.auto_value)) def = fi.rule.auto_word;
      }
      const std::string when =
          fi.rule.when_doc ? fmt::format(" (only when {})", fi.rule.when_doc) : std::string();
      out += fmt::format("| `{}` | {} | {} | `{}` | {}{} |\n", key,
                         config::type_name(static_cast<const T*>(nullptr)), bounds<T>(fi.rule), def,
                         fi.doc, when);
      // A list of mappings: each item's keys as key[].name.
      if constexpr (requires { typename T::value_type; }) {
        using Item = typename T::value_type;
        if constexpr (Section<Item>) key_rows(Item{}, key + "[].", out);
      }
    }
  });
}

}  // namespace

std::string recipe_to_yaml(const Recipe& r) {
  std::string out;
  Recipe::visit(r, [&](const FieldInfo& fi, const auto& section, const auto&) {
    out += fmt::format("{}:\n", fi.name);
    emit(section, "  ", out);
  });
  return out;
}

std::string recipe_keys_markdown() {
  std::string out = "| key | type | range | default | meaning |\n| --- | --- | --- | --- | --- |\n";
  const Recipe defaults;
  Recipe::visit(defaults, [&](const FieldInfo& fi, const auto& section, const auto&) {
    key_rows(section, std::string(fi.name) + ".", out);
  });
  return out;
}

}  // namespace tessera
