// Every op of kernels/ops.h on bf16 and f16 tensors on the CPU (kernels/cpu/narrow.h), bit for
// bit against the contract: the f32 kernel run on the exactly widened operands, each 16-bit output
// rounded once to nearest even, f32 statistics equal to the f32 run's, integer operands and read-
// only inputs untouched. Covers accumulation (+=), exact aliasing, mixed f32/16-bit operands,
// awkward sizes (1025 columns, 3 rows), NaN/Inf propagation, f16 overflow to Inf (what FP16 loss
// scaling detects), and the rejections (partial overlap, 16-bit statistics).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "tests/kernels_a/kernels_a_util.h"

namespace tessera::testing {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kQNaN = std::numeric_limits<float>::quiet_NaN();

uint16_t narrow_bits(DType dtype, float x) {
  return dtype == DType::bf16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x);
}
float widen(DType dtype, uint16_t bits) {
  return dtype == DType::bf16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}
bool same_or_both_nan(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0;
}

// How an operand is stored in the 16-bit run (the reference run stores every float as f32).
enum class Kind {
  narrow,  // the dtype under test (bf16 or f16)
  f32,     // f32 in both runs: statistics, or the f32 side of a mixed-dtype call
  i32,     // tokens, targets
};

struct Operand {
  Shape shape;
  Kind kind = Kind::narrow;
  double stddev = 1.0;    // floats: normal(0, stddev)
  bool positive = false;  // floats: |normal| + 0.5 (rstd, AdamW's v)
  int lo = 0, hi = 1;     // i32: uniform in [lo, hi)
};

Operand narrow(Shape s, double stddev = 1.0) { return Operand{s, Kind::narrow, stddev}; }
Operand f32(Shape s, bool positive = false) { return Operand{s, Kind::f32, 1.0, positive}; }
Operand ints(Shape s, int lo, int hi) { return Operand{s, Kind::i32, 1.0, false, lo, hi}; }

// One run's memory for every operand; tensors[i] views operand i.
struct OpRun {
  std::vector<std::vector<uint16_t>> bits;
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<int32_t>> i32;
  std::vector<Tensor> tensors;
};

// values[i] holds operand i's initial values, exactly representable in its storage dtype.
OpRun make_run(const std::vector<Operand>& specs, const std::vector<std::vector<double>>& values,
               DType narrow_dtype) {
  OpRun run;
  const size_t n = specs.size();
  run.bits.resize(n);
  run.f32.resize(n);
  run.i32.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Operand& op = specs[i];
    const auto numel = static_cast<size_t>(op.shape.numel());
    void* data = nullptr;
    DType dtype = DType::f32;
    if (op.kind == Kind::i32) {
      for (double v : values[i]) run.i32[i].push_back(int32_t(v));
      data = run.i32[i].data();
      dtype = DType::i32;
    } else if (op.kind == Kind::narrow && narrow_dtype != DType::f32) {
      for (double v : values[i]) run.bits[i].push_back(narrow_bits(narrow_dtype, float(v)));
      data = run.bits[i].data();
      dtype = narrow_dtype;
    } else {
      for (double v : values[i]) run.f32[i].push_back(float(v));
      data = run.f32[i].data();
    }
    EXPECT_EQ(values[i].size(), numel);
    run.tensors.emplace_back(data, dtype, Device::cpu, op.shape);
  }
  return run;
}

// Random initial values; 16-bit operands are rounded to `dtype` first, so the widened reference
// sees exactly what the 16-bit run stores. With `specials`, the first three elements of every
// 16-bit operand are NaN, +Inf, -Inf.
std::vector<std::vector<double>> draw(const std::vector<Operand>& specs, DType dtype, uint64_t seed,
                                      bool specials) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<std::vector<double>> values(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const Operand& op = specs[i];
    for (int64_t j = 0; j < op.shape.numel(); ++j) {
      if (op.kind == Kind::i32) {
        values[i].push_back(std::uniform_int_distribution<int>(op.lo, op.hi - 1)(rng));
        continue;
      }
      double v = normal(rng) * op.stddev;
      if (op.positive) v = std::fabs(v) + 0.5;
      v = float(v);
      if (op.kind == Kind::narrow) {
        if (specials && j < 3) v = j == 0 ? kQNaN : j == 1 ? kInf : -kInf;
        v = widen(dtype, narrow_bits(dtype, float(v)));
      }
      values[i].push_back(v);
    }
  }
  return values;
}

