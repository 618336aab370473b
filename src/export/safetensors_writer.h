// Hugging Face safetensors export: a directory transformers loads with from_pretrained —
// config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json
// (hf_mapping.h chooses the class and names the tensors).
//
// model.safetensors, written by this code: 8 bytes little-endian N, then N bytes of JSON header
// {"<name>": {"dtype": "F32"|"F16"|"BF16", "shape": [...], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"format": "pt"}} padded with spaces to a multiple of 8, then the tensors' raw
// little-endian bytes back to back (offsets relative to the end of the header).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "export/export.h"
#include "export/hf_mapping.h"

namespace tessera::exporting {

// One safetensors file of `tensors` in `dtype` (f32, f16 or bf16).
void write_safetensors_file(const std::string& path, const std::vector<HfTensor>& tensors,
                            DType dtype, const std::map<std::string, std::string>& metadata);

// The whole directory, atomically: written as a temporary directory beside `o.out`, each file
// fsynced, then renamed (replacing an existing `o.out` under --force).
void write_safetensors_dir(const ExportModel& m, const ExportOptions& o);

}  // namespace tessera::exporting
