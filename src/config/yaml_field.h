// Field values as YAML text, for the resolved-recipe emitter and the key table: one overload of
// yaml_value() per field type (strings double-quoted, floats in the shortest text that parses back
// to the same float, enums by name, lists in flow style), and short type names for the docs.
#pragma once
#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "core/yaml_util.h"

namespace tessera::config {

inline std::string yaml_value(int v) { return fmt::format("{}", v); }
inline std::string yaml_value(uint64_t v) { return fmt::format("{}", v); }
inline std::string yaml_value(float v) { return yaml_float_text(v); }
inline std::string yaml_value(double v) { return fmt::format("{}", v); }  // shortest round trip
inline std::string yaml_value(bool v) { return v ? "true" : "false"; }
inline std::string yaml_value(const std::string& v) { return yaml_quote(v); }
template <NamedEnum E>
std::string yaml_value(E v) {
  return to_string(v);
}
// A sub-section as a flow mapping of the fields that differ from their defaults (an item of
// distill.curriculum: {end_fraction: 0.5, alpha: 0.7}); parsing fills the rest back in.
template <class S>
requires requires(const S& s) {
  S::visit(s, [](const FieldInfo&, const auto&, const auto&) {});
}
std::string yaml_value(const S& section) {
  std::vector<std::string> given;
  const S defaults{};
  S::visit(defaults, [&](const FieldInfo&, const auto& def, const auto&) {
    given.push_back(yaml_value(def));
  });
  std::string items;
  size_t i = 0;
  S::visit(section, [&](const FieldInfo& fi, const auto& value, const auto&) {
    const std::string text = yaml_value(value);
    if (text != given[i++])
      items += fmt::format("{}{}: {}", items.empty() ? "" : ", ", fi.name, text);
  });
  return "{" + items + "}";
}
template <class T>
std::string yaml_value(const std::vector<T>& v) {
  std::string items;
  for (const T& x : v) items += (items.empty() ? "" : ", ") + yaml_value(x);
  return "[" + items + "]";
}
// A single unweighted dataset is written as its path; a blend as a list of mappings.
inline std::string yaml_value(const DataSources& v) {
  if (v.size() == 1 && v[0].weight == 1.0f) return yaml_quote(v[0].path);
  std::string items;
  for (const DataSource& s : v)
    items += fmt::format("{}{{path: {}, weight: {}}}", items.empty() ? "" : ", ",
                         yaml_quote(s.path), yaml_float_text(s.weight));
  return "[" + items + "]";
}

// Type names for the key table.
inline std::string type_name(const int*) { return "integer"; }
inline std::string type_name(const uint64_t*) { return "64-bit integer"; }
inline std::string type_name(const float*) { return "number"; }
inline std::string type_name(const bool*) { return "true/false"; }
inline std::string type_name(const std::string*) { return "string"; }
inline std::string type_name(const DataSources*) { return "path or blend"; }
template <NamedEnum E>
std::string type_name(const E*) {
  std::string names;
  for (const std::string& n : enum_names<E>()) names += (names.empty() ? "" : " \\| ") + n;
  return names;
}
template <class S>
requires requires(const S& s) {
  S::visit(s, [](const FieldInfo&, const auto&, const auto&) {});
}
std::string type_name(const S*) { return "mapping"; }
template <class T>
std::string type_name(const std::vector<T>*) {
  return "list of " + type_name(static_cast<const T*>(nullptr));
}

}  // namespace tessera::config
