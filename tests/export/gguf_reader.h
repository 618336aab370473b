// A small GGUF v3 reader for tests, written from the format description (ggml/include/gguf.h)
// independently of src/export/gguf_file.cpp: header, typed key-values, tensor infos, alignment and
// the data section, so a test can parse back what the writer wrote and check every field.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace tessera::testing {

struct GgufKv {
  uint32_t type = 0;       // gguf_type
  uint32_t elem_type = 0;  // arrays
  // Scalars: integers widened, floats as double, strings; arrays: of strings or numbers.
  std::variant<uint64_t, int64_t, double, std::string, std::vector<std::string>,
               std::vector<double>>
      value;
  uint64_t u() const { return std::get<uint64_t>(value); }
  int64_t i() const { return std::get<int64_t>(value); }
  double f() const { return std::get<double>(value); }
  const std::string& s() const { return std::get<std::string>(value); }
  const std::vector<std::string>& strings() const {
    return std::get<std::vector<std::string>>(value);
  }
  const std::vector<double>& numbers() const { return std::get<std::vector<double>>(value); }
};

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // innermost first
  uint32_t type = 0;
  uint64_t offset = 0;  // from the data section's start
};

struct GgufParsed {
  uint32_t version = 0;
  std::vector<std::string> key_order;
  std::map<std::string, GgufKv> kv;
  std::vector<GgufTensorInfo> tensors;
  uint64_t data_start = 0;  // absolute file offset of the data section
  std::string bytes;        // the whole file

  const GgufTensorInfo& tensor(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw std::runtime_error("no tensor " + name);
  }
  bool has_tensor(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return true;
    return false;
  }
  const uint8_t* data(const GgufTensorInfo& t) const {
    return reinterpret_cast<const uint8_t*>(bytes.data()) + data_start + t.offset;
  }
};

class GgufCursor {
 public:
  explicit GgufCursor(const std::string& b) : b_(b) {}
  template <class T>
  T pod() {
    if (pos_ + sizeof(T) > b_.size()) throw std::runtime_error("GGUF truncated");
    T v;
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str() {
    const uint64_t n = pod<uint64_t>();
    if (pos_ + n > b_.size()) throw std::runtime_error("GGUF string truncated");
    std::string s = b_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  uint64_t pos() const { return pos_; }

 private:
  const std::string& b_;
  uint64_t pos_ = 0;
};

// One scalar of gguf_type `t` as a double or string (integers fit a double in tests' ranges).
inline std::variant<double, std::string, uint64_t, int64_t> gguf_read_scalar(GgufCursor& c,
                                                                             uint32_t t) {
  switch (t) {
    case 0: return uint64_t(c.pod<uint8_t>());
    case 1: return int64_t(c.pod<int8_t>());
    case 2: return uint64_t(c.pod<uint16_t>());
    case 3: return int64_t(c.pod<int16_t>());
    case 4: return uint64_t(c.pod<uint32_t>());
    case 5: return int64_t(c.pod<int32_t>());
    case 6: return double(c.pod<float>());
    case 7: return uint64_t(c.pod<uint8_t>());
    case 8: return c.str();
    case 10: return c.pod<uint64_t>();
    case 11: return c.pod<int64_t>();
    case 12: return c.pod<double>();
  }
  throw std::runtime_error("GGUF value type " + std::to_string(t));
}

inline GgufParsed parse_gguf_file(const std::string& path) {
  GgufParsed g;
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  g.bytes = ss.str();
  GgufCursor c(g.bytes);
  if (g.bytes.compare(0, 4, "GGUF") != 0) throw std::runtime_error("no GGUF magic");
  c.pod<uint32_t>();
  g.version = c.pod<uint32_t>();
  const uint64_t n_tensors = c.pod<uint64_t>(), n_kv = c.pod<uint64_t>();
  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string key = c.str();
    GgufKv kv;
    kv.type = c.pod<uint32_t>();
    if (kv.type == 9) {
      kv.elem_type = c.pod<uint32_t>();
      const uint64_t n = c.pod<uint64_t>();
      if (kv.elem_type == 8) {
        std::vector<std::string> v(n);
        for (auto& s : v) s = c.str();
        kv.value = std::move(v);
      } else {
        std::vector<double> v(n);
        for (auto& x : v) {
          const auto s = gguf_read_scalar(c, kv.elem_type);
          x = std::holds_alternative<double>(s)    ? std::get<double>(s)
              : std::holds_alternative<int64_t>(s) ? double(std::get<int64_t>(s))
                                                   : double(std::get<uint64_t>(s));
        }
        kv.value = std::move(v);
      }
    } else {
      const auto s = gguf_read_scalar(c, kv.type);
      if (std::holds_alternative<double>(s)) kv.value = std::get<double>(s);
      if (std::holds_alternative<std::string>(s)) kv.value = std::get<std::string>(s);
      if (std::holds_alternative<uint64_t>(s)) kv.value = std::get<uint64_t>(s);
      if (std::holds_alternative<int64_t>(s)) kv.value = std::get<int64_t>(s);
    }
    g.key_order.push_back(key);
    g.kv[key] = std::move(kv);
  }
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensorInfo info;
    info.name = c.str();
    const uint32_t nd = c.pod<uint32_t>();
    for (uint32_t d = 0; d < nd; ++d) info.dims.push_back(c.pod<uint64_t>());
    info.type = c.pod<uint32_t>();
    info.offset = c.pod<uint64_t>();
    g.tensors.push_back(info);
  }
  const uint64_t align = g.kv.count("general.alignment") ? g.kv["general.alignment"].u() : 32;
  g.data_start = (c.pos() + align - 1) / align * align;
  return g;
}

}  // namespace tessera::testing
