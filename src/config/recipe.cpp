// Recipe reading: YAML text -> sections -> `--set` overrides -> typed fields -> validation. Every
// key is read through its section's field table (config/field.h), so unknown keys, wrong types and
// bad enum values fail where they are read, naming key, value, file and line (or the override).
// Checks across fields run last and name both values with their origins; those of the parallel
// layout are shared with the trainer (layout_check.h). Writing YAML back: recipe_emit.cpp.
#include "config/recipe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <sstream>
#include <type_traits>

#include "config/layout_check.h"
#include "config/yaml_field.h"
#include "core/error.h"
#include "core/yaml_util.h"

namespace tessera {

namespace config {
bool compute_is_fp16(const void* p) {
  return static_cast<const PrecisionConfig*>(p)->compute == Compute::fp16;
}
bool compute_is_fp8(const void* p) {
  return static_cast<const PrecisionConfig*>(p)->compute == Compute::fp8;
}
}  // namespace config

namespace {

using config::FieldInfo;
using config::Rule;

// Sections the design reserves; refused until their features are built (none at present).
const std::vector<std::string> kReservedSections = {};
// Keys that moved to another section: named in the error instead of "unknown key".
const std::map<std::string, std::string> kMovedKeys = {{"model.recompute", "train.recompute"},
                                                       {"model.attention_impl", "train.attention"}};

std::vector<std::string> section_names() {
  std::vector<std::string> names;
  Recipe r;
  Recipe::visit(r, [&](const FieldInfo& f, auto&, auto&) { names.push_back(f.name); });
  return names;
}

struct Section {
  std::string name;
  std::vector<YamlEntry> entries;
};

// Where each `section.key` value came from, for cross-field messages; keys not recorded are
// described by `fallback` ("default" while parsing).
class Origins {
 public:
  explicit Origins(std::string file, std::string fallback = "default")
      : file_(std::move(file)), fallback_(std::move(fallback)) {}
  const std::string& file() const { return file_; }
  void set(const std::string& key, const YamlOrigin& origin) { origins_[key] = origin; }
  bool given(const std::string& key) const { return origins_.count(key) > 0; }
  // "t.yaml:14" | "--set a.b=c" | "t.yaml"
  std::string at(const std::string& key) const {
    auto it = origins_.find(key);
    return it == origins_.end() ? file_ : it->second.str();
  }

  // "line 14" | "--set a.b=c" | "default"
  std::string where(const std::string& key) const {
    auto it = origins_.find(key);
    if (it == origins_.end()) return fallback_;
    if (!it->second.override_text.empty()) return it->second.override_text;
    return it->second.line > 0 ? fmt::format("line {}", it->second.line) : "in file";
  }

  // "model.hidden = 768 (line 5)"
  template <class T>
  std::string show(const std::string& key, const T& value) const {
    return fmt::format("{} = {} ({})", key, value, where(key));
  }

 private:
  std::string file_;
  std::string fallback_;
  std::map<std::string, YamlOrigin> origins_;
};

// A value as a message shows it: enums by name, numbers plainly, lists in brackets.
template <class T>
std::string shown(const T& v) {
  if constexpr (std::is_same_v<T, std::string>) {
    return v;
  } else if constexpr (NamedEnum<T>) {
    return to_string(v);
  } else if constexpr (std::is_same_v<T, std::vector<HighPrecisionLayer>>) {
    std::string s;
    for (HighPrecisionLayer l : v) s += (s.empty() ? "" : ", ") + std::string(to_string(l));
    return "[" + s + "]";
  } else if constexpr (requires { config::yaml_value(v); }) {
    return config::yaml_value(v);
  } else {
    return "(a section)";
  }
}

void check_section_name(const std::string& name, const YamlOrigin& origin) {
  const std::vector<std::string> names = section_names();
  if (std::find(names.begin(), names.end(), name) != names.end()) return;
  if (std::find(kReservedSections.begin(), kReservedSections.end(), name) !=
      kReservedSections.end())
    TS_USER_ERROR("{}: section '{}' is not built yet", origin.str(), name);
  const std::string guess = closest_name(name, names);
  TS_USER_ERROR("{}: unknown section '{}'{}; valid sections: {}", origin.str(), name,
                guess.empty() ? "" : fmt::format(" (did you mean '{}'?)", guess),
                join_names(names));
}

// Splits the document into known sections (in document order).
std::vector<Section> read_sections(const YAML::Node& root, const std::string& file) {
  if (!root.IsDefined() || root.IsNull())
    TS_USER_ERROR("{}: the recipe is empty; expected sections {}", file,
                  join_names(section_names()));
  std::vector<Section> sections;
  for (YamlEntry& top : yaml_map_entries(root, file, "")) {
    check_section_name(top.key, top.origin);
    sections.push_back(Section{top.key, yaml_map_entries(top.value, file, top.key)});
  }
  return sections;
}

// Applies one `section.key=value` override: replaces or adds the entry, the value parsed as YAML.
void apply_override(std::vector<Section>& sections, const std::string& text,
                    const std::string& file) {
  YamlOrigin origin;
  origin.file = file;
  origin.override_text = "--set " + text;
  const size_t eq = text.find('=');
  const std::string name = text.substr(0, eq);
  const size_t dot = name.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot == 0 || dot + 1 == name.size() ||
      name.find('.', dot + 1) != std::string::npos)
    TS_USER_ERROR("{}: expected section.key=value (e.g. --set train.steps=100)",
                  origin.override_text);
  const std::string section = name.substr(0, dot), key = name.substr(dot + 1);
  check_section_name(section, origin);
  YAML::Node value = yaml_parse(text.substr(eq + 1), origin.override_text);

