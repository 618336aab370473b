// Recipe reading: YAML text -> sections -> `--set` overrides -> typed fields -> validation.
// Every key is read by one table entry per section, so unknown keys, wrong types and bad enum
// values fail where they are read, naming key, value, file and line (or the override). Cross-field
// checks run last and name both values with their origins; those of the parallel layout are shared
// with the trainer (layout_check.h). Writing YAML back: recipe_emit.cpp.
#include "train/recipe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <sstream>

#include "core/error.h"
#include "core/yaml_util.h"
#include "train/layout_check.h"

namespace tessera {

namespace {

const std::vector<std::string> kSectionNames = {"model", "parallel", "precision",  "optim",
                                                "data",  "train",    "checkpoint", "logging"};
// Sections the design reserves; refused until their features are built.
const std::vector<std::string> kReservedSections = {"moe", "distill", "qat"};

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

void check_section_name(const std::string& name, const YamlOrigin& origin) {
  if (std::find(kSectionNames.begin(), kSectionNames.end(), name) != kSectionNames.end()) return;
  if (std::find(kReservedSections.begin(), kReservedSections.end(), name) !=
      kReservedSections.end())
    TS_USER_ERROR("{}: section '{}' is not built yet", origin.str(), name);
  const std::string guess = closest_name(name, kSectionNames);
  TS_USER_ERROR("{}: unknown section '{}'{}; valid sections: {}", origin.str(), name,
                guess.empty() ? "" : fmt::format(" (did you mean '{}'?)", guess),
                join_names(kSectionNames));
}

// Splits the document into known sections (in document order).
std::vector<Section> read_sections(const YAML::Node& root, const std::string& file) {
  if (!root.IsDefined() || root.IsNull())
    TS_USER_ERROR("{}: the recipe is empty; expected sections {}", file, join_names(kSectionNames));
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

// One readable key of a section and what to do with its value.
struct Key {
  std::string name;
  std::function<void(const YamlField&)> read;
};

// Reads every entry of `section` through `keys`; unknown keys name the valid ones.
void read_keys(const Section* section, const std::vector<Key>& keys, Origins& origins,
               const std::string& skip = "") {
  if (section == nullptr) return;
  for (const YamlEntry& e : section->entries) {
    const std::string full = section->name + "." + e.key;
    auto k = std::find_if(keys.begin(), keys.end(), [&](const Key& x) { return x.name == e.key; });
    if (k == keys.end()) {
      std::vector<std::string> names;
      for (const Key& x : keys) names.push_back(x.name);
      const std::string guess = closest_name(e.key, names);
      const std::string hint =
          guess.empty() ? "" : fmt::format(" (did you mean '{}.{}'?)", section->name, guess);
      TS_USER_ERROR("{}: unknown key '{}'{}; valid keys of '{}': {}", e.origin.str(), full, hint,
                    section->name, join_names(names));
    }
    origins.set(full, e.origin);
    if (e.key != skip) k->read(YamlField{full, e.value, e.origin});
  }
}

const Section* find_section(const std::vector<Section>& sections, const std::string& name) {
  for (const Section& s : sections)
    if (s.name == name) return &s;
  return nullptr;
}

template <class Enum>
Enum enum_from_name(const std::string& name, std::initializer_list<Enum> values) {
  for (Enum v : values)
    if (name == to_string(v)) return v;
  TS_BUG("enum name '{}' passed validation but has no value", name);
}

void require(bool present, const Origins& o, const std::string& key, const std::string& what) {
  if (!present) TS_USER_ERROR("{}: {} is required ({})", o.file(), key, what);
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// A list (possibly empty) of integers in `range`, described as `what` ("positive integers");
// with `distinct`, a repeated value is an error. Items are named "key[i]" in messages.
std::vector<int> read_int_list(const YamlField& f, IntRange range, const std::string& what,
                               bool distinct) {
  if (!f.value.IsSequence())
    TS_USER_ERROR("{}: {}: expected a list of {} (e.g. [1, 2]), got {}", f.origin.str(), f.name,
                  what, yaml_describe(f.value));
  std::vector<int> out;
  for (size_t i = 0; i < f.value.size(); ++i) {
    const int v = yaml_read_int({fmt::format("{}[{}]", f.name, i), f.value[i], f.origin}, range);
    if (distinct && std::find(out.begin(), out.end(), v) != out.end())
      TS_USER_ERROR("{}: {}: {} is listed twice", f.origin.str(), f.name, v);
    out.push_back(v);
  }
  return out;
}

ModelConfig read_model(const Section* s, Origins& o) {
  std::string family = "gpt2";
  if (s != nullptr) {
    for (const YamlEntry& e : s->entries)
      if (e.key == "family")
        family = yaml_read_enum({"model.family", e.value, e.origin}, {"gpt2", "llama"});
  }
  ModelConfig m = model_defaults_for_family(family);
  const std::vector<Key> keys = {
      {"family", nullptr},  // read above: its defaults come before every other key
      {"vocab_size",
       [&](const YamlField& f) {
         m.vocab_size = yaml_read_int_or_word(f, kPositiveInt, "auto", 0);
       }},
      {"padded_vocab_size",
       [&](const YamlField& f) {
         m.padded_vocab_size = yaml_read_int_or_word(f, kPositiveInt, "auto", 0);
       }},
      {"vocab_pad_multiple",
       [&](const YamlField& f) { m.vocab_pad_multiple = yaml_read_int(f, kPositiveInt); }},
      {"num_layers", [&](const YamlField& f) { m.num_layers = yaml_read_int(f, kPositiveInt); }},
      {"hidden", [&](const YamlField& f) { m.hidden = yaml_read_int(f, kPositiveInt); }},
      {"num_heads", [&](const YamlField& f) { m.num_heads = yaml_read_int(f, kPositiveInt); }},
      {"num_kv_heads",
       [&](const YamlField& f) { m.num_kv_heads = yaml_read_int(f, kPositiveInt); }},
      {"head_dim", [&](const YamlField& f) { m.head_dim = yaml_read_int(f, kPositiveInt); }},
      {"ffn_hidden", [&](const YamlField& f) { m.ffn_hidden = yaml_read_int(f, kPositiveInt); }},
      {"max_seq_len", [&](const YamlField& f) { m.max_seq_len = yaml_read_int(f, kPositiveInt); }},
      {"norm",
       [&](const YamlField& f) {
         m.norm = enum_from_name(yaml_read_enum(f, {"layernorm", "rmsnorm"}),
                                 {NormKind::layernorm, NormKind::rmsnorm});
       }},
      {"norm_eps", [&](const YamlField& f) { m.norm_eps = yaml_read_float(f, kPositiveReal); }},
      {"position",
       [&](const YamlField& f) {
         m.position = enum_from_name(yaml_read_enum(f, {"learned", "rope"}),
                                     {PositionKind::learned, PositionKind::rope});
       }},
      {"rope_theta", [&](const YamlField& f) { m.rope_theta = yaml_read_float(f, kPositiveReal); }},
      {"activation",
       [&](const YamlField& f) {
         m.activation = enum_from_name(yaml_read_enum(f, {"gelu", "swiglu"}),
                                       {ActivationKind::gelu, ActivationKind::swiglu});
       }},
      {"bias", [&](const YamlField& f) { m.bias = yaml_read_bool(f); }},
      {"tied_embeddings", [&](const YamlField& f) { m.tied_embeddings = yaml_read_bool(f); }},
      {"qk_norm", [&](const YamlField& f) { m.qk_norm = yaml_read_bool(f); }},
      {"init_std", [&](const YamlField& f) { m.init_std = yaml_read_float(f, kPositiveReal); }},
      {"recompute", [&](const YamlField& f) { m.recompute = yaml_read_bool(f); }},
      {"attention_impl",
       [&](const YamlField& f) {
         m.attention_impl = yaml_read_enum(f, {"cudnn", "native"});
       }},
  };
  read_keys(s, keys, o, "family");
  return m;
}

// Fills the derived model defaults and checks the model on its own, except that a derived
// padded_vocab_size is also a multiple of `tp` (see finalize_model_vocab) and a given one must be.
void resolve_model(ModelConfig& m, const Origins& o, int tp) {
  const std::string& file = o.file();
  require(m.num_layers > 0, o, "model.num_layers", "a positive integer");
  require(m.hidden > 0, o, "model.hidden", "a positive integer");
  require(m.num_heads > 0, o, "model.num_heads", "a positive integer");
  require(m.max_seq_len > 0, o, "model.max_seq_len", "a positive integer");
  if (m.num_kv_heads == 0) m.num_kv_heads = m.num_heads;
  if (m.ffn_hidden == 0) {
    require(m.family == "gpt2", o, "model.ffn_hidden",
            fmt::format("a positive integer; only family gpt2 defaults it to 4 * hidden, "
                        "family is '{}'",
                        m.family));
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

ParallelConfig read_parallel(const Section* s, Origins& o) {
  ParallelConfig p;
  read_keys(
      s,
      {
          {"dp", [&](const YamlField& f) { p.dp = yaml_read_int(f, kPositiveInt); }},
          {"tp", [&](const YamlField& f) { p.tp = yaml_read_int(f, kPositiveInt); }},
          {"pp", [&](const YamlField& f) { p.pp = yaml_read_int(f, kPositiveInt); }},
          {"microbatches",
           [&](const YamlField& f) { p.microbatches = yaml_read_int(f, kPositiveInt); }},
          {"schedule",
           [&](const YamlField& f) {
             p.schedule = yaml_read_enum(f, {"gpipe", "1f1b"});
           }},
          {"zero",
           [&](const YamlField& f) {
             p.zero = yaml_read_int(f, IntRange{0, 1});
           }},
          {"stage_layers",
           [&](const YamlField& f) {
             p.stage_layers = read_int_list(f, kPositiveInt, "positive integers", false);
           }},
          {"recompute_stages",
           [&](const YamlField& f) {
             p.recompute_stages = read_int_list(f, kNonNegativeInt, "non-negative integers", true);
           }},
          {"bucket_mb",
           [&](const YamlField& f) {
             p.bucket_mb = yaml_read_float(f, kPositiveReal);
             if (p.bucket_bytes() < 1)
               TS_USER_ERROR("{}: {} = {}: expected a bucket of at least one byte", f.origin.str(),
                             f.name, p.bucket_mb);
           }},
          {"order", [&](const YamlField& f) { p.order = yaml_read_enum(f, parallel_orders()); }},
      },
      o);
  return p;
}

// The entries of a mapping-valued key (precision.loss_scale) as a section named by its full
// key, so read_keys reports unknown keys as "precision.loss_scale.x". Entries of a map given by
// `--set` carry the override as their origin.
Section sub_section(const YamlField& f, const std::string& file) {
  Section sub{f.name, yaml_map_entries(f.value, file, f.name)};
  if (!f.origin.override_text.empty())
    for (YamlEntry& e : sub.entries) e.origin = f.origin;
  return sub;
}

LossScalerConfig read_loss_scale(const Section& s, Origins& o) {
  LossScalerConfig c;
  constexpr RealRange kAboveOne{1.0, true, std::numeric_limits<double>::infinity(), false};
  constexpr RealRange kUnitOpen{0.0, true, 1.0, true};  // (0, 1)
  read_keys(
      &s,
      {
          {"initial", [&](const YamlField& f) { c.initial = yaml_read_float(f, kPositiveReal); }},
          {"growth_factor",
           [&](const YamlField& f) { c.growth_factor = yaml_read_float(f, kAboveOne); }},
          {"backoff_factor",
           [&](const YamlField& f) { c.backoff_factor = yaml_read_float(f, kUnitOpen); }},
          {"growth_interval",
           [&](const YamlField& f) { c.growth_interval = yaml_read_int(f, kPositiveInt); }},
          {"hysteresis",
           [&](const YamlField& f) { c.hysteresis = yaml_read_int(f, kPositiveInt); }},
          {"min", [&](const YamlField& f) { c.min = yaml_read_float(f, kPositiveReal); }},
          {"max", [&](const YamlField& f) { c.max = yaml_read_float(f, kPositiveReal); }},
          {"max_overflows_at_min",
           [&](const YamlField& f) { c.max_overflows_at_min = yaml_read_int(f, kPositiveInt); }},
      },
      o);
  return c;
}

Fp8Config read_fp8(const Section& s, Origins& o) {
  Fp8Config c;
  read_keys(&s,
            {
                {"amax_history_len",
                 [&](const YamlField& f) { c.amax_history_len = yaml_read_int(f, kPositiveInt); }},
                {"amax_compute",
                 [&](const YamlField& f) {
                   c.amax_compute = yaml_read_enum(f, {"max", "most_recent"});
                 }},
                // 2^-64 keeps the scale a normal float for every FP8 format (optim/fp8_scaling.h).
                {"margin",
                 [&](const YamlField& f) {
                   c.margin = yaml_read_int(f, IntRange{0, 64});
                 }},
            },
            o);
  return c;
}

std::vector<std::string> read_high_precision(const YamlField& f) {
  // `router` belongs to MoE layers; refused by name rather than as an unknown layer.
  if (f.value.IsSequence())
    for (size_t i = 0; i < f.value.size(); ++i)
      if (f.value[i].IsScalar() && f.value[i].Scalar() == "router")
        TS_USER_ERROR(
            "{}: {}[{}] = router: MoE is not built yet, so there is no router to keep "
            "in high precision; valid layers: embedding, lm_head",
            f.origin.str(), f.name, i);
  return yaml_read_enum_list(f, {"embedding", "lm_head"});
}

// Reads and validates the precision section: the sub-sections only with the compute dtype they
// configure, and the loss scale's bounds.
PrecisionConfig read_precision(const Section* s, Origins& o) {
  PrecisionConfig p;
  bool loss_scale_given = false, fp8_given = false;
  read_keys(s,
            {
                {"compute",
                 [&](const YamlField& f) {
                   p.compute = yaml_read_enum(f, {"fp32", "bf16", "fp16", "fp8"});
                 }},
                {"high_precision",
                 [&](const YamlField& f) { p.high_precision = read_high_precision(f); }},
                {"loss_scale",
                 [&](const YamlField& f) {
                   p.loss_scale = read_loss_scale(sub_section(f, o.file()), o);
                   loss_scale_given = true;
                 }},
                {"fp8",
                 [&](const YamlField& f) {
                   p.fp8 = read_fp8(sub_section(f, o.file()), o);
                   fp8_given = true;
                 }},
            },
            o);

  const std::string& file = o.file();
  const std::string compute = o.show("precision.compute", p.compute);
  if (loss_scale_given && p.compute != "fp16")
    TS_USER_ERROR(
        "{}: precision.loss_scale is given ({}) but {}: loss scaling applies only to "
        "compute: fp16; remove the section or set compute: fp16",
        file, o.where("precision.loss_scale"), compute);
  if (fp8_given && p.compute != "fp8")
    TS_USER_ERROR(
        "{}: precision.fp8 is given ({}) but {}: FP8 scaling applies only to "
        "compute: fp8; remove the section or set compute: fp8",
        file, o.where("precision.fp8"), compute);
  if (!p.high_precision.empty() && p.compute == "fp32")
    TS_USER_ERROR(
        "{}: precision.high_precision = [{}] ({}) has no effect with {}: every layer "
        "is already FP32; remove it or choose a narrower compute dtype",
        file, join_names(p.high_precision), o.where("precision.high_precision"), compute);
  const LossScalerConfig& ls = p.loss_scale;
  if (ls.min > ls.initial)
    TS_USER_ERROR("{}: {} is larger than {}", file, o.show("precision.loss_scale.min", ls.min),
                  o.show("precision.loss_scale.initial", ls.initial));
  if (ls.max < ls.initial)
    TS_USER_ERROR("{}: {} is smaller than {}", file, o.show("precision.loss_scale.max", ls.max),
                  o.show("precision.loss_scale.initial", ls.initial));
  return p;
}

OptimConfig read_optim(const Section* s, Origins& o) {
  OptimConfig p;
  constexpr RealRange kUnitHalfOpen{0.0, false, 1.0, true};  // [0, 1)
  constexpr RealRange kUnitOpenLow{0.0, true, 1.0, false};   // (0, 1]
  read_keys(
      s,
      {
          {"lr", [&](const YamlField& f) { p.lr = yaml_read_float(f, kPositiveReal); }},
          {"min_lr", [&](const YamlField& f) { p.min_lr = yaml_read_float(f, kNonNegativeReal); }},
          {"warmup_steps",
           [&](const YamlField& f) { p.warmup_steps = yaml_read_int(f, kNonNegativeInt); }},
          {"schedule",
           [&](const YamlField& f) {
             p.schedule = yaml_read_enum(f, {"cosine", "linear", "constant", "wsd"});
           }},
          {"decay_fraction",
           [&](const YamlField& f) { p.decay_fraction = yaml_read_float(f, kUnitOpenLow); }},
          {"beta1", [&](const YamlField& f) { p.beta1 = yaml_read_float(f, kUnitHalfOpen); }},
          {"beta2", [&](const YamlField& f) { p.beta2 = yaml_read_float(f, kUnitHalfOpen); }},
          {"eps", [&](const YamlField& f) { p.eps = yaml_read_float(f, kPositiveReal); }},
          {"weight_decay",
           [&](const YamlField& f) { p.weight_decay = yaml_read_float(f, kNonNegativeReal); }},
          {"no_decay",
           [&](const YamlField& f) {
             p.no_decay = yaml_read_enum_list(f, {"norms", "biases", "embeddings"});
           }},
          {"grad_clip",
           [&](const YamlField& f) { p.grad_clip = yaml_read_float(f, kNonNegativeReal); }},
      },
      o);
  return p;
}

DataConfig read_data(const Section* s, Origins& o) {
  DataConfig d;
  read_keys(
      s,
      {
          {"path", [&](const YamlField& f) { d.path = yaml_read_string(f); }},
          {"seq_len", [&](const YamlField& f) { d.seq_len = yaml_read_int(f, kPositiveInt); }},
          {"micro_batch",
           [&](const YamlField& f) {
             d.micro_batch = yaml_read_int_or_word(f, kNonNegativeInt, "auto", 0);
           }},
          {"grad_accum",
           [&](const YamlField& f) { d.grad_accum = yaml_read_int(f, kPositiveInt); }},
          {"global_batch",
           [&](const YamlField& f) {
             d.global_batch = yaml_read_int_or_word(f, kNonNegativeInt, "auto", 0);
           }},
          {"tokenizer", [&](const YamlField& f) { d.tokenizer = yaml_read_string(f); }},
      },
      o);
  require(!d.path.empty(), o, "data.path", "the HDF5 token dataset written by `tessera prepare`");
  require(d.seq_len > 0, o, "data.seq_len", "a positive integer");
  require(d.micro_batch > 0 || d.global_batch > 0, o, "data.micro_batch",
          "a positive integer: sequences per micro-batch per data-parallel rank; or give "
          "data.global_batch to derive it");
  return d;
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

TrainConfig read_train(const Section* s, Origins& o) {
  TrainConfig t;
  read_keys(
      s,
      {
          {"steps", [&](const YamlField& f) { t.steps = yaml_read_int(f, kPositiveInt); }},
          {"eval_every",
           [&](const YamlField& f) { t.eval_every = yaml_read_int(f, kNonNegativeInt); }},
          {"eval_batches",
           [&](const YamlField& f) { t.eval_batches = yaml_read_int(f, kPositiveInt); }},
          {"seed", [&](const YamlField& f) { t.seed = yaml_read_uint64(f); }},
          {"out_dir", [&](const YamlField& f) { t.out_dir = yaml_read_string(f); }},
          {"device",
           [&](const YamlField& f) {
             t.device = yaml_read_enum(f, {"cpu", "cuda", "auto"});
           }},
          {"sample_tokens",
           [&](const YamlField& f) { t.sample_tokens = yaml_read_int(f, kNonNegativeInt); }},
          {"num_samples",
           [&](const YamlField& f) { t.num_samples = yaml_read_int(f, kNonNegativeInt); }},
          {"sample_temperature",
           [&](const YamlField& f) { t.sample_temperature = yaml_read_float(f, kPositiveReal); }},
          {"sample_prompt", [&](const YamlField& f) { t.sample_prompt = yaml_read_string(f); }},
      },
      o);
  require(t.steps > 0, o, "train.steps", "a positive integer");
  require(!t.out_dir.empty(), o, "train.out_dir", "the run directory");
  return t;
}

CheckpointConfig read_checkpoint(const Section* s, Origins& o) {
  CheckpointConfig c;
  read_keys(s,
            {
                {"every", [&](const YamlField& f) { c.every = yaml_read_int(f, kNonNegativeInt); }},
                {"keep", [&](const YamlField& f) { c.keep = yaml_read_int(f, kPositiveInt); }},
                {"save_final", [&](const YamlField& f) { c.save_final = yaml_read_bool(f); }},
                {"resume", [&](const YamlField& f) { c.resume = yaml_read_string(f); }},
            },
            o);
  return c;
}

LoggingConfig read_logging(const Section* s, Origins& o) {
  LoggingConfig l;
  read_keys(s,
            {
                {"every", [&](const YamlField& f) { l.every = yaml_read_int(f, kPositiveInt); }},
                {"level",
                 [&](const YamlField& f) {
                   l.level = yaml_read_enum(f, {"debug", "info", "warn", "error"});
                 }},
                {"profile_ops", [&](const YamlField& f) { l.profile_ops = yaml_read_bool(f); }},
            },
            o);
  return l;
}

// Checks that span sections (single-field ranges were checked where each field was read).
void validate_across(const Recipe& r, const Origins& o) {
  const std::string& file = o.file();
  const ModelConfig& m = r.model;
  if (r.data.seq_len > m.max_seq_len)
    TS_USER_ERROR("{}: {} exceeds {}", file, o.show("data.seq_len", r.data.seq_len),
                  o.show("model.max_seq_len", m.max_seq_len));
  check_layout_fields(r, [&o](const std::string& key, const std::string& value) {
    return fmt::format("{} = {} ({})", key, value, o.where(key));
  });
  const OptimConfig& opt = r.optim;
  if (opt.min_lr > opt.lr)
    TS_USER_ERROR("{}: {} is larger than {}", file, o.show("optim.min_lr", opt.min_lr),
                  o.show("optim.lr", opt.lr));
  if (opt.warmup_steps > r.train.steps)
    TS_USER_ERROR("{}: {} is more than {}", file, o.show("optim.warmup_steps", opt.warmup_steps),
                  o.show("train.steps", r.train.steps));
}

}  // namespace

Recipe parse_recipe(const std::string& yaml_text, const std::string& file_name,
                    const std::vector<std::string>& overrides) {
  std::vector<Section> sections = read_sections(yaml_parse(yaml_text, file_name), file_name);
  for (const std::string& text : overrides) apply_override(sections, text, file_name);

  Origins origins(file_name);
  Recipe r;
  r.file = file_name;
  r.model = read_model(find_section(sections, "model"), origins);
  r.parallel = read_parallel(find_section(sections, "parallel"), origins);
  r.precision = read_precision(find_section(sections, "precision"), origins);
  r.optim = read_optim(find_section(sections, "optim"), origins);
  r.data = read_data(find_section(sections, "data"), origins);
  r.train = read_train(find_section(sections, "train"), origins);
  r.checkpoint = read_checkpoint(find_section(sections, "checkpoint"), origins);
  r.logging = read_logging(find_section(sections, "logging"), origins);
  resolve_model(r.model, origins, r.parallel.tp);
  resolve_batch(r);
  validate_across(r, origins);
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
