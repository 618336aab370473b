// The Hugging Face transformers view of a Tessera model: the architecture class that computes what
// it computes (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM), its
// config.json, generation_config.json, and every tensor under its HF name and layout. This file is
// the one Tessera -> HF name table (bench/torch/check_hf_export.py loads the result through
// transformers and never names a tensor).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "export/export_model.h"

namespace tessera::exporting {

enum class HfArch { gpt2, llama, qwen3, qwen3_moe };
const char* hf_class_name(HfArch a);

// The architecture for the model, or a user error naming the model key that none of them matches
// (e.g. a llama-family model with learned positions, or MoE with shared experts).
HfArch hf_arch_for(const ExportModel& m);

// config.json; `torch_dtype` is "float32", "float16" or "bfloat16".
nlohmann::json hf_config(const ExportModel& m, HfArch a, const std::string& torch_dtype);
// generation_config.json: bos and eos are the tokenizer's end-of-text token (none: null).
nlohmann::json hf_generation_config(const ExportModel& m);
// tokenizer_config.json: the fast tokenizer class over tokenizer.json and its special tokens.
nlohmann::json hf_tokenizer_config(const ExportModel& m);

struct HfTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major
};
// Every tensor transformers' class expects, in Tessera's name order (a tied LM head is not
// stored: the class ties it). GPT-2's Conv1D weights are (in, out), so they are transposed, and
// its c_attn fuses q, k and v along the output dim. RoPE needs no Q/K permutation: Tessera rotates
// halves (rotate_half) as transformers does.
std::vector<HfTensor> hf_tensors(const ExportModel& m, HfArch a);

}  // namespace tessera::exporting
