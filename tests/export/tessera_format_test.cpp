// The Tessera export format: written, read back, the codes and scales are exactly
// quant::quantize_rows of the checkpoint's weights (int8 per channel and grouped, int4 grouped),
// int4 codes are packed low nibble first, float tensors keep their values, the model config and
// tokenizer come back, and one model gives byte-identical files from any shard layout.
#include "export/tessera_format.h"

#include <gtest/gtest.h>

#include "export/weight_quant.h"
#include "io/h5.h"
#include "tests/common/errors.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera::exporting {
namespace {

using testing::ScratchDir;

ExportOptions int_options(ExportQuant q, int64_t group, const std::string& out) {
  ExportOptions o;
  o.format = ExportFormat::tessera;
  o.quant = q;
  o.group_size = group;
  o.out = out;
  return o;
}

// Every quantized tensor equals quantize_rows of the checkpoint's f32 weight; every other tensor
// equals the checkpoint's values.
void expect_round_trip(const ExportModel& m, const TesseraExport& e, quant::IntBits bits,
                       int64_t group) {
  ASSERT_EQ(e.tensors.size(), m.tensors.size());
  int num_quantized = 0;
  for (const auto& [name, t] : m.tensors) {
    SCOPED_TRACE(name);
    const TesseraExportTensor& got = e.tensors.at(name);
    EXPECT_EQ(got.shape, t.shape);
    EXPECT_EQ(got.quantized, is_quantized_weight(m, name));
    if (!got.quantized) {
      EXPECT_EQ(got.values, t.data);
      continue;
    }
    ++num_quantized;
    const int64_t K = t.shape.back(), R = t.numel() / K, g = group > 0 ? group : K;
    std::vector<int8_t> codes(size_t(R * K));
    std::vector<uint16_t> scales(size_t(R * (K / g)));
    quant::quantize_rows(t.data.data(), R, K, bits, g, codes.data(), scales.data());
    EXPECT_EQ(got.bits, bits);
    EXPECT_EQ(got.group, g);
    EXPECT_EQ(got.rows, R);
    EXPECT_EQ(got.cols, K);
    EXPECT_EQ(got.codes, codes);
    EXPECT_EQ(got.scales, scales);
  }
  EXPECT_GE(num_quantized, 2 * 6);  // q k v o gate up down... of 2 layers at least
}

TEST(TesseraFormat, RoundTripGivesTheCodesAndScalesOfQuantizeRows) {
  ScratchDir dir;
  Recipe r = testing::export_recipe(testing::kLlamaModel);
  r.model.ffn_hidden = 128;  // every input width a multiple of 64
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(dir / "run", r));
  const struct {
    ExportQuant q;
    int64_t group;
    quant::IntBits bits;
  } cases[] = {{ExportQuant::int8, 0, quant::IntBits::int8},
               {ExportQuant::int8, 32, quant::IntBits::int8},
               {ExportQuant::int4, 0, quant::IntBits::int4},  // default: 32
               {ExportQuant::int4, 64, quant::IntBits::int4}};
  for (const auto& c : cases) {
    SCOPED_TRACE(fmt::format("{} group {}", to_string(c.q), c.group));
    const std::string out = dir / fmt::format("m-{}-{}.h5", to_string(c.q), c.group);
    export_model(m, int_options(c.q, c.group, out));
    const TesseraExport e = read_tessera_export(out);
    EXPECT_EQ(e.quant, to_string(c.q));
    EXPECT_EQ(e.float_dtype, "f32");  // trained in fp32
    EXPECT_FALSE(e.qat);
    EXPECT_EQ(e.step, 5);
    EXPECT_EQ(e.model, r.model);
    EXPECT_EQ(e.tokenizer_json, m.tokenizer_json);
    expect_round_trip(m, e, c.bits, c.bits == quant::IntBits::int4 && c.group == 0 ? 32 : c.group);
  }
}

