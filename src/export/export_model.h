// A trained model read back whole for export (tessera export): its recipe, every parameter as one
// full f32 tensor (any dp/tp/pp/ep/ZeRO-1 layout merged), its tokenizer, and the QAT settings it
// was trained with. The writers (tessera_format.h, gguf_writer.h, safetensors_writer.h) take it.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/recipe.h"

namespace tessera::exporting {

struct ExportTensor {
  std::vector<int64_t> shape;  // PyTorch layout: a linear's weight is (out, in)
  std::vector<float> data;     // row-major, prod(shape) values
  int64_t numel() const;
};

struct ExportModel {
  std::string checkpoint_dir;  // the step directory read
  int64_t step = 0;
  Recipe recipe;               // as trained (recipe.model, recipe.precision, recipe.qat, ...)
  std::string tokenizer_json;  // Hugging Face tokenizer.json text
  std::string tokenizer_hash;
  // Tessera global names (layers.3.attn.wq.weight, ...). Embedding and LM-head rows are cut to
  // recipe.model.vocab_size (the padding rows never reach a loss and no consumer expects them).
  // Optimizer state is not read.
  std::map<std::string, ExportTensor> tensors;

  const ExportTensor& at(const std::string& name) const;  // bug if absent
  bool has(const std::string& name) const { return tensors.count(name) != 0; }
};

// `dir`: a run directory (its newest complete checkpoint), or a checkpoints/step_<N> directory.
// The tokenizer is the checkpoint's own (meta tokenizer_json) or, for checkpoints that predate it,
// the one stored in the recipe's dataset (its hash must match). User errors (exit 2) name the
// path: no checkpoint, an incomplete or corrupt one, a tokenizer that cannot be found.
ExportModel load_export_model(const std::string& dir);

}  // namespace tessera::exporting
