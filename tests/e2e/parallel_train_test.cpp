// Parallel equals serial: tiny models trained for 5 steps under every (dp, tp, pp) layout of 2, 4
// and 8 MPI ranks, ZeRO-1 off and on, give the losses, evaluation and final parameters of one
// process; checkpoints reshard between layouts; a failing rank ends the whole job.
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
using testing::run_cli;

struct Layout {
  int dp, tp, pp, zero;
  std::string family = "gpt2";
  std::string schedule = "gpipe";
  std::string name() const {
    return fmt::format("{}_dp{}_tp{}_pp{}_zero{}_{}", family, dp, tp, pp, zero, schedule);
  }
};

// Tiny models that every layout up to 8 ranks divides: 8 layers, 8 heads (GQA 8/4 for llama),
// vocabulary 250 padded to 256, 16 sequences of 16 tokens per step as 2 micro-batches per dp rank.
std::string recipe_args(const Layout& l, const std::string& out_dir) {
  std::string a =
      " --set data.path=mock --set model.vocab_size=250 --set model.vocab_pad_multiple=64"
      " --set model.num_layers=8 --set model.hidden=32 --set model.num_heads=8"
      " --set model.max_seq_len=16 --set data.seq_len=16 --set data.global_batch=16"
      " --set data.micro_batch=0 --set data.grad_accum=1 --set parallel.microbatches=2"
      " --set train.steps=5 --set train.eval_every=0 --set train.eval_batches=2"
      " --set train.sample_tokens=0 --set optim.warmup_steps=2 --set optim.lr=3e-3"
      " --set checkpoint.every=3 --set checkpoint.keep=5 --set train.device=cpu"
      " --set logging.every=5";
  if (l.family == "llama")
    a += " --set model.family=llama --set model.num_kv_heads=4 --set model.qk_norm=true"
         " --set model.ffn_hidden=64";
  a += fmt::format(
      " --set parallel.dp={} --set parallel.tp={} --set parallel.pp={}"
      " --set parallel.zero={} --set parallel.schedule={} --set train.out_dir={}",
      l.dp, l.tp, l.pp, l.zero, l.schedule, out_dir);
  return a;
}

testing::CliResult train(const Layout& l, const std::string& out_dir,
                         const std::string& extra = "") {
  const int np = l.dp * l.tp * l.pp;
  const std::string args = "train recipes/ci-tiny.yaml" + recipe_args(l, out_dir) + extra;
  return run_cli(args, np == 1 ? std::string() : testing::mpirun(np));
}

struct RunResult {
  std::map<int64_t, double> loss;  // step -> training loss
  double val_loss = NAN;
  std::string dir;
};

RunResult read_run(const std::string& dir) {
  RunResult out;
  out.dir = dir;
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.loss[j["step"].get<int64_t>()] = j["loss"].get<double>();
    if (j.contains("val_loss")) out.val_loss = j["val_loss"].get<double>();
  }
  return out;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(1e-12, std::abs(b)); }

// The serial reference of a model family, trained once per test binary.
const RunResult& serial(const std::string& family) {
  static std::map<std::string, RunResult> cache;
  if (!cache.count(family)) {
    Layout l{1, 1, 1, 0, family};
    const std::string dir = testing::fresh_dir_for_this_test("parallel-serial-" + family);
    const auto r = train(l, dir);
    EXPECT_EQ(r.status, 0) << r.output;
    cache[family] = read_run(dir);
  }
  return cache[family];
}

void PrintTo(const Layout& l, std::ostream* os) { *os << l.name(); }

class ParallelEqualsSerial : public ::testing::TestWithParam<Layout> {};

TEST_P(ParallelEqualsSerial, LossesEvalAndParameters) {
  const Layout l = GetParam();
  const RunResult& ref = serial(l.family);
  ASSERT_EQ(ref.loss.size(), 5u);
  const std::string dir = testing::fresh_dir("parallel-" + l.name());
  const auto r = train(l, dir);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(fmt::format("dp {} x tp {} x pp {}", l.dp, l.tp, l.pp)),
            std::string::npos)
      << "the resolved layout is printed at start\n"
      << r.output;
  const RunResult got = read_run(dir);
  ASSERT_EQ(got.loss.size(), 5u) << r.output;
  for (const auto& [step, loss] : ref.loss)
    EXPECT_LE(rel(got.loss.at(step), loss), 1e-5)
        << "step " << step << ": " << got.loss.at(step) << " vs serial " << loss;
  EXPECT_LE(rel(got.val_loss, ref.val_loss), 1e-5) << got.val_loss << " vs " << ref.val_loss;
  // Adam divides by sqrt(v), so where a gradient is near zero a 1e-7 difference in summation
  // order moves a weight by up to ~1e-5 of the tensor's scale over 5 steps; a missing or doubled
  // gradient moves it by ~lr = 3e-3 per step, i.e. >10% of the scale.
  expect_same_parameters(dir, ref.dir, 1e-3);
}

