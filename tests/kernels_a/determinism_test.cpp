// Results of the CPU reference kernels must not depend on the OpenMP thread count: each op runs
// with 1 and with 3 threads on sizes above the parallel threshold, in f32 (where a different
// summation order would show), and the outputs must be bitwise equal.
#include <functional>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/gemm_reference.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

// Runs `op` (which writes into `outputs`) under 1 and 3 threads and compares every output.
void expect_thread_independent(const char* what, std::vector<HostTensor*> outputs,
                               const std::function<void()>& op) {
  std::vector<HostTensor> initial;
  for (HostTensor* h : outputs) initial.push_back(*h);
  with_threads(1, op);
  std::vector<HostTensor> serial;
  for (size_t i = 0; i < outputs.size(); ++i) {
    serial.push_back(*outputs[i]);
    *outputs[i] = initial[i];  // parameter gradients accumulate: restart from the same values
  }
  with_threads(3, op);
  for (size_t i = 0; i < outputs.size(); ++i) expect_identical(*outputs[i], serial[i], what);
}

constexpr int64_t kRows = 300, kCols = 200;  // 60000 elements, above kMinParallelWork

TEST(Determinism, NormsAreThreadCountIndependent) {
  std::mt19937_64 rng(81);
  const HostTensor inp = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor dout = randn(DType::f32, {kRows, kCols}, rng);
  const HostTensor w = randn(DType::f32, {kCols}, rng), b = randn(DType::f32, {kCols}, rng);
  HostTensor out(DType::f32, {kRows, kCols}), mean(DType::f32, {kRows}), rstd(DType::f32, {kRows});
  HostTensor dinp(DType::f32, {kRows, kCols});
  HostTensor dw = randn(DType::f32, {kCols}, rng), db = randn(DType::f32, {kCols}, rng);
  expect_thread_independent("layernorm_forward", {&out, &mean, &rstd},
                            [&] { cpu::layernorm_forward(out, mean, rstd, inp, w, b, 1e-5f); });
  expect_thread_independent("layernorm_backward", {&dinp, &dw, &db}, [&] {
    cpu::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd);
  });
  expect_thread_independent("rmsnorm_forward", {&out, &rstd},
                            [&] { cpu::rmsnorm_forward(out, rstd, inp, w, 1e-6f); });
  expect_thread_independent("rmsnorm_backward", {&dinp, &dw},
                            [&] { cpu::rmsnorm_backward(dinp, dw, dout, inp, w, rstd); });
}

TEST(Determinism, EmbeddingBackwardIsThreadCountIndependent) {
  std::mt19937_64 rng(82);
  const HostTensor tokens = randint({4, 128}, 0, 37, rng);  // many repeats
  const HostTensor dout = randn(DType::f32, {4, 128, 96}, rng);
  HostTensor dwte = randn(DType::f32, {37, 96}, rng), dwpe = randn(DType::f32, {128, 96}, rng);
  expect_thread_independent("embedding_backward", {&dwte, &dwpe},
                            [&] { cpu::embedding_backward(dwte, dwpe, dout, tokens); });
  HostTensor dwte_shard = randn(DType::f32, {13, 96}, rng);  // rows [20, 33) of the 37
  expect_thread_independent("embedding_backward, vocabulary shard", {&dwte_shard, &dwpe}, [&] {
    cpu::embedding_backward(dwte_shard, dwpe, dout, tokens, 20, 37);
  });
}

TEST(Determinism, GemmReferenceAndBiasGradientAreThreadCountIndependent) {
  std::mt19937_64 rng(83);
  const HostTensor a = randn(DType::f32, {70, 90}, rng), b = randn(DType::f32, {60, 90}, rng);
  HostTensor c = randn(DType::f32, {70, 60}, rng);
  expect_thread_independent("gemm_reference", {&c},
                            [&] { cpu::gemm_reference(c, a, b, false, true, 1.5f, 0.5f); });
  const HostTensor inp = randn(DType::f32, {kRows, 8}, rng), w = randn(DType::f32, {kCols, 8}, rng);
  const HostTensor dout = randn(DType::f32, {kRows, kCols}, rng);
  HostTensor dw(DType::f32, {kCols, 8}), dbias = randn(DType::f32, {kCols}, rng);
  // dbias only: dinp and dweight go through BLAS, which may block differently per thread count.
  expect_thread_independent("matmul_backward dbias", {&dbias},
                            [&] { cpu::matmul_backward(Tensor(), dw, dbias, dout, inp, w); });
}

TEST(Determinism, SumSquaresIsThreadCountIndependent) {
  std::mt19937_64 rng(84);
  const HostTensor x = randn(DType::f32, {100003}, rng);
  double serial = 0.0, parallel = 0.0;
  with_threads(1, [&] { serial = cpu::sum_squares(x); });
  with_threads(3, [&] { parallel = cpu::sum_squares(x); });
  EXPECT_EQ(serial, parallel);
}

}  // namespace
}  // namespace tessera::testing
