// MoE end to end through the `tessera` binary on the real (prepared) Gutenberg corpus, so routing
// is not balanced by construction:
//  * layouts of 2, 4 and 8 ranks over dp, tp, pp and ep, ZeRO-1 off and on, GPipe and 1F1B,
//  dropless
//    and with a capacity that drops tokens, equal one process (losses, evaluation, parameters);
//  * resuming is bitwise, MoE metrics included, and checkpoints reshard across layouts;
//  * the load-balancing loss spreads the load that a router without it concentrates;
//  * BF16, FP16 and FP8 track FP32;
//  * metrics.jsonl carries the per-layer router statistics.
// Micro-batches are one sequence in every layout, so each micro-batch's aux loss (a nonlinear
// function of its tokens, as in Megatron) is computed over the same tokens everywhere.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "tests/common/cli.h"
#include "tests/common/runs.h"

namespace tessera {
namespace {

using testing::expect_same_parameters;
using testing::read_metrics;
using testing::run_cli;

struct Layout {
  int dp = 1, tp = 1, pp = 1, zero = 0;
  std::string schedule = "gpipe";
  float capacity = 0.0f;  // moe.capacity_factor
  int ep = 1;             // expert-parallel ranks out of dp
  std::string name() const {
    return fmt::format("dp{}_ep{}_tp{}_pp{}_zero{}_{}_cap{}", dp, ep, tp, pp, zero, schedule,
                       int(capacity * 100));
  }
};

// ci-tiny-moe (4 blocks: dense, then 3 MoE of 8 experts top-2 with a shared expert) for 5 steps of
// 16 sequences of 32 tokens, each micro-batch one sequence.
std::string recipe_args(const Layout& l, const std::string& out_dir) {
  const int microbatches = 2, accum = 16 / (l.dp * microbatches);
  return fmt::format(
      " --set data.seq_len=32 --set data.micro_batch=1 --set data.grad_accum={}"
      " --set parallel.microbatches={} --set train.steps=5 --set train.eval_every=0"
      " --set train.eval_batches=2 --set train.sample_tokens=0 --set optim.warmup_steps=2"
      " --set optim.lr=3e-3 --set checkpoint.every=3 --set checkpoint.keep=5"
      " --set logging.every=5 --set moe.capacity_factor={} --set parallel.dp={}"
      " --set parallel.tp={} --set parallel.pp={} --set parallel.zero={} --set parallel.ep={}"
      " --set parallel.schedule={} --set train.out_dir={}",
      accum, microbatches, l.capacity, l.dp, l.tp, l.pp, l.zero, l.ep, l.schedule, out_dir);
}

testing::CliResult train(const Layout& l, const std::string& out_dir,
                         const std::string& extra = "") {
  const int np = l.dp * l.tp * l.pp;
  const std::string args = "train recipes/ci-tiny-moe.yaml" + recipe_args(l, out_dir) + extra;
  return run_cli(args, np == 1 ? std::string() : testing::mpirun(np));
}

struct RunResult {
  std::map<int64_t, double> loss, aux, grad_norm;
  double val_loss = NAN;
  std::string dir;
};

RunResult read_run(const std::string& dir) {
  RunResult out;
  out.dir = dir;
  for (const auto& j : read_metrics(dir)) {
    if (j.contains("loss")) {
      out.loss[j["step"].get<int64_t>()] = j["loss"].get<double>();
      out.aux[j["step"].get<int64_t>()] = j["moe_aux_loss"].get<double>();
      out.grad_norm[j["step"].get<int64_t>()] = j["grad_norm"].get<double>();
    }
    if (j.contains("val_loss")) out.val_loss = j["val_loss"].get<double>();
  }
  return out;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(1e-12, std::abs(b)); }

const RunResult& serial(float capacity) {
  static std::map<float, RunResult> cache;
  if (!cache.count(capacity)) {
    Layout l;
    l.capacity = capacity;
    const std::string dir = testing::fresh_dir_for_this_test("moe-serial-" + l.name());
    const auto r = train(l, dir);
    EXPECT_EQ(r.status, 0) << r.output;
    cache[capacity] = read_run(dir);
  }
  return cache[capacity];
}

void PrintTo(const Layout& l, std::ostream* os) { *os << l.name(); }

class MoeParallelEqualsSerial : public ::testing::TestWithParam<Layout> {};

TEST_P(MoeParallelEqualsSerial, LossesEvalAndParameters) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Layout l = GetParam();
  const RunResult& ref = serial(l.capacity);
  ASSERT_EQ(ref.loss.size(), 5u);
  const std::string dir = testing::fresh_dir("moe-parallel-" + l.name());
  const auto r = train(l, dir);
  ASSERT_EQ(r.status, 0) << r.output;
  const RunResult got = read_run(dir);
  ASSERT_EQ(got.loss.size(), 5u) << r.output;
  for (const auto& [step, loss] : ref.loss) {
    EXPECT_LE(rel(got.loss.at(step), loss), 1e-5) << "step " << step;
    EXPECT_LE(rel(got.aux.at(step), ref.aux.at(step)), 1e-5) << "aux loss, step " << step;
    // The norm sums each gradient element once, whatever holds it (dense, expert, ZeRO-1 chunk):
    // 1e-5 at step 1 (same parameters everywhere); later the parameters' rounding differences
    // (within the 1e-5 on the loss) grow in the norm to ~1.5e-4 by step 5, in layouts with and
    // without ep alike (measured), so 1e-3 there.
    EXPECT_LE(rel(got.grad_norm.at(step), ref.grad_norm.at(step)), step == 1 ? 1e-5 : 1e-3)
        << "grad norm, step " << step;
  }
  EXPECT_LE(rel(got.val_loss, ref.val_loss), 1e-5) << got.val_loss << " vs " << ref.val_loss;
  expect_same_parameters(dir, ref.dir, 1e-3);  // tolerance: see parallel_train_test.cpp
}

// Each parallel dimension alone and together, both schedules, dropless and dropping, expert
// parallelism (ep 2 and 4) alone and with dp, tp, pp and ZeRO-1 (ten layouts: each costs CI
// 10-60 s on two cores). The dropless ep layouts equal the serial run, so dropless with ep equals
// dropless without.
std::vector<Layout> moe_layouts() {
  return {{2, 1, 1, 0, "gpipe", 0.0f},    {1, 2, 1, 1, "gpipe", 0.0f},
          {1, 1, 2, 0, "gpipe", 0.0f},    {2, 2, 1, 1, "gpipe", 1.0f},
          {1, 1, 4, 0, "1f1b", 1.0f},     {2, 1, 1, 0, "gpipe", 0.0f, 2},
          {4, 1, 1, 0, "gpipe", 0.0f, 4}, {4, 1, 1, 1, "gpipe", 1.0f, 2},
          {2, 1, 2, 1, "1f1b", 1.0f, 2},  {2, 2, 2, 1, "gpipe", 0.0f, 2}};
}

INSTANTIATE_TEST_SUITE_P(Layouts, MoeParallelEqualsSerial, ::testing::ValuesIn(moe_layouts()),
                         [](const auto& info) { return info.param.name(); });

// step -> the exact text of the values that must match bitwise (JSON prints doubles with
// round-trip precision, so equal text means equal bits).
std::map<int64_t, std::string> step_records(const std::string& dir) {
  std::map<int64_t, std::string> out;
  for (const auto& m : read_metrics(dir))
    if (m.contains("loss"))
      out[m["step"].get<int64_t>()] = m["loss"].dump() + " " + m["grad_norm"].dump() + " " +
                                      m["moe_aux_loss"].dump() + " " + m["moe_layers"].dump();
  return out;
}

// Saved at (dp 2, ep 2, pp 2) with ZeRO-1 and tokens dropped; resumed from step 3 in one
// process, at (dp 1, tp 2) and at (dp 4, ep 4): the experts (stored by global expert index) and
// their optimizer state reshard across ep, tp, pp and dp, and steps 4 and 5 continue the saved run;
// resumed at the saved layout, they repeat it bit for bit.
TEST(MoeTrain, CheckpointsReshardAcrossLayouts) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Layout saved{2, 1, 2, 1, "gpipe", 1.0f, 2};
  const std::string dir = testing::fresh_dir("moe-reshard");
  const auto r = train(saved, dir + "/saved");
  ASSERT_EQ(r.status, 0) << r.output;
  const RunResult a = read_run(dir + "/saved");
  for (const Layout& l : {Layout{1, 1, 1, 0, "gpipe", 1.0f}, Layout{1, 2, 1, 1, "gpipe", 1.0f},
                          Layout{4, 1, 1, 1, "gpipe", 1.0f, 4}}) {
    SCOPED_TRACE(l.name());
    const std::string out = dir + "/" + l.name();
    const auto c = train(l, out, " --set checkpoint.resume=" + dir + "/saved/checkpoints/step_3");
    ASSERT_EQ(c.status, 0) << c.output;
    const RunResult got = read_run(out);
    for (int64_t s : {4, 5}) EXPECT_LE(rel(got.loss.at(s), a.loss.at(s)), 1e-5) << "step " << s;
  }
  const std::string same = dir + "/same";
  const auto c =
      train(saved, same, " --set checkpoint.resume=" + dir + "/saved/checkpoints/step_3");
  ASSERT_EQ(c.status, 0) << c.output;
  const auto want = step_records(dir + "/saved"), got = step_records(same);
  for (int64_t s : {4, 5}) EXPECT_EQ(got.at(s), want.at(s)) << "step " << s;
}

