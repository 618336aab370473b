// Offline distillation end to end through the `tessera` binary: `tessera distill-cache` writes a
// ci-tiny teacher's top-k logits for the windows a student run reads, and the student trains from
// the cache (distill.teacher_cache) with no teacher in memory.
//  * k = vocabulary equals the online teacher (every step's loss and KD loss within 1e-7);
//  * k = 32: the bucketed KL (top 32 + one tail bucket) is at most the full KL (the
//    data-processing inequality; equal at step 1, where both students are the same), and the
//    student's validation loss stays within 3% of the online student's after 5 steps;
//  * tp 2 x pp 2 from the cache equals one process;
//  * an FP8 teacher's cache (--precision fp8) gives a first step's KD within 3% of the FP32 one's;
//  * a cache of another seq_len, a temperature it lacks and a window it lacks are user errors.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "tests/common/cli.h"
#include "tests/common/runs.h"

namespace tessera {
namespace {

using testing::read_metrics;
using testing::run_cli;

constexpr const char* kShort =
    " --set data.seq_len=32 --set train.eval_every=0 --set train.eval_batches=2"
    " --set train.sample_tokens=0 --set optim.warmup_steps=2 --set logging.every=1";
// The student: 4 sequences of 32 tokens per step as 4 micro-batches, 5 steps, constant alpha 0.5.
constexpr const char* kStudent =
    " --set data.micro_batch=1 --set data.grad_accum=4 --set parallel.microbatches=2"
    " --set train.steps=5 --set 'distill.curriculum=[{alpha: 0.5}]'";

struct Fixture {
  std::string dir, teacher;
};

// One teacher (ci-tiny, 20 steps) and its full and top-32 caches of the student's windows, shared
// by the tests of one process. ctest runs each case in a process of its own, concurrently: the
// directory is the process's, so no case removes another's files.
const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    x.dir = testing::fresh_dir(fmt::format("distill-cache-{}", static_cast<long>(::getpid())));
    x.teacher = x.dir + "/teacher";
    const auto t = run_cli(
        fmt::format("train recipes/ci-tiny.yaml{} --set data.micro_batch=8 --set train.steps=20 "
                    "--set train.out_dir={}",
                    kShort, x.teacher));
    EXPECT_EQ(t.status, 0) << t.output;
    for (int k : {4096, 32}) {
      const auto c = run_cli(fmt::format(
          "distill-cache --teacher {} --data {} --top-k {} --out {}/k{}.h5 --precision fp32 "
          "--device cpu --windows-of recipes/ci-tiny-distill.yaml{}{}",
          x.teacher, testing::ci_dataset(), k, x.dir, k, kShort, kStudent));
      EXPECT_EQ(c.status, 0) << c.output;
    }
    return x;
  }();
  return f;
}

// A student run: online (cache empty) or from `cache`, under tp x pp.
testing::CliResult student(const std::string& out, const std::string& cache, int tp = 1, int pp = 1,
                           const std::string& extra = "") {
  const Fixture& f = fixture();
  const std::string teacher = cache.empty()
                                  ? " --set distill.teacher=" + f.teacher
                                  : " --set distill.teacher= --set distill.teacher_cache=" + cache;
  return run_cli(fmt::format("train recipes/ci-tiny-distill.yaml{}{}{} --set parallel.tp={} "
                             "--set parallel.pp={} --set train.out_dir={}{}",
                             kShort, kStudent, teacher, tp, pp, out, extra),
                 tp * pp == 1 ? std::string() : testing::mpirun(tp * pp));
}

std::vector<nlohmann::json> steps_of(const std::string& dir) {
  std::vector<nlohmann::json> out;
  for (const auto& m : read_metrics(dir))
    if (m.contains("loss")) out.push_back(m);
  return out;
}

double final_val(const std::string& dir) {
  double v = NAN;
  for (const auto& m : read_metrics(dir))
    if (m.contains("val_loss")) v = m["val_loss"].get<double>();
  return v;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(1e-12, std::abs(b)); }

TEST(DistillCache, FullTopKEqualsTheOnlineTeacher) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Fixture& f = fixture();
  const auto a = student(f.dir + "/online", "");
  ASSERT_EQ(a.status, 0) << a.output;
  const auto b = student(f.dir + "/full", f.dir + "/k4096.h5");
  ASSERT_EQ(b.status, 0) << b.output;
  EXPECT_EQ(b.output.find("distillation: teacher "), std::string::npos) << "a teacher was loaded";
  EXPECT_NE(b.output.find("distillation: from the teacher cache"), std::string::npos) << b.output;
  const auto on = steps_of(f.dir + "/online"), off = steps_of(f.dir + "/full");
  ASSERT_EQ(on.size(), 5u);
  ASSERT_EQ(off.size(), 5u);
  for (size_t i = 0; i < on.size(); ++i) {
    SCOPED_TRACE(on[i].dump() + "\n" + off[i].dump());
    EXPECT_LE(rel(off[i]["loss"].get<double>(), on[i]["loss"].get<double>()), 1e-7);
    EXPECT_LE(rel(off[i]["kd_loss"].get<double>(), on[i]["kd_loss"].get<double>()), 1e-7);
  }
}

