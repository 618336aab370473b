// recipe_to_yaml: the resolved recipe as YAML, every field in declaration order, so that
// parse_recipe(recipe_to_yaml(r), r.file) == r. Strings are always double-quoted and floats use
// the shortest text that parses back to the same float, which is what makes the round trip exact.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/yaml_util.h"
#include "train/recipe.h"

namespace tessera {

namespace {

// Appends "section:" then one "  key: value" line per field.
class YamlWriter {
 public:
  void section(const char* name) {
    out_ += fmt::format("{}:\n", name);
    indent_ = "  ";
  }
  // "  key:" then the following fields one level deeper, until the next section.
  void sub_section(const char* key) {
    out_ += fmt::format("  {}:\n", key);
    indent_ = "    ";
  }
  void raw(const char* key, const std::string& text) {
    out_ += fmt::format("{}{}: {}\n", indent_, key, text);
  }
  void integer(const char* key, int64_t v) { raw(key, fmt::format("{}", v)); }
  void uinteger(const char* key, uint64_t v) { raw(key, fmt::format("{}", v)); }
  void real(const char* key, float v) { raw(key, yaml_float_text(v)); }
  void boolean(const char* key, bool v) { raw(key, v ? "true" : "false"); }
  void string(const char* key, const std::string& v) { raw(key, yaml_quote(v)); }
  void list(const char* key, const std::vector<std::string>& v) {
    std::string items;
    for (const std::string& s : v) items += (items.empty() ? "" : ", ") + yaml_quote(s);
    raw(key, "[" + items + "]");
  }
  void int_list(const char* key, const std::vector<int>& v) {
    raw(key, fmt::format("[{}]", fmt::join(v, ", ")));
  }
  const std::string& text() const { return out_; }

 private:
  std::string out_;
  std::string indent_ = "  ";
};

std::string int_or_auto(int v) { return v == 0 ? "auto" : fmt::format("{}", v); }

}  // namespace

std::string recipe_to_yaml(const Recipe& r) {
  YamlWriter w;
  const ModelConfig& m = r.model;
  w.section("model");
  w.string("family", m.family);
  w.raw("vocab_size", int_or_auto(m.vocab_size));
  w.raw("padded_vocab_size", int_or_auto(m.padded_vocab_size));
  w.integer("vocab_pad_multiple", m.vocab_pad_multiple);
  w.integer("num_layers", m.num_layers);
  w.integer("hidden", m.hidden);
  w.integer("num_heads", m.num_heads);
  w.integer("num_kv_heads", m.num_kv_heads);
  w.integer("head_dim", m.head_dim);
  w.integer("ffn_hidden", m.ffn_hidden);
  w.integer("max_seq_len", m.max_seq_len);
  w.raw("norm", to_string(m.norm));
  w.real("norm_eps", m.norm_eps);
  w.raw("position", to_string(m.position));
  w.real("rope_theta", m.rope_theta);
  w.raw("activation", to_string(m.activation));
  w.boolean("bias", m.bias);
  w.boolean("tied_embeddings", m.tied_embeddings);
  w.boolean("qk_norm", m.qk_norm);
  w.real("init_std", m.init_std);
  w.boolean("recompute", m.recompute);
  w.string("attention_impl", m.attention_impl);

  const ParallelConfig& p = r.parallel;
  w.section("parallel");
  w.integer("dp", p.dp);
  w.integer("tp", p.tp);
  w.integer("pp", p.pp);
  w.integer("microbatches", p.microbatches);
  w.string("schedule", p.schedule);
  w.integer("zero", p.zero);
  w.int_list("stage_layers", p.stage_layers);
  w.int_list("recompute_stages", p.recompute_stages);
  w.real("bucket_mb", p.bucket_mb);
  w.string("order", p.order);

  // The sub-sections only with the compute dtype that reads them (the parser refuses them
  // otherwise); absent, they parse back as the defaults they hold.
  const PrecisionConfig& pr = r.precision;
  w.section("precision");
  w.string("compute", pr.compute);
  w.list("high_precision", pr.high_precision);
  if (pr.compute == "fp16") {
    const LossScalerConfig& ls = pr.loss_scale;
    w.sub_section("loss_scale");
    w.real("initial", ls.initial);
    w.real("growth_factor", ls.growth_factor);
    w.real("backoff_factor", ls.backoff_factor);
    w.integer("growth_interval", ls.growth_interval);
    w.integer("hysteresis", ls.hysteresis);
    w.real("min", ls.min);
    w.real("max", ls.max);
    w.integer("max_overflows_at_min", ls.max_overflows_at_min);
  }
  if (pr.compute == "fp8") {
    w.sub_section("fp8");
    w.integer("amax_history_len", pr.fp8.amax_history_len);
    w.string("amax_compute", pr.fp8.amax_compute);
    w.integer("margin", pr.fp8.margin);
  }

  const OptimConfig& o = r.optim;
  w.section("optim");
  w.real("lr", o.lr);
  w.real("min_lr", o.min_lr);
  w.integer("warmup_steps", o.warmup_steps);
  w.string("schedule", o.schedule);
  w.real("decay_fraction", o.decay_fraction);
  w.real("beta1", o.beta1);
  w.real("beta2", o.beta2);
  w.real("eps", o.eps);
  w.real("weight_decay", o.weight_decay);
  w.list("no_decay", o.no_decay);
  w.real("grad_clip", o.grad_clip);

  const DataConfig& d = r.data;
  w.section("data");
  w.string("path", d.path);
  w.integer("seq_len", d.seq_len);
  w.integer("micro_batch", d.micro_batch);
  w.integer("grad_accum", d.grad_accum);
  w.raw("global_batch", int_or_auto(d.global_batch));
  w.string("tokenizer", d.tokenizer);

  const TrainConfig& t = r.train;
  w.section("train");
  w.integer("steps", t.steps);
  w.integer("eval_every", t.eval_every);
  w.integer("eval_batches", t.eval_batches);
  w.uinteger("seed", t.seed);
  w.string("out_dir", t.out_dir);
  w.string("device", t.device);
  w.integer("sample_tokens", t.sample_tokens);
  w.integer("num_samples", t.num_samples);
  w.real("sample_temperature", t.sample_temperature);
  w.string("sample_prompt", t.sample_prompt);

  const CheckpointConfig& c = r.checkpoint;
  w.section("checkpoint");
  w.integer("every", c.every);
  w.integer("keep", c.keep);
  w.boolean("save_final", c.save_final);
  w.string("resume", c.resume);

  w.section("logging");
  w.integer("every", r.logging.every);
  w.string("level", r.logging.level);
  w.boolean("profile_ops", r.logging.profile_ops);
  return w.text();
}

}  // namespace tessera
