// The inference engine's model: the decoder-only Transformer of src/model (gpt2, llama/qwen3,
// MoE) with weights from a Tessera export (INT8/INT4 weight-only, BF16, F16, F32) or a training
// checkpoint of any layout, run over the rows of one engine step (prefill chunks and decodes of
// many sequences at once) against the paged KV cache. Same ops as training (kernels/ops.h), plus
// the engine's (kernels/ops_infer.h): its batch-invariant linear and paged attention.
// Shape letters: M rows of a step, R rows whose logits are wanted, C width, Hq/Hkv heads, D head
// dim, F FFN width, V vocabulary, E experts, K top-k, S table rows, MB blocks per table row, NB
// cache blocks, BS tokens per block.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/model_config.h"
#include "core/memory.h"
#include "kernels/ops_infer.h"

namespace tessera {

// A linear of the engine: weight (out, in) quantized or float, and its bias (or empty).
struct EngineLinear {
  ops::InferWeight weight;
  Tensor bias;
};

struct EngineNorm {
  Tensor weight, bias;  // (C); bias empty for RMSNorm or bias-free LayerNorm
};

// A feed-forward network: GELU (fc, proj) or SwiGLU (gate, up, down; `up` set).
struct EngineFfn {
  EngineLinear in, up, out;
  int64_t width = 0;  // F
};

struct EngineLayer {
  EngineNorm ln1, ln2;
  EngineLinear wq, wk, wv, wo;
  Tensor q_norm, k_norm;  // (D) QK-norm weights, or empty
  bool is_moe = false;
  EngineFfn mlp;                   // dense blocks
  ops::InferWeight router;         // MoE: (E, C) f32, computed in f32
  std::vector<EngineFfn> experts;  // MoE: E routed experts (slices of the stored (E, out, in))
  EngineFfn shared;                // MoE with shared experts (width 0 if none)
};

// The K/V cache of every layer: (NB, BS, Hkv, D) each, in the model's dtype, allocated once.
struct KvCacheArena {
  int64_t num_blocks = 0, block_size = 0;
  std::vector<Tensor> k, v;  // L of each
  Buffer buffer;
};

// One step's rows, as the engine lays them out (host vectors; forward copies them to the device
// in one transfer).
struct StepRows {
  std::vector<int32_t> tokens;        // (M)
  std::vector<int32_t> positions;     // (M)
  std::vector<int32_t> slots;         // (M) KvSlot::flat of each row's position
  std::vector<int32_t> seq;           // (M) the row of block_tables the token belongs to
  std::vector<int32_t> block_tables;  // (S, MB) row-major, unused entries 0
  int64_t table_width = 0;            // MB
  std::vector<int32_t> logit_rows;    // (R) rows whose logits are computed, in output order
  int max_context = 0;                // > every position
};

// Where the weights come from and how they run.
struct EngineModelOptions {
  Device device = Device::cpu;
  DType dtype = DType::f32;  // activations, float weights and the KV cache: f32, bf16 or f16
};

// Random weights for benchmarks (speed does not depend on the values): N(0, std) linears and
// embeddings, unit norms; `format` float (the engine's dtype), int8 or int4, quantized as an
// export would (group 0: per output channel).
struct SyntheticWeights {
  std::string format = "float";
  int64_t group = 0;
  uint64_t seed = 1;
  float std = 0.02f;
};

class EngineModel {
 public:
  // `path`: a Tessera export file (tessera export --format tessera) or a training run / checkpoint
  // step directory (any dp/tp/pp/ep layout, merged). User errors name the path.
  static std::unique_ptr<EngineModel> load(const std::string& path,
                                           const EngineModelOptions& options);
  // A model of `config`'s shape with random weights, made and placed one tensor at a time (a
  // Llama-3-8B never exists whole in host memory). It has no tokenizer.
  static std::unique_ptr<EngineModel> synthetic(const ModelConfig& config,
                                                const SyntheticWeights& w,
                                                const EngineModelOptions& options);
  ~EngineModel();

  const ModelConfig& config() const { return cfg_; }
  Device device() const { return options_.device; }
  DType dtype() const { return options_.dtype; }
  const std::string& tokenizer_json() const { return tokenizer_json_; }
  const std::string& source() const { return source_; }
  const std::string& weight_format() const { return weight_format_; }  // "int4-g32", "bf16", ...
  int64_t weight_bytes() const { return weight_bytes_; }               // as held on the device
  int64_t vocab_size() const { return cfg_.vocab_size; }

  // A cache of num_blocks blocks of block_size tokens for this model.
  KvCacheArena make_kv_cache(int64_t num_blocks, int64_t block_size) const;

  // Scratch for steps of up to max_rows rows, max_logit_rows logit rows, max_seqs table rows of
  // max_table_width blocks, positions below max_context. Allocated once; forward never allocates.
  void reserve(int64_t max_rows, int64_t max_logit_rows, int64_t max_seqs, int64_t max_table_width,
               int64_t max_context);
  size_t workspace_bytes() const { return work_.capacity(); }

  // Runs one step: writes every row's K/V into `kv` at its slot, and returns the logits of
  // rows.logit_rows, (R, V) f32 on the host.
  const std::vector<float>& forward(const StepRows& rows, KvCacheArena& kv);

 private:
  struct Scratch;  // the step's activations, carved from work_
  EngineModel();
  void layer_forward(const EngineLayer& layer, int l, Scratch& s, KvCacheArena& kv) const;
  void ffn_forward(const EngineFfn& f, Tensor y, Tensor x, Scratch& s) const;
  void moe_forward(const EngineLayer& layer, Tensor y, Tensor x, Scratch& s) const;

  ModelConfig cfg_;
  EngineModelOptions options_;
  std::string tokenizer_json_, source_, weight_format_;
  int64_t weight_bytes_ = 0;
  std::vector<Buffer> storage_;  // every weight's memory
  Tensor wte_, wpe_;             // (V, C), (maxT, C) or empty
  EngineNorm final_norm_;
  ops::InferWeight lm_head_;  // (V, C): the embedding when tied
  std::vector<EngineLayer> layers_;
  Arena work_;
  std::unique_ptr<Scratch> scratch_;
  std::vector<int32_t> host_i32_;  // staging of a step's index tensors
  std::vector<float> logits_;      // (R, V)
  friend struct EngineModelLoader;
};

}  // namespace tessera
