// Parity of the CUDA elementwise helpers (kernels/cuda/elementwise.cu) with the CPU references:
// add_forward, add_inplace, scale_inplace (f32, bf16, f16; awkward sizes; misaligned views;
// in-place; NaN/Inf; f16 overflow to Inf, bit for bit), fill and cast bit for bit against
// core/dtype.h for every castable dtype pair (random codes, fp8 ties, subnormals, saturation),
// and sum_squares (double, deterministic, carrying f16 Inf/NaN).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace tessera {
namespace {

using testing::DeviceTensor;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// f32 arithmetic on f32 data rounds exactly like the CPU's f32 loop: equal up to 0. bf16 outputs
// are the f32 result rounded once more: at most 2^-9 relative per element, ~1.1e-3 in L2; f16
// ones at most 2^-11, ~2.8e-4 in L2 (unit-normal inputs are far inside f16's range).
double tolerance(DType dtype) {
  constexpr double kBound[3] = {1e-7, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }

// DeviceTensor fills and uploads run on the legacy stream; the ops run on the context's
// non-blocking stream, which does not wait for it. Synchronize before every op.
void settle() { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); }

// A view that starts one element into a larger allocation: no longer 16-byte aligned.
Tensor shifted(const DeviceTensor& d, DType dtype, int64_t n) {
  return Tensor(static_cast<char*>(d.t().data) + dtype_size(dtype), dtype, Device::cuda, Shape{n});
}

std::vector<float> with_specials(std::vector<float> v) {
  if (v.size() > 3) {
    v[1] = kNan;
    v[2] = kInf;
    v[v.size() - 1] = -kInf;
  }
  return v;
}

class ElementwiseTest : public ::testing::TestWithParam<DType> {};

TEST_P(ElementwiseTest, AddForwardMatchesCpu) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(1);
  for (int64_t n : {1, 7, 1025, 4097, (1 << 20) + 3}) {
    auto a = testing::round_to(dtype, with_specials(testing::random_vector(n, rng)));
    auto b = testing::round_to(dtype, testing::random_vector(n, rng));
    std::vector<float> ref(n);
    cpu::add_forward(host(ref, {n}), host(a, {n}), host(b, {n}));
    DeviceTensor da(dtype, {n}), db(dtype, {n}), dout(dtype, {n});
    da.upload(a);
    db.upload(b);
    settle();
    cuda::add_forward(dout, da, db);
    const auto out = dout.download();
    EXPECT_LE(testing::rel_l2(out, ref), tolerance(dtype)) << "n=" << n;
    testing::expect_same_nonfinite(out, ref, "add_forward");
    EXPECT_TRUE(dout.guards_intact());
    // In place: out is a.
    cuda::add_forward(da, da, db);
    EXPECT_LE(testing::rel_l2(da.download(), ref), tolerance(dtype)) << "in place, n=" << n;
    EXPECT_TRUE(da.guards_intact());
  }
}

TEST_P(ElementwiseTest, AddInplaceAndScaleMatchCpuOnMisalignedViews) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(2);
  for (int64_t n : {1, 9, 4099}) {
    auto dst = testing::round_to(dtype, with_specials(testing::random_vector(n + 1, rng)));
    auto src = testing::round_to(dtype, testing::random_vector(n + 1, rng));
    // Reference on elements [1, n + 1) of each buffer.
    std::vector<float> ref(dst.begin() + 1, dst.end()), src_tail(src.begin() + 1, src.end());
    cpu::add_inplace(host(ref, {n}), host(src_tail, {n}));
    cpu::scale_inplace(host(ref, {n}), -1.75f);
    DeviceTensor ddst(dtype, {n + 1}), dsrc(dtype, {n + 1});
    ddst.upload(dst);
    dsrc.upload(src);
    settle();
    const Tensor view = shifted(ddst, dtype, n);
    cuda::add_inplace(view, shifted(dsrc, dtype, n));
    cuda::scale_inplace(view, -1.75f);
    const auto all = ddst.download();
    EXPECT_EQ(std::bit_cast<uint32_t>(all[0]), std::bit_cast<uint32_t>(dst[0]))
        << "element before the view was written";
    const std::vector<float> out(all.begin() + 1, all.end());
    // 16-bit types round twice here (after the add and after the scale): 2 * 2^-9 (bf16) or
    // 2 * 2^-11 (f16) per element.
    EXPECT_LE(testing::rel_l2(out, ref), 2 * tolerance(dtype)) << "n=" << n;
    testing::expect_same_nonfinite(out, ref, "add_inplace + scale_inplace");
    EXPECT_TRUE(ddst.guards_intact());
  }
}

