// Tessera's export format: ONE HDF5 file holding a trained model for inference — integer weights
// with their FP16 scales, the float tensors, the model config and the tokenizer. The inference
// engine loads it (read_tessera_export); `tessera inspect FILE` summarises it.
//
// Layout (format_version 1):
//   / attributes   tessera_format = "tessera-export", format_version, quant (f32 f16 bf16 int8
//                  int4), float_dtype (of the tensors kept in float), source_checkpoint (the step
//                  directory as given), step, tokenizer_hash (sha256 hex of /tokenizer_json),
//                  trained_compute (precision.compute), qat (1: the integers are the ones QAT
//                  trained against; 0: post-training round-to-nearest)
//   /model_config  string: the recipe's model and moe sections, YAML
//   /tokenizer_json string: the Hugging Face tokenizer.json the model was trained with
//   /tensors/<name> a float tensor: a dataset of its shape; attribute dtype: f32 (IEEE float) or
//                  f16 / bf16 (u16 bit patterns)
//   /tensors/<name>/ a quantized weight (weight_quant.h says which): a group with attributes
//                  shape (int64[]: (out, in), or (E, out, in) for routed experts), bits (8 or 4),
//                  group_size (input columns per scale), rows R (prod of all dims but the last),
//                  cols K (the last dim), holding
//        codes     int8: (R, K) i8 in [-127, 127]; int4: (R, K/2) u8, two codes per byte — element
//                  2j of a row in the LOW nibble, element 2j+1 in the HIGH nibble, each the code's
//                  4-bit two's complement (-8..7; core/dtype.h pack_int4)
//        scales    (R, K/group) u16: FP16 bit patterns
//                  The weight is code * float(fp16 scale) in f32 (kernels/quant_math.h).
// Every dataset is chunked with Fletcher-32 checksums (a flipped byte fails the read). Equal
// models give byte-identical files (no timestamps; a fixed write order).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/model_config.h"
#include "core/dtype.h"
#include "export/export.h"
#include "kernels/quantize.h"

namespace tessera::exporting {

constexpr int64_t kTesseraExportVersion = 1;
constexpr const char* kTesseraExportTag = "tessera-export";

void write_tessera_export(const ExportModel& m, const ExportOptions& o);

struct TesseraExportTensor {
  std::vector<int64_t> shape;
  bool quantized = false;
  DType dtype = DType::f32;   // float tensors: as stored (f32, f16 or bf16)
  std::vector<float> values;  // float tensors, prod(shape) values (f16/bf16 widened exactly)
  // Quantized weights (codes unpacked: one per byte).
  quant::IntBits bits = quant::IntBits::int8;
  int64_t rows = 0, cols = 0, group = 0;
  std::vector<int8_t> codes;     // (R, K)
  std::vector<uint16_t> scales;  // (R, K / group), fp16 bits
  int64_t stored_bytes = 0;      // of its datasets' data
};

struct TesseraExport {
  int64_t format_version = 0, step = 0;
  std::string quant, float_dtype, source_checkpoint, trained_compute;
  bool qat = false;
  std::string model_config_yaml;
  ModelConfig model;  // parsed from model_config_yaml
  std::string tokenizer_json, tokenizer_hash;
  std::map<std::string, TesseraExportTensor> tensors;
};

// True when `path` is an HDF5 file whose root says tessera_format = "tessera-export".
bool is_tessera_export(const std::string& path);
// Reads the file; with_data = false reads shapes, types and attributes only (inspect). A file
// that is not a Tessera export, of another version, or inconsistent is a user error naming it.
TesseraExport read_tessera_export(const std::string& path, bool with_data = true);

// The model and moe sections of the recipe as YAML, and back (model_config_yaml of a file).
std::string model_config_yaml(const Recipe& r);
ModelConfig parse_model_config_yaml(const std::string& yaml, const std::string& file);

}  // namespace tessera::exporting