using OpFn = std::function<void(const std::vector<Tensor>&)>;

// Runs `steps` (ops called one after another) on 16-bit storage and on the f32 widening of the same
// values, then demands every 16-bit operand equal the once-rounded f32 result bit for bit (read-
// only ones: unchanged), every f32 operand equal the f32 run's and every integer operand be
// unchanged. Between steps the reference rounds its copies of the 16-bit operands, as their
// storage would (a sequence of ops rounds once per op, not once at the end). Returns the 16-bit
// run.
OpRun expect_steps(const std::string& what, DType dtype, const std::vector<Operand>& specs,
                   const std::vector<OpFn>& steps, uint64_t seed, bool specials = false) {
  SCOPED_TRACE(what + " on " + std::string(dtype_name(dtype)));
  const auto values = draw(specs, dtype, seed, specials);
  OpRun low = make_run(specs, values, dtype);
  OpRun ref = make_run(specs, values, DType::f32);
  for (const OpFn& step : steps) {
    step(low.tensors);
    step(ref.tensors);
    for (size_t i = 0; i < specs.size(); ++i)
      if (specs[i].kind == Kind::narrow)
        for (float& v : ref.f32[i]) v = std::isnan(v) ? v : widen(dtype, narrow_bits(dtype, v));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t n = specs[i].shape.numel();
    int64_t bad = -1;
    for (int64_t j = 0; j < n && bad < 0; ++j) {
      if (specs[i].kind == Kind::i32) {
        if (low.i32[i][j] != int32_t(values[i][j]) || ref.i32[i][j] != low.i32[i][j]) bad = j;
      } else if (specs[i].kind == Kind::narrow) {
        // NaN payloads are not part of the contract; every other value is compared by its bits
        // (so -0 and +0 differ).
        const float want = ref.f32[i][j];
        if (std::isnan(want) ? !std::isnan(widen(dtype, low.bits[i][j]))
                             : low.bits[i][j] != narrow_bits(dtype, want))
          bad = j;
      } else if (!same_or_both_nan(low.f32[i][j], ref.f32[i][j])) {
        bad = j;
      }
    }
    if (bad >= 0) {
      const double got = specs[i].kind == Kind::narrow ? widen(dtype, low.bits[i][bad])
                         : specs[i].kind == Kind::f32  ? low.f32[i][bad]
                                                       : low.i32[i][bad];
      const double want = specs[i].kind == Kind::i32 ? ref.i32[i][bad] : ref.f32[i][bad];
      ADD_FAILURE() << "operand " << i << " " << specs[i].shape.str() << " element " << bad
                    << ": got " << got << ", f32 reference " << want;
    }
  }
  return low;
}

OpRun expect_contract(const std::string& what, DType dtype, const std::vector<Operand>& specs,
                      const OpFn& op, uint64_t seed, bool specials = false) {
  return expect_steps(what, dtype, specs, {op}, seed, specials);
}

// Two ways of computing the same thing on the same 16-bit operands must agree bit for bit (the
// fused sequences against their step-by-step definition).
void expect_same(const std::string& what, DType dtype, const std::vector<Operand>& specs,
                 const OpFn& fused, const OpFn& sequence, uint64_t seed) {
  SCOPED_TRACE(what + " on " + std::string(dtype_name(dtype)));
  const auto values = draw(specs, dtype, seed, false);
  OpRun a = make_run(specs, values, dtype);
  OpRun b = make_run(specs, values, dtype);
  fused(a.tensors);
  sequence(b.tensors);
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(a.bits[i], b.bits[i]) << "operand " << i;
    EXPECT_EQ(a.f32[i], b.f32[i]) << "operand " << i;
  }
}

const DType kNarrowTypes[] = {DType::bf16, DType::f16};

// Widened value of element j of 16-bit operand i of a run.
float at(const OpRun& run, DType dtype, size_t i, int64_t j) {
  return widen(dtype, run.bits[i][j]);
}

