// `tessera export` end to end: one model trained under tp2 x pp2, saved again unchanged under
// other layouts (dp2 with ZeRO-1, one process), exports to byte-identical files from each; and
// the command's errors — unknown format, a type the format does not take, an existing output
// without --force, a corrupt checkpoint — exit with status 2 naming the thing; `tessera inspect`
// summarises an export.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "core/dtype.h"
#include "export/export_model.h"
#include "export/tessera_format.h"
#include "export/weight_quant.h"
#include "io/checkpoint.h"
#include "kernels/ops.h"
#include "kernels/quantize.h"
#include "tests/common/cli.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera {
namespace {

using testing::run_cli;
using testing::run_cli_in;

// A 2-layer llama (GQA, QK-norm, untied head): no biases, so a step at lr 1e-30 (below every
// weight's rounding step) changes no parameter, and a checkpoint can be saved again unchanged
// under another layout by resuming it for one such step.
std::string train_args(int dp, int tp, int pp, int zero) {
  return fmt::format(
      "train {}/recipes/ci-tiny.yaml --set data.path={} --set model.family=llama"
      " --set model.num_layers=2 --set model.hidden=64 --set model.num_heads=4"
      " --set model.num_kv_heads=2 --set model.ffn_hidden=128 --set model.qk_norm=true"
      " --set model.max_seq_len=32 --set data.seq_len=32 --set data.global_batch=4"
      " --set data.micro_batch=0 --set train.eval_batches=1 --set train.eval_every=0"
      " --set train.sample_tokens=0 --set optim.warmup_steps=0 --set optim.min_lr=0"
      " --set logging.every=1 --set parallel.dp={} --set parallel.tp={} --set parallel.pp={}"
      " --set parallel.zero={} --set train.out_dir=run",
      TESSERA_SOURCE_DIR, testing::ci_dataset(), dp, tp, pp, zero);
}

std::string launcher(int np) { return np == 1 ? std::string() : testing::mpirun(np); }

TEST(ExportCli, OneModelSavedUnderAnyLayoutExportsByteIdenticalFiles) {
  const std::string src = testing::fresh_dir("export-layout-src");
  const auto t = run_cli_in(src, train_args(1, 2, 2, 0) + " --set train.steps=2", launcher(4));
  ASSERT_EQ(t.status, 0) << t.output;
  const std::string step2 = src + "/run/checkpoints/step_2";
  const io::CheckpointReader original = io::CheckpointReader::open(step2);
  struct Layout {
    int dp, tp, pp, zero;
  };
  std::string tessera_bytes, st_bytes, config_bytes;
  for (const Layout& l : {Layout{1, 1, 1, 0}, Layout{2, 1, 1, 1}, Layout{1, 2, 2, 0}}) {
    const std::string name = fmt::format("dp{}_tp{}_pp{}_zero{}", l.dp, l.tp, l.pp, l.zero);
    SCOPED_TRACE(name);
    // Each export runs in its own directory on "run": the files record the same source path.
    const std::string dir = testing::fresh_dir("export-layout-" + name);
    const auto r = run_cli_in(dir,
                              train_args(l.dp, l.tp, l.pp, l.zero) +
                                  " --set train.steps=3 --set optim.lr=1e-30"
                                  " --set checkpoint.resume=" +
                                  step2,
                              launcher(l.dp * l.tp * l.pp));
    ASSERT_EQ(r.status, 0) << r.output;
    // The premise: the parameters are the original's, bit for bit.
    const io::CheckpointReader saved = io::CheckpointReader::open(dir + "/run/checkpoints/step_3");
    for (const std::string& n : original.tensor_names()) {
      if (n.rfind("optim.", 0) == 0) continue;
      std::vector<float> a(size_t(original.numel(n))), b(a.size());
      original.read_full(n, a.data());
      saved.read_full(n, b.data());
      ASSERT_EQ(a, b) << n;
    }
    const auto e1 = run_cli_in(dir, "export run --format tessera --quant int4 --out m.h5");
    ASSERT_EQ(e1.status, 0) << e1.output;
    const auto e2 = run_cli_in(dir, "export run --format safetensors --quant bf16 --out hf");
    ASSERT_EQ(e2.status, 0) << e2.output;
    const std::string tb = testing::read_all(dir + "/m.h5");
    const std::string sb = testing::read_all(dir + "/hf/model.safetensors");
    const std::string cb = testing::read_all(dir + "/hf/config.json");
    if (tessera_bytes.empty()) {
      tessera_bytes = tb;
      st_bytes = sb;
      config_bytes = cb;
      continue;
    }
    EXPECT_TRUE(tb == tessera_bytes) << "tessera export differs";
    EXPECT_TRUE(sb == st_bytes) << "model.safetensors differs";
    EXPECT_EQ(cb, config_bytes);
  }
  EXPECT_GT(tessera_bytes.size(), 100000u);
}

TEST(ExportCli, BadRequestsExitTwoNamingTheThing) {
  const std::string dir = testing::fresh_dir("export-cli-errors");
  const std::string step = testing::write_synthetic_checkpoint(
      dir + "/run", testing::export_recipe(testing::kGpt2Model));
  const auto expect_2 = [&](const std::string& args, const std::vector<std::string>& fragments) {
    SCOPED_TRACE(args);
    const auto r = run_cli_in(dir, "export " + args);
    EXPECT_EQ(r.status, 2) << r.output;
    for (const std::string& f : fragments)
      EXPECT_NE(r.output.find(f), std::string::npos) << "lacks '" << f << "': " << r.output;
  };
  expect_2("run --format onnx --quant f16 --out x", {"--format", "onnx"});
  expect_2("run --format tessera --quant q5_k --out x", {"--quant", "q5_k"});
  expect_2("run --format safetensors --quant int4 --out x", {"int4", "safetensors"});
  expect_2("run --format tessera --quant q4_0 --out x", {"q4_0", "tessera"});
  expect_2("run --format gguf --quant int8 --out x", {"int8", "gguf"});
  expect_2("run --format tessera --quant int4 --group-size 48 --out x", {"--group-size", "48"});
  expect_2("run --format tessera --quant f16 --group-size 32 --out x", {"--group-size", "f16"});
  expect_2("nowhere --format tessera --quant int8 --out x", {"nowhere"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/x"));

  // An existing output: refused without --force, replaced with it.
  testing::write_all(dir + "/m.h5", "old");
  expect_2("run --format tessera --quant int8 --out m.h5", {"m.h5", "--force"});
  EXPECT_EQ(testing::read_all(dir + "/m.h5"), "old");
  const auto forced =
      run_cli_in(dir, "export run --format tessera --quant int8 --out m.h5 --force");
  EXPECT_EQ(forced.status, 0) << forced.output;
  EXPECT_GT(testing::read_all(dir + "/m.h5").size(), 1000u);
  std::filesystem::create_directories(dir + "/hf");
  expect_2("run --format safetensors --quant f32 --out hf", {"hf", "--force"});
  const auto st = run_cli_in(dir, "export run --format safetensors --quant f32 --out hf --force");
  EXPECT_EQ(st.status, 0) << st.output;
  EXPECT_TRUE(std::filesystem::exists(dir + "/hf/model.safetensors"));
  for (const auto& e : std::filesystem::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();

  // Corrupt checkpoints: bytes flipped all through the shard (tensor data fails its checksum,
  // metadata fails to parse), then the shard cut short.
  const std::string shard = step + "/shard_0_of_1.h5";
  const std::string good = testing::read_all(shard);
  std::string bytes = good;
  for (size_t at = bytes.size() / 3; at < bytes.size(); at += 997)
    bytes[at] = char(bytes[at] ^ 0x5A);
  testing::write_all(shard, bytes);
  expect_2("run --format tessera --quant int8 --out corrupt.h5", {"shard_0_of_1.h5"});
  testing::write_all(shard, good.substr(0, good.size() / 2));
  expect_2("run --format safetensors --quant f32 --out corrupt", {"shard_0_of_1.h5"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/corrupt.h5"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/corrupt"));

  const auto help = run_cli("export --help");
  EXPECT_EQ(help.status, 0);
  for (const char* opt : {"--format", "--quant", "--group-size", "--out", "--force", "CKPT"})
    EXPECT_NE(help.output.find(opt), std::string::npos) << opt;
}

TEST(ExportCli, InspectSummarisesATesseraExport) {
  const std::string dir = testing::fresh_dir("export-cli-inspect");
  testing::write_synthetic_checkpoint(dir + "/run", testing::export_recipe(testing::kLlamaModel));
  const auto e = run_cli_in(dir, "export run --format tessera --quant int4 --out m.h5");
  ASSERT_EQ(e.status, 0) << e.output;
  const auto r = run_cli_in(dir, "inspect m.h5");
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* want : {"Tessera export m.h5", "quant int4", "post-training round-to-nearest",
                           "family: llama", "layers.1.attn.wq.weight", "int4 g32", "(128, 64)",
                           "lm_head.weight", "run/checkpoints/step_5"})
    EXPECT_NE(r.output.find(want), std::string::npos) << want << "\n" << r.output;
}

// A QAT checkpoint (int4 in groups of 32, bf16 compute) exports the integers its forward trained
// against: each weight read back from the Tessera file, dequantized, is bit for bit what
// ops::fake_quantize makes of the weight the forward read (the bf16 copy of the master); and
// `tessera perplexity --quant int4` scores those same weights as the GGUF Q4_0 export's.
TEST(ExportCli, QatCheckpointExportsTheIntegersItsForwardUsed) {
  const std::string dir = testing::fresh_dir("export-cli-qat");
  const auto t = run_cli_in(dir, train_args(1, 1, 1, 0) +
                                     " --set train.steps=2 --set precision.compute=bf16"
                                     " --set qat.weights=int4 --set qat.group_size=32");
  ASSERT_EQ(t.status, 0) << t.output;
  const auto e = run_cli_in(dir, "export run --format tessera --quant int4 --out m.h5");
  ASSERT_EQ(e.status, 0) << e.output;
  const exporting::ExportModel m = exporting::load_export_model(dir + "/run");
  const exporting::TesseraExport x = exporting::read_tessera_export(dir + "/m.h5");
  EXPECT_TRUE(x.qat);
  const std::vector<std::string> names = exporting::quantized_weight_names(m);
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const exporting::TesseraExportTensor& q = x.tensors.at(name);
    ASSERT_TRUE(q.quantized);
    EXPECT_EQ(q.group, 32);
    EXPECT_EQ(q.bits, quant::IntBits::int4);
    const std::vector<float>& master = m.at(name).data;
    std::vector<uint16_t> w(master.size()), forward(master.size());
    for (size_t i = 0; i < master.size(); ++i) w[i] = f32_to_bf16_bits(master[i]);
    ops::fake_quantize(Tensor(forward.data(), DType::bf16, Device::cpu, {q.rows, q.cols}),
                       Tensor(w.data(), DType::bf16, Device::cpu, {q.rows, q.cols}),
                       quant::IntBits::int4, 32);
    std::vector<float> deployed(master.size());
    quant::dequantize_rows(q.codes.data(), q.scales.data(), q.rows, q.cols, q.group,
                           deployed.data());
    for (size_t i = 0; i < master.size(); ++i)
      ASSERT_EQ(forward[i], f32_to_bf16_bits(deployed[i])) << "element " << i;
  }
}

}  // namespace
}  // namespace tessera