TEST_P(ElementwiseTest, SumSquaresMatchesCpuAndIsDeterministic) {
  TESSERA_REQUIRE_GPU();
  const DType dtype = GetParam();
  std::mt19937_64 rng(3);
  for (int64_t n : {1, 7, 4097, 3000005}) {
    auto x = testing::round_to(dtype, testing::random_vector(n, rng, 3.0f));
    const double ref = cpu::sum_squares(host(x, {n}));
    DeviceTensor dx(dtype, {n});
    dx.upload(x);
    settle();
    const double got = cuda::sum_squares(dx);
    // Squares of f32 values are exact in double; only the order of the double additions
    // differs from the CPU's, ~1e-16 relative per addition.
    EXPECT_NEAR(got, ref, 1e-12 * ref) << "n=" << n;
    EXPECT_EQ(std::bit_cast<uint64_t>(cuda::sum_squares(dx)), std::bit_cast<uint64_t>(got));
  }
  auto x = testing::random_vector(1001, rng);
  x[500] = kNan;
  DeviceTensor dx(dtype, {1001});
  dx.upload(x);
  settle();
  EXPECT_TRUE(std::isnan(cuda::sum_squares(dx)));
  DeviceTensor misaligned(dtype, {1002});
  misaligned.upload(testing::round_to(dtype, testing::random_vector(1002, rng)));
  const auto values = misaligned.download();
  double ref = 0.0;
  for (int i = 1; i < 1002; ++i) ref += double(values[i]) * values[i];
  EXPECT_NEAR(cuda::sum_squares(shifted(misaligned, dtype, 1001)), ref, 1e-12 * ref);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ElementwiseTest,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// f16 storage: each op is the f32 operation on the stored values, rounded once to nearest even
// (core/dtype.h's round_f16), so results match bit for bit, including overflow past 65504 to Inf
// (65504 + 15 = 65519 rounds down to 65504; 65520 is the tie, which rounds to even: Inf). FP16
// loss scaling detects overflow through these Infs, and through sum_squares seeing them.
TEST(CudaElementwiseF16, RoundsOnceAndOverflowsToInf) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(4);
  const int64_t n = 4099;
  auto a = testing::round_to(DType::f16, testing::random_vector(n, rng, 1000.0f));
  auto b = testing::round_to(DType::f16, testing::random_vector(n, rng, 1000.0f));
  const float pairs[][2] = {{65504.0f, 15.0f},      {65504.0f, 16.0f},     {60000.0f, 10000.0f},
                            {-60000.0f, -10000.0f}, {65504.0f, -65504.0f}, {kInf, -kInf},
                            {3e-5f, 3e-5f},         {6e-8f, 0.0f}};
  for (size_t i = 0; i < std::size(pairs); ++i) {
    a[10 * i] = round_f16(pairs[i][0]);
    b[10 * i] = round_f16(pairs[i][1]);
  }
  std::vector<float> sum(n), scaled(n);
  for (int64_t i = 0; i < n; ++i) {
    sum[i] = round_f16(a[i] + b[i]);
    scaled[i] = round_f16(sum[i] * 40.0f);  // |sum| > 1638 overflows here
  }
  ASSERT_TRUE(std::isinf(sum[10])) << "65504 + 16 must overflow in the reference too";
  ASSERT_EQ(sum[0], 65504.0f);
  DeviceTensor da(DType::f16, {n}), db(DType::f16, {n}), dout(DType::f16, {n});
  da.upload(a);
  db.upload(b);
  settle();
  cuda::add_forward(dout, da, db);
  auto expect_bits = [](const std::vector<float>& got, const std::vector<float>& want,
                        const char* what) {
    for (size_t i = 0; i < got.size(); ++i) {
      const bool same = std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i]) ||
                        (std::isnan(got[i]) && std::isnan(want[i]));
      if (!same) {
        ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", want " << want[i];
        return;
      }
    }
  };
  expect_bits(dout.download(), sum, "add_forward f16");
  cuda::add_inplace(da, db);
  expect_bits(da.download(), sum, "add_inplace f16");
  cuda::scale_inplace(da, 40.0f);
  expect_bits(da.download(), scaled, "scale_inplace f16");
  EXPECT_TRUE(dout.guards_intact() && da.guards_intact());
  // The gradient norm of an overflowed f16 gradient is Inf (NaN when Inf - Inf made a NaN).
  EXPECT_TRUE(std::isinf(cuda::sum_squares(da)) || std::isnan(cuda::sum_squares(da)));
  std::vector<float> finite(n, 1.0f);
  finite[77] = kInf;
  DeviceTensor dinf(DType::f16, {n});
  dinf.upload(finite);
  settle();
  EXPECT_EQ(cuda::sum_squares(dinf), std::numeric_limits<double>::infinity());
}

