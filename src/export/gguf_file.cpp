// GGUF v3 serialization: metadata, tensor infos with aligned offsets, streamed tensor data, and the
// atomic commit (temporary file, fsync, rename, directory fsync).
#include "export/gguf_file.h"

#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "io/fs_util.h"

namespace tessera::exporting {

int ggml_block_length(GgmlType type) {
  return type == GgmlType::q8_0 || type == GgmlType::q4_0 ? 32 : 1;
}

uint64_t ggml_row_bytes(GgmlType type, int64_t n) {
  TS_CHECK(n % ggml_block_length(type) == 0, "{} row of {} elements", ggml_type_name(type), n);
  switch (type) {
    case GgmlType::f32: return uint64_t(n) * 4;
    case GgmlType::f16:
    case GgmlType::bf16: return uint64_t(n) * 2;
    case GgmlType::q8_0: return uint64_t(n / 32) * (2 + 32);  // fp16 d + 32 int8
    case GgmlType::q4_0: return uint64_t(n / 32) * (2 + 16);  // fp16 d + 32 nibbles
  }
  TS_BUG("ggml type {}", uint32_t(type));
}

const char* ggml_type_name(GgmlType type) {
  switch (type) {
    case GgmlType::f32: return "F32";
    case GgmlType::f16: return "F16";
    case GgmlType::bf16: return "BF16";
    case GgmlType::q8_0: return "Q8_0";
    case GgmlType::q4_0: return "Q4_0";
  }
  return "?";
}

uint64_t GgufTensor::nbytes() const {
  TS_CHECK(!dims.empty(), "GGUF tensor {} has no dims", name);
  uint64_t rows = 1;
  for (size_t i = 1; i < dims.size(); ++i) rows *= uint64_t(dims[i]);
  return ggml_row_bytes(type, dims[0]) * rows;
}

void GgufBuilder::set(const std::string& key, GgufValue value) {
  for (auto& [k, v] : kvs_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  kvs_.emplace_back(key, std::move(value));
}

void GgufBuilder::add_tensor(GgufTensor tensor) {
  for (const GgufTensor& t : tensors_)
    TS_CHECK(t.name != tensor.name, "GGUF tensor {} added twice", tensor.name);
  tensors_.push_back(std::move(tensor));
}

uint64_t GgufBuilder::alignment() const {
  for (const auto& [k, v] : kvs_)
    if (k == "general.alignment") return std::get<uint64_t>(v.value);
  return kGgufDefaultAlignment;
}

namespace {

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Little-endian byte sink over a FILE (x86-64 and aarch64 are little-endian: values are written as
// they lie in memory; the static_assert below guards the assumption).
static_assert(std::endian::native == std::endian::little, "GGUF writer assumes little-endian");

class Sink {
 public:
  Sink(FILE* f, std::string path) : f_(f), path_(std::move(path)) {}
  void bytes(const void* p, size_t n) {
    if (n > 0 && std::fwrite(p, 1, n, f_) != n)
      TS_SYSTEM_ERROR("writing {}: {}", path_, std::strerror(errno));
    written_ += n;
  }
  template <class T>
  void pod(T v) {
    bytes(&v, sizeof v);
  }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    bytes(s.data(), s.size());
  }
  void pad_to(uint64_t alignment) {
    static const char zeros[64] = {};
    uint64_t n = align_up(written_, alignment) - written_;
    while (n > 0) {
      const uint64_t k = n < sizeof zeros ? n : sizeof zeros;
      bytes(zeros, k);
      n -= k;
    }
  }
  uint64_t written() const { return written_; }

 private:
  FILE* f_;
  std::string path_;
  uint64_t written_ = 0;
};

void write_scalar(Sink& s, GgufValueType type, const GgufValue& v, size_t idx) {
  const auto as_u = [&] {
    return v.type == GgufValueType::array ? uint64_t(std::get<std::vector<int64_t>>(v.value)[idx])
                                          : std::get<uint64_t>(v.value);
  };
  const auto as_i = [&] {
    return v.type == GgufValueType::array ? std::get<std::vector<int64_t>>(v.value)[idx]
                                          : std::get<int64_t>(v.value);
  };
  const auto as_f = [&] {
    return v.type == GgufValueType::array ? std::get<std::vector<double>>(v.value)[idx]
                                          : std::get<double>(v.value);
  };
  switch (type) {
    case GgufValueType::u8: return s.pod<uint8_t>(uint8_t(as_u()));
    case GgufValueType::i8: return s.pod<int8_t>(int8_t(as_i()));
    case GgufValueType::u16: return s.pod<uint16_t>(uint16_t(as_u()));
    case GgufValueType::i16: return s.pod<int16_t>(int16_t(as_i()));
    case GgufValueType::u32: return s.pod<uint32_t>(uint32_t(as_u()));
    case GgufValueType::i32: return s.pod<int32_t>(int32_t(as_i()));
    case GgufValueType::u64: return s.pod<uint64_t>(as_u());
    case GgufValueType::i64: return s.pod<int64_t>(as_i());
    case GgufValueType::f32: return s.pod<float>(float(as_f()));
    case GgufValueType::f64: return s.pod<double>(as_f());
    case GgufValueType::boolean: return s.pod<uint8_t>(std::get<bool>(v.value) ? 1 : 0);
    case GgufValueType::string:
      return s.str(v.type == GgufValueType::array ? std::get<std::vector<std::string>>(v.value)[idx]
                                                  : std::get<std::string>(v.value));
    case GgufValueType::array: break;
  }
  TS_BUG("GGUF value type {} as a scalar", uint32_t(type));
}

size_t array_length(const GgufValue& v) {
  switch (v.element_type) {
    case GgufValueType::string: return std::get<std::vector<std::string>>(v.value).size();
    case GgufValueType::f32:
    case GgufValueType::f64: return std::get<std::vector<double>>(v.value).size();
    default: return std::get<std::vector<int64_t>>(v.value).size();
  }
}

void write_value(Sink& s, const GgufValue& v) {
  s.pod<uint32_t>(uint32_t(v.type));
  if (v.type != GgufValueType::array) return write_scalar(s, v.type, v, 0);
  s.pod<uint32_t>(uint32_t(v.element_type));
  const size_t n = array_length(v);
  s.pod<uint64_t>(n);
  for (size_t i = 0; i < n; ++i) write_scalar(s, v.element_type, v, i);
}

void write_contents(Sink& s, const GgufBuilder& b) {
  s.bytes(kGgufMagic, 4);
  s.pod<uint32_t>(kGgufVersion);
  s.pod<uint64_t>(b.tensors().size());
  s.pod<uint64_t>(b.metadata().size());
  for (const auto& [key, value] : b.metadata()) {
    s.str(key);
    write_value(s, value);
  }
  const uint64_t align = b.alignment();
  uint64_t offset = 0;
  for (const GgufTensor& t : b.tensors()) {
    s.str(t.name);
    s.pod<uint32_t>(uint32_t(t.dims.size()));
    for (int64_t d : t.dims) s.pod<uint64_t>(uint64_t(d));
    s.pod<uint32_t>(uint32_t(t.type));
    s.pod<uint64_t>(offset);
    offset = align_up(offset + t.nbytes(), align);
  }
  s.pad_to(align);
  const uint64_t data_start = s.written();
  for (const GgufTensor& t : b.tensors()) {
    const std::vector<uint8_t> data = t.produce();
    TS_CHECK(data.size() == t.nbytes(), "GGUF tensor {}: {} bytes produced, {} declared", t.name,
             data.size(), t.nbytes());
    s.bytes(data.data(), data.size());
    s.pad_to(align);
  }
  TS_CHECK(s.written() - data_start == offset, "GGUF data section {} bytes, offsets say {}",
           s.written() - data_start, offset);
}

}  // namespace

void GgufBuilder::write(const std::string& path) const {
  const uint64_t align = alignment();
  TS_CHECK(align > 0 && (align & (align - 1)) == 0, "general.alignment {} is not a power of 2",
           align);
  io::TempPath tmp(path);
  FILE* f = std::fopen(tmp.path.c_str(), "wb");
  if (!f) TS_SYSTEM_ERROR("cannot create {}: {}", tmp.path, std::strerror(errno));
  try {
    Sink sink(f, tmp.path);
    write_contents(sink, *this);
  } catch (...) {
    std::fclose(f);
    throw;
  }
  if (std::fflush(f) != 0 || ::fsync(fileno(f)) != 0) {
    const int err = errno;
    std::fclose(f);
    TS_SYSTEM_ERROR("flushing {}: {}", tmp.path, std::strerror(err));
  }
  if (std::fclose(f) != 0) TS_SYSTEM_ERROR("closing {}: {}", tmp.path, std::strerror(errno));
  io::rename_path(tmp.path, path);
  tmp.committed = true;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  io::fsync_dir(parent.empty() ? "." : parent.string());
}

}  // namespace tessera::exporting
