// The GGUF v3 container (llama.cpp's model file): a header, typed key-value metadata, tensor infos
// and the aligned tensor data. This file knows the byte layout only; which keys and tensors a
// model needs is gguf_writer.cpp's business, and the block formats are gguf_blocks.h's.
//
// Layout (little-endian):  "GGUF" u32 version=3  u64 n_tensors  u64 n_kv
//   n_kv x  { string key, u32 value type, value }       string = u64 length + bytes (no NUL)
//                                                       array = u32 element type, u64 n, elements
//   n_tensors x { string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
//                 u64 offset (from the start of the data section, a multiple of the alignment) }
//   zero padding to the alignment (general.alignment, 32 unless that key says otherwise)
//   data: each tensor's bytes at its offset, zero padding between tensors.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <variant>
#include <vector>

namespace tessera::exporting {

// gguf_type (ggml/include/gguf.h): the type tag of a metadata value.
enum class GgufValueType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

// ggml_type (ggml/include/ggml.h) of the tensor types Tessera writes.
enum class GgmlType : uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, bf16 = 30 };

constexpr char kGgufMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kGgufVersion = 3;
constexpr uint64_t kGgufDefaultAlignment = 32;

// Bytes of `n` elements of a tensor type along its innermost dimension (n a multiple of the
// block length for the block types).
uint64_t ggml_row_bytes(GgmlType type, int64_t n);
int ggml_block_length(GgmlType type);  // 1, or 32 for Q8_0/Q4_0
const char* ggml_type_name(GgmlType type);

// One metadata value: a scalar, a string, or an array of one scalar type / of strings.
struct GgufValue {
  GgufValueType type = GgufValueType::u32;
  GgufValueType element_type = GgufValueType::u32;  // arrays only
  std::variant<uint64_t, int64_t, double, bool, std::string, std::vector<std::string>,
               std::vector<int64_t>, std::vector<double>>
      value;

  static GgufValue u32(uint32_t v) { return {GgufValueType::u32, GgufValueType::u32, uint64_t(v)}; }
  static GgufValue i32(int32_t v) { return {GgufValueType::i32, GgufValueType::i32, int64_t(v)}; }
  static GgufValue f32(float v) { return {GgufValueType::f32, GgufValueType::f32, double(v)}; }
  static GgufValue boolean(bool v) { return {GgufValueType::boolean, GgufValueType::boolean, v}; }
  static GgufValue string(std::string v) {
    return {GgufValueType::string, GgufValueType::string, std::move(v)};
  }
  static GgufValue strings(std::vector<std::string> v) {
    return {GgufValueType::array, GgufValueType::string, std::move(v)};
  }
  static GgufValue i32s(std::vector<int64_t> v) {
    return {GgufValueType::array, GgufValueType::i32, std::move(v)};
  }
  static GgufValue f32s(std::vector<double> v) {
    return {GgufValueType::array, GgufValueType::f32, std::move(v)};
  }
};

// A tensor to be written: its data is produced when the file is written (one tensor in memory at
// a time), and must be exactly ggml_row_bytes(type, dims[0]) * prod(dims[1:]) bytes.
struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // innermost first (ggml's ne): a (rows, cols) matrix is {cols, rows}
  GgmlType type = GgmlType::f32;
  std::function<std::vector<uint8_t>()> produce;
  uint64_t nbytes() const;
};

class GgufBuilder {
 public:
  // Keys are written in the order set; setting a key again replaces its value in place.
  void set(const std::string& key, GgufValue value);
  void add_tensor(GgufTensor tensor);  // names must be unique
  uint64_t alignment() const;          // general.alignment if set (u32), else 32

  // Writes the file atomically: a temporary beside `path`, fsynced, renamed over `path`, the
  // directory fsynced. OS failures are TS_SYSTEM_ERROR naming the path.
  void write(const std::string& path) const;

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kvs_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

 private:
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::vector<GgufTensor> tensors_;
};

}  // namespace tessera::exporting
