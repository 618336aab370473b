// A Tessera model as a GGUF v3 file llama.cpp loads: the architecture (gpt2, llama, qwen3,
// qwen3moe) chosen from the model's switches, its hyperparameters and tokenizer as metadata, its
// tensors under llama.cpp's names and in GGML types. The container is gguf_file.h, the block
// packing gguf_blocks.h. Which type each tensor gets (gguf_storage_type) is shared with
// reference_eval.h, so Tessera can evaluate exactly the weights a file holds.
#pragma once
#include <cstdint>
#include <string>

#include "config/model_config.h"
#include "export/export_model.h"
#include "export/gguf_file.h"

namespace tessera::exporting {

// The file's main weight type (general.file_type).
enum class GgufType { f32, f16, bf16, q8_0, q4_0 };
const char* gguf_type_name(GgufType type);  // "f32", "f16", "bf16", "q8_0", "q4_0"

enum class GgufArch { gpt2, llama, qwen3, qwen3moe };
const char* gguf_arch_name(GgufArch arch);

// The llama.cpp architecture whose forward equals the model's: gpt2 (LayerNorm, learned
// positions, GELU, biases, fused QKV), llama (RMSNorm, RoPE, SwiGLU, no biases; llama.cpp's
// interleaved RoPE, so Q/K rows are permuted on export), qwen3 (llama + QK-norm, NEOX RoPE),
// qwen3moe (qwen3 with every block MoE). llama with MoE layers maps to llama (Mixtral's form).
// A model no architecture expresses (a mix of the two families' switches, biases in a llama
// model, MoE with shared experts, dense leading blocks, GELU experts or un-normalized top-k) is a
// user error naming the switch and `where`.
GgufArch gguf_arch_for(const ModelConfig& cfg, const std::string& where);

// What a tensor is to the exporter.
enum class TensorRole {
  vector,        // 1-D: norms, biases
  block_linear,  // a block's linear weight (attention, MLP, routed experts: (E, out, in))
  router,        // an MoE router (E, C): kept F32 (Tessera routes in FP32)
  embedding,     // token and position embeddings
  lm_head,       // an untied LM head
};
TensorRole tensor_role(const std::string& tessera_name, size_t ndim);

// The GGML type a tensor of `role` with `in_features` elements per row is stored as in a file of
// `type`: vectors and routers F32; block linears `type` (Q8_0/Q4_0 fall back to F16 when
// in_features is not a multiple of 32, GGML's block length); embeddings and the LM head `type`
// for F32/F16/BF16 files and F16 in Q8_0/Q4_0 files (only block linears are quantized: they are
// what QAT fake-quantizes by default).
GgmlType gguf_storage_type(GgufType type, TensorRole role, int64_t in_features);

// Writes `model` as a GGUF file at `out_path` (atomically: temporary, fsync, rename). The
// tokenizer comes from model.tokenizer_json. User errors (exit 2) name out_path and the reason:
// an architecture llama.cpp cannot express (gguf_arch_for), a tokenizer larger than the model's
// vocabulary.
void write_gguf(const ExportModel& model, GgufType type, const std::string& out_path);

// The builder write_gguf fills (metadata and tensors, data produced lazily): for tests and
// `tessera inspect`-style listings without writing a file.
GgufBuilder build_gguf(const ExportModel& model, GgufType type, const std::string& where);

}  // namespace tessera::exporting
