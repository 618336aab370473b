// Every op of part A writes only inside its outputs: each output is a view into a larger buffer
// whose guard elements on both sides hold a sentinel, and the guards must be untouched afterwards
// (catches off-by-one rows, wrong leading dimensions and stray writes past the end).
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

constexpr int64_t kGuard = 37;
constexpr double kSentinel = -12345.5;

// An f32 output with kGuard sentinel elements before and after it.
struct Guarded {
  HostTensor storage;
  Tensor t;

  explicit Guarded(Shape s) : storage(filled(DType::f32, {s.numel() + 2 * kGuard}, kSentinel)) {
    t = Tensor(storage.f32.data() + kGuard, DType::f32, Device::cpu, s);
  }
  Guarded(const Guarded&) = delete;
  operator Tensor() const { return t; }

  void expect_guards_intact(const char* what) const {
    const int64_t n = storage.size();
    for (int64_t i = 0; i < kGuard; ++i) {
      EXPECT_EQ(storage.get(i), kSentinel) << what << ": wrote " << kGuard - i << " before";
      EXPECT_EQ(storage.get(n - 1 - i), kSentinel) << what << ": wrote " << kGuard - i << " after";
    }
  }
};

TEST(Bounds, OpsWriteOnlyTheirOutputs) {
  std::mt19937_64 rng(91);
  constexpr int64_t kB = 2, kT = 5, kC = 19, kV = 7, kN = kB * kT, kF = 23;
  const HostTensor tokens = randint({kB, kT}, 0, kV, rng);
  const HostTensor wte = randn(DType::f32, {kV, kC}, rng), wpe = randn(DType::f32, {kT, kC}, rng);
  const HostTensor x = randn(DType::f32, {kB, kT, kC}, rng);
  const HostTensor dout = randn(DType::f32, {kN, kC}, rng);
  const HostTensor w = randn(DType::f32, {kC}, rng), b = randn(DType::f32, {kC}, rng);

  Guarded emb({kB, kT, kC}), dwte({kV, kC}), dwpe({kT, kC});
  cpu::embedding_forward(emb, tokens, wte, wpe);
  cpu::embedding_backward(dwte, dwpe, x, tokens);
  emb.expect_guards_intact("embedding out");
  dwte.expect_guards_intact("dwte");
  dwpe.expect_guards_intact("dwpe");
  // Vocabulary-parallel: rows [2, 5) of the table; the other tokens read as zero rows.
  const HostTensor wte_shard = randn(DType::f32, {3, kC}, rng);
  Guarded emb_shard({kB, kT, kC}), dwte_shard({3, kC});
  cpu::embedding_forward(emb_shard, tokens, wte_shard, Tensor(), 2, kV);
  cpu::embedding_backward(dwte_shard, Tensor(), x, tokens, 2, kV);
  emb_shard.expect_guards_intact("sharded embedding out");
  dwte_shard.expect_guards_intact("sharded dwte");

  const Tensor x2 = x.t.view({kN, kC});
  Guarded ln({kN, kC}), mean({kN}), rstd({kN}), dinp({kN, kC}), dw({kC}), db({kC});
  cpu::layernorm_forward(ln, mean, rstd, x2, w, b, 1e-5f);
  cpu::layernorm_backward(dinp, dw, db, dout, x2, w, mean, rstd);
  for (const Guarded* g : {&ln, &mean, &rstd, &dinp, &dw, &db})
    g->expect_guards_intact("layernorm");
  Guarded rms({kN, kC}), rms_rstd({kN}), rms_dinp({kN, kC}), rms_dw({kC});
  cpu::rmsnorm_forward(rms, rms_rstd, x2, w, 1e-6f);
  cpu::rmsnorm_backward(rms_dinp, rms_dw, dout, x2, w, rms_rstd);
  for (const Guarded* g : {&rms, &rms_rstd, &rms_dinp, &rms_dw}) g->expect_guards_intact("rmsnorm");

  const HostTensor weight = randn(DType::f32, {kF, kC}, rng), bias = randn(DType::f32, {kF}, rng);
  const HostTensor dmm = randn(DType::f32, {kN, kF}, rng);
  Guarded mm({kN, kF}), mm_dinp({kN, kC}), mm_dw({kF, kC}), mm_db({kF});
  cpu::matmul_forward(mm, x2, weight, bias);
  cpu::matmul_backward(mm_dinp, mm_dw, mm_db, dmm, x2, weight);
  for (const Guarded* g : {&mm, &mm_dinp, &mm_dw, &mm_db}) g->expect_guards_intact("matmul");

  const HostTensor up = randn(DType::f32, {kN, kF}, rng);
  Guarded act({kN, kF}), dgate({kN, kF}), dup({kN, kF}), sum({kN, kF});
  cpu::gelu_forward(act, dmm);
  cpu::gelu_backward(dgate, dmm, up);
  cpu::swiglu_forward(sum, dmm, up);
  act.expect_guards_intact("gelu");
  sum.expect_guards_intact("swiglu");
  cpu::swiglu_backward(dgate, dup, dmm, mm, up);
  cpu::add_forward(sum, dmm, up);
  for (const Guarded* g : {&dgate, &dup, &sum}) g->expect_guards_intact("swiglu/add");

  Guarded param({kF}), m({kF}), v({kF});
  for (Guarded* g : {&param, &m, &v}) cpu::fill(*g, 0.5f);
  cpu::adamw_update(param, bias, m, v, ops::AdamWStep{});
  for (const Guarded* g : {&param, &m, &v}) g->expect_guards_intact("adamw/fill");
}

TEST(Bounds, CastWritesOnlyItsOutput) {
  std::mt19937_64 rng(92);
  const HostTensor src = randn(DType::f32, {33}, rng);
  std::vector<uint8_t> e4m3(33 + 2 * kGuard, 0xA5);
  std::vector<uint16_t> bf16(33 + 2 * kGuard, 0xA5A5);
  cpu::cast(Tensor(e4m3.data() + kGuard, DType::e4m3, Device::cpu, {33}), src);
  cpu::cast(Tensor(bf16.data() + kGuard, DType::bf16, Device::cpu, {33}), src);
  for (int64_t i = 0; i < kGuard; ++i) {
    EXPECT_EQ(e4m3[i], 0xA5);
    EXPECT_EQ(e4m3[e4m3.size() - 1 - i], 0xA5);
    EXPECT_EQ(bf16[i], 0xA5A5);
    EXPECT_EQ(bf16[bf16.size() - 1 - i], 0xA5A5);
  }
}

}  // namespace
}  // namespace tessera::testing
