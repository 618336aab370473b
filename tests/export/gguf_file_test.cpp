// The GGUF container parsed back by an independent reader (tests/export/gguf_reader.h): header,
// every value type, key order, tensor infos with aligned offsets, data bytes, a non-default
// alignment, the atomic commit; and the Q8_0/Q4_0 blocks against blocks computed by hand from
// GGML's rules.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "export/gguf_blocks.h"
#include "export/gguf_file.h"
#include "kernels/quantize.h"
#include "tests/common/cli.h"
#include "tests/export/gguf_reader.h"

namespace tessera::exporting {
namespace {

GgufTensor bytes_tensor(const std::string& name, std::vector<int64_t> dims, GgmlType type,
                        uint8_t fill) {
  GgufTensor t{name, std::move(dims), type, nullptr};
  const uint64_t n = t.nbytes();
  t.produce = [n, fill] {
    std::vector<uint8_t> v(n);
    for (uint64_t i = 0; i < n; ++i) v[i] = uint8_t(fill + i);
    return v;
  };
  return t;
}

GgufBuilder sample_builder() {
  GgufBuilder b;
  b.set("general.architecture", GgufValue::string("gpt2"));
  b.set("a.u32", GgufValue::u32(4000000000u));
  b.set("a.i32", GgufValue::i32(-7));
  b.set("a.f32", GgufValue::f32(0.25f));
  b.set("a.bool", GgufValue::boolean(true));
  b.set("a.strings", GgufValue::strings({"x", "", "Ġthe"}));
  b.set("a.ints", GgufValue::i32s({1, -2, 3}));
  b.set("a.floats", GgufValue::f32s({0.5, -1.5}));
  b.set("a.u32", GgufValue::u32(5));  // replaced in place: the key keeps its position
  b.add_tensor(bytes_tensor("v", {3}, GgmlType::f32, 1));            // 12 bytes
  b.add_tensor(bytes_tensor("m", {7, 5}, GgmlType::f16, 50));        // 70 bytes
  b.add_tensor(bytes_tensor("q", {64, 2}, GgmlType::q8_0, 100));     // 4 blocks: 136 bytes
  b.add_tensor(bytes_tensor("e", {32, 3, 2}, GgmlType::q4_0, 200));  // 6 blocks: 108 bytes
  return b;
}

TEST(GgufFile, ParsesBackHeaderKeysTensorsAndData) {
  const std::string path = testing::fresh_dir_for_this_test("gguf-file") + "/a.gguf";
  const GgufBuilder b = sample_builder();
  b.write(path);
  const auto g = testing::parse_gguf_file(path);
  EXPECT_EQ(g.bytes.substr(0, 4), "GGUF");
  EXPECT_EQ(g.version, 3u);
  EXPECT_EQ(g.key_order,
            (std::vector<std::string>{"general.architecture", "a.u32", "a.i32", "a.f32", "a.bool",
                                      "a.strings", "a.ints", "a.floats"}));
  EXPECT_EQ(g.kv.at("a.u32").type, 4u);
  EXPECT_EQ(g.kv.at("a.u32").u(), 5u);
  EXPECT_EQ(g.kv.at("a.i32").type, 5u);
  EXPECT_EQ(g.kv.at("a.i32").i(), -7);
  EXPECT_EQ(g.kv.at("a.f32").type, 6u);
  EXPECT_EQ(g.kv.at("a.f32").f(), 0.25);
  EXPECT_EQ(g.kv.at("a.bool").type, 7u);
  EXPECT_EQ(g.kv.at("a.bool").u(), 1u);
  EXPECT_EQ(g.kv.at("a.strings").type, 9u);
  EXPECT_EQ(g.kv.at("a.strings").elem_type, 8u);
  EXPECT_EQ(g.kv.at("a.strings").strings(), (std::vector<std::string>{"x", "", "Ġthe"}));
  EXPECT_EQ(g.kv.at("a.ints").elem_type, 5u);
  EXPECT_EQ(g.kv.at("a.ints").numbers(), (std::vector<double>{1, -2, 3}));
  EXPECT_EQ(g.kv.at("a.floats").elem_type, 6u);
  EXPECT_EQ(g.kv.at("a.floats").numbers(), (std::vector<double>{0.5, -1.5}));

  ASSERT_EQ(g.tensors.size(), 4u);
  const uint64_t sizes[] = {12, 70, 136, 108}, types[] = {0, 1, 8, 2};
  uint64_t expect_offset = 0;
  for (size_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(g.tensors[i].name);
    EXPECT_EQ(g.tensors[i].type, types[i]);
    EXPECT_EQ(g.tensors[i].offset, expect_offset);
    EXPECT_EQ(g.tensors[i].offset % 32, 0u);
    const auto want = b.tensors()[i].produce();
    ASSERT_EQ(want.size(), sizes[i]);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(g.data(g.tensors[i])), sizes[i]),
              std::string(want.begin(), want.end()));
    expect_offset = (expect_offset + sizes[i] + 31) / 32 * 32;
  }
  EXPECT_EQ(g.tensors[1].dims, (std::vector<uint64_t>{7, 5}));
  EXPECT_EQ(g.tensors[3].dims, (std::vector<uint64_t>{32, 3, 2}));
  EXPECT_EQ(g.data_start % 32, 0u);
  EXPECT_EQ(g.bytes.size(), g.data_start + expect_offset) << "the last tensor is padded too";
  // Padding between the tensor infos and the data is zeros.
  EXPECT_EQ(g.bytes.substr(g.data_start - 1, 1), std::string(1, '\0'));
}

