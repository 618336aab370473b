// Parity of the CUDA AdamW (kernels/cuda/adamw.cu) with the CPU reference: the update is written
// with explicitly rounded f32 operations in the CPU's order, so param, m and v must match to the
// bit over several steps, with and without weight decay, with gradient scaling, f32, bf16 and
// f16 gradients (f16 ones loss-scaled, unscaled through grad_scale as FP16 training does),
// awkward sizes and misaligned views. The multi-tensor adamw_update_multi must match
// the single-tensor op bit for bit, across more tensors than one launch takes.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// Bitwise comparison that names the first differing element.
void expect_bitwise(const std::vector<float>& got, const std::vector<float>& ref,
                    const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(ref[i])) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << ref[i];
      return;
    }
  }
}

ops::AdamWStep step_config(int step, float weight_decay, float grad_scale) {
  ops::AdamWStep s;
  s.lr = 6e-4f;
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = weight_decay;
  s.step = step;
  s.grad_scale = grad_scale;
  return s;
}

// The loss scale an FP16 run would leave in its gradients (unscaled by grad_scale in the update):
// a power of two, so scaled values are as exact in f16 as unscaled ones would be in bf16.
float loss_scale(DType grad_dtype) { return grad_dtype == DType::f16 ? 1024.0f : 1.0f; }

class AdamWTest : public ::testing::TestWithParam<DType> {};

TEST_P(AdamWTest, StepsMatchCpuBitwise) {
  TESSERA_REQUIRE_GPU();
  const DType grad_dtype = GetParam();
  std::mt19937_64 rng(61);
  for (int64_t n : {1, 7, 4097, (1 << 20) + 3}) {
    for (int offset : {0, 1}) {
      for (float wd : {0.0f, 0.1f}) {
        auto param = testing::random_vector(n, rng);
        std::vector<float> m(n, 0.0f), v(n, 0.0f);
        DeviceTensor gp(DType::f32, {n + 1}), gm(DType::f32, {n + 1}), gv(DType::f32, {n + 1});
        DeviceTensor gg(grad_dtype, {n + 1});
        auto view = [&](const DeviceTensor& d, DType t) {
          return Tensor(static_cast<char*>(d.t().data) + offset * dtype_size(t), t, Device::cuda,
                        Shape{n});
        };
        auto upload_view = [&](DeviceTensor& d, const std::vector<float>& x) {
          std::vector<float> padded(n + 1, 0.0f);
          std::copy(x.begin(), x.end(), padded.begin() + offset);
          d.upload(padded);
        };
        upload_view(gp, param);
        upload_view(gm, m);
        upload_view(gv, v);
        for (int step = 1; step <= 3; ++step) {
          // The CPU sees exactly the gradient values the GPU reads (rounded for bf16 and f16).
          const float scale = loss_scale(grad_dtype);
          auto grad = testing::round_to(grad_dtype, testing::random_vector(n, rng, 0.1f * scale));
          const auto s = step_config(step, wd, (step == 2 ? 0.5f : 1.0f) / scale);
          cpu::adamw_update(host(param, {n}), host(grad, {n}), host(m, {n}), host(v, {n}), s);
          upload_view(gg, grad);
          settle();
          cuda::adamw_update(view(gp, DType::f32), view(gg, grad_dtype), view(gm, DType::f32),
                             view(gv, DType::f32), s);
        }
        auto tail = [&](const DeviceTensor& d) {
          const auto all = d.download();
          return std::vector<float>(all.begin() + offset, all.begin() + offset + n);
        };
        const std::string what = std::string(dtype_name(grad_dtype)) +
                                 " grad, n=" + std::to_string(n) +
                                 " offset=" + std::to_string(offset) + " wd=" + std::to_string(wd);
        expect_bitwise(tail(gp), param, "param " + what);
        expect_bitwise(tail(gm), m, "m " + what);
        expect_bitwise(tail(gv), v, "v " + what);
        EXPECT_TRUE(gp.guards_intact() && gm.guards_intact() && gv.guards_intact()) << what;
      }
    }
  }
}

