// The safetensors file format and the transformers directory around it (safetensors_writer.h).
#include "export/safetensors_writer.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/fs_util.h"

namespace tessera::exporting {
namespace {

namespace fs = std::filesystem;

const char* st_dtype(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    default: TS_BUG("safetensors dtype {}", dtype_name(d));
  }
}

DType dtype_of(ExportQuant q) {
  switch (q) {
    case ExportQuant::f32: return DType::f32;
    case ExportQuant::f16: return DType::f16;
    case ExportQuant::bf16: return DType::bf16;
    default: TS_BUG("safetensors quant {}", to_string(q));
  }
}

const char* torch_dtype_name(DType d) {
  return d == DType::f32 ? "float32" : d == DType::f16 ? "float16" : "bfloat16";
}

void write_text(const std::string& path, const std::string& text) {
  io::write_file_synced(path, text);
}

// Removes a temporary directory unless the write committed it.
struct TempDir {
  std::string path;
  bool committed = false;
  ~TempDir() {
    if (!committed) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
};

}  // namespace

void write_safetensors_file(const std::string& path, const std::vector<HfTensor>& tensors,
                            DType dtype, const std::map<std::string, std::string>& metadata) {
  const int64_t elem = int64_t(dtype_size(dtype));
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (const HfTensor& t : tensors) {
    const int64_t bytes = int64_t(t.data.size()) * elem;
    TS_CHECK(!header.contains(t.name), "safetensors: tensor '{}' twice", t.name);
    header[t.name] = {
        {"dtype", st_dtype(dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) TS_SYSTEM_ERROR("safetensors: cannot create {}: {}", path, std::strerror(errno));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t((uint64_t(text.size()) >> (8 * i)) & 0xFF);
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), std::streamsize(text.size()));
  std::vector<char> buf;
  for (const HfTensor& t : tensors) {  // the host is little-endian, as the format is
    buf.resize(size_t(int64_t(t.data.size()) * elem));
    convert_buffer(t.data.data(), DType::f32, buf.data(), dtype, int64_t(t.data.size()));
    out.write(buf.data(), std::streamsize(buf.size()));
  }
  out.close();
  if (!out) TS_SYSTEM_ERROR("safetensors: writing {} failed: {}", path, std::strerror(errno));
  io::fsync_file(path);
}

void write_safetensors_dir(const ExportModel& m, const ExportOptions& o) {
  const HfArch arch = hf_arch_for(m);  // user errors before anything is written
  const DType dtype = dtype_of(o.quant);
  TempDir tmp{o.out + ".tmp-" + std::to_string(::getpid())};
  io::remove_tree(tmp.path);
  io::make_dirs(tmp.path);
  write_safetensors_file(tmp.path + "/model.safetensors", hf_tensors(m, arch), dtype,
                         {{"format", "pt"}});
  write_text(tmp.path + "/config.json", hf_config(m, arch, torch_dtype_name(dtype)).dump(2) + "\n");
  write_text(tmp.path + "/generation_config.json", hf_generation_config(m).dump(2) + "\n");
  write_text(tmp.path + "/tokenizer_config.json", hf_tokenizer_config(m).dump(2) + "\n");
  write_text(tmp.path + "/tokenizer.json", m.tokenizer_json);
  io::fsync_dir(tmp.path);
  std::error_code ec;
  if (fs::exists(o.out, ec)) {
    io::replace_dir(tmp.path, o.out, o.out + ".old-" + std::to_string(::getpid()));
  } else {
    io::rename_path(tmp.path, o.out);
    io::fsync_dir(fs::absolute(o.out, ec).parent_path().string());
  }
  tmp.committed = true;
}

}  // namespace tessera::exporting
