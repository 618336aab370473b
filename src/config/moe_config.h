// MoeConfig (the recipe's `moe` section): Mixture-of-Experts layers in place of the MLP of the
// blocks it names — router (softmax then top-k), routed experts, optional shared experts, the
// load-balancing and z losses, capacity and token dropping. num_experts 0 (the default) means no
// MoE; every other key then is an error. parse_recipe copies the section into ModelConfig::moe,
// which is what the model reads.
#pragma once
#include <cstdint>

#include "config/field.h"

namespace tessera {

// clang-format off
#define TESSERA_MOE_FIELDS(X)                                                                     \
  X(int, num_experts, 0, config::kNonNegative,                                                    \
    "routed experts per MoE layer (E); 0: no MoE layers")                                        \
  X(int, topk, 2, config::moe_rule(config::kPositive),                                            \
    "experts each token is routed to (K), <= num_experts")                                       \
  X(int, ffn_hidden, 0, config::moe_rule(config::or_auto(config::kPositive)),                     \
    "FFN width of each routed expert; auto: model.ffn_hidden")                                   \
  X(int, shared_experts, 0, config::moe_rule(config::kNonNegative),                               \
    "shared experts every token also passes through (DeepSeek style, added ungated)")           \
  X(int, shared_ffn_hidden, 0, config::moe_rule(config::or_auto(config::kPositive)),              \
    "FFN width of each shared expert; auto: moe.ffn_hidden")                                     \
  X(bool, norm_topk_prob, true, config::moe_rule(config::kAny),                                   \
    "renormalise each token's K routing weights to sum to 1 (Qwen3, Mixtral)")                    \
  X(int, first_dense_layers, 0, config::moe_rule(config::kNonNegative),                           \
    "leading blocks that keep a dense MLP")                                                      \
  X(int, every, 1, config::moe_rule(config::kPositive),                                           \
    "after those, every N-th block is MoE: block i when (i - first_dense_layers) % every == 0")  \
  X(float, capacity_factor, 0.0f, config::moe_rule(config::kNonNegative),                         \
    "slots per expert per micro-batch = ceil(capacity_factor * tokens * K / E); tokens past it are dropped (keep their residual); 0: dropless") \
  X(float, aux_loss_coef, 0.01f, config::moe_rule(config::kNonNegative),                          \
    "Switch/GShard load-balancing loss coefficient (per MoE layer, per micro-batch)")            \
  X(float, z_loss_coef, 0.0f, config::moe_rule(config::kNonNegative),                             \
    "router z-loss coefficient (mean squared logsumexp of the router logits)")
// clang-format on

struct MoeConfig {
  TESSERA_CONFIG_FIELDS(MoeConfig, TESSERA_MOE_FIELDS)

  bool enabled() const { return num_experts > 0; }
  // Block `layer` (global index) has an MoE layer instead of its MLP.
  bool is_moe_layer(int layer) const {
    return enabled() && layer >= first_dense_layers && (layer - first_dense_layers) % every == 0;
  }
  int num_moe_layers(int num_layers) const {
    int n = 0;
    for (int l = 0; l < num_layers; ++l) n += is_moe_layer(l) ? 1 : 0;
    return n;
  }
  // Slots per expert for `tokens` tokens; 0: dropless.
  int64_t capacity(int64_t tokens) const;
  // The fields that shape the weights (the losses and the capacity may change on resume).
  bool same_architecture(const MoeConfig& o) const {
    return num_experts == o.num_experts && topk == o.topk && ffn_hidden == o.ffn_hidden &&
           shared_experts == o.shared_experts && shared_ffn_hidden == o.shared_ffn_hidden &&
           norm_topk_prob == o.norm_topk_prob && first_dense_layers == o.first_dense_layers &&
           every == o.every;
  }
};

}  // namespace tessera
