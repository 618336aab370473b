// Writes the golden check's initial state for both tiny models: Tessera-initialized weights and
// random token batches, as a Tessera checkpoint that bench/torch/make_golden.py loads into PyTorch.
// Run once (its outputs are committed):  build/bench/torch/tessera_golden_init <repo root>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "golden_setup.h"
#include "io/checkpoint.h"
#include "model/transformer.h"
#include "optim/adamw.h"

using namespace tessera;

static std::vector<int64_t> dims(const Shape& s) {
  return {s.dims.begin(), s.dims.begin() + s.ndim};
}

static void write_family(const std::string& root, const std::string& family) {
  const ModelConfig cfg = golden::config_for(family);
  Transformer model(cfg, DType::f32, Device::cpu);
  model.init_weights(golden::kSeed);
  const std::string dir = golden::init_dir(root, family);
  std::filesystem::remove_all(dir);
  io::CheckpointWriter w(dir, 0, 0, 1);
  nlohmann::json params = nlohmann::json::array();
  AdamW decay_rule(model.params(), AdamWConfig{});  // default no_decay: norms, biases, embeddings
  for (const Param& p : model.params().all()) {
    const auto shape = dims(p.spec.shape);
    w.add({p.spec.name, DType::f32, shape, std::vector<int64_t>(shape.size(), 0), shape,
           p.value.data});
    params.push_back({{"name", p.spec.name}, {"decay", decay_rule.decays(p)}});
  }
  std::mt19937_64 rng(golden::kSeed + (family == "gpt2" ? 0 : 1));
  std::uniform_int_distribution<int> tok(0, cfg.vocab_size - 1);
  const int64_t n = int64_t(golden::kSteps) * golden::kBatch * golden::kSeq;
  std::vector<int32_t> tokens(n), targets(n);
  for (int64_t i = 0; i < n; ++i) tokens[i] = tok(rng);
  for (int64_t i = 0; i < n; ++i) targets[i] = (i % 13 == 5) ? -1 : tok(rng);  // some ignored
  const std::vector<int64_t> bshape = {golden::kSteps, golden::kBatch, golden::kSeq};
  w.add({"golden.tokens", DType::i32, bshape, {0, 0, 0}, bshape, tokens.data()});
  w.add({"golden.targets", DType::i32, bshape, {0, 0, 0}, bshape, targets.data()});
  const nlohmann::json model_json = {
      {"family", to_string(cfg.family)},
      {"vocab_size", cfg.vocab_size},
      {"padded_vocab_size", cfg.padded_vocab_size},
      {"num_layers", cfg.num_layers},
      {"hidden", cfg.hidden},
      {"num_heads", cfg.num_heads},
      {"num_kv_heads", cfg.num_kv_heads},
      {"head_dim", cfg.resolved_head_dim()},
      {"ffn_hidden", cfg.ffn_hidden},
      {"max_seq_len", cfg.max_seq_len},
      {"norm", cfg.norm == NormKind::layernorm ? "layernorm" : "rmsnorm"},
      {"norm_eps", cfg.norm_eps},
      {"position", cfg.position == PositionKind::learned ? "learned" : "rope"},
      {"rope_theta", cfg.rope_theta},
      {"activation", cfg.activation == ActivationKind::gelu ? "gelu" : "swiglu"},
      {"bias", cfg.bias},
      {"tied_embeddings", cfg.tied_embeddings},
      {"qk_norm", cfg.qk_norm}};
  const nlohmann::json setup = {{"batch", golden::kBatch},
                                {"seq", golden::kSeq},
                                {"steps", golden::kSteps},
                                {"lr", golden::kLr},
                                {"beta1", golden::kBeta1},
                                {"beta2", golden::kBeta2},
                                {"eps", golden::kEps},
                                {"weight_decay", golden::kWeightDecay},
                                {"grad_clip", golden::kGradClip},
                                {"params", params}};
  w.set_meta("model_json", model_json.dump(2));
  w.set_meta("golden", setup.dump(2));
  std::printf("wrote %s\n", w.commit(1).c_str());
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: tessera_golden_init REPO_ROOT\n");
    return 2;
  }
  write_family(argv[1], "gpt2");
  write_family(argv[1], "llama");
  return 0;
}
