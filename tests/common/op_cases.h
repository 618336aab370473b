// The registry behind tests/kernels/every_op_test.cpp: each finite-difference case and each GPU
// parity case names, where it is defined, the ops of kernels/ops.h / ops_fp8.h / ops_moe.h it
// checks. The every-op test (linked into the same executable) then demands such a case for every
// op. Part of the shared test kit (tests/common).
//
//   TS_FD_TEST(Gelu, GradientMatchesFiniteDifferences, "gelu_forward", "gelu_backward") { ... }
//       a CPU case (TEST) comparing a backward with central finite differences of its forward
//       (TS_FD_TEST_P: the same for a value-parameterized suite);
//   TS_CPU_VALUE_TEST(InferLinear, Name, "infer_linear_forward") { ... }
//       a CPU case (TEST) comparing a forward-only op (no backward: kernels/ops_infer.h) with an
//       independent computation of its values;
//   TS_GPU_PARITY_TEST(Gelu, ForwardAndBackward, "gelu_forward", "gelu_backward") { ... }
//       a GPU case (TEST_F of GpuCase, suite GeluGpu) comparing CUDA with the CPU reference;
//   TS_GPU_PARITY_TEST_P(GeluGpu, Name, "gelu_forward") { ... }
//       the same for a value-parameterized suite GeluGpu (a GpuCaseP<...> fixture).
// Registration happens at static initialization, before main, so every case is known whether or
// not it runs (filtered out, skipped without a GPU).
#pragma once
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "tests/common/gpu.h"

namespace tessera::testing {

enum class OpCaseKind { finite_difference, cpu_value, gpu_parity };

struct OpCase {
  OpCaseKind kind;
  std::string op;    // an op name of kernels/ops.h, ops_fp8.h, ops_moe.h or ops_infer.h
  std::string test;  // "Suite.Name" of the case that checks it
};

inline std::vector<OpCase>& op_case_registry() {
  static std::vector<OpCase> cases;
  return cases;
}

inline bool register_op_cases(OpCaseKind kind, const char* test,
                              std::initializer_list<const char*> ops) {
  for (const char* op : ops) op_case_registry().push_back({kind, op, test});
  return true;
}

#define TS_OP_CASE_REGISTER_(kind, Suite, Name, ...)                              \
  [[maybe_unused]] static const bool ts_op_case_##Suite##_##Name =                \
      ::tessera::testing::register_op_cases(::tessera::testing::OpCaseKind::kind, \
                                            #Suite "." #Name, {__VA_ARGS__})

#define TS_FD_TEST(Suite, Name, ...)                                 \
  TS_OP_CASE_REGISTER_(finite_difference, Suite, Name, __VA_ARGS__); \
  TEST(Suite, Name)

#define TS_FD_TEST_P(Suite, Name, ...)                               \
  TS_OP_CASE_REGISTER_(finite_difference, Suite, Name, __VA_ARGS__); \
  TEST_P(Suite, Name)

#define TS_CPU_VALUE_TEST(Suite, Name, ...)                  \
  TS_OP_CASE_REGISTER_(cpu_value, Suite, Name, __VA_ARGS__); \
  TEST(Suite, Name)

#define TS_GPU_PARITY_TEST(Suite, Name, ...)                       \
  TS_OP_CASE_REGISTER_(gpu_parity, Suite##Gpu, Name, __VA_ARGS__); \
  TS_GPU_TEST(Suite, Name)

#define TS_GPU_PARITY_TEST_P(Suite, Name, ...)                \
  TS_OP_CASE_REGISTER_(gpu_parity, Suite, Name, __VA_ARGS__); \
  TEST_P(Suite, Name)

}  // namespace tessera::testing
