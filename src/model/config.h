// ModelConfig: the architecture of a decoder-only Transformer, covering two families:
//   gpt2  — LayerNorm, learned positions, GELU (tanh), biases, tied embeddings;
//   llama — RMSNorm, RoPE (theta), SwiGLU, no biases, grouped-query attention, optional QK-norm,
//           untied LM head (Qwen3 = llama + qk_norm).
// `family` sets the defaults; every architectural switch can still be set on its own.
#pragma once
#include <cstdint>
#include <string>

namespace tessera {

enum class NormKind { layernorm, rmsnorm };
enum class PositionKind { learned, rope };
enum class ActivationKind { gelu, swiglu };

struct ModelConfig {
  std::string family = "gpt2";  // gpt2 | llama
  int vocab_size = 0;           // real vocabulary (tokenizer size); 0 = `auto`, filled from the
                                // dataset by finalize_model_vocab (train/recipe.h)
  int padded_vocab_size = 0;    // >= vocab_size; rows past vocab_size are padding, masked in loss;
                                // 0 = derive from vocab_size and vocab_pad_multiple
  int vocab_pad_multiple = 1;   // padded_vocab_size, when not given, rounds vocab_size up to this
  int num_layers = 0;
  int hidden = 0;        // C
  int num_heads = 0;     // Hq
  int num_kv_heads = 0;  // Hkv (divides Hq)
  int head_dim = 0;      // D; 0 = hidden / num_heads
  int ffn_hidden = 0;    // F
  int max_seq_len = 0;   // learned-position table size and longest sequence
  NormKind norm = NormKind::layernorm;
  float norm_eps = 1e-5f;
  PositionKind position = PositionKind::learned;
  float rope_theta = 10000.0f;
  ActivationKind activation = ActivationKind::gelu;
  bool bias = true;             // biases in linears and norms
  bool tied_embeddings = true;  // LM head reuses the token embedding
  bool qk_norm = false;         // RMSNorm on each query/key head before RoPE (Qwen3)
  float init_std = 0.02f;       // N(0, init_std); residual output projections are scaled by
                                // 1/sqrt(2 * num_layers) (GPT-2)
  // precision.high_precision: [lm_head] under 16-bit compute: the LM head's GEMMs, logits and
  // cross-entropy in FP32 (from FP32 copies of its weight and input). Set by the trainer from the
  // precision section, not a model key; it does not change the weights.
  bool fp32_lm_head = false;
  // precision.high_precision: [embedding] under 16-bit compute: the lookup reads the FP32 master
  // table (and positions), sums in FP32 and rounds once into the residual stream, as Megatron's
  // embedding weights in FP32 do. Needs the masters on every rank (not with ZeRO-1); the table's
  // gradient stays the compute dtype's (summed in FP32 per micro-batch, rounded once), as every
  // parameter's. Set by the trainer like fp32_lm_head.
  bool fp32_embedding = false;
  bool recompute = false;  // activation recomputation: keep only each block's input
  // How attention runs on CUDA: "cudnn" (fused SDPA) or "native" (Tessera's kernel). Execution
  // choices like this and recompute do not change the weights, so resume may change them.
  std::string attention_impl = "cudnn";

  int resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden / num_heads; }
  // Total parameter count (tied embedding counted once; padded vocabulary rows included).
  // Matches the model's parameter list entry for entry; needs padded_vocab_size > 0.
  int64_t num_params() const;

  bool operator==(const ModelConfig&) const = default;
};

const char* to_string(NormKind kind);
const char* to_string(PositionKind kind);
const char* to_string(ActivationKind kind);

// Applies the family's defaults to every field left at its "unset" value. Used by the recipe
// parser before reading explicit keys.
ModelConfig model_defaults_for_family(const std::string& family);

}  // namespace tessera
