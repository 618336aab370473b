// Element-type metadata and exact scalar conversions (f32/f64 <-> bf16, f16, fp8 E4M3/E5M2, ints).
// Every narrowing conversion is integer bit manipulation with round-to-nearest-even: it does not
// depend on the floating-point environment's rounding mode. The only hardware rounding used is the
// f64 -> f32 cast in convert_buffer, which IEEE 754 defines as RNE in the default environment.
#include "core/dtype.h"

#include <bit>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace tessera {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::e4m3: return 1;
    case DType::e5m2: return 1;
    case DType::i8: return 1;
    case DType::i4: return 0;
    case DType::i32: return 4;
  }
  TS_BUG("unknown dtype {}", static_cast<int>(t));
}

size_t dtype_storage_bytes(DType t, int64_t numel) {
  TS_CHECK(numel >= 0, "negative element count {}", numel);
  if (t == DType::i4) return static_cast<size_t>((numel + 1) / 2);
  return static_cast<size_t>(numel) * dtype_size(t);
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "fp32";
    case DType::f64: return "fp64";
    case DType::bf16: return "bf16";
    case DType::f16: return "fp16";
    case DType::e4m3: return "fp8_e4m3";
    case DType::e5m2: return "fp8_e5m2";
    case DType::i8: return "int8";
    case DType::i4: return "int4";
    case DType::i32: return "int32";
  }
  TS_BUG("unknown dtype {}", static_cast<int>(t));
}

bool parse_dtype(std::string_view name, DType* out) {
  struct Alias {
    std::string_view name;
    DType type;
  };
  static constexpr Alias kAliases[] = {
      {"fp32", DType::f32},      {"f32", DType::f32},   {"fp64", DType::f64},
      {"bf16", DType::bf16},     {"fp16", DType::f16},  {"f16", DType::f16},
      {"fp8_e4m3", DType::e4m3}, {"e4m3", DType::e4m3}, {"fp8_e5m2", DType::e5m2},
      {"e5m2", DType::e5m2},     {"int8", DType::i8},   {"int4", DType::i4},
      {"int32", DType::i32},
  };
  for (const Alias& a : kAliases) {
    if (a.name == name) {
      *out = a.type;
      return true;
    }
  }
  return false;
}

bool dtype_is_float(DType t) {
  switch (t) {
    case DType::f32:
    case DType::f64:
    case DType::bf16:
    case DType::f16:
    case DType::e4m3:
    case DType::e5m2: return true;
    case DType::i8:
    case DType::i4:
    case DType::i32: return false;
  }
  TS_BUG("unknown dtype {}", static_cast<int>(t));
}

