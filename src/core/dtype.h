// Element types and exact scalar conversions between them.
// FP8 follows the OCP 8-bit floating point spec (OFP8, v1.0): E4M3 has no infinities, one NaN
// pattern per sign (S.1111.111) and max 448; E5M2 is IEEE-like with Inf and NaN and max 57344.
// All narrowing conversions round to nearest, ties to even. Saturation is an explicit choice.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tessera {

enum class DType : uint8_t {
  f32,
  f64,  // CPU reference and finite-difference tests only
  bf16,
  f16,
  e4m3,  // fp8 E4M3 (OCP)
  e5m2,  // fp8 E5M2 (OCP)
  i8,
  i4,  // packed: two signed 4-bit values per byte, element 2k in the low nibble
  i32,
};

// Bytes per element; for i4 this is 0 (use dtype_storage_bytes for a count of elements).
size_t dtype_size(DType t);
size_t dtype_storage_bytes(DType t, int64_t numel);
std::string_view dtype_name(DType t);
// Parses "fp32"/"f32", "bf16", "fp16"/"f16", "fp8_e4m3"/"e4m3", "fp8_e5m2"/"e5m2", "int8", "int4",
// "int32", "fp64"; returns false for anything else.
bool parse_dtype(std::string_view name, DType* out);
bool dtype_is_float(DType t);

// 16-bit and 8-bit float storage types (bit patterns).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};
struct e4m3_t {
  uint8_t bits;
};
struct e5m2_t {
  uint8_t bits;
};

// f32 -> narrow, round-to-nearest-even. NaN maps to a quiet NaN of the target (E4M3: 0x7F/0xFF).
// Overflow: bf16/f16 go to Inf (IEEE); for fp8 `saturate` clamps finite overflow to ±max
// (the OCP "SAT" mode, what training uses), otherwise E5M2 gives Inf and E4M3 gives NaN
// (E4M3 has no Inf). Infinite inputs: saturate -> ±max, else E5M2 Inf / E4M3 NaN.
uint16_t f32_to_bf16_bits(float x);
uint16_t f32_to_f16_bits(float x);
uint8_t f32_to_e4m3_bits(float x, bool saturate = true);
uint8_t f32_to_e5m2_bits(float x, bool saturate = true);

float bf16_bits_to_f32(uint16_t b);
float f16_bits_to_f32(uint16_t b);
float e4m3_bits_to_f32(uint8_t b);
float e5m2_bits_to_f32(uint8_t b);

// Round-trips through the narrow type: what the CPU backend uses to emulate low-precision numerics.
inline float round_bf16(float x) { return bf16_bits_to_f32(f32_to_bf16_bits(x)); }
inline float round_f16(float x) { return f16_bits_to_f32(f32_to_f16_bits(x)); }
inline float round_e4m3(float x) { return e4m3_bits_to_f32(f32_to_e4m3_bits(x)); }
inline float round_e5m2(float x) { return e5m2_bits_to_f32(f32_to_e5m2_bits(x)); }

constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

// Signed int4 packing: values must lie in [-8, 7].
void pack_int4(const int8_t* values, int64_t n, uint8_t* packed);
void unpack_int4(const uint8_t* packed, int64_t n, int8_t* values);

// Element-wise conversion between any two float dtypes (and i8/i32 <-> float by rounding to
// nearest even with saturation to the integer range) over host buffers.
void convert_buffer(const void* src, DType src_type, void* dst, DType dst_type, int64_t n);

}  // namespace tessera