std::vector<Layout> all_layouts() {
  std::vector<Layout> out;
  for (int world : {2, 4, 8})
    for (int tp = 1; tp <= world; tp *= 2)
      for (int pp = 1; tp * pp <= world; pp *= 2) {
        const int dp = world / (tp * pp);
        for (int zero : {0, 1}) out.push_back({dp, tp, pp, zero});
      }
  // Llama family: GQA (8 query / 4 KV heads), QK-norm, SwiGLU, RoPE, untied head.
  for (const auto& [dp, tp, pp] : std::vector<std::array<int, 3>>{
           {1, 2, 1}, {1, 4, 1}, {2, 2, 1}, {1, 2, 2}, {2, 1, 2}, {1, 1, 4}})
    out.push_back({dp, tp, pp, 1, "llama"});
  // 1F1B against the same serial run.
  out.push_back({1, 1, 2, 0, "gpt2", "1f1b"});
  out.push_back({1, 2, 4, 1, "gpt2", "1f1b"});
  out.push_back({2, 1, 2, 0, "llama", "1f1b"});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, ParallelEqualsSerial, ::testing::ValuesIn(all_layouts()),
                         [](const auto& info) { return info.param.name(); });

// Saved at (dp2, tp2, pp2) with ZeRO-1; reloaded at (1,1,1) and (1,4,1): the same evaluation, and
// training on from step 3 continues the original run. Reloaded at the same layout: bit for bit.
TEST(ParallelCheckpoint, ReshardsAcrossLayouts) {
  const Layout saved{2, 2, 2, 1};
  const std::string dir = testing::fresh_dir("parallel-ckpt-saved");
  const auto r = train(saved, dir);
  ASSERT_EQ(r.status, 0) << r.output;
  const RunResult a = read_run(dir);
  const std::string step3 = dir + "/checkpoints/step_3", step5 = dir + "/checkpoints/step_5";
  for (const Layout& l : {Layout{1, 1, 1, 0}, Layout{1, 4, 1, 0}, Layout{1, 4, 1, 1}}) {
    SCOPED_TRACE(l.name());
    // Evaluation of the final weights: nothing left to train.
    const std::string eval_dir = testing::fresh_dir("parallel-ckpt-eval-" + l.name());
    const auto e = train(l, eval_dir, " --set checkpoint.resume=" + step5);
    ASSERT_EQ(e.status, 0) << e.output;
    EXPECT_LE(rel(read_run(eval_dir).val_loss, a.val_loss), 1e-6);
    // Optimizer state reshards too: steps 4 and 5 continue the saved run.
    const std::string cont_dir = testing::fresh_dir("parallel-ckpt-cont-" + l.name());
    const auto c = train(l, cont_dir, " --set checkpoint.resume=" + step3);
    ASSERT_EQ(c.status, 0) << c.output;
    const RunResult got = read_run(cont_dir);
    for (int64_t s : {4, 5}) EXPECT_LE(rel(got.loss.at(s), a.loss.at(s)), 1e-5) << "step " << s;
  }
  // Same layout: checkpoint data movement is exact, so the continuation is bitwise.
  const std::string same_dir = testing::fresh_dir("parallel-ckpt-same");
  const auto s = train(saved, same_dir, " --set checkpoint.resume=" + step3);
  ASSERT_EQ(s.status, 0) << s.output;
  const RunResult got = read_run(same_dir);
  for (int64_t st : {4, 5}) EXPECT_EQ(got.loss.at(st), a.loss.at(st)) << "step " << st;
}

// A rank that fails takes the job down with its rank and operation named; nobody hangs.
TEST(ParallelFailure, FailingRankAbortsJob) {
  const std::string dir = testing::fresh_dir("parallel-fail");
  const auto r = train(Layout{2, 1, 2, 0}, dir, "");
  ASSERT_EQ(r.status, 0) << r.output;  // sanity: the layout itself runs
  const std::string cmd_dir = testing::fresh_dir("parallel-fail-injected");
  setenv("TESSERA_FAULT_INJECT", "rank=3,op=train_step,step=2", 1);
  const auto f = train(Layout{2, 1, 2, 0}, cmd_dir, "");
  unsetenv("TESSERA_FAULT_INJECT");
  EXPECT_NE(f.status, 0) << f.output;
  EXPECT_NE(f.output.find("[rank 3]"), std::string::npos) << f.output;
  EXPECT_NE(f.output.find("train_step"), std::string::npos) << f.output;
}

// Layouts that do not fit fail before allocating, naming both values.
TEST(ParallelLayout, BadLayoutsAreUserErrors) {
  const std::string dir = testing::fresh_dir("parallel-bad");
  const auto world = train(Layout{2, 1, 1, 0}, dir, " --set parallel.dp=4");
  EXPECT_EQ(world.status, 2) << world.output;
  EXPECT_NE(world.output.find("4"), std::string::npos) << world.output;
  const auto heads =
      train(Layout{1, 2, 1, 0}, dir, " --set model.num_heads=3 --set model.hidden=33");
  EXPECT_EQ(heads.status, 2) << heads.output;
  EXPECT_NE(heads.output.find("num_heads"), std::string::npos) << heads.output;
}

}  // namespace
}  // namespace tessera