namespace {

// A narrow binary float format. Codes are sign | magnitude, and magnitudes are ordered like the
// values they encode, so rounding up past the largest mantissa carries into the exponent field.
struct NarrowFormat {
  int mant_bits;
  int bias;
  uint32_t sign_bit;
  uint32_t max_finite;  // magnitude code of the largest finite value
  uint32_t overflow;    // magnitude code for non-saturated overflow: Inf, or NaN for E4M3
  uint32_t quiet_nan;   // magnitude code produced for NaN inputs
  bool has_inf;         // magnitude code max_finite + 1 is Inf, larger ones NaN
};

constexpr NarrowFormat kBf16{7, 127, 0x8000, 0x7F7F, 0x7F80, 0x7FC0, true};
constexpr NarrowFormat kF16{10, 15, 0x8000, 0x7BFF, 0x7C00, 0x7E00, true};
constexpr NarrowFormat kE4M3{3, 7, 0x80, 0x7E, 0x7F, 0x7F, false};
constexpr NarrowFormat kE5M2{2, 15, 0x80, 0x7B, 0x7C, 0x7E, true};

// Rounds a double into `f`, ties to even. f32 inputs convert to double exactly, so this is also
// the exact f32 rounding; f64 inputs are rounded once, never through f32.
uint32_t encode_narrow(double x, const NarrowFormat& f, bool saturate) {
  const uint64_t bits = std::bit_cast<uint64_t>(x);
  const uint32_t sign = (bits >> 63) ? f.sign_bit : 0;
  const uint64_t exp_field = (bits >> 52) & 0x7FF;
  const uint64_t frac = bits & ((uint64_t{1} << 52) - 1);
  if (exp_field == 0x7FF) {
    if (frac != 0) return sign | f.quiet_nan;
    return sign | (saturate ? f.max_finite : f.overflow);
  }
  // |x| = sig * 2^lsb_exp with sig an integer of at most 53 bits.
  uint64_t sig = frac;
  int lsb_exp = -1074;
  if (exp_field != 0) {
    sig |= uint64_t{1} << 52;
    lsb_exp = static_cast<int>(exp_field) - 1075;
  }
  if (sig == 0) return sign;
  const int emin = 1 - f.bias;
  // Binade of |x|, clamped up to the smallest normal one: subnormals share its quantum.
  int exp = lsb_exp + static_cast<int>(std::bit_width(sig)) - 1;
  if (exp < emin) exp = emin;
  // shift >= 52 - mant_bits > 0 always: the target has fewer mantissa bits than a double.
  const int shift = (exp - f.mant_bits) - lsb_exp;
  uint64_t n = 0;
  if (shift < 64) {
    n = sig >> shift;
    const uint64_t rem = sig & ((uint64_t{1} << shift) - 1);
    const uint64_t half = uint64_t{1} << (shift - 1);
    if (rem > half || (rem == half && (n & 1))) ++n;
  }  // else |x| < 2^-11 quanta: rounds to zero
  // In the subnormal binade n is the magnitude code itself; above it each binade adds 2^mant_bits.
  const uint64_t code = (static_cast<uint64_t>(exp - emin) << f.mant_bits) + n;
  if (code > f.max_finite) return sign | (saturate ? f.max_finite : f.overflow);
  return sign | static_cast<uint32_t>(code);
}

// Decodes a narrow code into f32 bits; every f16 and fp8 value is an f32 normal or zero.
float decode_narrow(uint32_t code, const NarrowFormat& f) {
  const uint32_t sign = (code & f.sign_bit) ? 0x80000000u : 0u;
  const uint32_t mag = code & (f.sign_bit - 1);
  if (f.has_inf && mag == f.max_finite + 1) return std::bit_cast<float>(sign | 0x7F800000u);
  if (mag > f.max_finite) return std::bit_cast<float>(sign | 0x7FC00000u);
  const uint32_t exp_field = mag >> f.mant_bits;
  const uint32_t mant = mag & ((1u << f.mant_bits) - 1);
  if (exp_field == 0) {
    if (mant == 0) return std::bit_cast<float>(sign);
    // mant * 2^(emin - mant_bits): normalise so the leading one becomes f32's implicit bit.
    const int top = static_cast<int>(std::bit_width(mant)) - 1;
    const int exp = (1 - f.bias) - f.mant_bits + top;
    const uint32_t frac = (mant & ~(1u << top)) << (23 - top);
    return std::bit_cast<float>(sign | (static_cast<uint32_t>(exp + 127) << 23) | frac);
  }
  const int exp = static_cast<int>(exp_field) - f.bias;
  return std::bit_cast<float>(sign | (static_cast<uint32_t>(exp + 127) << 23) |
                              (mant << (23 - f.mant_bits)));
}

// Rounds a finite double to the nearest integer, ties to even, saturating to [lo, hi]; NaN -> 0.
int64_t round_to_int(double v, int64_t lo, int64_t hi) {
  if (v != v) return 0;
  if (v <= static_cast<double>(lo)) return lo;
  if (v >= static_cast<double>(hi)) return hi;
  // |v| < 2^31 here, so floor and the difference are exact in double.
  double r = static_cast<double>(static_cast<int64_t>(v));
  if (r > v) r -= 1.0;
  const double diff = v - r;
  int64_t n = static_cast<int64_t>(r);
  if (diff > 0.5 || (diff == 0.5 && (n & 1))) ++n;
  return n;
}

// Reads element i of a host buffer as a double; exact for every dtype.
double load_as_double(const void* src, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(src)[i];
    case DType::f64: return static_cast<const double*>(src)[i];
    case DType::bf16: return bf16_bits_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::f16: return f16_bits_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::e4m3: return e4m3_bits_to_f32(static_cast<const uint8_t*>(src)[i]);
    case DType::e5m2: return e5m2_bits_to_f32(static_cast<const uint8_t*>(src)[i]);
    case DType::i8: return static_cast<const int8_t*>(src)[i];
    case DType::i32: return static_cast<const int32_t*>(src)[i];
    case DType::i4: {
      const uint8_t byte = static_cast<const uint8_t*>(src)[i / 2];
      const int nibble = (i % 2) ? (byte >> 4) : (byte & 0xF);
      return nibble >= 8 ? nibble - 16 : nibble;
    }
  }
  TS_BUG("unknown dtype {}", static_cast<int>(t));
}

// The widenings and the f32 -> bf16 rounding that every bf16/f16 CPU op runs on each operand
// (kernels/cpu/narrow.h), without the per-element double round trip of the general path: the same
// bits (tests/core/dtype_test.cpp compares them on every bf16 and f16 pattern and on sampled f32
// ones). NaN takes the general path, which alone defines its payload.
bool convert_fast(const void* src, DType src_type, void* dst, DType dst_type, int64_t n) {
  if (dst_type == DType::f32 && src_type == DType::bf16) {
    const auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) {
      // A NaN is quieted, as the general path's widening through double does.
      const uint32_t bits = uint32_t(in[i]) << 16;
      out[i] = std::bit_cast<float>((bits & 0x7FFFFFFFu) > 0x7F800000u ? bits | 0x00400000u : bits);
    }
    return true;
  }
  if (dst_type == DType::f32 && src_type == DType::f16) {
    static const std::vector<float> table = [] {
      std::vector<float> t(65536);
      for (uint32_t b = 0; b < 65536; ++b)
        t[b] = static_cast<float>(static_cast<double>(decode_narrow(b, kF16)));
      return t;
    }();
    const auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = table[in[i]];
    return true;
  }
  if (dst_type == DType::bf16 && src_type == DType::f32) {
    const auto* in = static_cast<const uint32_t*>(src);
    auto* out = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = in[i];
      out[i] = (bits & 0x7FFFFFFFu) > 0x7F800000u
                   ? static_cast<uint16_t>(encode_narrow(std::bit_cast<float>(bits), kBf16, false))
                   : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1)) >> 16);
    }
    return true;
  }
  return false;
}

}  // namespace