TEST(NarrowDtype, Embedding) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_c = 129;
    // wte (V=7, C), wpe (maxT=5, C), tokens (B=2, T=3)
    expect_contract(
        "embedding_forward", dt,
        {narrow({2, 3, num_c}), ints({2, 3}, 0, 7), narrow({7, num_c}), narrow({5, num_c})},
        [](const auto& t) { ops::embedding_forward(t[0], t[1], t[2], t[3]); }, 1);
    // vocabulary-parallel shard [3, 10) of 12 rows, tokens outside it included, no wpe
    expect_contract(
        "embedding_forward shard", dt,
        {narrow({2, 3, num_c}), ints({2, 3}, 0, 12), narrow({7, num_c})},
        [](const auto& t) { ops::embedding_forward(t[0], t[1], t[2], Tensor(), 3, 12); }, 2);
    // dwte and dwpe accumulate (+=) onto their random contents; tokens repeat (V = 4)
    expect_contract(
        "embedding_backward", dt,
        {narrow({4, num_c}), narrow({5, num_c}), narrow({2, 3, num_c}), ints({2, 3}, 0, 4)},
        [](const auto& t) { ops::embedding_backward(t[0], t[1], t[2], t[3]); }, 3);
    expect_contract(
        "embedding_backward shard", dt,
        {narrow({4, num_c}), narrow({2, 3, num_c}), ints({2, 3}, 0, 9)},
        [](const auto& t) { ops::embedding_backward(t[0], Tensor(), t[1], t[2], 2, 9); }, 4);
  }
}

TEST(NarrowDtype, LayerNorm) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    expect_contract(
        "layernorm_forward", dt,
        {narrow({num_n, num_c}), f32({num_n}), f32({num_n}), narrow({num_n, num_c}, 3.0),
         narrow({num_c}), narrow({num_c})},
        [](const auto& t) { ops::layernorm_forward(t[0], t[1], t[2], t[3], t[4], t[5], 1e-5f); },
        10);
    expect_contract(
        "layernorm_forward without bias, f32 weight", dt,
        {narrow({num_n, num_c}), f32({num_n}), f32({num_n}), narrow({num_n, num_c}), f32({num_c})},
        [](const auto& t) {
          ops::layernorm_forward(t[0], t[1], t[2], t[3], t[4], Tensor(), 1e-5f);
        },
        11);
    // dinp overwritten; dweight, dbias accumulate onto random contents
    expect_contract(
        "layernorm_backward", dt,
        {narrow({num_n, num_c}), narrow({num_c}), narrow({num_c}), narrow({num_n, num_c}),
         narrow({num_n, num_c}), narrow({num_c}), f32({num_n}), f32({num_n}, true)},
        [](const auto& t) {
          ops::layernorm_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
        },
        12);
    // the fused residual + LayerNorm equals add_forward then layernorm_forward, both rounded to
    // storage (the norm reads the rounded residual), also with residual aliasing a
    const std::vector<Operand> fused_specs{
        narrow({num_n, num_c}), narrow({num_n, num_c}), f32({num_n}),    f32({num_n}),
        narrow({num_n, num_c}), narrow({num_n, num_c}), narrow({num_c}), narrow({num_c})};
    expect_same(
        "add_layernorm_forward", dt, fused_specs,
        [](const auto& t) {
          ops::add_layernorm_forward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], 1e-5f);
        },
        [](const auto& t) {
          ops::add_forward(t[0], t[4], t[5]);
          ops::layernorm_forward(t[1], t[2], t[3], t[0], t[6], t[7], 1e-5f);
        },
        13);
    expect_same(
        "add_layernorm_forward residual aliasing a", dt, fused_specs,
        [](const auto& t) {
          ops::add_layernorm_forward(t[4], t[1], t[2], t[3], t[4], t[5], t[6], t[7], 1e-5f);
        },
        [](const auto& t) {
          ops::add_forward(t[4], t[4], t[5]);
          ops::layernorm_forward(t[1], t[2], t[3], t[4], t[6], t[7], 1e-5f);
        },
        14);
  }
}