  auto s = std::find_if(sections.begin(), sections.end(),
                        [&](const Section& x) { return x.name == section; });
  if (s == sections.end()) s = sections.insert(sections.end(), Section{section, {}});
  for (YamlEntry& e : s->entries) {
    if (e.key == key) {
      e.value = value;
      e.origin = origin;
      return;
    }
  }
  s->entries.push_back(YamlEntry{key, value, origin});
}

// ---- typed readers: one overload per field type ------------------------------------------------

template <class S>
void read_section(const std::vector<YamlEntry>& entries, const std::string& prefix, S& out,
                  Origins& o);

void read_value(const YamlField& f, int& out, const Rule& r, Origins&) {
  out = r.auto_word ? yaml_read_int_or_word(f, r.ints, r.auto_word, int(r.auto_value))
                    : yaml_read_int(f, r.ints);
}
void read_value(const YamlField& f, uint64_t& out, const Rule&, Origins&) {
  out = yaml_read_uint64(f);
}
void read_value(const YamlField& f, float& out, const Rule& r, Origins&) {
  if (r.auto_word && f.value.IsScalar() && f.value.Tag() == "?" && f.value.Scalar() == r.auto_word)
    out = float(r.auto_value);
  else
    out = yaml_read_float(f, r.reals);
}
void read_value(const YamlField& f, bool& out, const Rule&, Origins&) { out = yaml_read_bool(f); }
void read_value(const YamlField& f, std::string& out, const Rule&, Origins&) {
  out = yaml_read_string(f);
}
template <NamedEnum E>
void read_value(const YamlField& f, E& out, const Rule&, Origins&) {
  out = *enum_from_name<E>(yaml_read_enum(f, enum_names<E>()));
}
template <NamedEnum E>
void read_value(const YamlField& f, std::vector<E>& out, const Rule&, Origins&) {
  out.clear();
  for (const std::string& name : yaml_read_enum_list(f, enum_names<E>()))
    out.push_back(*enum_from_name<E>(name));
}

// A list (possibly empty) of integers in the rule's range; with `distinct`, a repeated value is an
// error. Items are named "key[i]" in messages.
void read_value(const YamlField& f, std::vector<int>& out, const Rule& r, Origins&) {
  const char* what = r.ints.lo >= 1 ? "positive integers" : "non-negative integers";
  if (!f.value.IsSequence())
    TS_USER_ERROR("{}: {}: expected a list of {} (e.g. [1, 2]), got {}", f.origin.str(), f.name,
                  what, yaml_describe(f.value));
  out.clear();
  for (size_t i = 0; i < f.value.size(); ++i) {
    const int v = yaml_read_int({fmt::format("{}[{}]", f.name, i), f.value[i], f.origin}, r.ints);
    if (r.distinct && std::find(out.begin(), out.end(), v) != out.end())
      TS_USER_ERROR("{}: {}: {} is listed twice", f.origin.str(), f.name, v);
    out.push_back(v);
  }
}

// A path, or a blend: a list of {path, weight} mappings (weight > 0, default 1).
void read_value(const YamlField& f, DataSources& out, const Rule& r, Origins&) {
  out.clear();
  if (!f.value.IsSequence()) {
    if (!f.value.IsNull() && !f.value.IsScalar())
      TS_USER_ERROR(
          "{}: {}: expected a string (a dataset path) or a list of {{path, weight}} "
          "mappings, got {}",
          f.origin.str(), f.name, yaml_describe(f.value));
    const std::string path = yaml_read_string(f);
    if (!path.empty()) out.push_back({path, 1.0f});
    return;
  }
  for (size_t i = 0; i < f.value.size(); ++i) {
    const std::string item = fmt::format("{}[{}]", f.name, i);
    if (!f.value[i].IsMap())
      TS_USER_ERROR("{}: {}: expected a mapping {{path: P, weight: W}}, got {}", f.origin.str(),
                    item, yaml_describe(f.value[i]));
    DataSource s;
    bool has_path = false;
    for (const YamlEntry& e : yaml_map_entries(f.value[i], f.origin.file, item)) {
      const YamlField sub{item + "." + e.key, e.value, f.origin};
      if (e.key == "path") {
        s.path = yaml_read_string(sub);
        has_path = !s.path.empty();
      } else if (e.key == "weight") {
        s.weight = yaml_read_float(sub, r.reals);
      } else {
        TS_USER_ERROR("{}: unknown key '{}.{}'; a blend entry has path and weight", f.origin.str(),
                      item, e.key);
      }
    }
    if (!has_path) TS_USER_ERROR("{}: {}.path is required", f.origin.str(), item);
    out.push_back(s);
  }
}

// A sub-section (precision.loss_scale): its entries are read like a section named by the full
// key. Entries of a mapping given by `--set` carry the override as their origin.
template <class S>
requires requires(S s) {
  S::visit(s, [](const FieldInfo&, auto&, auto&) {});
}
void read_value(const YamlField& f, S& out, const Rule&, Origins& o) {
  std::vector<YamlEntry> entries = yaml_map_entries(f.value, f.origin.file, f.name);
  if (!f.origin.override_text.empty())
    for (YamlEntry& e : entries) e.origin = f.origin;
  out = S{};
  read_section(entries, f.name, out, o);
}

// A list of mappings (distill.curriculum), each read like a sub-section named "key[i]"; empty only
// under Rule::allow_empty (distill.hidden_pairs).
template <class S>
requires requires(S s) {
  S::visit(s, [](const FieldInfo&, auto&, auto&) {});
}
void read_value(const YamlField& f, std::vector<S>& out, const Rule& r, Origins& o) {
  if (r.allow_empty && !f.value.IsSequence())
    TS_USER_ERROR("{}: {}: expected a list of mappings, got {}", f.origin.str(), f.name,
                  yaml_describe(f.value));
  if (!r.allow_empty && (!f.value.IsSequence() || f.value.size() == 0))
    TS_USER_ERROR("{}: {}: expected a non-empty list of mappings (e.g. [{{alpha: 0.5}}]), got {}",
                  f.origin.str(), f.name, yaml_describe(f.value));
  out.clear();
  for (size_t i = 0; i < f.value.size(); ++i) {
    const std::string item = fmt::format("{}[{}]", f.name, i);
    if (!f.value[i].IsMap())
      TS_USER_ERROR("{}: {}: expected a mapping, got {}", f.origin.str(), item,
                    yaml_describe(f.value[i]));
    std::vector<YamlEntry> entries = yaml_map_entries(f.value[i], f.origin.file, item);
    if (!f.origin.override_text.empty())
      for (YamlEntry& e : entries) e.origin = f.origin;
    S s{};
    read_section(entries, item, s, o);
    out.push_back(s);
  }
}

// ---- sections ----------------------------------------------------------------------------------

template <class T>
bool unset(const T& v) {
  if constexpr (std::is_same_v<T, std::string> || requires { v.empty(); })
    return v.empty();
  else if constexpr (std::is_arithmetic_v<T>)
    return v == T{};
  else
    return false;
}

// The model's family is read first: its defaults come before every other key.
template <class S>
void start_section(const std::vector<YamlEntry>&, S&) {}
void start_section(const std::vector<YamlEntry>& entries, ModelConfig& m) {
  for (const YamlEntry& e : entries)
    if (e.key == "family")
      m = model_defaults_for_family(*enum_from_name<ModelFamily>(
          yaml_read_enum({"model.family", e.value, e.origin}, enum_names<ModelFamily>())));
}

void unknown_key(const YamlEntry& e, const std::string& prefix,
                 const std::vector<std::string>& names) {
  const std::string full = prefix + "." + e.key;
  if (auto moved = kMovedKeys.find(full); moved != kMovedKeys.end())
    TS_USER_ERROR("{}: '{}' moved to '{}' (how the model runs is not part of its architecture)",
                  e.origin.str(), full, moved->second);
  const std::string guess = closest_name(e.key, names);
  const std::string hint =
      guess.empty() ? "" : fmt::format(" (did you mean '{}.{}'?)", prefix, guess);
  TS_USER_ERROR("{}: unknown key '{}'{}; valid keys of '{}': {}", e.origin.str(), full, hint,
                prefix, join_names(names));
}

// Reads every entry through the field table of S; then checks required fields and fields that
// apply only under a condition (Rule::when).
template <class S>
void read_section(const std::vector<YamlEntry>& entries, const std::string& prefix, S& out,
                  Origins& o) {
  start_section(entries, out);
  std::vector<std::string> names;
  S::visit(out, [&](const FieldInfo& fi, auto&, auto&) { names.push_back(fi.name); });
  for (const YamlEntry& e : entries) {
    bool found = false;
    S::visit(out, [&](const FieldInfo& fi, auto& member, auto&) {
      if (found || e.key != fi.name) return;
      found = true;
      const std::string full = prefix + "." + e.key;
      o.set(full, e.origin);
      read_value(YamlField{full, e.value, e.origin}, member, fi.rule, o);
    });
    if (!found) unknown_key(e, prefix, names);
  }
  S::visit(out, [&](const FieldInfo& fi, auto& member, auto& self) {
    const std::string full = prefix + "." + fi.name;
    if (fi.rule.required && unset(member))
      TS_USER_ERROR("{}: {} is required ({})", o.file(), full, fi.doc);
    if (fi.rule.when && o.given(full) && !fi.rule.when(&self)) {
      // The condition names its field ("precision.compute is fp16"): show that field's value.
      const std::string cond = fi.rule.when_doc;
      const std::string key = cond.substr(0, cond.find(' '));
      std::string value;
      S::visit(self, [&](const FieldInfo& g, auto& m, auto&) {
        if (prefix + "." + g.name == key) value = shown(m);
      });
      TS_USER_ERROR(
          "{}: {} is given ({}) but {}: it applies only when {}; remove it or change "
          "{}",
          o.file(), full, o.where(full), o.show(key, value), cond, key);
    }
  });
}

const Section* find_section(const std::vector<Section>& sections, const std::string& name) {
  for (const Section& s : sections)
    if (s.name == name) return &s;
  return nullptr;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Fills the derived model defaults and checks the model on its own, except that a derived
// padded_vocab_size is also a multiple of `tp` (see finalize_model_vocab) and a given one must be.
void resolve_model(ModelConfig& m, const Origins& o, int tp) {
  const std::string& file = o.file();
  if (m.num_kv_heads == 0) m.num_kv_heads = m.num_heads;
  if (m.ffn_hidden == 0) {
    if (m.family != ModelFamily::gpt2)
      TS_USER_ERROR(
          "{}: model.ffn_hidden is required (a positive integer; only family gpt2 "
          "defaults it to 4 * hidden, family is '{}')",
          file, to_string(m.family));
    if (m.hidden > std::numeric_limits<int>::max() / 4)
      TS_USER_ERROR("{}: {} is too large for the default ffn_hidden = 4 * hidden", file,
                    o.show("model.hidden", m.hidden));
    m.ffn_hidden = 4 * m.hidden;
  }
  if (m.head_dim == 0) {
    if (m.hidden % m.num_heads != 0)
      TS_USER_ERROR(
          "{}: {} is not divisible by {}; set model.head_dim to use heads whose size "
          "does not divide hidden",
          file, o.show("model.hidden", m.hidden), o.show("model.num_heads", m.num_heads));
    m.head_dim = m.hidden / m.num_heads;
  }
  if (m.num_heads % m.num_kv_heads != 0)
    TS_USER_ERROR(
        "{}: {} is not divisible by {} (each key/value head serves a whole group of "
        "query heads)",
        file, o.show("model.num_heads", m.num_heads), o.show("model.num_kv_heads", m.num_kv_heads));
  if (m.position == PositionKind::rope && m.head_dim % 2 != 0)
    TS_USER_ERROR("{}: {} must be even with {} (rotary pairs of dimensions)", file,
                  o.show("model.head_dim", m.head_dim),
                  o.show("model.position", to_string(m.position)));
  if (m.padded_vocab_size > 0 && m.padded_vocab_size % m.vocab_pad_multiple != 0)
    TS_USER_ERROR("{}: {} is not a multiple of {}", file,
                  o.show("model.padded_vocab_size", m.padded_vocab_size),
                  o.show("model.vocab_pad_multiple", m.vocab_pad_multiple));
  if (m.padded_vocab_size > 0 && m.padded_vocab_size % tp != 0)
    TS_USER_ERROR(
        "{}: {} is not divisible by {} (the embedding and LM head are split by "
        "vocabulary rows across tensor-parallel ranks); leave padded_vocab_size out to "
        "round vocab_size up to a multiple of lcm(vocab_pad_multiple, tp)",
        file, o.show("model.padded_vocab_size", m.padded_vocab_size), o.show("parallel.tp", tp));
  if (m.vocab_size > 0) {
    if (m.padded_vocab_size == 0) {
      // The padding rows are masked out of the loss; lcm keeps both the tile-friendly multiple
      // and an even split over tensor-parallel ranks.
      const int64_t multiple = std::lcm(int64_t{m.vocab_pad_multiple}, int64_t{tp});
      const int64_t padded = round_up(m.vocab_size, multiple);
      if (padded > std::numeric_limits<int>::max())
        TS_USER_ERROR("{}: {} rounded up to a multiple of lcm({}, {}) = {} overflows", file,
                      o.show("model.vocab_size", m.vocab_size),
                      o.show("model.vocab_pad_multiple", m.vocab_pad_multiple),
                      o.show("parallel.tp", tp), multiple);
      m.padded_vocab_size = int(padded);
    } else if (m.padded_vocab_size < m.vocab_size) {
      TS_USER_ERROR("{}: {} is smaller than {}", file,
                    o.show("model.padded_vocab_size", m.padded_vocab_size),
                    o.show("model.vocab_size", m.vocab_size));
    }
  }
}

// The precision policy against itself and the layout.
void validate_precision(const Recipe& r, const Origins& o) {
  const PrecisionConfig& p = r.precision;
  const std::string compute = o.show("precision.compute", to_string(p.compute));
  if (!p.high_precision.empty() && p.compute == Compute::fp32)
    TS_USER_ERROR(
        "{}: {} has no effect with {}: every layer is already FP32; remove it or "
        "choose a narrower compute dtype",
        o.file(), o.show("precision.high_precision", shown(p.high_precision)), compute);
  if (p.keeps_high_precision(HighPrecisionLayer::embedding) && r.parallel.zero == 1)
    TS_USER_ERROR(
        "{}: precision.high_precision 'embedding' reads the FP32 master table on every "
        "rank, but {} shards the masters over dp; use zero 0 or remove 'embedding'",
        o.file(), o.show("parallel.zero", r.parallel.zero));
  const LossScalerConfig& ls = p.loss_scale;
  if (ls.min > ls.initial)
    TS_USER_ERROR("{}: {} is larger than {}", o.file(), o.show("precision.loss_scale.min", ls.min),
                  o.show("precision.loss_scale.initial", ls.initial));
  if (ls.max < ls.initial)
    TS_USER_ERROR("{}: {} is smaller than {}", o.file(), o.show("precision.loss_scale.max", ls.max),
                  o.show("precision.loss_scale.initial", ls.initial));
}

// Derives data.micro_batch from data.global_batch when only the latter was given (see "Batch
// terms" in recipe.h). When it does not divide, micro_batch stays 0 and check_layout_fields
// reports global_batch with every factor.
void resolve_batch(Recipe& r) {
  DataConfig& d = r.data;
  if (d.micro_batch != 0 || d.global_batch == 0) return;
  const int64_t per_rank = int64_t(d.grad_accum) * r.parallel.microbatches;
  if (per_rank > std::numeric_limits<int>::max()) return;  // reported with both factors
  const int64_t rows = r.parallel.dp * per_rank;
  if (d.global_batch % rows != 0) return;
  d.micro_batch = int(d.global_batch / rows);
}

void validate_data(const Recipe& r, const Origins& o) {
  const DataConfig& d = r.data;
  if (d.micro_batch == 0 && d.global_batch == 0)
    TS_USER_ERROR(
        "{}: data.micro_batch is required (a positive integer: sequences per "
        "micro-batch per data-parallel rank; or give data.global_batch to derive it)",
        o.file());
  if (r.data.seq_len > r.model.max_seq_len)
    TS_USER_ERROR("{}: {} exceeds {}", o.file(), o.show("data.seq_len", r.data.seq_len),
                  o.show("model.max_seq_len", r.model.max_seq_len));
  for (const DataSource& s : d.path)
    if (s.path == "mock" && d.path.size() > 1)
      TS_USER_ERROR("{}: data.path ({}): 'mock' cannot be part of a blend", o.file(),
                    o.where("data.path"));
  if (d.mock() && r.model.vocab_size == 0)
    TS_USER_ERROR("{}: data.path 'mock' ({}) needs an explicit model.vocab_size (got auto)",
                  o.file(), o.where("data.path"));
}

// The moe section: derived widths, the router's FP32 in the precision list, and its checks
// against the model and the layout. Copies the result into model.moe (what the model reads).
void resolve_moe(Recipe& r, const Origins& o) {
  MoeConfig& m = r.moe;
  if (m.enabled()) {
    if (m.ffn_hidden == 0) m.ffn_hidden = r.model.ffn_hidden;
    if (m.shared_ffn_hidden == 0) m.shared_ffn_hidden = m.ffn_hidden;
    if (m.topk > m.num_experts)
      TS_USER_ERROR("{}: {} is larger than {}", o.file(), o.show("moe.topk", m.topk),
                    o.show("moe.num_experts", m.num_experts));
    if (m.num_moe_layers(r.model.num_layers) == 0)
      TS_USER_ERROR("{}: {} leaves no MoE layer among {}", o.file(),
                    o.show("moe.first_dense_layers", m.first_dense_layers),
                    o.show("model.num_layers", r.model.num_layers));
    if (int64_t(m.shared_experts) * m.shared_ffn_hidden > std::numeric_limits<int>::max())
      TS_USER_ERROR("{}: {} x {} overflows", o.file(),
                    o.show("moe.shared_experts", m.shared_experts),
                    o.show("moe.shared_ffn_hidden", m.shared_ffn_hidden));
    if (m.shared_experts > 0 && int64_t(m.shared_experts) * m.shared_ffn_hidden % r.parallel.tp)
      TS_USER_ERROR(
          "{}: moe.shared_experts x moe.shared_ffn_hidden = {} is not divisible by {} (the "
          "shared experts are split over tp like the dense MLP)",
          o.file(), int64_t(m.shared_experts) * m.shared_ffn_hidden,
          o.show("parallel.tp", r.parallel.tp));
    // The router always runs in FP32 (Megatron's moe_router_dtype fp32); the resolved list says so.
    PrecisionConfig& p = r.precision;
    if (p.compute != Compute::fp32 && !p.keeps_high_precision(HighPrecisionLayer::router))
      p.high_precision.push_back(HighPrecisionLayer::router);
  } else if (r.precision.keeps_high_precision(HighPrecisionLayer::router)) {
    TS_USER_ERROR(
        "{}: {}: 'router' belongs to MoE layers, and this recipe has none (moe.num_experts "
        "is 0)",
        o.file(), o.show("precision.high_precision", shown(r.precision.high_precision)));
  }
  r.model.moe = m;
}

// Checks that span sections (single-field ranges were checked where each field was read).
void validate_across(const Recipe& r, const Origins& o) {
  validate_data(r, o);
  if (r.parallel.bucket_bytes() < 1)
    TS_USER_ERROR("{}: {}: expected a bucket of at least one byte", o.at("parallel.bucket_mb"),
                  fmt::format("parallel.bucket_mb = {}", r.parallel.bucket_mb));
  check_layout_fields(r, [&o](const std::string& key, const std::string& value) {
    return fmt::format("{} = {} ({})", key, value, o.where(key));
  });
  validate_precision(r, o);
  const OptimConfig& opt = r.optim;
  if (opt.min_lr > opt.lr)
    TS_USER_ERROR("{}: {} is larger than {}", o.file(), o.show("optim.min_lr", opt.min_lr),
                  o.show("optim.lr", opt.lr));
  if (opt.warmup_steps > r.train.steps)
    TS_USER_ERROR("{}: {} is more than {}", o.file(),
                  o.show("optim.warmup_steps", opt.warmup_steps),
                  o.show("train.steps", r.train.steps));
}

// The distill section: one teacher, online or cached; the
// curriculum's phases must end in order, inside the run, each ramp inside its phase; hidden-state
// pairs need the online teacher and name student blocks that exist, once each (the teacher's side
// is checked against its checkpoint: train/teacher.cpp), and phases give hidden_weight only when
// there are pairs.
void validate_distill(const Recipe& r, const Origins& o) {
  const DistillConfig& d = r.distill;
  if (!d.enabled()) return;
  if (d.online() && !d.teacher_cache.empty())
    TS_USER_ERROR("{}: {} and {}: give one teacher, online or cached", o.file(),
                  o.show("distill.teacher", d.teacher),
                  o.show("distill.teacher_cache", d.teacher_cache));
  if (!d.online() && !d.hidden_pairs.empty())
    TS_USER_ERROR(
        "{}: distill.hidden_pairs ({}) with {}: the hidden-state loss needs the online teacher "
        "(a cache holds its logits only); give distill.teacher instead",
        o.file(), o.where("distill.hidden_pairs"),
        o.show("distill.teacher_cache", d.teacher_cache));
  const int64_t steps = r.train.steps;
  const std::vector<int64_t> ends = curriculum_ends(d, steps);
  int64_t start = 0;
  for (size_t i = 0; i < d.curriculum.size(); ++i) {
    const CurriculumPhase& p = d.curriculum[i];
    const std::string key = fmt::format("distill.curriculum[{}]", i);
    const bool last = i + 1 == d.curriculum.size();
    const bool has_step = p.end_step > 0, has_fraction = p.end_fraction > 0.0f;
    if (has_step && has_fraction)
      TS_USER_ERROR("{}: {} and {}: give one end for a phase", o.file(),
                    o.show(key + ".end_step", p.end_step),
                    o.show(key + ".end_fraction", p.end_fraction));
    if (!last && !has_step && !has_fraction)
      TS_USER_ERROR(
          "{}: {} needs end_step or end_fraction (only the last phase may run to the end)",
          o.file(), key);
    if (ends[i] <= start || ends[i] > steps)
      TS_USER_ERROR(
          "{}: {} ends at step {} ({}): phases must end in order, after step {} and by {}",
          o.file(), key, ends[i], o.where(key + (has_step ? ".end_step" : ".end_fraction")), start,
          o.show("train.steps", r.train.steps));
    if (p.ramp != CurriculumRamp::none) {
      if (i == 0)
        TS_USER_ERROR("{}: {}: the first phase has no previous values to ramp from", o.file(),
                      o.show(key + ".ramp", to_string(p.ramp)));
      if (p.ramp_steps < 1 || p.ramp_steps > ends[i] - start)
        TS_USER_ERROR("{}: {}: a {} ramp needs 1 to {} steps (the phase's length)", o.file(),
                      o.show(key + ".ramp_steps", p.ramp_steps), to_string(p.ramp),
                      ends[i] - start);
    } else if (p.ramp_steps > 0) {
      TS_USER_ERROR("{}: {} with {}: choose ramp linear or cosine", o.file(),
                    o.show(key + ".ramp_steps", p.ramp_steps), o.show(key + ".ramp", "none"));
    }
    if (d.hidden_pairs.empty() && o.given(key + ".hidden_weight"))
      TS_USER_ERROR(
          "{}: {} is given ({}) but distill.hidden_pairs is empty: there is no hidden-state loss "
          "to weigh; remove it or give distill.hidden_pairs",
          o.file(), key + ".hidden_weight", o.where(key + ".hidden_weight"));
    start = ends[i];
  }
  for (size_t i = 0; i < d.hidden_pairs.size(); ++i) {
    const DistillHiddenPair& p = d.hidden_pairs[i];
    const std::string key = fmt::format("distill.hidden_pairs[{}]", i);
    if (p.student > r.model.num_layers)
      TS_USER_ERROR("{}: {} is past the student's last block ({})", o.file(),
                    o.show(key + ".student", p.student),
                    o.show("model.num_layers", r.model.num_layers));
    for (size_t j = 0; j < i; ++j)
      if (d.hidden_pairs[j] == p)
        TS_USER_ERROR("{}: {} ({}) repeats distill.hidden_pairs[{}] = {}", o.file(), key,
                      o.where(key + ".student"), j, shown(p));
  }
}

// The qat section: group_size auto resolved (int4 32, int8 0), its value among those the formats
// take, no FP8 compute, the layers that are built, and a start inside the run. The local K of each
// linear against the group is checked where the layers are known (optim/qat_linear.cpp).
void resolve_qat(Recipe& r, const Origins& o) {
  QatConfig& q = r.qat;
  if (!q.enabled()) return;
  const std::string weights = o.show("qat.weights", to_string(q.weights));
  if (q.group_size < 0) q.group_size = q.weights == QatBits::int4 ? 32 : 0;
  if (q.group_size != 0 && q.group_size != 32 && q.group_size != 64 && q.group_size != 128)
    TS_USER_ERROR(
        "{}: {}: expected 32, 64 or 128 input columns per scale, or 0 (int8 only) for one scale "
        "per output channel",
        o.file(), o.show("qat.group_size", q.group_size));
  if (q.group_size == 0 && q.weights == QatBits::int4)
    TS_USER_ERROR(
        "{}: {} with {}: int4 needs groups of 32, 64 or 128 (one scale per output channel is "
        "int8 only)",
        o.file(), o.show("qat.group_size", q.group_size), weights);
  if (r.precision.compute == Compute::fp8)
    TS_USER_ERROR(
        "{}: {} with {}: QAT fake-quantizes the weights of 16/32-bit GEMMs, FP8 quantizes them "
        "to FP8 instead; train QAT with compute bf16, fp16 or fp32",
        o.file(), weights, o.show("precision.compute", to_string(r.precision.compute)));
  if (q.layers.empty())
    TS_USER_ERROR(
        "{}: qat.layers ({}) is empty: name the linears to quantize or set qat.weights "
        "none",
        o.file(), o.where("qat.layers"));
  for (QatLayer l : q.layers)
    if (l == QatLayer::lm_head || l == QatLayer::embedding)
      TS_USER_ERROR(
          "{}: qat.layers ({}) names '{}': fake quantization of the LM head and the embedding is "
          "not built yet (QAT covers the block linears and the experts)",
          o.file(), o.where("qat.layers"), to_string(l));
  if (q.start_step >= r.train.steps)
    TS_USER_ERROR("{}: {} is not before {}: QAT would never begin", o.file(),
                  o.show("qat.start_step", q.start_step), o.show("train.steps", r.train.steps));
}

}  // namespace

Recipe parse_recipe(const std::string& yaml_text, const std::string& file_name,
                    const std::vector<std::string>& overrides) {
  std::vector<Section> sections = read_sections(yaml_parse(yaml_text, file_name), file_name);
  for (const std::string& text : overrides) apply_override(sections, text, file_name);

  Origins origins(file_name);
  Recipe r;
  r.file = file_name;
  Recipe::visit(r, [&](const FieldInfo& fi, auto& section, auto&) {
    const Section* s = find_section(sections, fi.name);
    read_section(s ? s->entries : std::vector<YamlEntry>{}, fi.name, section, origins);
  });
  resolve_model(r.model, origins, r.parallel.tp);
  resolve_batch(r);
  validate_across(r, origins);
  validate_distill(r, origins);
  resolve_moe(r, origins);
  resolve_qat(r, origins);
  return r;
}

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_USER_ERROR("cannot open recipe file '{}': {}", path, std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) TS_SYSTEM_ERROR("reading recipe file '{}' failed: {}", path, std::strerror(errno));
  return parse_recipe(text.str(), path, overrides);
}

void finalize_model_vocab(ModelConfig& m, int vocab_size, const std::string& recipe_file, int tp) {
  TS_CHECK(tp >= 1, "finalize_model_vocab with tp {}", tp);
  if (vocab_size <= 0)
    TS_USER_ERROR("{}: the dataset reports a vocabulary of {} tokens; expected a positive size",
                  recipe_file, vocab_size);
  if (m.vocab_size != 0 && m.vocab_size != vocab_size)
    TS_USER_ERROR(
        "{}: model.vocab_size = {} but the dataset's tokenizer has {} tokens; set "
        "model.vocab_size to {} or auto",
        recipe_file, m.vocab_size, vocab_size, vocab_size);
  m.vocab_size = vocab_size;
  Origins origins(recipe_file, "recipe");
  YamlOrigin from_dataset;
  from_dataset.override_text = "from the dataset";
  origins.set("model.vocab_size", from_dataset);
  resolve_model(m, origins, tp);
}

}  // namespace tessera