// ---- fill and cast: bit patterns ------------------------------------------------------------

const DType kCastable[] = {DType::f32, DType::bf16, DType::f16, DType::e4m3, DType::e5m2};

// Raw device buffer with guard bytes, for the narrow dtypes DeviceTensor cannot download.
std::vector<uint8_t> download_bytes(const Tensor& t) {
  std::vector<uint8_t> bytes(t.nbytes());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(bytes.data(), t.data, bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  return bytes;
}
void upload_bytes(const Tensor& t, const std::vector<uint8_t>& bytes) {
  ASSERT_EQ(bytes.size(), t.nbytes());
  ASSERT_EQ(cudaMemcpy(t.data, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
}

// Element i of a host buffer as an f32 bit pattern or narrow code, for messages.
uint32_t code_at(const std::vector<uint8_t>& b, DType t, int64_t i) {
  const size_t size = dtype_size(t);
  uint32_t v = 0;
  std::memcpy(&v, b.data() + i * size, size);
  return v;
}

bool is_nan_code(uint32_t code, DType t) {
  switch (t) {
    case DType::f32: return std::isnan(std::bit_cast<float>(code));
    case DType::bf16: return std::isnan(bf16_bits_to_f32(uint16_t(code)));
    case DType::f16: return std::isnan(f16_bits_to_f32(uint16_t(code)));
    case DType::e4m3: return std::isnan(e4m3_bits_to_f32(uint8_t(code)));
    default: return std::isnan(e5m2_bits_to_f32(uint8_t(code)));
  }
}

TEST(CudaFill, MatchesCpuBitsForEveryDtype) {
  TESSERA_REQUIRE_GPU();
  for (DType dtype : kCastable) {
    for (float value : {1.5f, -3.1e-3f, 1e30f, -kInf, kNan, 0.0f, 1e-40f}) {
      for (int64_t n : {1, 17, 4103}) {
        std::vector<uint8_t> ref(dtype_storage_bytes(dtype, n));
        cpu::fill(Tensor(ref.data(), dtype, Device::cpu, Shape{n}), value);
        DeviceTensor d(dtype, {n + 1});
        settle();
        const Tensor view(static_cast<char*>(d.t().data) + (n % 2) * dtype_size(dtype), dtype,
                          Device::cuda, Shape{n});
        cuda::fill(view, value);
        EXPECT_EQ(download_bytes(view), ref)
            << dtype_name(dtype) << " value " << value << " n " << n;
        EXPECT_TRUE(d.guards_intact());
      }
    }
  }
}

// f32 inputs that stress narrowing: every class of bit pattern, exact ties between neighbouring
// codes of each narrow format, the subnormal ranges, and values around the largest finite ones.
std::vector<float> hard_f32_values(std::mt19937_64& rng) {
  std::vector<float> v;
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 20000; ++i) v.push_back(std::bit_cast<float>(any_bits(rng)));
  // Midpoints (ties) and near-midpoints between consecutive fp8 values, both signs.
  for (int code = 0; code < 127; ++code) {
    for (auto decode : {e4m3_bits_to_f32, e5m2_bits_to_f32}) {
      const float lo = decode(uint8_t(code)), hi = decode(uint8_t(code + 1));
      if (!std::isfinite(lo) || !std::isfinite(hi)) continue;
      const float mid = 0.5f * (lo + hi);
      for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, kInf), lo, hi})
        for (float s : {1.0f, -1.0f}) v.push_back(s * x);
    }
  }
  // Ties for bf16 and f16: an f32 whose dropped bits are exactly half.
  std::uniform_int_distribution<uint32_t> top(0, 0xFFFF);
  for (int i = 0; i < 2000; ++i) {
    v.push_back(std::bit_cast<float>((top(rng) << 16) | 0x8000u));
    v.push_back(std::bit_cast<float>((top(rng) << 16) | 0x1000u));  // f16 ties (13 dropped bits)
  }
  // Log-uniform magnitudes over the fp8/f16 subnormal-to-overflow range.
  std::uniform_real_distribution<float> exponent(-26.0f, 20.0f);
  for (int i = 0; i < 20000; ++i) v.push_back((i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng)));
  for (float x : {0.0f, -0.0f, kInf, -kInf, kNan, -kNan, 448.0f, 464.0f, 480.0f, 57344.0f, 61440.0f,
                  65504.0f, 65520.0f, 1e-45f, 3.4e38f})
    v.push_back(x);
  return v;
}

