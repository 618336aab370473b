// ModelConfig helpers: the per-family defaults and the exact parameter count. The count follows
// the model's parameter list (names in the comments below), so a test can demand equality with
// the sum of the model's tensors.
#include "config/model_config.h"

#include "core/error.h"

namespace tessera {

ModelConfig model_defaults_for_family(ModelFamily family) {
  ModelConfig c;  // the table's defaults are gpt2's
  c.family = family;
  if (family == ModelFamily::llama) {
    c.norm = NormKind::rmsnorm;
    c.norm_eps = 1e-6f;
    c.position = PositionKind::rope;
    c.activation = ActivationKind::swiglu;
    c.bias = false;
    c.tied_embeddings = false;
  }
  return c;
}

// Letters: V padded vocabulary, C hidden, L layers, Hq query heads, Hkv key/value heads,
// D head dim, F FFN hidden, Tmax max_seq_len. Linear weights are (in, out); biases (out).
int64_t ModelConfig::num_params() const {
  TS_CHECK(padded_vocab_size > 0 && hidden > 0 && num_heads > 0 && num_layers > 0,
           "num_params needs a resolved config (padded_vocab_size {}, hidden {}, num_heads {}, "
           "num_layers {}); call finalize_model_vocab first when vocab_size is auto",
           padded_vocab_size, hidden, num_heads, num_layers);
  const int64_t V = padded_vocab_size, C = hidden, F = ffn_hidden;
  const int64_t Hq = num_heads, Hkv = num_kv_heads > 0 ? num_kv_heads : num_heads;
  const int64_t D = resolved_head_dim();
  const int64_t norm_params = (norm == NormKind::layernorm && bias) ? 2 * C : C;  // weight (+bias)

  int64_t total = V * C;                                                     // token embedding
  if (position == PositionKind::learned) total += int64_t(max_seq_len) * C;  // (Tmax, C)

  int64_t layer = 2 * norm_params;                     // attention norm + MLP norm
  layer += C * Hq * D + 2 * C * Hkv * D + Hq * D * C;  // q, k, v, o projections
  if (bias) layer += Hq * D + 2 * Hkv * D + C;
  if (qk_norm) layer += 2 * D;                                  // RMSNorm weights shared by heads
  const int mats = activation == ActivationKind::gelu ? 2 : 3;  // fc, proj | gate, up, down
  const auto mlp = [&](int64_t width) {
    return mats * C * width + (bias ? (mats - 1) * width + C : 0);
  };
  for (int l = 0; l < num_layers; ++l) {
    total += layer;
    if (!moe.is_moe_layer(l)) {
      total += mlp(F);
      continue;
    }
    const int64_t E = moe.num_experts;
    total += E * C + E * mats * C * moe.ffn_hidden;  // router (E, C); experts (E, Fe, C) etc.
    if (moe.shared_experts > 0) total += mlp(int64_t(moe.shared_experts) * moe.shared_ffn_hidden);
  }
  total += norm_params;                  // final norm
  if (!tied_embeddings) total += V * C;  // LM head (C, V), no bias
  return total;
}

int64_t ModelConfig::num_active_params() const {
  const int mats = activation == ActivationKind::gelu ? 2 : 3;
  const int64_t idle = int64_t(moe.num_experts - moe.topk) * mats * hidden * moe.ffn_hidden;
  return num_params() - int64_t(moe.num_moe_layers(num_layers)) * (moe.enabled() ? idle : 0);
}

}  // namespace tessera