TEST(DistillCache, Top32IsALowerBoundAndTrainsClose) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Fixture& f = fixture();
  const auto a = student(f.dir + "/online32", "");
  ASSERT_EQ(a.status, 0) << a.output;
  const auto b = student(f.dir + "/top32", f.dir + "/k32.h5");
  ASSERT_EQ(b.status, 0) << b.output;
  const auto on = steps_of(f.dir + "/online32"), off = steps_of(f.dir + "/top32");
  ASSERT_EQ(off.size(), 5u);
  // Step 1: the same student, so the bucketed KL is at most the full one; the CE is the same.
  EXPECT_LE(off[0]["kd_loss"].get<double>(), on[0]["kd_loss"].get<double>());
  EXPECT_GT(off[0]["kd_loss"].get<double>(), 0.0);
  EXPECT_LE(rel(off[0]["ce_loss"].get<double>(), on[0]["ce_loss"].get<double>()), 1e-9);
  EXPECT_LE(rel(final_val(f.dir + "/top32"), final_val(f.dir + "/online32")), 0.03);
  // tp 2 x pp 2 from the cache: the vocabulary-parallel sparse KD on the last stage's ranks.
  const auto c = student(f.dir + "/top32-tp2pp2", f.dir + "/k32.h5", 2, 2);
  ASSERT_EQ(c.status, 0) << c.output;
  const auto par = steps_of(f.dir + "/top32-tp2pp2");
  ASSERT_EQ(par.size(), 5u);
  for (size_t i = 0; i < off.size(); ++i) {
    SCOPED_TRACE(off[i].dump() + "\n" + par[i].dump());
    EXPECT_LE(rel(par[i]["loss"].get<double>(), off[i]["loss"].get<double>()), 1e-5);
    EXPECT_LE(rel(par[i]["kd_loss"].get<double>(), off[i]["kd_loss"].get<double>()), 1e-5);
  }
}

// The same teacher in FP8 (its block linears FP8 GEMMs, the online FP8 teacher's code): its top 32
// make a first step (the same student, one step is enough) whose KD is within 3% of the FP32
// cache's (the logits differ by E4M3's rounding, ~2%: tests/train/teacher_test.cpp).
TEST(DistillCache, Fp8TeacherCacheIsCloseToTheFp32One) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Fixture& f = fixture();
  const auto c = run_cli(fmt::format(
      "distill-cache --teacher {} --data {} --top-k 32 --out {}/k32-fp8.h5 --precision fp8 "
      "--device cpu --windows-of recipes/ci-tiny-distill.yaml{}{}",
      f.teacher, testing::ci_dataset(), f.dir, kShort, kStudent));
  ASSERT_EQ(c.status, 0) << c.output;
  EXPECT_NE(c.output.find("parameters, fp8)"), std::string::npos) << c.output;
  for (const char* k : {"k32", "k32-fp8"}) {
    const auto r = student(fmt::format("{}/first-{}", f.dir, k), fmt::format("{}/{}.h5", f.dir, k),
                           1, 1, " --set train.steps=1 --set optim.warmup_steps=0");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  const auto ref = steps_of(f.dir + "/first-k32"), got = steps_of(f.dir + "/first-k32-fp8");
  ASSERT_EQ(ref.size(), 1u);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_LE(rel(got[0]["kd_loss"].get<double>(), ref[0]["kd_loss"].get<double>()), 0.03)
      << got[0].dump() << "\n"
      << ref[0].dump();
  EXPECT_NE(got[0]["kd_loss"].get<double>(), ref[0]["kd_loss"].get<double>());
  EXPECT_EQ(got[0]["ce_loss"].get<double>(), ref[0]["ce_loss"].get<double>());
}

TEST(DistillCache, MismatchesAreUserErrors) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Fixture& f = fixture();
  const std::string cache = f.dir + "/k32.h5";
  struct Case {
    std::string extra, fragment;
  };
  const Case cases[] = {
      {" --set data.seq_len=16", "seq_len 32, the run reads 16"},
      {" --set distill.temperature=3", "temperature 3, which the cache lacks"},
      {" --set train.seed=99", "which the teacher cache"},
      {" --set distill.teacher=" + f.teacher, "give one teacher"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.extra);
    const auto r =
        run_cli(fmt::format("train recipes/ci-tiny-distill.yaml{}{} --set distill.teacher= "
                            "--set distill.teacher_cache={} --set train.out_dir={}/bad{}",
                            kShort, kStudent, cache, f.dir, c.extra));
    EXPECT_EQ(r.status, 2) << r.output;
    EXPECT_NE(r.output.find(c.fragment), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace tessera