TEST(MoeTrain, ResumeIsBitwiseExact) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  Layout l;
  l.capacity = 1.0f;
  const std::string dir = testing::fresh_dir("moe-resume");
  const std::string six = " --set train.steps=6";
  ASSERT_EQ(train(l, dir + "/full", six).status, 0);
  const auto resumed = train(l, dir + "/resumed",
                             six + " --set checkpoint.resume=" + dir + "/full/checkpoints/step_3");
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  const auto a = step_records(dir + "/full"), b = step_records(dir + "/resumed");
  ASSERT_EQ(a.size(), 6u);
  for (int64_t s = 4; s <= 6; ++s) EXPECT_EQ(b.at(s), a.at(s)) << "step " << s;
}

// The per-layer router statistics (moe_layers) of the last `n` steps: mean of max/mean tokens
// per expert over the MoE layers.
double late_imbalance(const std::string& dir, int n) {
  const auto m = read_metrics(dir);
  double sum = 0.0;
  int count = 0;
  for (const auto& j : m) {
    if (!j.contains("moe_layers") || j["step"].get<int64_t>() <= int64_t(m.size()) - n) continue;
    for (const auto& layer : j["moe_layers"]) {
      sum += layer["max_tokens"].get<double>() / layer["mean_tokens"].get<double>();
      ++count;
    }
  }
  return count ? sum / count : NAN;
}