TEST(NarrowDtype, AddLayerNormReadsTheRoundedResidual) {
  // Independent of the harness: the norm of the fused op sees round(a + b), not the f32 sum.
  const int64_t num_c = 4;
  std::vector<float> a{1.0f, 2.0f, 3.0f, 4.0f}, b{1.0f / 256, -1.0f / 512, 0.0f, 0.5f};
  std::vector<uint16_t> a16(num_c), b16(num_c), res16(num_c), out16(num_c), w16(num_c);
  for (int64_t i = 0; i < num_c; ++i) {
    a16[i] = f32_to_bf16_bits(a[i]);
    b16[i] = f32_to_bf16_bits(b[i]);
    w16[i] = f32_to_bf16_bits(1.0f);
  }
  auto view = [&](std::vector<uint16_t>& v) {
    return Tensor(v.data(), DType::bf16, Device::cpu, {1, num_c});
  };
  float mean = 0, rstd = 0;
  ops::add_layernorm_forward(view(res16), view(out16), Tensor(&mean, DType::f32, Device::cpu, {1}),
                             Tensor(&rstd, DType::f32, Device::cpu, {1}), view(a16), view(b16),
                             Tensor(w16.data(), DType::bf16, Device::cpu, {num_c}), Tensor(),
                             1e-5f);
  double sum = 0;
  for (int64_t i = 0; i < num_c; ++i) {
    EXPECT_EQ(res16[i], f32_to_bf16_bits(a[i] + b[i]));
    sum += bf16_bits_to_f32(res16[i]);
  }
  EXPECT_EQ(mean, float(sum / num_c));  // 1 + 1/256 rounds to 1 in bf16: the mean is exactly 2.625
  EXPECT_EQ(mean, 2.625f);
}

TEST(NarrowDtype, RmsNorm) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_c = 1025;
    expect_contract(
        "rmsnorm_forward", dt,
        {narrow({num_n, num_c}), f32({num_n}), narrow({num_n, num_c}, 2.0), narrow({num_c})},
        [](const auto& t) { ops::rmsnorm_forward(t[0], t[1], t[2], t[3], 1e-6f); }, 20);
    expect_contract(
        "rmsnorm_backward", dt,
        {narrow({num_n, num_c}), narrow({num_c}), narrow({num_n, num_c}), narrow({num_n, num_c}),
         narrow({num_c}), f32({num_n}, true)},
        [](const auto& t) { ops::rmsnorm_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 21);
  }
}

TEST(NarrowDtype, Gemm) {
  for (DType dt : kNarrowTypes) {
    const int64_t m = 3, n = 17, k = 1025;
    for (int trans = 0; trans < 4; ++trans) {
      const bool ta = trans & 1, tb = trans & 2;
      const Shape a_shape = ta ? Shape{k, m} : Shape{m, k};
      const Shape b_shape = tb ? Shape{n, k} : Shape{k, n};
      for (float beta : {0.0f, 0.5f}) {
        expect_contract(
            "gemm trans " + std::to_string(trans) + " beta " + std::to_string(beta), dt,
            {narrow({m, n}), narrow(a_shape), narrow(b_shape)},
            [=](const auto& t) { ops::gemm(t[0], t[1], t[2], ta, tb, 1.5f, beta); }, 30 + trans);
      }
    }
    // 16-bit inputs into an f32 output (cuBLASLt's bf16 x bf16 -> f32)
    expect_contract(
        "gemm into f32", dt, {f32({m, n}), narrow({m, k}), narrow({k, n})},
        [](const auto& t) { ops::gemm(t[0], t[1], t[2], false, false, 1.0f, 1.0f); }, 35);
  }
}

TEST(NarrowDtype, Matmul) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_m = 3, num_k = 1025, num_n = 17;
    expect_contract(
        "matmul_forward", dt,
        {narrow({num_m, num_n}), narrow({num_m, num_k}), narrow({num_n, num_k}), narrow({num_n})},
        [](const auto& t) { ops::matmul_forward(t[0], t[1], t[2], t[3]); }, 40);
    expect_contract(
        "matmul_forward (B,T,K) without bias", dt,
        {narrow({1, num_m, num_n}), narrow({1, num_m, num_k}), narrow({num_n, num_k})},
        [](const auto& t) { ops::matmul_forward(t[0], t[1], t[2], Tensor()); }, 41);
    // dweight and dbias accumulate onto random contents (also twice in a row)
    const std::vector<Operand> bwd{narrow({num_m, num_k}), narrow({num_n, num_k}),
                                   narrow({num_n}),        narrow({num_m, num_n}),
                                   narrow({num_m, num_k}), narrow({num_n, num_k})};
    expect_contract(
        "matmul_backward", dt, bwd,
        [](const auto& t) { ops::matmul_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 42);
    const OpFn no_dinp = [](const auto& t) {
      ops::matmul_backward(Tensor(), t[1], t[2], t[3], t[4], t[5]);
    };
    expect_steps("matmul_backward twice, no dinp", dt, bwd, {no_dinp, no_dinp}, 43);
    expect_contract(
        "matmul_backward f32 dweight (master gradient)", dt,
        {narrow({num_m, num_k}), f32({num_n, num_k}), f32({num_n}), narrow({num_m, num_n}),
         narrow({num_m, num_k}), narrow({num_n, num_k})},
        [](const auto& t) { ops::matmul_backward(t[0], t[1], t[2], t[3], t[4], t[5]); }, 44);
  }
}

