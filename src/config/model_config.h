// ModelConfig (the recipe's `model` section): the architecture of a decoder-only Transformer in
// two families:
//   gpt2  — LayerNorm, learned positions, GELU (tanh), biases, tied embeddings;
//   llama — RMSNorm, RoPE (theta), SwiGLU, no biases, grouped-query attention, optional QK-norm,
//           untied LM head (Qwen3 = llama + qk_norm).
// `family` sets the defaults (the table holds gpt2's; model_defaults_for_family the others);
// every switch can still be set on its own. How the model runs (device, attention kernel,
// recomputation, layers kept in FP32) is not here: see ExecOptions (model/transformer.h).
#pragma once
#include <cstdint>

#include "config/enums.h"
#include "config/field.h"
#include "config/moe_config.h"

namespace tessera {

// clang-format off
#define TESSERA_MODEL_FIELDS(X)                                                                   \
  X(ModelFamily, family, ModelFamily::gpt2, config::kAny,                                         \
    "architecture family; sets the defaults of the switches below (llama: rmsnorm, 1e-6, rope, swiglu, no bias, untied)") \
  X(int, vocab_size, 0, config::or_auto(config::kPositive),                                       \
    "real vocabulary size (the tokenizer's); auto: taken from the dataset")                      \
  X(int, padded_vocab_size, 0, config::or_auto(config::kPositive),                                \
    "embedding/LM-head rows, >= vocab_size (padding rows are masked out of the loss); auto: vocab_size rounded up to lcm(vocab_pad_multiple, parallel.tp)") \
  X(int, vocab_pad_multiple, 1, config::kPositive,                                                \
    "multiple the derived padded_vocab_size rounds up to")                                       \
  X(int, num_layers, 0, config::required(config::kPositive), "Transformer blocks (L)")            \
  X(int, hidden, 0, config::required(config::kPositive), "model width (C)")                       \
  X(int, num_heads, 0, config::required(config::kPositive), "query heads (Hq)")                   \
  X(int, num_kv_heads, 0, config::kPositive,                                                      \
    "key/value heads (Hkv), dividing num_heads; default num_heads")                              \
  X(int, head_dim, 0, config::kPositive, "head width (D); default hidden / num_heads")            \
  X(int, ffn_hidden, 0, config::kPositive,                                                        \
    "MLP width (F); gpt2 defaults to 4 * hidden, llama requires it")                             \
  X(int, max_seq_len, 0, config::required(config::kPositive),                                     \
    "longest sequence (learned-position table size)")                                            \
  X(NormKind, norm, NormKind::layernorm, config::kAny, "normalization layer")                     \
  X(float, norm_eps, 1e-5f, config::kPositive, "epsilon of every norm")                           \
  X(PositionKind, position, PositionKind::learned, config::kAny, "position encoding")             \
  X(float, rope_theta, 10000.0f, config::kPositive, "RoPE base frequency")                        \
  X(ActivationKind, activation, ActivationKind::gelu, config::kAny, "MLP activation")             \
  X(bool, bias, true, config::kAny, "biases in linears and norms")                                \
  X(bool, tied_embeddings, true, config::kAny, "the LM head reuses the token embedding")          \
  X(bool, qk_norm, false, config::kAny, "RMSNorm on each query/key head before RoPE (Qwen3)")     \
  X(float, init_std, 0.02f, config::kPositive,                                                    \
    "weights start N(0, init_std); residual output projections are scaled by 1/sqrt(2 L)")
// clang-format on

struct ModelConfig {
  TESSERA_CONFIG_FIELDS(ModelConfig, TESSERA_MODEL_FIELDS)
  // The recipe's `moe` section, copied here by parse_recipe (not a `model.*` key): MoE layers are
  // part of the architecture. Dense (num_experts 0) unless set.
  MoeConfig moe;

  int resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden / num_heads; }
  // Total parameter count (tied embedding counted once; padded vocabulary rows included).
  // Matches the model's parameter list entry for entry; needs padded_vocab_size > 0.
  int64_t num_params() const;
  // Parameters one token passes through: num_params() less the routed experts it is not sent to
  // (E - K per MoE layer). What FLOPs and MFU count.
  int64_t num_active_params() const;
};

// A config with `family`'s defaults in every switch (the parser starts from it).
ModelConfig model_defaults_for_family(ModelFamily family);

}  // namespace tessera
