// Tensor: a non-owning, contiguous, row-major view (pointer + dtype + device + shape).
// Memory is owned elsewhere (an Arena or a Buffer); views are cheap to copy and pass by value.
// Shapes are written outermost first; letters in shape comments are defined per file.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace tessera {

enum class Device : uint8_t { cpu, cuda };
std::string_view device_name(Device d);

constexpr int kMaxDims = 5;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  int64_t operator[](int i) const { return dims[i < 0 ? ndim + i : i]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "(2, 3, 4)"
};

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  Shape shape;

  Tensor() = default;
  Tensor(void* d, DType t, Device dev, Shape s) : data(d), dtype(t), device(dev), shape(s) {}

  bool empty() const { return data == nullptr; }  // "no tensor" (e.g. no bias)
  int ndim() const { return shape.ndim; }
  int64_t dim(int i) const { return shape[i]; }
  int64_t numel() const { return shape.numel(); }
  size_t nbytes() const { return dtype_storage_bytes(dtype, numel()); }

  // Typed pointer; checks the dtype matches T (float<->f32, double<->f64, int32_t<->i32, ...).
  template <class T>
  T* ptr() const;

  Tensor view(Shape s) const;                      // same numel, new shape
  Tensor slice(int64_t begin, int64_t end) const;  // rows [begin, end) of the leading dim
  std::string str() const;                         // "f32 cpu (2, 3)"
};

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::f64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::i32;
}
template <>
constexpr DType dtype_of<int8_t>() {
  return DType::i8;
}
template <>
constexpr DType dtype_of<bf16_t>() {
  return DType::bf16;
}
template <>
constexpr DType dtype_of<f16_t>() {
  return DType::f16;
}
template <>
constexpr DType dtype_of<e4m3_t>() {
  return DType::e4m3;
}
template <>
constexpr DType dtype_of<e5m2_t>() {
  return DType::e5m2;
}

template <class T>
T* Tensor::ptr() const {
  TS_CHECK(dtype == dtype_of<T>(), "tensor {} accessed as {}", str(), dtype_name(dtype_of<T>()));
  return static_cast<T*>(data);
}

// Shape checks used by every op launcher.
void expect_shape(const Tensor& t, const Shape& s, const char* what);
void expect_same_dtype(const Tensor& a, const Tensor& b, const char* what);

}  // namespace tessera
