// Internal to the op dispatch files (kernels/ops.cpp, kernels/ops_fp8.cpp): the one helper that
// runs an op on the backend of its tensors' device, timed under the op's name, and the error for a
// CUDA op in a build without CUDA. Not part of the op contract.
#pragma once
#include <initializer_list>
#include <type_traits>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cpu/narrow.h"
#include "kernels/op_profile.h"

namespace tessera::ops::detail {

[[noreturn]] inline void no_cuda(const char* op) {
  TS_USER_ERROR(
      "op {} was asked to run on cuda, but this build has no CUDA backend "
      "(configure with -DTESSERA_CUDA=ON on a machine with nvcc)",
      op);
}

// The device an op runs on: that of its first non-empty tensor (optional outputs such as an
// absent dinp are empty tensors, whose device field means nothing).
inline Device device_of(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (!t->empty()) return t->device;
  return Device::cpu;
}

// What TS_ON_CUDA gives in a build without the CUDA backend: dispatch() then answers a cuda
// device with no_cuda().
struct NoCuda {};

// TS_ON_CUDA(call): an op's CUDA body as a callable for dispatch(). This is the dispatch's one
// #ifdef: without TESSERA_CUDA the call is not compiled at all (its symbols do not exist).
#ifdef TESSERA_CUDA
#define TS_ON_CUDA(...) [&] { return __VA_ARGS__; }
#else
#define TS_ON_CUDA(...) \
  ::tessera::ops::detail::NoCuda {}
#endif

// Runs op `op` on `device` under a ProfileScope on `stream`: on_cuda() on a cuda device (the
// callable passes the stream on), else the CPU body.
// A CPU body taking a cpu::NarrowScope& gets one named after the op (bf16/f16 operands widened to
// f32 scratch, kernels/cpu/narrow.h) and the scope is finished (written copies rounded back once)
// after the body returns; nothing is written back when the body throws. A CPU body taking no
// argument handles every dtype itself.
template <class OnCuda, class OnCpu>
decltype(auto) dispatch(const char* op, Device device, Stream stream, OnCuda&& on_cuda,
                        OnCpu&& on_cpu) {
  const ProfileScope profile(op, device, stream);
  if (device == Device::cuda) {
    if constexpr (std::is_same_v<std::decay_t<OnCuda>, NoCuda>)
      no_cuda(op);
    else
      return on_cuda();
  }
  if constexpr (std::is_invocable_v<OnCpu, cpu::NarrowScope&>) {
    cpu::NarrowScope narrow(op);
    if constexpr (std::is_void_v<std::invoke_result_t<OnCpu, cpu::NarrowScope&>>) {
      on_cpu(narrow);
      narrow.finish();
    } else {
      auto result = on_cpu(narrow);
      narrow.finish();
      return result;
    }
  } else {
    return on_cpu();
  }
}

// The same, on the device of the first non-empty tensor of `tensors`.
template <class OnCuda, class OnCpu>
decltype(auto) dispatch(const char* op, std::initializer_list<const Tensor*> tensors, Stream stream,
                        OnCuda&& on_cuda, OnCpu&& on_cpu) {
  return dispatch(op, device_of(tensors), stream, static_cast<OnCuda&&>(on_cuda),
                  static_cast<OnCpu&&>(on_cpu));
}

}  // namespace tessera::ops::detail
