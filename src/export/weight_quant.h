// Which exported tensors the integer formats quantize, and their codes and FP16 scales by
// kernels/quantize.h — post-training round-to-nearest (PTQ) for an ordinary checkpoint, or exactly
// the integers the training forward used for a QAT one. Shared by the Tessera and GGUF writers.
// Shape letters: R rows (output features; E * out for routed experts), K input features.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "export/export_model.h"
#include "kernels/quantize.h"

namespace tessera::exporting {

// The recipe's QAT settings (Recipe::qat) as the exporter needs them.
struct QatSettings {
  bool enabled = false;
  quant::IntBits bits = quant::IntBits::int8;
  int64_t group_size = 0;  // 0: one group per output channel (group = K)
};
QatSettings qat_settings(const Recipe& r);

// The tensors int8/int4 exports quantize: the weights of the block linears (attention q/k/v/o,
// the MLP's, shared experts') and the routed experts' (E, out, in) tables. Embeddings, the LM head,
// the router, norms and biases stay in a float type (they are small, and quantizing them costs
// the most quality).
std::vector<std::string> quantized_weight_names(const ExportModel& m);
bool is_quantized_weight(const ExportModel& m, const std::string& name);

struct QuantizedWeight {
  std::vector<int64_t> shape;  // the tensor's own: (out, in) or (E, out, in)
  int64_t rows = 0, cols = 0;  // R, K
  int64_t group = 0;           // columns per scale (K: per output channel)
  quant::IntBits bits = quant::IntBits::int8;
  std::vector<int8_t> codes;     // (R, K), int8 in [-127, 127] or int4 in [-8, 7], one per byte
  std::vector<uint16_t> scales;  // (R, K / group), fp16 bits
};

// The group size an int8/int4 export uses: `requested` when > 0; else the QAT recipe's when the
// checkpoint trained with QAT at these bits; else per output channel for int8 and 32 for int4.
// Returns 0 for "per output channel".
int64_t resolve_group_size(const ExportModel& m, quant::IntBits bits, int64_t requested);

// Quantizes tensor `name` (group 0: per output channel). For a QAT checkpoint the f32 master is
// first rounded to the compute dtype (bf16/f16), as the training forward rounded it before fake
// quantization, so the codes and scales equal the ones training used. K % group != 0 is a user
// error naming the tensor.
QuantizedWeight quantize_weight(const ExportModel& m, const std::string& name, quant::IntBits bits,
                                int64_t group);

// For a QAT checkpoint trained in bf16/f16, rounds w (f32 master values) to the compute dtype, as
// the training forward did before fake quantization; otherwise leaves w alone. Every quantizer of
// the exporters (Tessera format, GGUF blocks, tessera perplexity) applies it first.
void round_as_qat_forward(const Recipe& r, std::vector<float>& w);

}  // namespace tessera::exporting