TEST(TesseraFormat, Int4CodesArePackedLowNibbleFirst) {
  ScratchDir dir;
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(
      dir / "run", testing::export_recipe(testing::kGpt2Model)));
  const std::string out = dir / "m.h5";
  export_model(m, int_options(ExportQuant::int4, 32, out));
  const std::string name = "layers.0.mlp.fc.weight";
  const TesseraExportTensor t = read_tessera_export(out).tensors.at(name);
  namespace h5 = io::h5;
  h5::File f = h5::File::open_read(out);
  h5::Handle d = h5::open_dataset(f.ctx(), f.id(), "tensors/" + name + "/codes");
  const std::vector<int64_t> dims = h5::dataset_dims(f.ctx(), d.id(), name);
  ASSERT_EQ(dims, (std::vector<int64_t>{t.rows, t.cols / 2}));
  std::vector<uint8_t> packed(size_t(dims[0] * dims[1]));
  h5::read_box(f.ctx(), d.id(), H5T_NATIVE_UINT8, {0, 0}, dims, packed.data(), dims, {0, 0}, name);
  for (int64_t i = 0; i < t.rows * t.cols; i += 2) {
    const int lo = packed[size_t(i / 2)] & 0xF, hi = packed[size_t(i / 2)] >> 4;
    ASSERT_EQ(lo, t.codes[size_t(i)] & 0xF) << i;
    ASSERT_EQ(hi, t.codes[size_t(i + 1)] & 0xF) << i;
  }
}

TEST(TesseraFormat, FloatExportsHoldTheRoundedValues) {
  ScratchDir dir;
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(
      dir / "run", testing::export_recipe(testing::kGpt2Model)));
  for (ExportQuant q : {ExportQuant::f16, ExportQuant::bf16}) {
    const std::string out = dir / fmt::format("m-{}.h5", to_string(q));
    export_model(m, int_options(q, 0, out));
    const TesseraExport e = read_tessera_export(out);
    for (const auto& [name, t] : m.tensors) {
      const TesseraExportTensor& got = e.tensors.at(name);
      ASSERT_FALSE(got.quantized) << name;
      for (size_t i = 0; i < t.data.size(); ++i)
        ASSERT_EQ(got.values[i],
                  q == ExportQuant::f16 ? round_f16(t.data[i]) : round_bf16(t.data[i]))
            << name << "[" << i << "]";
    }
  }
}

TEST(TesseraFormat, RoutedExpertsAreQuantizedAsRowsOfAllExperts) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(testing::kLlamaModel,
                                          "moe:\n  num_experts: 4\n  topk: 2\n  ffn_hidden: 32\n");
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(dir / "run", r));
  const std::string out = dir / "m.h5";
  export_model(m, int_options(ExportQuant::int4, 32, out));
  const TesseraExport e = read_tessera_export(out);
  const TesseraExportTensor& up = e.tensors.at("layers.1.moe.experts.up.weight");
  EXPECT_TRUE(up.quantized);
  EXPECT_EQ(up.shape, (std::vector<int64_t>{4, 32, 64}));
  EXPECT_EQ(up.rows, 4 * 32);
  EXPECT_FALSE(e.tensors.at("layers.1.moe.router.weight").quantized);
  expect_round_trip(m, e, quant::IntBits::int4, 32);
}

TEST(TesseraFormat, AGroupThatDoesNotDivideIsAUserError) {
  ScratchDir dir;
  // ffn_hidden 96: the down projection has 96 input columns, which 64 does not divide.
  const ExportModel m = load_export_model(testing::write_synthetic_checkpoint(
      dir / "run", testing::export_recipe(testing::kLlamaModel)));
  testing::expect_user_error(
      [&] { export_model(m, int_options(ExportQuant::int8, 64, dir / "m.h5")); },
      {"--group-size 64", "96", "mlp.down.weight"});
  EXPECT_FALSE(std::filesystem::exists(dir / "m.h5"));  // nothing left behind
}

TEST(TesseraFormat, AnyShardLayoutGivesAByteIdenticalFile) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(testing::kLlamaModel);
  std::string first;
  for (int shards : {1, 3, 4}) {
    // The same path each time: the file records its source checkpoint.
    std::filesystem::remove_all(dir / "run");
    testing::SyntheticOptions o;
    o.num_shards = shards;
    testing::write_synthetic_checkpoint(dir / "run", r, o);
    const std::string out = dir / fmt::format("m{}.h5", shards);
    export_model(load_export_model(dir / "run"), int_options(ExportQuant::int4, 32, out));
    if (first.empty())
      first = testing::read_all(out);
    else
      EXPECT_TRUE(testing::read_all(out) == first) << shards << " shards";
  }
  EXPECT_GT(first.size(), 10000u);
}

TEST(TesseraFormat, ModelConfigYamlRoundTrips) {
  for (const Recipe& r :
       {testing::export_recipe(testing::kGpt2Model), testing::export_recipe(testing::kLlamaModel),
        testing::export_recipe(testing::kLlamaModel,
                               "moe:\n  num_experts: 4\n  topk: 2\n  shared_experts: 1\n")})
    EXPECT_EQ(parse_model_config_yaml(model_config_yaml(r), "test"), r.model);
}

}  // namespace
}  // namespace tessera::exporting