uint16_t f32_to_bf16_bits(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040);
  // bf16 is the top half of an f32: adding 0x7FFF plus the kept LSB rounds the dropped half to
  // nearest, ties to even; a carry out of the mantissa moves into the exponent (up to Inf).
  const uint32_t lsb = (bits >> 16) & 1;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

uint16_t f32_to_f16_bits(float x) { return static_cast<uint16_t>(encode_narrow(x, kF16, false)); }

uint8_t f32_to_e4m3_bits(float x, bool saturate) {
  return static_cast<uint8_t>(encode_narrow(x, kE4M3, saturate));
}

uint8_t f32_to_e5m2_bits(float x, bool saturate) {
  return static_cast<uint8_t>(encode_narrow(x, kE5M2, saturate));
}

float bf16_bits_to_f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
float f16_bits_to_f32(uint16_t b) { return decode_narrow(b, kF16); }
float e4m3_bits_to_f32(uint8_t b) { return decode_narrow(b, kE4M3); }
float e5m2_bits_to_f32(uint8_t b) { return decode_narrow(b, kE5M2); }

void pack_int4(const int8_t* values, int64_t n, uint8_t* packed) {
  for (int64_t i = 0; i < n; i += 2) {
    const int8_t lo = values[i];
    const int8_t hi = i + 1 < n ? values[i + 1] : 0;
    TS_CHECK(lo >= -8 && lo <= 7 && hi >= -8 && hi <= 7, "int4 value out of [-8, 7] at {}: {}, {}",
             i, lo, hi);
    packed[i / 2] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
  }
}

void unpack_int4(const uint8_t* packed, int64_t n, int8_t* values) {
  for (int64_t i = 0; i < n; ++i) {
    const int nibble = (i % 2) ? (packed[i / 2] >> 4) : (packed[i / 2] & 0xF);
    values[i] = static_cast<int8_t>(nibble >= 8 ? nibble - 16 : nibble);
  }
}

void convert_buffer(const void* src, DType src_type, void* dst, DType dst_type, int64_t n) {
  TS_CHECK(n >= 0, "negative element count {}", n);
  if (src_type == dst_type) {
    std::memmove(dst, src, dtype_storage_bytes(src_type, n));
    return;
  }
  if (convert_fast(src, src_type, dst, dst_type, n)) return;
  // Every element is read exactly as a double, then rounded once into the destination type, so
  // no conversion double-rounds (f64 -> bf16 does not pass through f32).
  switch (dst_type) {
    case DType::f32: {
      auto* out = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load_as_double(src, src_type, i));
      return;
    }
    case DType::f64: {
      auto* out = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = load_as_double(src, src_type, i);
      return;
    }
    case DType::bf16:
    case DType::f16: {
      const NarrowFormat& f = dst_type == DType::bf16 ? kBf16 : kF16;
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<uint16_t>(encode_narrow(load_as_double(src, src_type, i), f, false));
      return;
    }
    case DType::e4m3:
    case DType::e5m2: {
      // Saturating, as training uses fp8 (see f32_to_e4m3_bits).
      const NarrowFormat& f = dst_type == DType::e4m3 ? kE4M3 : kE5M2;
      auto* out = static_cast<uint8_t*>(dst);
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<uint8_t>(encode_narrow(load_as_double(src, src_type, i), f, true));
      return;
    }
    case DType::i8: {
      auto* out = static_cast<int8_t*>(dst);
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<int8_t>(round_to_int(load_as_double(src, src_type, i), -128, 127));
      return;
    }
    case DType::i32: {
      auto* out = static_cast<int32_t*>(dst);
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<int32_t>(
            round_to_int(load_as_double(src, src_type, i), INT32_MIN, INT32_MAX));
      return;
    }
    case DType::i4: {
      auto* out = static_cast<uint8_t*>(dst);
      for (int64_t i = 0; i < n; i += 2) {
        const int64_t lo = round_to_int(load_as_double(src, src_type, i), -8, 7);
        const int64_t hi =
            i + 1 < n ? round_to_int(load_as_double(src, src_type, i + 1), -8, 7) : 0;
        out[i / 2] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
      }
      return;
    }
  }
  TS_BUG("unknown dtype {}", static_cast<int>(dst_type));
}

}  // namespace tessera