TEST(NarrowDtype, Rope) {
  for (DType dt : kNarrowTypes) {
    const Shape s{2, 5, 3, 8};  // (B, T, H, D)
    expect_contract(
        "rope_forward", dt, {narrow(s), narrow(s, 4.0)},
        [](const auto& t) { ops::rope_forward(t[0], t[1], 10000.0f, 2); }, 50);
    expect_contract(
        "rope_forward in place", dt, {narrow(s, 4.0)},
        [](const auto& t) { ops::rope_forward(t[0], t[0], 10000.0f, 2); }, 51);
    expect_contract(
        "rope_backward", dt, {narrow(s), narrow(s)},
        [](const auto& t) { ops::rope_backward(t[0], t[1], 500000.0f, 0); }, 52);
    expect_contract(
        "rope_backward in place", dt, {narrow(s)},
        [](const auto& t) { ops::rope_backward(t[0], t[0], 500000.0f, 0); }, 53);
  }
}

TEST(NarrowDtype, Attention) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_b = 2, num_t = 5, num_hq = 4, num_hkv = 2, head_dim = 8;
    const Shape qs{num_b, num_t, num_hq, head_dim}, kvs{num_b, num_t, num_hkv, head_dim};
    const float scale = 1.0f / std::sqrt(float(head_dim));
    expect_contract(
        "attention_forward", dt,
        {narrow(qs), f32({num_b, num_hq, num_t}), narrow(qs, 2.0), narrow(kvs, 2.0), narrow(kvs)},
        [=](const auto& t) {
          ops::attention_forward(t[0], t[1], t[2], t[3], t[4], scale, ops::AttentionImpl::cudnn);
        },
        60);
    // Backward on the forward's own out and lse, as in training.
    const std::vector<Operand> bwd{narrow(qs),  narrow(kvs), narrow(kvs),
                                   narrow(qs),  narrow(qs),  narrow(kvs),
                                   narrow(kvs), narrow(qs),  f32({num_b, num_hq, num_t})};
    const OpFn backward = [=](const auto& t) {
      ops::attention_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], scale,
                              ops::AttentionImpl::cudnn);
    };
    expect_steps("attention_forward then backward", dt, bwd,
                 {[=](const auto& t) {
                    ops::attention_forward(t[7], t[8], t[4], t[5], t[6], scale,
                                           ops::AttentionImpl::cudnn);
                  },
                  backward},
                 61);
    expect_contract("attention_backward on random out and lse", dt, bwd, backward, 62);
  }
}

TEST(NarrowDtype, Activations) {
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 100 : 70;
      const std::string tag = specials ? " with NaN/Inf" : "";
      OpRun r = expect_contract(
          "gelu_forward" + tag, dt, {narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_forward(t[0], t[1]); }, seed, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));  // gelu(NaN)
        EXPECT_EQ(at(r, dt, 0, 1), kInf);          // gelu(+Inf) = +Inf
      }
      r = expect_contract(
          "gelu_forward in place" + tag, dt, {narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_forward(t[0], t[0]); }, seed + 1, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
      }
      expect_contract(
          "gelu_backward" + tag, dt, {narrow(s), narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_backward(t[0], t[1], t[2]); }, seed + 2, specials);
      expect_contract(
          "gelu_backward dinp aliasing dout" + tag, dt, {narrow(s), narrow(s, 3.0)},
          [](const auto& t) { ops::gelu_backward(t[0], t[0], t[1]); }, seed + 3, specials);
      r = expect_contract(
          "swiglu_forward" + tag, dt, {narrow(s), narrow(s, 2.0), narrow(s)},
          [](const auto& t) { ops::swiglu_forward(t[0], t[1], t[2]); }, seed + 4, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
      }
      expect_contract(
          "swiglu_backward" + tag, dt, {narrow(s), narrow(s), narrow(s), narrow(s, 2.0), narrow(s)},
          [](const auto& t) { ops::swiglu_backward(t[0], t[1], t[2], t[3], t[4]); }, seed + 5,
          specials);
    }
  }
}

