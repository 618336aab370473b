// Shape and Tensor view helpers.
#include "core/tensor.h"

#include <fmt/format.h>

namespace tessera {

std::string_view device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

Shape::Shape(std::initializer_list<int64_t> d) {
  TS_CHECK(d.size() <= kMaxDims, "too many dims: {}", d.size());
  for (int64_t v : d) dims[ndim++] = v;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= dims[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "(";
  for (int i = 0; i < ndim; ++i) s += fmt::format("{}{}", i ? ", " : "", dims[i]);
  return s + ")";
}

Tensor Tensor::view(Shape s) const {
  TS_CHECK(s.numel() == numel(), "view {} of {}", s.str(), str());
  return Tensor(data, dtype, device, s);
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  TS_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= dim(0), "slice [{}, {}) of {}",
           begin, end, str());
  TS_CHECK(dtype != DType::i4 || (numel() / dim(0)) % 2 == 0, "odd-width int4 slice of {}", str());
  Shape s = shape;
  s.dims[0] = end - begin;
  const int64_t row = numel() / std::max<int64_t>(dim(0), 1);
  auto* base = static_cast<char*>(data);
  return Tensor(base ? base + dtype_storage_bytes(dtype, begin * row) : nullptr, dtype, device, s);
}

std::string Tensor::str() const {
  return fmt::format("{} {} {}", dtype_name(dtype), device_name(device), shape.str());
}

void expect_shape(const Tensor& t, const Shape& s, const char* what) {
  TS_CHECK(t.shape == s, "{}: expected shape {}, got {}", what, s.str(), t.str());
}

void expect_same_dtype(const Tensor& a, const Tensor& b, const char* what) {
  TS_CHECK(a.dtype == b.dtype, "{}: dtype {} vs {}", what, dtype_name(a.dtype),
           dtype_name(b.dtype));
}

}  // namespace tessera
