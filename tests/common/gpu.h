// GPU parity-test helpers: device tensors with poisoned guard bytes around them (an out-of-bounds
// write fails the test), uploads from host f32 data into f32, bf16 or f16, downloads to f32, error
// metrics against the CPU reference, and the fixtures every GPU case uses (GpuCase, GpuCaseP):
// they skip the case (GTEST_SKIP, reported as skipped, never as passed) on a machine without a
// GPU. Plain C++ over core/memory.h, so GPU cases compile into CPU-only builds too (where they
// skip) and the every-op test sees them. Part of the shared test kit (tests/common).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/memory.h"
#include "core/tensor.h"
#include "kernels/ops.h"

#ifdef TESSERA_CUDA
#include <cuda_runtime.h>
#endif

namespace tessera::testing {

// ---- fixtures ---------------------------------------------------------------------------------
// Every GPU case is a TEST_F / TEST_P of a fixture derived from GpuCase, in a suite whose name
// ends in "Gpu": tests/kernels/CMakeLists.txt labels exactly those cases `cuda` (ctest -L cuda)
// and the others `kernels`. SetUp enforces the name, so a misnamed GPU case fails on every
// machine, and skips the case without a GPU.
inline void gpu_case_setup() {
  const std::string suite = ::testing::UnitTest::GetInstance()->current_test_suite()->name();
  // "Dtypes/NormGpu" (a parameterized suite) ends like "NormGpu".
  ASSERT_TRUE(suite.size() > 3 && suite.compare(suite.size() - 3, 3, "Gpu") == 0)
      << "GPU case in suite " << suite << ": GPU suites must end in \"Gpu\" (ctest -L cuda)";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
}

class GpuCase : public ::testing::Test {
 protected:
  void SetUp() override { gpu_case_setup(); }
};

template <class Param>
class GpuCaseP : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override { gpu_case_setup(); }
};

// A GPU case: TS_GPU_TEST(Fp8Quantize, Name) is the case Fp8QuantizeGpu.Name.
#define TS_GPU_TEST(Suite, Name)                  \
  using Suite##Gpu = ::tessera::testing::GpuCase; \
  TEST_F(Suite##Gpu, Name)

// The GPU's compute capability as major * 10 + minor; 0 in a build without CUDA.
inline int gpu_compute_capability() {
#ifdef TESSERA_CUDA
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major * 10 + minor;
#else
  return 0;
#endif
}

// Waits for the device's default stream (where the ops under test run) and surfaces errors.
inline void settle() { ASSERT_NO_THROW(ops::synchronize(Device::cuda)); }

// ---- device tensors ---------------------------------------------------------------------------

constexpr size_t kGpuGuardBytes = 256;
constexpr unsigned char kGpuGuardByte = 0xA5;

// A device allocation of one tensor with kGpuGuardBytes of 0xA5 before and after it. The tensor's
// own bytes start poisoned with NaN patterns (0xFF) so unwritten outputs show up as NaN.
class DeviceTensor {
 public:
  DeviceTensor(DType dtype, Shape shape) : dtype_(dtype), shape_(shape) {
    bytes_ = dtype_storage_bytes(dtype, shape.numel());
    buffer_ = Buffer(Device::cuda, bytes_ + 2 * kGpuGuardBytes);
    std::vector<unsigned char> init(bytes_ + 2 * kGpuGuardBytes, kGpuGuardByte);
    std::fill(init.begin() + kGpuGuardBytes, init.begin() + kGpuGuardBytes + bytes_, 0xFF);
    copy_bytes(buffer_.data(), Device::cuda, init.data(), Device::cpu, init.size());
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  Tensor t() const {
    return Tensor(static_cast<char*>(buffer_.data()) + kGpuGuardBytes, dtype_, Device::cuda,
                  shape_);
  }
  operator Tensor() const { return t(); }

  // Host f32 values -> device (rounded to nearest even when the tensor is bf16 or f16).
  void upload(const std::vector<float>& host) {
    EXPECT_EQ(int64_t(host.size()), shape_.numel());
    if (dtype_ == DType::f32) {
      upload_bytes(host.data());
    } else if (dtype_ == DType::bf16 || dtype_ == DType::f16) {
      std::vector<uint16_t> b(host.size());
      for (size_t i = 0; i < host.size(); ++i)
        b[i] = dtype_ == DType::bf16 ? f32_to_bf16_bits(host[i]) : f32_to_f16_bits(host[i]);
      upload_bytes(b.data());
    } else if (dtype_ == DType::i32) {
      std::vector<int32_t> v(host.begin(), host.end());
      upload_bytes(v.data());
    } else {
      ADD_FAILURE() << "upload: unsupported dtype";
    }
  }
  void upload_i32(const std::vector<int32_t>& host) { upload_bytes(host.data()); }
  // The tensor's bytes from host memory as they are (any dtype).
  void upload_bytes(const void* host) {
    copy_bytes(t().data, Device::cuda, host, Device::cpu, bytes_);
  }
  // Device -> host f32 (after synchronizing the device).
  std::vector<float> download() const {
    ops::synchronize(Device::cuda);
    std::vector<float> out(shape_.numel());
    if (dtype_ == DType::f32) {
      copy_bytes(out.data(), Device::cpu, t().data, Device::cuda, bytes_);
    } else if (dtype_ == DType::bf16 || dtype_ == DType::f16) {
      std::vector<uint16_t> b(out.size());
      copy_bytes(b.data(), Device::cpu, t().data, Device::cuda, bytes_);
      for (size_t i = 0; i < out.size(); ++i)
        out[i] = dtype_ == DType::bf16 ? bf16_bits_to_f32(b[i]) : f16_bits_to_f32(b[i]);
    } else {
      ADD_FAILURE() << "download: unsupported dtype";
    }
    return out;
  }
  // The tensor's bytes as they are (any dtype).
  std::vector<unsigned char> download_bytes() const {
    ops::synchronize(Device::cuda);
    std::vector<unsigned char> host(bytes_);
    copy_bytes(host.data(), Device::cpu, t().data, Device::cuda, bytes_);
    return host;
  }
  // True when both guard regions still hold 0xA5 everywhere.
  bool guards_intact() const {
    ops::synchronize(Device::cuda);
    std::vector<unsigned char> g(kGpuGuardBytes);
    for (size_t off : {size_t(0), kGpuGuardBytes + bytes_}) {
      copy_bytes(g.data(), Device::cpu, static_cast<char*>(buffer_.data()) + off, Device::cuda,
                 kGpuGuardBytes);
      for (unsigned char c : g)
        if (c != kGpuGuardByte) return false;
    }
    return true;
  }

 private:
  Buffer buffer_;
  size_t bytes_ = 0;
  DType dtype_;
  Shape shape_;
};

// ---- host data and error metrics --------------------------------------------------------------

// An f32 CPU tensor over a host vector (the CPU reference's operands).
inline Tensor host(std::vector<float>& v, Shape s) {
  return Tensor(v.data(), DType::f32, Device::cpu, s);
}

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

// ||a - b|| / ||b|| (L2), with NaN/Inf agreement checked separately by expect_same_nonfinite.
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
                                  const std::string& what) {
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