TEST(GgufFile, HonoursGeneralAlignment) {
  const std::string path = testing::fresh_dir_for_this_test("gguf-file-align") + "/a.gguf";
  GgufBuilder b = sample_builder();
  b.set("general.alignment", GgufValue::u32(256));
  b.write(path);
  const auto g = testing::parse_gguf_file(path);
  EXPECT_EQ(g.data_start % 256, 0u);
  for (const auto& t : g.tensors) EXPECT_EQ(t.offset % 256, 0u) << t.name;
  EXPECT_EQ(g.tensors[3].offset, 768u);
}

TEST(GgufFile, WritesAtomically) {
  const std::string dir = testing::fresh_dir_for_this_test("gguf-file-atomic");
  const std::string path = dir + "/a.gguf";
  sample_builder().write(path);
  const std::string before = testing::parse_gguf_file(path).bytes;
  GgufBuilder bad = sample_builder();
  bad.add_tensor(GgufTensor{"boom", {4}, GgmlType::f32, []() -> std::vector<uint8_t> {
                              throw std::runtime_error("boom");
                            }});
  EXPECT_THROW(bad.write(path), std::runtime_error);
  EXPECT_EQ(testing::parse_gguf_file(path).bytes, before) << "the old file is intact";
  GgufBuilder wrong = sample_builder();
  wrong.add_tensor(GgufTensor{"short", {4}, GgmlType::f32, [] { return std::vector<uint8_t>(3); }});
  EXPECT_THROW(wrong.write(path), Error);
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) entries += e.exists() ? 1 : 0;
  EXPECT_EQ(entries, 1) << "no temporary left behind";
}

// A row 0..31 shifted: x_j = j - 16 (the largest |x| is 16, at j = 0, negative).
std::vector<float> ramp() {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = float(j - 16);
  return x;
}

uint16_t u16_at(const std::vector<uint8_t>& b, size_t i) { return uint16_t(b[i] | b[i + 1] << 8); }