// Without the balancing loss the routers collapse (every token's top-2 includes one expert: its
// load is E/K = 4 times the mean); with it the load spreads (measured: about 2.3 times the mean
// over the last steps at this learning rate). Both runs see the same data and initialization;
// 512-token micro-batches keep the load statistics meaningful.
TEST(MoeTrain, LoadBalancingLossSpreadsTheLoad) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  Layout l;
  const std::string dir = testing::fresh_dir("moe-balance");
  const std::string common =
      " --set data.seq_len=64 --set data.micro_batch=8 --set data.grad_accum=1"
      " --set parallel.microbatches=1 --set train.steps=60 --set optim.lr=1e-2"
      " --set moe.z_loss_coef=0";
  ASSERT_EQ(train(l, dir + "/off", common + " --set moe.aux_loss_coef=0").status, 0);
  ASSERT_EQ(train(l, dir + "/on", common + " --set moe.aux_loss_coef=0.1").status, 0);
  const double off = late_imbalance(dir + "/off", 10), on = late_imbalance(dir + "/on", 10);
  EXPECT_GT(off, 3.5) << "without the balancing loss the routers collapse";
  EXPECT_GT(off, on * 1.3) << "max/mean tokens per expert without aux " << off << ", with " << on;
}

// BF16, FP16 (loss scaling) and FP8 (dense and shared-expert linears in FP8; routed experts in
// the 16-bit activation dtype) train the MoE model and track FP32: the same first loss to 1e-2,
// the third within 2%.
TEST(MoeTrain, EveryPrecisionTracksFp32) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  Layout l;
  l.capacity = 1.0f;
  const std::string dir = testing::fresh_dir("moe-precision");
  const std::string three = " --set train.steps=3";
  ASSERT_EQ(train(l, dir + "/fp32", three).status, 0);
  const RunResult ref = read_run(dir + "/fp32");
  ASSERT_EQ(ref.loss.size(), 3u);
  for (const char* p : {"bf16", "fp16", "fp8"}) {
    const auto r = train(l, dir + "/" + p, three + " --set precision.compute=" + p);
    ASSERT_EQ(r.status, 0) << p << "\n" << r.output;
    const RunResult got = read_run(dir + "/" + p);
    ASSERT_EQ(got.loss.size(), 3u) << p;
    EXPECT_LE(rel(got.loss.at(1), ref.loss.at(1)), 1e-2) << p;
    EXPECT_LE(rel(got.loss.at(3), ref.loss.at(3)), 2e-2) << p;
    EXPECT_GT(got.aux.at(3), 0.0) << p;
  }
}

TEST(MoeTrain, MetricsCarryTheRouterStatistics) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  Layout l;
  l.capacity = 0.5f;
  const std::string dir = testing::fresh_dir("moe-metrics");
  const auto r = train(l, dir, " --set train.steps=2");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto m = read_metrics(dir);
  ASSERT_FALSE(m.empty());
  const auto& j = m.front();
  ASSERT_TRUE(j.contains("moe_layers")) << j.dump();
  ASSERT_EQ(j["moe_layers"].size(), 3u);  // blocks 1, 2, 3
  double aux = 0.0;
  for (const auto& layer : j["moe_layers"]) {
    aux += layer["aux_loss"].get<double>();
    EXPECT_GT(layer["z_loss"].get<double>(), 0.0);
    // 32 tokens x top-2 over 8 experts, capacity ceil(0.5 * 8) = 4 of the mean 8: half dropped at
    // best, and the busiest expert holds at least the mean.
    EXPECT_DOUBLE_EQ(layer["mean_tokens"].get<double>(), 8.0);
    EXPECT_GE(layer["max_tokens"].get<double>(), 8.0);
    EXPECT_GE(layer["dropped"].get<double>(), 0.5);
    EXPECT_LT(layer["dropped"].get<double>(), 1.0);
  }
  EXPECT_NEAR(j["moe_aux_loss"].get<double>(), aux, 1e-12);
  EXPECT_GT(aux, 0.0);
  EXPECT_NE(r.output.find("| aux "), std::string::npos) << r.output;
}

}  // namespace
}  // namespace tessera