TEST(NarrowDtype, Elementwise) {
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 180 : 80;
      const std::string tag = specials ? " with NaN/Inf" : "";
      OpRun r = expect_contract(
          "add_forward" + tag, dt, {narrow(s), narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[1], t[2]); }, seed, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));  // NaN + NaN
        EXPECT_EQ(at(r, dt, 0, 1), kInf);          // Inf + Inf
        EXPECT_EQ(at(r, dt, 0, 2), -kInf);
      }
      expect_contract(
          "add_forward out aliasing a" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[0], t[1]); }, seed + 1, specials);
      expect_contract(
          "add_forward out aliasing b" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[1], t[0], t[1]); }, seed + 2, specials);
      expect_contract(
          "add_forward out = a = b" + tag, dt, {narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[0], t[0]); }, seed + 3, specials);
      expect_contract(
          "add_forward mixed f32 a" + tag, dt, {narrow(s), f32(s), narrow(s)},
          [](const auto& t) { ops::add_forward(t[0], t[1], t[2]); }, seed + 4, specials);
      r = expect_contract(
          "add_inplace" + tag, dt, {narrow(s), narrow(s)},
          [](const auto& t) { ops::add_inplace(t[0], t[1]); }, seed + 5, specials);
      expect_contract(
          "add_inplace into f32" + tag, dt, {f32(s), narrow(s)},
          [](const auto& t) { ops::add_inplace(t[0], t[1]); }, seed + 6, specials);
      const OpFn add = [](const auto& t) { ops::add_inplace(t[0], t[1]); };
      expect_steps("add_inplace twice" + tag, dt, {narrow(s), narrow(s)}, {add, add}, seed + 7,
                   specials);
      r = expect_contract(
          "scale_inplace" + tag, dt, {narrow(s, 100.0)},
          [](const auto& t) { ops::scale_inplace(t[0], 0.37f); }, seed + 8, specials);
      if (specials) {
        EXPECT_TRUE(std::isnan(at(r, dt, 0, 0)));
        EXPECT_EQ(at(r, dt, 0, 1), kInf);
      }
    }
  }
}

TEST(NarrowDtype, ElementwiseRoundsOnceByHand) {
  // Independent of the f32 kernels: the 16-bit results are round(widen(x) op widen(y)).
  std::mt19937_64 rng(90);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  for (DType dt : kNarrowTypes) {
    const int64_t n = 1025;
    std::vector<uint16_t> a(n), b(n), out(n), acc(n), scaled(n);
    for (int64_t i = 0; i < n; ++i) {
      a[i] = narrow_bits(dt, normal(rng));
      b[i] = narrow_bits(dt, normal(rng));
    }
    acc = a;
    scaled = a;
    auto view = [&](std::vector<uint16_t>& v) { return Tensor(v.data(), dt, Device::cpu, {n}); };
    ops::add_forward(view(out), view(a), view(b));
    ops::add_inplace(view(acc), view(b));
    ops::scale_inplace(view(scaled), 1.0f / 3.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float x = widen(dt, a[i]), y = widen(dt, b[i]);
      EXPECT_EQ(out[i], narrow_bits(dt, x + y)) << i;
      EXPECT_EQ(acc[i], narrow_bits(dt, x + y)) << i;
      EXPECT_EQ(scaled[i], narrow_bits(dt, x * (1.0f / 3.0f))) << i;
    }
    // sum_squares reads the exact widened values and accumulates in double, like the f32 run.
    std::vector<float> a32(n);
    for (int64_t i = 0; i < n; ++i) a32[i] = widen(dt, a[i]);
    EXPECT_EQ(ops::sum_squares(view(a)),
              ops::sum_squares(Tensor(a32.data(), DType::f32, Device::cpu, {n})));
  }
}