TEST(GgufBlocks, Q8_0BlockByHand) {
  // d = 16 / 127; q_j = round(x_j * (1 / d)), 1 / d = 7.9375 up to f32 rounding.
  const auto b = pack_gguf_rows(GgmlType::q8_0, ramp().data(), 1, 32);
  ASSERT_EQ(b.size(), 34u);
  EXPECT_EQ(u16_at(b, 0), f32_to_f16_bits(16.0f / 127.0f));
  EXPECT_EQ(int8_t(b[2 + 0]), -127);  // x = -16
  EXPECT_EQ(int8_t(b[2 + 16]), 0);    // x = 0
  EXPECT_EQ(int8_t(b[2 + 20]), 32);   // x = 4: 31.75
  EXPECT_EQ(int8_t(b[2 + 31]), 119);  // x = 15: 119.06
  EXPECT_EQ(int8_t(b[2 + 15]), -8);   // x = -1: -7.94
}

TEST(GgufBlocks, Q4_0BlockByHand) {
  // d = -16 / -8 = 2; nibble = min(15, trunc(x / 2 + 8.5)); byte j = nibble_j | nibble_{j+16} << 4.
  const auto b = pack_gguf_rows(GgmlType::q4_0, ramp().data(), 1, 32);
  ASSERT_EQ(b.size(), 18u);
  EXPECT_EQ(u16_at(b, 0), 0x4000);  // fp16 2.0
  EXPECT_EQ(b[2 + 0], 0x80);        // x0 = -16 -> 0; x16 = 0 -> 8
  EXPECT_EQ(b[2 + 15], 0xF8);       // x15 = -1 -> trunc(8) = 8; x31 = 15 -> min(15, 16) = 15
  EXPECT_EQ(b[2 + 1], 0x91);        // x1 = -15 -> trunc(1.0) = 1; x17 = 1 -> trunc(9.0) = 9
  EXPECT_EQ(b[2 + 2], 0x91);        // x2 = -14 -> trunc(1.5) = 1; x18 = 2 -> trunc(9.5) = 9
  // From given codes: code + 8 in each nibble, the first half low.
  std::vector<int8_t> codes(32);
  for (int j = 0; j < 32; ++j) codes[j] = int8_t(j % 16 - 8);
  const uint16_t d = 0x3c00;
  const auto p = pack_q4_0(codes.data(), &d, 1, 32);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(p[2 + j], uint8_t(j | j << 4)) << j;
}

TEST(GgufBlocks, RoundTripIsQuantizeRowsBitForBit) {
  const int64_t rows = 3, cols = 96;
  std::vector<float> w(rows * cols);
  CounterRng(3, "blocks").fill_normal(w.data(), 0, w.size(), 1.0f);
  w[5] = 0.0f;
  for (int j = 32; j < 64; ++j) w[j] = 0.0f;  // an all-zero block: d = 0, codes 0
  for (const auto& [type, bits] : {std::pair{GgmlType::q8_0, quant::IntBits::int8},
                                   std::pair{GgmlType::q4_0, quant::IntBits::int4}}) {
    SCOPED_TRACE(ggml_type_name(type));
    std::vector<int8_t> codes(w.size());
    std::vector<uint16_t> scales(w.size() / 32);
    quant::quantize_rows(w.data(), rows, cols, bits, 32, codes.data(), scales.data());
    std::vector<float> want(w.size());
    quant::dequantize_rows(codes.data(), scales.data(), rows, cols, 32, want.data());
    const auto packed = pack_gguf_rows(type, w.data(), rows, cols);
    EXPECT_EQ(packed.size(), ggml_row_bytes(type, cols) * rows);
    EXPECT_EQ(unpack_gguf_rows(type, packed.data(), rows, cols), want);
  }
  for (GgmlType type : {GgmlType::f16, GgmlType::bf16}) {
    const auto packed = pack_gguf_rows(type, w.data(), rows, cols);
    const auto back = unpack_gguf_rows(type, packed.data(), rows, cols);
    for (size_t i = 0; i < w.size(); ++i)
      ASSERT_EQ(back[i], type == GgmlType::f16 ? round_f16(w[i]) : round_bf16(w[i]));
  }
}

}  // namespace
}  // namespace tessera::exporting
