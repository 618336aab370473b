// Tiny configurations of both model families, shared by model, optimizer and golden tests.
#pragma once
#include "config/model_config.h"

namespace tessera::testing {

// GPT-2 family: LayerNorm, learned positions, GELU, biases, tied embeddings. Vocab 37 padded to 40
// so the padding path of the loss is exercised.
inline ModelConfig tiny_gpt2() {
  ModelConfig c;
  c.family = ModelFamily::gpt2;
  c.vocab_size = 37;
  c.padded_vocab_size = 40;
  c.num_layers = 2;
  c.hidden = 16;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.ffn_hidden = 64;
  c.max_seq_len = 8;
  c.norm = NormKind::layernorm;
  c.position = PositionKind::learned;
  c.activation = ActivationKind::gelu;
  c.bias = true;
  c.tied_embeddings = true;
  c.init_std = 0.2f;  // large so every path carries signal in a 2-layer model
  return c;
}

// Llama/Qwen3 family: RMSNorm, RoPE, SwiGLU, no biases, GQA (4 query / 2 KV heads), QK-norm,
// untied head.
inline ModelConfig tiny_llama() {
  ModelConfig c;
  c.family = ModelFamily::llama;
  c.vocab_size = 41;
  c.padded_vocab_size = 41;
  c.num_layers = 2;
  c.hidden = 16;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 6;  // != hidden / heads: projections are not square
  c.ffn_hidden = 24;
  c.max_seq_len = 8;
  c.norm = NormKind::rmsnorm;
  c.norm_eps = 1e-6f;
  c.position = PositionKind::rope;
  c.rope_theta = 10000.0f;
  c.activation = ActivationKind::swiglu;
  c.bias = false;
  c.tied_embeddings = false;
  c.qk_norm = true;
  c.init_std = 0.2f;
  return c;
}

// MoE variants (moe section set): GELU experts with a tight capacity (some slots dropped) on
// every block; SwiGLU experts with renormalised weights, a shared expert and a dense first block.
// The losses' coefficients are large so their gradients are visible in finite differences.
inline ModelConfig tiny_gpt2_moe() {
  ModelConfig c = tiny_gpt2();
  c.moe.num_experts = 4;
  c.moe.topk = 2;
  c.moe.ffn_hidden = 8;
  c.moe.norm_topk_prob = false;
  c.moe.capacity_factor = 1.0f;
  c.moe.aux_loss_coef = 0.1f;
  c.moe.z_loss_coef = 0.01f;
  return c;
}

inline ModelConfig tiny_llama_moe() {
  ModelConfig c = tiny_llama();
  c.moe.num_experts = 4;
  c.moe.topk = 2;
  c.moe.ffn_hidden = 12;
  c.moe.shared_experts = 1;
  c.moe.shared_ffn_hidden = 8;
  c.moe.first_dense_layers = 1;
  c.moe.aux_loss_coef = 0.1f;
  c.moe.z_loss_coef = 0.01f;
  return c;
}

}  // namespace tessera::testing