TEST(NarrowDtype, F16OverflowRoundsToInf) {
  // FP16 loss scaling detects overflow as Inf in the gradients: the CPU must produce it.
  std::vector<uint16_t> x{f32_to_f16_bits(60000.0f), f32_to_f16_bits(-60000.0f),
                          f32_to_f16_bits(30000.0f)};
  const Tensor t(x.data(), DType::f16, Device::cpu, {3});
  ops::scale_inplace(t, 2.0f);
  EXPECT_EQ(x[0], 0x7C00);  // +Inf
  EXPECT_EQ(x[1], 0xFC00);  // -Inf
  EXPECT_EQ(f16_bits_to_f32(x[2]), 60000.0f);
  // 65504 is the largest f16; 65520 is the tie with the next binade and rounds up to Inf.
  std::vector<uint16_t> a{f32_to_f16_bits(32752.0f), f32_to_f16_bits(32768.0f)}, out(2);
  ops::add_forward(Tensor(out.data(), DType::f16, Device::cpu, {2}),
                   Tensor(a.data(), DType::f16, Device::cpu, {2}),
                   Tensor(a.data(), DType::f16, Device::cpu, {2}));
  EXPECT_EQ(out[0], 0x7BFF);  // 65504
  EXPECT_EQ(out[1], 0x7C00);  // 65536 -> Inf
  // A GEMM whose f32 result exceeds the f16 range: 300 * 300 = 90000.
  std::vector<uint16_t> p{f32_to_f16_bits(300.0f)}, c{0};
  ops::gemm(Tensor(c.data(), DType::f16, Device::cpu, {1, 1}),
            Tensor(p.data(), DType::f16, Device::cpu, {1, 1}),
            Tensor(p.data(), DType::f16, Device::cpu, {1, 1}), false, false, 1.0f, 0.0f);
  EXPECT_EQ(c[0], 0x7C00);
  // bf16 keeps f32's range: the same scaling stays finite.
  std::vector<uint16_t> y{f32_to_bf16_bits(61440.0f)};  // 1.875 * 2^15, exact in bf16
  ops::scale_inplace(Tensor(y.data(), DType::bf16, Device::cpu, {1}), 2.0f);
  EXPECT_EQ(bf16_bits_to_f32(y[0]), 122880.0f);
  // fill rounds its value once, overflow included
  std::vector<uint16_t> f(5);
  ops::fill(Tensor(f.data(), DType::f16, Device::cpu, {5}), 1e5f);
  for (uint16_t bits : f) EXPECT_EQ(bits, 0x7C00);
}

TEST(NarrowDtype, CastAndFill) {
  std::mt19937_64 rng(95);
  std::normal_distribution<float> normal(0.0f, 1000.0f);
  const int64_t n = 1025;
  std::vector<float> src32(n);
  for (float& v : src32) v = normal(rng);
  src32[0] = kQNaN;
  src32[1] = -kInf;
  src32[2] = 1e6f;
  src32[3] = 1e-8f;  // f16 subnormal range
  for (DType src_dt : kNarrowTypes) {
    std::vector<uint16_t> src(n);
    for (int64_t i = 0; i < n; ++i) src[i] = narrow_bits(src_dt, src32[i]);
    const Tensor src_t(src.data(), src_dt, Device::cpu, {n});
    for (DType dst_dt : kNarrowTypes) {
      std::vector<uint16_t> dst(n);
      ops::cast(Tensor(dst.data(), dst_dt, Device::cpu, {n}), src_t);
      for (int64_t i = 0; i < n; ++i) {
        const float x = widen(src_dt, src[i]);
        if (std::isnan(x))
          EXPECT_TRUE(std::isnan(widen(dst_dt, dst[i])));
        else
          EXPECT_EQ(dst[i], narrow_bits(dst_dt, x)) << i;
      }
    }
    std::vector<float> wide(n);
    ops::cast(Tensor(wide.data(), DType::f32, Device::cpu, {n}), src_t);
    for (int64_t i = 1; i < n; ++i) EXPECT_EQ(wide[i], widen(src_dt, src[i])) << i;
    std::vector<uint16_t> back(n);
    ops::cast(Tensor(back.data(), src_dt, Device::cpu, {n}),
              Tensor(src32.data(), DType::f32, Device::cpu, {n}));
    EXPECT_EQ(back, src);
    std::vector<uint16_t> filled_bits(n);
    ops::fill(Tensor(filled_bits.data(), src_dt, Device::cpu, {n}), 0.1f);
    for (uint16_t bits : filled_bits) EXPECT_EQ(bits, narrow_bits(src_dt, 0.1f));
  }
}

