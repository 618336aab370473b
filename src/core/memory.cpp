// Raw device allocation and copies (CPU always; CUDA when built with TESSERA_CUDA), the owning
// Buffer, and the bump-pointer Arena. Without the CUDA backend, any request for Device::cuda is a
// user error (the recipe asked for a GPU this build cannot drive), never a silent CPU fallback.
#include "core/memory.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#ifdef TESSERA_CUDA
#include <cuda_runtime.h>
#endif

namespace tessera {

namespace {

#ifdef TESSERA_CUDA
void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) [[unlikely]]
    fail(ErrorKind::system,
         fmt::format("{} failed: {} ({})", call, cudaGetErrorString(status),
                     cudaGetErrorName(status)),
         file, line);
}
#define CORE_CUDA_CHECK(call) check_cuda((call), #call, __FILE__, __LINE__)
#else
[[noreturn]] void no_cuda_backend(const char* what) {
  TS_USER_ERROR(
      "{} needs device 'cuda', but this build has no CUDA backend (rebuild with "
      "-DTESSERA_CUDA=ON), or use device 'cpu'",
      what);
}
#endif

}  // namespace

void* device_alloc(Device d, size_t bytes) {
  if (bytes == 0) return nullptr;
  if (d == Device::cpu) {
    // aligned_alloc wants a size that is a multiple of the alignment.
    void* p = std::aligned_alloc(Arena::kAlign, Arena::aligned(bytes));
    if (p == nullptr) TS_SYSTEM_ERROR("aligned_alloc of {} bytes on the host failed", bytes);
    return p;
  }
#ifdef TESSERA_CUDA
  void* p = nullptr;
  CORE_CUDA_CHECK(cudaMalloc(&p, bytes));  // cudaMalloc aligns to at least 256 bytes
  return p;
#else
  no_cuda_backend("device_alloc");
#endif
}

void device_free(Device d, void* p) {
  if (p == nullptr) return;
  if (d == Device::cpu) {
    std::free(p);
    return;
  }
#ifdef TESSERA_CUDA
  CORE_CUDA_CHECK(cudaFree(p));
#else
  no_cuda_backend("device_free");
#endif
}

HostPin::HostPin(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0 || !cuda_available()) return;
#ifdef TESSERA_CUDA
  CORE_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterDefault));
  ptr_ = ptr;
#endif
}

HostPin::~HostPin() {
#ifdef TESSERA_CUDA
  if (ptr_) cudaHostUnregister(ptr_);  // a failure here cannot be reported; the memory stays
#endif
}

HostPin& HostPin::operator=(HostPin&& o) noexcept {
  if (this != &o) {
    HostPin gone(std::move(*this));
    ptr_ = o.ptr_;
    o.ptr_ = nullptr;
  }
  return *this;
}

void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  if (bytes == 0) return;
  TS_CHECK(dst != nullptr && src != nullptr, "copy_bytes of {} bytes with a null pointer", bytes);
  if (dst_dev == Device::cpu && src_dev == Device::cpu) {
    std::memmove(dst, src, bytes);
    return;
  }
#ifdef TESSERA_CUDA
  cudaMemcpyKind kind = cudaMemcpyDeviceToDevice;
  if (dst_dev == Device::cpu)
    kind = cudaMemcpyDeviceToHost;
  else if (src_dev == Device::cpu)
    kind = cudaMemcpyHostToDevice;
  CORE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, kind));
#else
  no_cuda_backend("copy_bytes");
#endif
}

void copy_bytes_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                   size_t rows, Device device) {
  if (rows == 0 || width == 0) return;
  TS_CHECK(dst != nullptr && src != nullptr && width <= dst_pitch && width <= src_pitch,
           "copy_bytes_2d: {} rows of {} bytes, pitches {} <- {}", rows, width, dst_pitch,
           src_pitch);
  if (device == Device::cpu) {
    for (size_t r = 0; r < rows; ++r)
      std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                   static_cast<const char*>(src) + r * src_pitch, width);
    return;
  }
#ifdef TESSERA_CUDA
  CORE_CUDA_CHECK(
      cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice));
#else
  no_cuda_backend("copy_bytes_2d");
#endif
}

void copy_tensor(const Tensor& dst, const Tensor& src) {
  TS_CHECK(dst.numel() == src.numel(), "copy_tensor: {} elements into {} ({} <- {})", src.numel(),
           dst.numel(), dst.str(), src.str());
  expect_same_dtype(dst, src, "copy_tensor");
  copy_bytes(dst.data, dst.device, src.data, src.device, src.nbytes());
}

void zero_tensor(const Tensor& t) {
  const size_t bytes = t.nbytes();
  if (bytes == 0) return;
  TS_CHECK(t.data != nullptr, "zero_tensor on an empty tensor {}", t.str());
  if (t.device == Device::cpu) {
    std::memset(t.data, 0, bytes);
    return;
  }
#ifdef TESSERA_CUDA
  CORE_CUDA_CHECK(cudaMemset(t.data, 0, bytes));
#else
  no_cuda_backend("zero_tensor");
#endif
}

bool cuda_available() {
#ifdef TESSERA_CUDA
  int count = 0;
  // No driver or no visible device is an answer here, not an error.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) last error so later checks do not see it
    return false;
  }
  return count > 0;
#else
  return false;
#endif
}

bool device_memory_info(Device d, size_t* free_bytes, size_t* total_bytes) {
  if (d != Device::cuda) return false;
#ifdef TESSERA_CUDA
  CORE_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
  return true;
#else
  return false;
#endif
}

Buffer::Buffer(Device d, size_t bytes) : data_(device_alloc(d, bytes)), size_(bytes), device_(d) {}

Buffer::~Buffer() {
  // A destructor must not throw; a failed free at teardown is not recoverable anyway.
  try {
    device_free(device_, data_);
  } catch (const Error&) {}
}

Buffer::Buffer(Buffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      device_(o.device_) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    Buffer old(std::move(*this));  // frees our block when it goes out of scope
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    device_ = o.device_;
  }
  return *this;
}

// The capacity is rounded up to the alignment so every aligned allocation either fits or not.
Arena::Arena(Device d, size_t capacity, std::string name)
    : buffer_(d, aligned(capacity)), name_(std::move(name)) {}

void* Arena::alloc_bytes(size_t bytes) {
  const size_t need = aligned(bytes);
  if (need > capacity() - used_) {
    TS_USER_ERROR(
        "arena '{}' ({}) is out of memory: requested {} bytes with {} of {} bytes used "
        "(peak {}); raise its size",
        name_, device_name(device()), bytes, used_, capacity(), peak_);
  }
  void* p = static_cast<char*>(buffer_.data()) + used_;
  used_ += need;
  peak_ = std::max(peak_, used_);
  return p;
}

Tensor Arena::alloc(DType t, Shape s) {
  return Tensor(alloc_bytes(dtype_storage_bytes(t, s.numel())), t, device(), s);
}

void Arena::release(size_t mark) {
  TS_CHECK(mark <= used_ && mark % kAlign == 0, "arena '{}': release to mark {} with {} used",
           name_, mark, used_);
  used_ = mark;
}

}  // namespace tessera
