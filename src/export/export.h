// `tessera export`: a checkpoint written for deployment in one of three formats, at one numeric
// type. Which types each format takes: tessera {f32, f16, bf16, int8, int4}; gguf {f32, f16, bf16,
// q8_0, q4_0}; safetensors {f32, f16, bf16}. Outputs are written atomically (a temporary beside
// the target, fsynced, renamed over it). docs/EXPORT.md describes the formats.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/enums.h"
#include "export/export_model.h"

namespace tessera::exporting {

enum class ExportFormat { tessera, gguf, safetensors };
enum class ExportQuant { f32, f16, bf16, q8_0, q4_0, int8, int4 };

struct ExportOptions {
  ExportFormat format = ExportFormat::tessera;
  ExportQuant quant = ExportQuant::f32;
  int64_t group_size = 0;  // int8/int4: columns per scale; 0: the default (weight_quant.h)
  std::string out;         // a file (tessera, gguf) or a directory (safetensors)
  bool force = false;      // replace an existing `out`
};

// The types `format` takes, in the order the docs list them.
std::vector<ExportQuant> accepted_quants(ExportFormat format);

// The checks that need no checkpoint (run before reading one): the quant type is one the format
// takes, the group size is valid for it, `out` does not exist unless force. User errors naming the
// option, the value and, for the output, the path.
void check_export_options(const ExportOptions& o);

// Writes `m` as `o` asks (check_export_options first).
void export_model(const ExportModel& m, const ExportOptions& o);

// Writes one file atomically: `write(tmp)` fills a temporary beside `out`, which is then fsynced
// and renamed over `out` (and the directory fsynced). The temporary is removed if `write` throws.
void write_file_atomically(const std::string& out,
                           const std::function<void(const std::string&)>& write);

}  // namespace tessera::exporting

namespace tessera {
// Name tables (config/enums.h): the command line takes exactly these names.
template <>
struct EnumNames<exporting::ExportFormat> {
  using F = exporting::ExportFormat;
  static constexpr std::pair<F, const char*> values[] = {
      {F::tessera, "tessera"}, {F::gguf, "gguf"}, {F::safetensors, "safetensors"}};
};
template <>
struct EnumNames<exporting::ExportQuant> {
  using Q = exporting::ExportQuant;
  static constexpr std::pair<Q, const char*> values[] = {
      {Q::f32, "f32"},   {Q::f16, "f16"},   {Q::bf16, "bf16"}, {Q::q8_0, "q8_0"},
      {Q::q4_0, "q4_0"}, {Q::int8, "int8"}, {Q::int4, "int4"}};
};
}  // namespace tessera