TEST(NarrowDtype, CrossEntropy) {
  for (DType dt : kNarrowTypes) {
    const int64_t num_n = 3, num_v = 1025;
    const int vocab = 1000;
    // targets in [-1, vocab): a row with -1 is ignored (loss 0, lse still set)
    expect_contract(
        "cross_entropy_forward", dt,
        {f32({num_n}), f32({num_n}), narrow({num_n, num_v}, 3.0), ints({num_n}, -1, vocab)},
        [=](const auto& t) { ops::cross_entropy_forward(t[0], t[1], t[2], t[3], vocab); }, 110);
    const std::vector<Operand> bwd{narrow({num_n, num_v}), narrow({num_n, num_v}, 3.0),
                                   f32({num_n}), ints({num_n}, -1, vocab)};
    expect_contract(
        "cross_entropy forward + backward", dt, bwd,
        [=](const auto& t) {
          HostTensor losses(DType::f32, {num_n});
          ops::cross_entropy_forward(losses, t[2], t[1], t[3], vocab);
          ops::cross_entropy_backward(t[0], t[1], t[2], t[3], vocab, 0.25f);
        },
        111);
    expect_contract(
        "cross_entropy_backward in place", dt,
        {narrow({num_n, num_v}, 3.0), f32({num_n}), ints({num_n}, -1, vocab)},
        [=](const auto& t) {
          HostTensor losses(DType::f32, {num_n});
          ops::cross_entropy_forward(losses, t[1], t[0], t[2], vocab);
          ops::cross_entropy_backward(t[0], t[0], t[1], t[2], vocab, 1.0f / 3);
        },
        112);
    // vocabulary-parallel: this shard holds columns [600, 1113) of a padded 1113-column vocab
    const int64_t width = 513, start = 600;
    expect_contract(
        "cross_entropy shard pipeline", dt,
        {narrow({num_n, width}, 3.0), ints({num_n}, -1, vocab), f32({num_n}), f32({num_n}),
         f32({num_n}), f32({num_n}), f32({num_n}), narrow({num_n, width})},
        [=](const auto& t) {
          ops::cross_entropy_shard_max(t[2], t[0], start, vocab);
          ops::cross_entropy_shard_sums(t[3], t[4], t[0], t[2], t[1], start, vocab);
          ops::cross_entropy_shard_finish(t[5], t[6], t[2], t[3], t[4], t[1]);
          ops::cross_entropy_backward(t[7], t[0], t[6], t[1], vocab, 0.5f, start);
        },
        113);
  }
}

TEST(NarrowDtype, AdamW) {
  ops::AdamWStep step;
  step.lr = 1e-2f;
  step.weight_decay = 0.1f;
  step.step = 3;
  step.grad_scale = 1.0f / 1024;  // FP16 loss-scale unscaling happens in f32, on the read value
  for (DType dt : kNarrowTypes) {
    const Shape s{3, 1025};
    // CUDA's layout: f32 master param and state, 16-bit gradient
    expect_contract(
        "adamw_update 16-bit grad", dt, {f32(s), narrow(s, 1000.0), f32(s), f32(s, true)},
        [&](const auto& t) { ops::adamw_update(t[0], t[1], t[2], t[3], step); }, 120);
    // every operand 16-bit (no master copy): read exactly, updated in f32, rounded once
    expect_contract(
        "adamw_update all 16-bit", dt,
        {narrow(s), narrow(s, 1000.0), narrow(s, 0.01), Operand{s, Kind::narrow, 1.0, true}},
        [&](const auto& t) { ops::adamw_update(t[0], t[1], t[2], t[3], step); }, 121);
    expect_contract(
        "adamw_update_multi", dt,
        {f32(s), narrow(s, 1000.0), f32(s), f32(s, true), narrow({7}), narrow({7}), f32({7}),
         f32({7}, true)},
        [&](const auto& t) {
          ops::AdamWStep no_decay = step;
          no_decay.weight_decay = 0.0f;
          const ops::AdamWTensors entries[] = {{t[0], t[1], t[2], t[3], step},
                                               {t[4], t[5], t[6], t[7], no_decay}};
          ops::adamw_update_multi(entries);
        },
        122);
  }
}

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
