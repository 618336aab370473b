// Device memory: raw allocation per device, an owning Buffer, and a bump-pointer Arena.
// The arena is sized once at start-up so no allocation happens inside a training step; it records
// its peak so metrics can report memory, and refuses (user error) an allocation that does not fit.
#pragma once
#include <cstddef>
#include <string>

#include "core/tensor.h"

namespace tessera {

void* device_alloc(Device d, size_t bytes);  // 256-byte aligned; system error on failure
void device_free(Device d, void* p);
// Copies between any two devices (host<->device, device<->device); sizes must match.
void copy_tensor(const Tensor& dst, const Tensor& src);
void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
// `rows` rows of `width` bytes within one device, from rows `src_pitch` bytes apart to rows
// `dst_pitch` bytes apart (one cudaMemcpy2D on CUDA, ordered on the compute stream).
void copy_bytes_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                   size_t rows, Device device);
void zero_tensor(const Tensor& t);
bool cuda_available();  // false when built without CUDA or no device is visible
// Free and total bytes of the current CUDA device; false (and nothing written) for the CPU.
bool device_memory_info(Device d, size_t* free_bytes, size_t* total_bytes);

// Page-locks host memory [ptr, ptr + bytes) while it lives (cudaHostRegister), so copies between
// it and a device run at full DMA speed; a no-op without a usable CUDA device. The memory must
// outlive the pin and must not move (move-only).
class HostPin {
 public:
  HostPin() = default;
  HostPin(void* ptr, size_t bytes);
  ~HostPin();
  HostPin(HostPin&& o) noexcept : ptr_(o.ptr_) { o.ptr_ = nullptr; }
  HostPin& operator=(HostPin&& o) noexcept;
  HostPin(const HostPin&) = delete;
  HostPin& operator=(const HostPin&) = delete;

 private:
  void* ptr_ = nullptr;  // registered; null: nothing pinned
};

// Owning allocation of one block on one device (move-only).
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device d, size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  Device device_ = Device::cpu;
};

// Bump allocator over one Buffer. alloc() never frees individually; mark()/release() rewinds
// (used for per-step scratch). Alignment is 256 bytes (cuBLAS/cuDNN friendly).
class Arena {
 public:
  Arena() = default;
  Arena(Device d, size_t capacity, std::string name = "arena");

  Tensor alloc(DType t, Shape s);  // zero-initialised on first use is NOT guaranteed
  void* alloc_bytes(size_t bytes);
  size_t mark() const { return used_; }
  void release(size_t mark);

  // Hands the underlying block to the caller (who keeps the carved pointers valid by owning it);
  // the arena is left empty.
  Buffer take_buffer() {
    used_ = 0;
    return std::move(buffer_);
  }

  size_t used() const { return used_; }
  size_t peak() const { return peak_; }
  size_t capacity() const { return buffer_.size(); }
  Device device() const { return buffer_.device(); }

  static constexpr size_t kAlign = 256;
  static size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

 private:
  Buffer buffer_;
  size_t used_ = 0;
  size_t peak_ = 0;
  std::string name_;
};

}  // namespace tessera