TEST(CudaCast, F32ToNarrowMatchesCoreDtypeBitForBit) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(4);
  const auto values = hard_f32_values(rng);
  const int64_t n = int64_t(values.size());
  DeviceTensor src(DType::f32, {n});
  src.upload(values);
  for (DType dst_type : {DType::bf16, DType::f16, DType::e4m3, DType::e5m2}) {
    std::vector<uint8_t> ref(dtype_storage_bytes(dst_type, n));
    convert_buffer(values.data(), DType::f32, ref.data(), dst_type, n);
    DeviceTensor dst(dst_type, {n});
    settle();
    cuda::cast(dst, src);
    const auto got = download_bytes(dst.t());
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n && mismatches < 10; ++i) {
      if (code_at(got, dst_type, i) != code_at(ref, dst_type, i)) {
        ++mismatches;
        ADD_FAILURE() << dtype_name(dst_type) << ": x = " << values[i] << " (bits 0x" << std::hex
                      << std::bit_cast<uint32_t>(values[i]) << "): gpu 0x"
                      << code_at(got, dst_type, i) << ", cpu 0x" << code_at(ref, dst_type, i);
      }
    }
    EXPECT_TRUE(dst.guards_intact());
  }
}

// Every source code (all of them for the narrow types) into every other castable dtype, with
// aligned (vector path) and odd-offset (scalar path) buffers.
TEST(CudaCast, EveryDtypePairMatchesCoreDtype) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(5);
  for (DType src_type : kCastable) {
    std::vector<uint32_t> codes;
    if (src_type == DType::f32) {
      for (float x : hard_f32_values(rng)) codes.push_back(std::bit_cast<uint32_t>(x));
    } else {
      const uint32_t num_codes = dtype_size(src_type) == 2 ? 65536u : 256u;
      for (uint32_t c = 0; c < num_codes; ++c) codes.push_back(c);
    }
    const int64_t n = int64_t(codes.size());
    const size_t src_size = dtype_size(src_type);
    std::vector<uint8_t> src_bytes(n * src_size);
    for (int64_t i = 0; i < n; ++i) std::memcpy(&src_bytes[i * src_size], &codes[i], src_size);
    for (DType dst_type : kCastable) {
      if (dst_type == src_type) continue;
      std::vector<uint8_t> ref(dtype_storage_bytes(dst_type, n));
      convert_buffer(src_bytes.data(), src_type, ref.data(), dst_type, n);
      for (int offset : {0, 1}) {
        DeviceTensor src(src_type, {n + 1}), dst(dst_type, {n + 1});
        const Tensor s(static_cast<char*>(src.t().data) + offset * src_size, src_type, Device::cuda,
                       Shape{n});
        const Tensor d(static_cast<char*>(dst.t().data) + offset * dtype_size(dst_type), dst_type,
                       Device::cuda, Shape{n});
        settle();
        upload_bytes(s, src_bytes);
        cuda::cast(d, s);
        const auto got = download_bytes(d);
        int64_t mismatches = 0;
        for (int64_t i = 0; i < n && mismatches < 5; ++i) {
          const uint32_t g = code_at(got, dst_type, i), r = code_at(ref, dst_type, i);
          // f32 NaN payloads are not specified; every narrow NaN code is.
          const bool same = g == r || (dst_type == DType::f32 && is_nan_code(g, dst_type) &&
                                       is_nan_code(r, dst_type));
          if (!same) {
            ++mismatches;
            ADD_FAILURE() << dtype_name(src_type) << " 0x" << std::hex << codes[i] << " -> "
                          << dtype_name(dst_type) << ": gpu 0x" << g << ", cpu 0x" << r
                          << " (offset " << offset << ")";
          }
        }
        EXPECT_TRUE(dst.guards_intact()) << dtype_name(src_type) << "->" << dtype_name(dst_type);
      }
    }
  }
}

TEST(CudaCast, SameTensorIsANoOpAndOverlapIsRejected) {
  TESSERA_REQUIRE_GPU();
  std::mt19937_64 rng(6);
  auto x = testing::random_vector(100, rng);
  DeviceTensor d(DType::f32, {100});
  d.upload(x);
  settle();
  cuda::cast(d, d);
  EXPECT_EQ(d.download(), x);
  const Tensor half1(d.t().data, DType::bf16, Device::cuda, Shape{100});
  EXPECT_THROW(cuda::cast(half1, d), Error);
  DeviceTensor copy(DType::f32, {100});
  settle();
  cuda::cast(copy, d);
  EXPECT_EQ(copy.download(), x);
}

}  // namespace
}  // namespace tessera
