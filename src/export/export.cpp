// Option checks, dispatch to the writers and the atomic file commit of `tessera export`.
#include "export/export.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "export/gguf_writer.h"
#include "export/safetensors_writer.h"
#include "export/tessera_format.h"
#include "io/fs_util.h"

namespace tessera::exporting {
namespace {

namespace fs = std::filesystem;

std::string names_text(const std::vector<ExportQuant>& qs) {
  std::string s;
  for (ExportQuant q : qs) s += (s.empty() ? "" : ", ") + std::string(to_string(q));
  return s;
}

// check_export_options admits only these for gguf.
GgufType gguf_type(ExportQuant q) {
  switch (q) {
    case ExportQuant::f32: return GgufType::f32;
    case ExportQuant::f16: return GgufType::f16;
    case ExportQuant::bf16: return GgufType::bf16;
    case ExportQuant::q8_0: return GgufType::q8_0;
    case ExportQuant::q4_0: return GgufType::q4_0;
    default: TS_BUG("--quant {} reached the gguf writer", to_string(q));
  }
}

bool is_int(ExportQuant q) { return q == ExportQuant::int8 || q == ExportQuant::int4; }
bool is_gguf_block(ExportQuant q) { return q == ExportQuant::q8_0 || q == ExportQuant::q4_0; }

void check_group_size(const ExportOptions& o) {
  const int64_t g = o.group_size;
  if (g == 0) return;
  if (is_gguf_block(o.quant)) {
    if (g != 32)
      TS_USER_ERROR("export: --group-size {}: --quant {} has blocks of 32 (GGUF), nothing else", g,
                    to_string(o.quant));
    return;
  }
  if (!is_int(o.quant))
    TS_USER_ERROR("export: --group-size {} applies to integer types only, not --quant {}", g,
                  to_string(o.quant));
  if (g != 32 && g != 64 && g != 128)
    TS_USER_ERROR(
        "export: --group-size {} is not one of 32, 64, 128 (or 0: the default; per output "
        "channel for int8)",
        g);
}

}  // namespace

std::vector<ExportQuant> accepted_quants(ExportFormat format) {
  using Q = ExportQuant;
  switch (format) {
    case ExportFormat::tessera: return {Q::f32, Q::f16, Q::bf16, Q::int8, Q::int4};
    case ExportFormat::gguf: return {Q::f32, Q::f16, Q::bf16, Q::q8_0, Q::q4_0};
    case ExportFormat::safetensors: return {Q::f32, Q::f16, Q::bf16};
  }
  TS_BUG("export format {}", int(format));
}

void check_export_options(const ExportOptions& o) {
  const std::vector<ExportQuant> ok = accepted_quants(o.format);
  if (std::find(ok.begin(), ok.end(), o.quant) == ok.end())
    TS_USER_ERROR("export: --quant {} is not available for --format {} (it takes {})",
                  to_string(o.quant), to_string(o.format), names_text(ok));
  check_group_size(o);
  if (o.out.empty()) TS_USER_ERROR("export: --out is empty");
  std::error_code ec;
  if (fs::symlink_status(o.out, ec).type() != fs::file_type::not_found && !o.force)
    TS_USER_ERROR("export: output {} exists; pass --force to replace it", o.out);
  const bool dir_out = o.format == ExportFormat::safetensors;
  if (o.force && fs::exists(o.out, ec) && fs::is_directory(o.out, ec) != dir_out)
    TS_USER_ERROR("export: output {} exists and is {}; --format {} writes {} (not replaced)", o.out,
                  dir_out ? "not a directory" : "a directory", to_string(o.format),
                  dir_out ? "a directory" : "a file");
  const fs::path parent = fs::absolute(o.out, ec).parent_path();
  if (!fs::is_directory(parent, ec))
    TS_USER_ERROR("export: the directory of --out {} ({}) does not exist", o.out, parent.string());
}

void export_model(const ExportModel& m, const ExportOptions& o) {
  check_export_options(o);
  switch (o.format) {
    case ExportFormat::tessera: write_tessera_export(m, o); return;
    case ExportFormat::safetensors: write_safetensors_dir(m, o); return;
    case ExportFormat::gguf: write_gguf(m, gguf_type(o.quant), o.out); return;
  }
  TS_BUG("export format {}", int(o.format));
}

void write_file_atomically(const std::string& out,
                           const std::function<void(const std::string&)>& write) {
  io::TempPath tmp(out);
  write(tmp.path);
  io::fsync_file(tmp.path);
  io::rename_path(tmp.path, out);
  tmp.committed = true;
  std::error_code ec;
  const fs::path parent = fs::absolute(out, ec).parent_path();
  io::fsync_dir(parent.string());
}

}  // namespace tessera::exporting
