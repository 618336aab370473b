// Parity-test helpers for CUDA ops: device tensors with poisoned guard bytes around them (an
// out-of-bounds write fails the test), uploads from host f32 data into f32, bf16 or f16, downloads
// to f32, and error metrics against the CPU reference. Every test calls TESSERA_REQUIRE_GPU()
// first, so on a machine without a GPU it reports itself as skipped, never as passed.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/memory.h"
#include "core/tensor.h"

#define TESSERA_REQUIRE_GPU()                                           \
  do {                                                                  \
    if (!::tessera::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace tessera::testing {

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuardByte = 0xA5;

// A device allocation of one tensor with kGuardBytes of 0xA5 before and after it. The tensor's
// own bytes start poisoned with NaN patterns (0xFF) so unwritten outputs show up as NaN.
class DeviceTensor {
 public:
  DeviceTensor(DType dtype, Shape shape) : dtype_(dtype), shape_(shape) {
    bytes_ = dtype_storage_bytes(dtype, shape.numel());
    cudaMalloc(&base_, bytes_ + 2 * kGuardBytes);
    cudaMemset(base_, kGuardByte, kGuardBytes);
    cudaMemset(static_cast<char*>(base_) + kGuardBytes, 0xFF, bytes_);
    cudaMemset(static_cast<char*>(base_) + kGuardBytes + bytes_, kGuardByte, kGuardBytes);
  }
  ~DeviceTensor() { cudaFree(base_); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  Tensor t() const {
    return Tensor(static_cast<char*>(base_) + kGuardBytes, dtype_, Device::cuda, shape_);
  }
  operator Tensor() const { return t(); }

  // Host f32 values -> device (rounded to nearest even when the tensor is bf16 or f16).
  void upload(const std::vector<float>& host) {
    EXPECT_EQ(int64_t(host.size()), shape_.numel());
    if (dtype_ == DType::f32) {
      cudaMemcpy(t().data, host.data(), bytes_, cudaMemcpyHostToDevice);
    } else if (dtype_ == DType::bf16 || dtype_ == DType::f16) {
      std::vector<uint16_t> b(host.size());
      for (size_t i = 0; i < host.size(); ++i)
        b[i] = dtype_ == DType::bf16 ? f32_to_bf16_bits(host[i]) : f32_to_f16_bits(host[i]);
      cudaMemcpy(t().data, b.data(), bytes_, cudaMemcpyHostToDevice);
    } else if (dtype_ == DType::i32) {
      std::vector<int32_t> v(host.begin(), host.end());
      cudaMemcpy(t().data, v.data(), bytes_, cudaMemcpyHostToDevice);
    } else {
      ADD_FAILURE() << "upload: unsupported dtype";
    }
  }
  void upload_i32(const std::vector<int32_t>& host) {
    cudaMemcpy(t().data, host.data(), bytes_, cudaMemcpyHostToDevice);
  }
  // Device -> host f32 (after synchronizing the device).
  std::vector<float> download() const {
    cudaDeviceSynchronize();
    std::vector<float> out(shape_.numel());
    if (dtype_ == DType::f32) {
      cudaMemcpy(out.data(), t().data, bytes_, cudaMemcpyDeviceToHost);
    } else if (dtype_ == DType::bf16 || dtype_ == DType::f16) {
      std::vector<uint16_t> b(out.size());
      cudaMemcpy(b.data(), t().data, bytes_, cudaMemcpyDeviceToHost);
      for (size_t i = 0; i < out.size(); ++i)
        out[i] = dtype_ == DType::bf16 ? bf16_bits_to_f32(b[i]) : f16_bits_to_f32(b[i]);
    } else {
      ADD_FAILURE() << "download: unsupported dtype";
    }
    return out;
  }
  // True when both guard regions still hold 0xA5 everywhere.
  bool guards_intact() const {
    cudaDeviceSynchronize();
    std::vector<unsigned char> g(kGuardBytes);
    for (size_t off : {size_t(0), kGuardBytes + bytes_}) {
      cudaMemcpy(g.data(), static_cast<char*>(base_) + off, kGuardBytes, cudaMemcpyDeviceToHost);
      for (unsigned char c : g)
        if (c != kGuardByte) return false;
    }
    return true;
  }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  DType dtype_;
  Shape shape_;
};

inline std::vector<float> random_vector(int64_t n, std::mt19937_64& rng, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Host values rounded through bf16 or f16 (so CPU references see exactly the GPU's inputs).
inline std::vector<float> round_to(DType dtype, std::vector<float> v) {
  if (dtype == DType::bf16)
    for (auto& x : v) x = round_bf16(x);
  if (dtype == DType::f16)
    for (auto& x : v) x = round_f16(x);
  return v;
}

// Index of a float dtype in the per-dtype bound tables of the tests: f32 0, bf16 1, f16 2.
inline int dtype_index(DType dtype) {
  return dtype == DType::f32 ? 0 : dtype == DType::bf16 ? 1 : 2;
}

// ||a - b|| / ||b|| (L2), with NaN/Inf agreement checked separately by expect_finite_pattern.
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) continue;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Same elements are NaN (and same infinities) on both sides.
inline void expect_same_nonfinite(const std::vector<float>& gpu, const std::vector<float>& cpu,
                                  const char* what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (std::isnan(cpu[i])) {
      EXPECT_TRUE(std::isnan(gpu[i])) << what << "[" << i << "]: cpu NaN, gpu " << gpu[i];
    } else if (std::isinf(cpu[i])) {
      EXPECT_EQ(gpu[i], cpu[i]) << what << "[" << i << "]";
    } else {
      EXPECT_TRUE(std::isfinite(gpu[i]))
          << what << "[" << i << "]: cpu " << cpu[i] << ", gpu " << gpu[i];
    }
  }
}

}  // namespace tessera::testing