// Over 40 tensors (more than one launch's descriptors), assorted sizes including empty and
// misaligned ones, each with its own learning rate and decay: the multi-tensor update equals
// the single-tensor op on each, bit for bit.
TEST_P(AdamWTest, MultiTensorMatchesSingleTensor) {
  TESSERA_REQUIRE_GPU();
  const DType grad_dtype = GetParam();
  std::mt19937_64 rng(62);
  std::uniform_int_distribution<int64_t> size(0, 20000);
  constexpr int kTensors = 45;
  std::vector<int64_t> sizes(kTensors);
  for (int i = 0; i < kTensors; ++i) sizes[i] = i == 3 ? 0 : i == 7 ? 100003 : size(rng);
  // Two copies of each state: one updated by adamw_update, one by adamw_update_multi.
  std::vector<std::unique_ptr<DeviceTensor>> tensors;
  auto make = [&](DType t, int64_t n, const std::vector<float>& values) {
    tensors.push_back(std::make_unique<DeviceTensor>(t, Shape{n + 1}));
    tensors.back()->upload(values);
    return tensors.back().get();
  };
  struct Set {
    Tensor p, g, m, v;
  };
  std::vector<Set> single, multi;
  std::vector<ops::AdamWTensors> entries;
  for (int i = 0; i < kTensors; ++i) {
    const int64_t n = sizes[i];
    const int offset = i % 3 == 1 ? 1 : 0;
    auto p = testing::random_vector(n + 1, rng);
    auto g = testing::round_to(grad_dtype,
                               testing::random_vector(n + 1, rng, 0.1f * loss_scale(grad_dtype)));
    auto m = testing::random_vector(n + 1, rng, 0.01f);
    std::vector<float> v(n + 1);
    for (auto& x : v) x = std::abs(testing::random_vector(1, rng, 0.001f)[0]);
    for (auto* sets : {&single, &multi}) {
      auto view = [&](DeviceTensor* d, DType t) {
        return Tensor(static_cast<char*>(d->t().data) + offset * dtype_size(t), t, Device::cuda,
                      Shape{n});
      };
      sets->push_back(
          {view(make(DType::f32, n, p), DType::f32), view(make(grad_dtype, n, g), grad_dtype),
           view(make(DType::f32, n, m), DType::f32), view(make(DType::f32, n, v), DType::f32)});
    }
    auto s = step_config(5, i % 2 ? 0.1f : 0.0f, 0.75f / loss_scale(grad_dtype));
    s.lr = 1e-3f * float(1 + i % 4);
    entries.push_back({multi.back().p, multi.back().g, multi.back().m, multi.back().v, s});
  }
  settle();
  for (int i = 0; i < kTensors; ++i)
    cuda::adamw_update(single[i].p, single[i].g, single[i].m, single[i].v, entries[i].step);
  cuda::adamw_update_multi(entries);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (int i = 0; i < kTensors; ++i) {
    for (auto member : {&Set::p, &Set::m, &Set::v}) {
      const Tensor a = single[i].*member, b = multi[i].*member;
      std::vector<float> x(a.numel()), y(b.numel());
      ASSERT_EQ(cudaMemcpy(x.data(), a.data, a.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(y.data(), b.data, b.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
      expect_bitwise(y, x, "tensor " + std::to_string(i) + " (n=" + std::to_string(sizes[i]) + ")");
    }
  }
  for (const auto& t : tensors) EXPECT_TRUE(t->guards_intact());
}

TEST(CudaAdamW, RejectsBadArguments) {
  TESSERA_REQUIRE_GPU();
  DeviceTensor p(DType::f32, {8}), g(DType::f32, {8}), m(DType::f32, {8}), v(DType::f32, {9});
  settle();
  EXPECT_THROW(cuda::adamw_update(p, g, m, v, step_config(1, 0.0f, 1.0f)), Error);  // v shape
  EXPECT_THROW(cuda::adamw_update(p, g, m, m, step_config(1, 0.0f, 1.0f)), Error);  // m is v
  DeviceTensor v8(DType::f32, {8});
  settle();
  EXPECT_THROW(cuda::adamw_update(p, g, m, v8, step_config(0, 0.0f, 1.0f)), Error);  // step 0
}

INSTANTIATE_TEST_SUITE_P(GradDtypes, AdamWTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera
