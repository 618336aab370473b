// Field tables: a config section declares each field ONCE, as one line of an X-macro list
//   X(type, name, default, rule, "doc line")
// TESSERA_CONFIG_FIELDS turns that list into the struct's members (with their defaults) and a
// visit() that walks them in declaration order, so the parser (recipe.cpp), the resolved-recipe
// emitter (recipe_emit.cpp) and the key table of docs/RECIPES.md (recipe_docs.cpp) all come from
// that one line. A Rule says what values a field takes; checks that span fields are written out in
// recipe.cpp.
#pragma once
#include <cstdint>
#include <limits>

#include "core/yaml_util.h"

namespace tessera::config {

// What a field's value must be. `ints` bounds integers (and each item of an integer list),
// `reals` bounds floats; `required`: the recipe must give the field (its default is only a
// placeholder); `auto_word`: that plain word also reads, as `auto_value` (0 unless a field needs
// 0 as a value of its own; "auto": derived later); `distinct`: a list may not repeat an item;
// `allow_empty`: a list of mappings may be empty (one must have an item otherwise); `when`: the
// field applies only when this returns true for the section it is in (`when_doc` says when, e.g.
// "precision.compute is fp16") — given otherwise it is an error, and the emitter leaves it out.
struct Rule {
  IntRange ints = kAnyInt;
  RealRange reals = kAnyReal;
  bool required = false;
  const char* auto_word = nullptr;
  bool distinct = false;
  bool (*when)(const void* section) = nullptr;
  const char* when_doc = nullptr;
  double auto_value = 0.0;
  bool allow_empty = false;
};

inline constexpr Rule kAny{};
inline constexpr Rule kPositive{kPositiveInt, kPositiveReal};
inline constexpr Rule kNonNegative{kNonNegativeInt, kNonNegativeReal};
inline constexpr Rule kUnitOpen{kAnyInt, RealRange{0.0, true, 1.0, true}};       // (0, 1)
inline constexpr Rule kUnitHalfOpen{kAnyInt, RealRange{0.0, false, 1.0, true}};  // [0, 1)
inline constexpr Rule kUnitOpenLow{kAnyInt, RealRange{0.0, true, 1.0, false}};   // (0, 1]
inline constexpr Rule kUnitClosed{kAnyInt, RealRange{0.0, false, 1.0, false}};   // [0, 1]
inline constexpr Rule kAboveOne{
    kAnyInt, RealRange{1.0, true, std::numeric_limits<double>::infinity(), false}};  // > 1
constexpr Rule int_range(int64_t lo, int64_t hi) { return Rule{IntRange{lo, hi}, kAnyReal}; }
constexpr Rule required(Rule r) {
  r.required = true;
  return r;
}
constexpr Rule or_auto(Rule r, double auto_value = 0.0) {
  r.auto_word = "auto";
  r.auto_value = auto_value;
  return r;
}
constexpr Rule allow_empty(Rule r) {
  r.allow_empty = true;
  return r;
}
constexpr Rule distinct(Rule r) {
  r.distinct = true;
  return r;
}
constexpr Rule only_when(bool (*pred)(const void*), const char* doc) {
  Rule r;
  r.when = pred;
  r.when_doc = doc;
  return r;
}

// `r` that applies only when the section's moe.num_experts > 0 (config/moe_config.h).
bool moe_enabled(const void* moe);
constexpr Rule moe_rule(Rule r) {
  r.when = moe_enabled;
  r.when_doc = "moe.num_experts > 0";
  return r;
}

// `r` that applies only when the section's distill.teacher is set (config/distill_config.h).
bool distill_enabled(const void* distill);
constexpr Rule distill_rule(Rule r) {
  r.when = distill_enabled;
  r.when_doc = "distill.teacher or distill.teacher_cache is set";
  return r;
}

// One field as a visitor sees it.
struct FieldInfo {
  const char* name;
  Rule rule;
  const char* doc;
};

}  // namespace tessera::config

#define TESSERA_CONFIG_MEMBER_(type, name, def, rule, doc) type name = def;
#define TESSERA_CONFIG_VISIT_(type, name, def, rule, doc) \
  v(::tessera::config::FieldInfo{#name, rule, doc}, self.name, self);

// Inside `struct Section { ... }`: the members of FIELDS, equality, and
//   template <class Self, class V> static void visit(Self& self, V&& v)
// calling v(FieldInfo, member, self) for every field in order.
#define TESSERA_CONFIG_FIELDS(Section, FIELDS)     \
  FIELDS(TESSERA_CONFIG_MEMBER_)                   \
  bool operator==(const Section&) const = default; \
  template <class Self, class V>                   \
  static void visit(Self& self, V&& v) {           \
    FIELDS(TESSERA_CONFIG_VISIT_)                  \
  }
