// Tests of the CPU's bf16/f16 path itself (kernels/cpu/narrow.cpp, NarrowScope): the widening and
// narrowing chunks on several threads give the same bits as one thread, and the operand mixes
// that scratch copies would hide from a kernel's own checks (partial overlap, the same memory seen
// as two dtypes, 16-bit statistics, f64 beside 16-bit operands) are rejected with nothing written
// back. Each op's own 16-bit contract cases are in its tests/kernels/<op>_test.cpp.
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/common/narrow.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

using namespace n16;

TEST(NarrowDtype, LargeTensorsAndThreadCounts) {
  // Above the OpenMP threshold the widening and narrowing run in 16384-element chunks on several
  // threads; 70001 elements end in a partial chunk. The bits may not depend on the thread count.
  const Shape s{70001};
  for (DType dt : kNarrowTypes) {
    std::vector<uint16_t> runs[2];
    for (int threads : {1, 2}) {
      with_threads(threads, [&] {
        const OpRun r = expect_contract(
            "gelu_forward " + std::to_string(threads) + " threads", dt, {narrow(s), narrow(s, 3.0)},
            [](const auto& t) { ops::gelu_forward(t[0], t[1]); }, 130);
        runs[threads - 1] = r.bits[0];
      });
    }
    EXPECT_EQ(runs[0], runs[1]);
  }
}

TEST(NarrowDtype, RejectsWhatCopiesWouldHide) {
  std::vector<uint16_t> buf(9, f32_to_bf16_bits(1.0f));
  const Tensor whole(buf.data(), DType::bf16, Device::cpu, {8});
  const Tensor shifted(buf.data() + 1, DType::bf16, Device::cpu, {8});
  // partial overlap between a written 16-bit output and an input
  EXPECT_THROW(ops::add_forward(shifted, whole, whole), Error);
  EXPECT_THROW(ops::gelu_forward(shifted, whole), Error);
  // the same memory seen as f32 and as bf16 is not exact aliasing either
  const Tensor as_f32(buf.data(), DType::f32, Device::cpu, {4});
  const Tensor as_bf16(buf.data(), DType::bf16, Device::cpu, {4});
  std::vector<float> other(4, 1.0f);
  EXPECT_THROW(
      ops::add_forward(as_bf16, as_f32, Tensor(other.data(), DType::f32, Device::cpu, {4})), Error);
  for (uint16_t bits : buf) EXPECT_EQ(bits, f32_to_bf16_bits(1.0f));  // nothing written back
  // statistics stay f32
  std::vector<uint16_t> x(6), out(6), w(3), mean(2);
  float rstd[2];
  EXPECT_THROW(
      ops::layernorm_forward(Tensor(out.data(), DType::bf16, Device::cpu, {2, 3}),
                             Tensor(mean.data(), DType::bf16, Device::cpu, {2}),
                             Tensor(rstd, DType::f32, Device::cpu, {2}),
                             Tensor(x.data(), DType::bf16, Device::cpu, {2, 3}),
                             Tensor(w.data(), DType::bf16, Device::cpu, {3}), Tensor(), 1e-5f),
      Error);
  // aliasing the contract forbids is still caught by the kernel (one shared copy): dinp == inp
  std::vector<uint16_t> g(6), dw(3);
  float r2[2] = {1, 1};
  const Tensor xin(x.data(), DType::bf16, Device::cpu, {2, 3});
  EXPECT_THROW(ops::rmsnorm_backward(xin, Tensor(dw.data(), DType::bf16, Device::cpu, {3}),
                                     Tensor(g.data(), DType::bf16, Device::cpu, {2, 3}), xin,
                                     Tensor(w.data(), DType::bf16, Device::cpu, {3}),
                                     Tensor(r2, DType::f32, Device::cpu, {2})),
               Error);
  // f64 does not mix with 16-bit operands (f64 is for finite-difference tests only)
  std::vector<double> d64(8, 1.0);
  EXPECT_THROW(ops::add_forward(whole, Tensor(d64.data(), DType::f64, Device::cpu, {8}), whole),
               Error);
}

}  // namespace
}  // namespace tessera::testing
