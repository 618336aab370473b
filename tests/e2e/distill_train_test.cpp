// Knowledge distillation end to end through the `tessera` binary on the prepared Gutenberg corpus:
// a ci-tiny teacher trained by each test, distilled into the ci-tiny-distill student.
//  * alpha 0 (and beta 0, with hidden-state pairs) is plain cross-entropy training bit for bit (no
//    teacher runs, no KD or hidden-state term);
//  * the seed curriculum logs alpha, temperature, kd_loss and ce_loss per step, the loss is
//    alpha kd + (1 - alpha) ce, KD pulls the student toward the teacher, and the teacher is freed
//    when no later step needs it;
//  * resuming in the middle of a ramp is bitwise;
//  * the hidden-state loss: logged with its weight, the loss is alpha kd + (1 - alpha) ce +
//    beta hidden, it falls, its teacher is freed once beta and alpha are 0, resuming in a ramp of
//    beta is bitwise;
//  * dp, tp and pp (GPipe and 1F1B) layouts and a dp x tp x pp mix equal one process (forward
//    and reverse KL; the first three with hidden-state pairs);
//  * MoE teachers and MoE students, BF16, an FP8 teacher (its first step's KD within 3% of the
//    BF16 teacher's), and the errors for a bad teacher or hidden pair.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "tests/common/cli.h"
#include "tests/common/runs.h"

namespace tessera {
namespace {

using testing::read_metrics;
using testing::run_cli;

// Short runs: 32-token sequences, 4 per step; no samples, a small final evaluation.
constexpr const char* kShort =
    " --set data.seq_len=32 --set train.eval_every=0 --set train.eval_batches=2"
    " --set train.sample_tokens=0 --set optim.warmup_steps=2 --set logging.every=1";

// A ci-tiny teacher trained for 20 steps (its run directory), private to the running test and
// to this call.
std::string train_teacher(const std::string& recipe = "recipes/ci-tiny.yaml",
                          const std::string& extra = "") {
  static int count = 0;  // several teachers in one test each get a directory
  const std::string dir =
      testing::fresh_dir_for_this_test(fmt::format("distill-teacher-{}", count++));
  const auto r =
      run_cli(fmt::format("train {}{} --set data.micro_batch=8 --set train.steps=20 "
                          "--set train.out_dir={}{}",
                          recipe, kShort, dir, extra));
  EXPECT_EQ(r.status, 0) << r.output;
  return dir;
}

struct Layout {
  int dp = 1, tp = 1, pp = 1;
  std::string schedule = "gpipe";
  bool reverse = false;
  bool hidden = false;  // with kHiddenPairs
  std::string name() const {
    return fmt::format("dp{}_tp{}_pp{}_{}{}{}", dp, tp, pp, schedule, reverse ? "_reverse" : "",
                       hidden ? "_hidden" : "");
  }
};

// The student's two blocks against the ci-tiny teacher's second and fourth (width 64 against 128:
// learned projections); under pp 2 each pair lies on one stage (student 1 | 1, teacher 2 | 2).
constexpr const char* kHiddenPairs =
    " --set 'distill.hidden_pairs=[{student: 1, teacher: 2}, {student: 2, teacher: 4}]'";
void PrintTo(const Layout& l, std::ostream* os) { *os << l.name(); }

// The student: 4 sequences per step as micro-batches of one (flushes of two), `steps` steps;
// under dp > 1 with ZeRO-1 (which shards the student's optimizer state, not the teacher).
testing::CliResult train_student(const std::string& teacher, const std::string& out_dir,
                                 const std::string& extra = "", const Layout& l = {},
                                 int steps = 9) {
  const int np = l.dp * l.tp * l.pp;
  const std::string args = fmt::format(
      "train recipes/ci-tiny-distill.yaml{} --set data.micro_batch=1 --set data.grad_accum={}"
      " --set parallel.microbatches=2 --set train.steps={} --set parallel.dp={} --set "
      "parallel.zero={}"
      " --set parallel.tp={} --set parallel.pp={} --set parallel.schedule={}"
      " --set distill.reverse_kl={} --set distill.teacher={} --set train.out_dir={}{}",
      kShort, 2 / l.dp, steps, l.dp, l.dp > 1 ? 1 : 0, l.tp, l.pp, l.schedule,
      l.reverse ? "true" : "false", teacher, out_dir, extra);
  return run_cli(args, np == 1 ? std::string() : testing::mpirun(np));
}

double rel(double a, double b) { return std::abs(a - b) / std::max(1e-12, std::abs(b)); }

// step -> the exact text of what must match bitwise (JSON prints doubles with round-trip
// precision, so equal text means equal bits).
std::map<int64_t, std::string> step_records(const std::string& dir) {
  std::map<int64_t, std::string> out;
  for (const auto& m : read_metrics(dir))
    if (m.contains("loss")) {
      std::string t = fmt::format("{} {}", m["loss"].dump(), m["grad_norm"].dump());
      for (const char* k :
           {"alpha", "temperature", "kd_loss", "ce_loss", "hidden_weight", "hidden_loss"})
        if (m.contains(k)) t += fmt::format(" {}", m[k].dump());
      out[m["step"].get<int64_t>()] = t;
    }
  return out;
}

TEST(DistillTrain, AlphaZeroIsPlainCrossEntropyBitForBit) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string teacher = train_teacher();
  const std::string dir = testing::fresh_dir("distill-alpha0");
  const auto a =
      train_student(teacher, dir + "/alpha0", " --set 'distill.curriculum=[{alpha: 0}]'");
  ASSERT_EQ(a.status, 0) << a.output;
  // The student's recipe without its distill section: ci-tiny at the student's shape and rates.
  const auto b = run_cli(
      fmt::format("train recipes/ci-tiny.yaml{} --set data.micro_batch=1 --set data.grad_accum=4"
                  " --set train.steps=9 --set model.num_layers=2 --set model.hidden=64"
                  " --set model.num_heads=2 --set optim.lr=3.0e-3 --set optim.min_lr=3.0e-4"
                  " --set train.out_dir={}/plain",
                  kShort, dir));
  ASSERT_EQ(b.status, 0) << b.output;
  auto plain = step_records(dir + "/plain"), kd = step_records(dir + "/alpha0");
  ASSERT_EQ(plain.size(), 9u);
  for (auto& [step, text] : plain) {
    EXPECT_EQ(kd.at(step).substr(0, text.size()), text) << "step " << step;
  }
  testing::expect_same_parameters(dir + "/alpha0", dir + "/plain", 0.0);
  EXPECT_EQ(a.output.find("distillation: teacher"), std::string::npos) << "teacher loaded";
  // With hidden-state pairs at beta 0 too, their projections exist but nothing else runs.
  const auto c = train_student(
      teacher, dir + "/beta0",
      std::string(" --set 'distill.curriculum=[{alpha: 0, hidden_weight: 0}]'") + kHiddenPairs);
  ASSERT_EQ(c.status, 0) << c.output;
  EXPECT_EQ(c.output.find("distillation: teacher"), std::string::npos) << "teacher loaded";
  const auto beta0 = step_records(dir + "/beta0");
  for (auto& [step, text] : plain) {
    EXPECT_EQ(beta0.at(step).substr(0, text.size()), text) << "step " << step;
  }
}

TEST(DistillTrain, SeedCurriculumLogsItsPhasesAndFreesTheTeacher) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string teacher = train_teacher();
  const std::string dir = testing::fresh_dir("distill-seed");
  const auto r = train_student(teacher, dir, " --set checkpoint.every=6 --set checkpoint.keep=2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("distillation: teacher " + teacher + "/checkpoints/step_20"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("no longer needs the teacher; freed it"), std::string::npos);
  std::vector<nlohmann::json> steps;
  for (const auto& m : read_metrics(dir))
    if (m.contains("loss")) steps.push_back(m);
  ASSERT_EQ(steps.size(), 9u);
  const double alphas[] = {1.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0};
  for (int i = 0; i < 9; ++i) {
    const auto& m = steps[i];
    SCOPED_TRACE(m.dump());
    EXPECT_FLOAT_EQ(m["alpha"].get<float>(), float(alphas[i]));
    EXPECT_EQ(m["temperature"].get<double>(), 2.0);
    const double ce = m["ce_loss"].get<double>();
    if (alphas[i] == 0.0) {
      EXPECT_TRUE(m["kd_loss"].is_null());
      EXPECT_EQ(m["loss"].get<double>(), ce);
    } else {
      const double kd = m["kd_loss"].get<double>(), a = m["alpha"].get<float>();
      EXPECT_GT(kd, 0.0);
      EXPECT_LE(rel(m["loss"].get<double>(), a * kd + (1.0 - a) * ce), 1e-6);
    }
  }
  // Soft labels only: the student's KL to the teacher falls step by step.
  EXPECT_LT(steps[2]["kd_loss"].get<double>(), steps[1]["kd_loss"].get<double>());
  EXPECT_LT(steps[1]["kd_loss"].get<double>(), steps[0]["kd_loss"].get<double>());
  // `tessera plan` prints the teacher's memory beside the student's.
  const auto plan = run_cli("plan recipes/ci-tiny-distill.yaml --set distill.teacher=" + teacher);
  ASSERT_EQ(plan.status, 0) << plan.output;
  EXPECT_NE(plan.output.find(" teacher "), std::string::npos) << plan.output;
  // Resumed after the soft phases (step 6): the teacher is never loaded, and the steps repeat.
  const std::string again = testing::fresh_dir("distill-seed-resumed");
  const auto resumed =
      train_student(teacher, again, " --set checkpoint.resume=" + dir + "/checkpoints/step_6");
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_EQ(resumed.output.find("distillation: teacher"), std::string::npos) << resumed.output;
  const auto a = step_records(dir), b = step_records(again);
  for (int64_t s = 7; s <= 9; ++s) EXPECT_EQ(b.at(s), a.at(s)) << "step " << s;
}

TEST(DistillTrain, ResumeInsideARampIsBitwise) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string teacher = train_teacher();
  const std::string dir = testing::fresh_dir("distill-resume");
  const std::string ramp =
      " --set 'distill.curriculum=[{end_step: 3, alpha: 1, temperature: 1},"
      "{alpha: 0.2, temperature: 3, ramp: cosine, ramp_steps: 4}]' --set checkpoint.every=4"
      " --set checkpoint.keep=3";
  ASSERT_EQ(train_student(teacher, dir + "/full", ramp, {}, 7).status, 0);
  const auto resumed =
      train_student(teacher, dir + "/resumed",
                    ramp + " --set checkpoint.resume=" + dir + "/full/checkpoints/step_4", {}, 7);
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  const auto a = step_records(dir + "/full"), b = step_records(dir + "/resumed");
  ASSERT_EQ(a.size(), 7u);
  for (int64_t s = 5; s <= 7; ++s) EXPECT_EQ(b.at(s), a.at(s)) << "step " << s;
  // Step 5 is inside the ramp: alpha and temperature between the phases'.
  const auto m = read_metrics(dir + "/full");
  EXPECT_GT(m[4]["temperature"].get<double>(), 1.0);
  EXPECT_LT(m[4]["temperature"].get<double>(), 3.0);
}

// Hidden-state pairs with the seed-like phases: soft labels and beta auto (1), then a linear ramp
// to alpha 0.5 and beta 2, then hard labels with beta 0 (the teacher is freed). Resumed inside
// the ramp, the run repeats bit for bit.
TEST(DistillTrain, HiddenStateLossTrainsFreesItsTeacherAndResumesInARampBitwise) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string teacher = train_teacher();
  const std::string dir = testing::fresh_dir("distill-hidden");
  const std::string curriculum = std::string(kHiddenPairs) +
                                 " --set 'distill.curriculum=[{end_step: 3, alpha: 1},"
                                 "{end_step: 5, alpha: 0.5, hidden_weight: 2, ramp: linear,"
                                 " ramp_steps: 2}, {alpha: 0, hidden_weight: 0}]'"
                                 " --set checkpoint.every=4 --set checkpoint.keep=3";
  const auto full = train_student(teacher, dir + "/full", curriculum, {}, 7);
  ASSERT_EQ(full.status, 0) << full.output;
  EXPECT_NE(full.output.find("hidden-state loss over 2 pair(s)"), std::string::npos) << full.output;
  EXPECT_NE(full.output.find("no longer needs the teacher; freed it"), std::string::npos);
  std::vector<nlohmann::json> steps;
  for (const auto& m : read_metrics(dir + "/full"))
    if (m.contains("loss")) steps.push_back(m);
  ASSERT_EQ(steps.size(), 7u);
  const double betas[] = {1.0, 1.0, 1.0, 1.0, 1.5, 0.0, 0.0};
  for (int i = 0; i < 7; ++i) {
    const auto& m = steps[i];
    SCOPED_TRACE(m.dump());
    EXPECT_FLOAT_EQ(m["hidden_weight"].get<float>(), float(betas[i]));
    const double a = m["alpha"].get<float>(), b = m["hidden_weight"].get<float>();
    const double kd = a > 0.0 ? m["kd_loss"].get<double>() : 0.0;
    const double hidden = b > 0.0 ? m["hidden_loss"].get<double>() : 0.0;
    if (b == 0.0) {
      EXPECT_TRUE(m["hidden_loss"].is_null());
    } else {
      EXPECT_GT(hidden, 0.0);
    }
    EXPECT_LE(
        rel(m["loss"].get<double>(), a * kd + (1.0 - a) * m["ce_loss"].get<double>() + b * hidden),
        1e-6);
  }
  // The projections learn, and the student's states move toward the teacher's.
  EXPECT_LT(steps[2]["hidden_loss"].get<double>(), steps[0]["hidden_loss"].get<double>());
  EXPECT_LT(steps[4]["hidden_loss"].get<double>(), steps[2]["hidden_loss"].get<double>());
  // Resumed at step 4, inside the ramp (alpha 0.75, beta 1.5 on step 5): bit for bit.
  const auto resumed = train_student(
      teacher, dir + "/resumed",
      curriculum + " --set checkpoint.resume=" + dir + "/full/checkpoints/step_4", {}, 7);
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  const auto a = step_records(dir + "/full"), b = step_records(dir + "/resumed");
  for (int64_t s = 5; s <= 7; ++s) EXPECT_EQ(b.at(s), a.at(s)) << "step " << s;
  testing::expect_same_parameters(dir + "/resumed", dir + "/full", 0.0);
}

class DistillParallelEqualsSerial : public ::testing::TestWithParam<Layout> {};

TEST_P(DistillParallelEqualsSerial, LossesKdEvalAndParameters) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const Layout l = GetParam();
  const std::string teacher = train_teacher();
  const std::string dir = testing::fresh_dir_for_this_test("distill-parallel");
  const std::string curriculum =
      " --set 'distill.curriculum=[{end_step: 3, alpha: 1}, {alpha: 0.5}]'";
  Layout serial;
  serial.reverse = l.reverse;
  const std::string extra = curriculum + (l.hidden ? kHiddenPairs : "");
  const auto a = train_student(teacher, dir + "/serial", extra, serial, 5);
  ASSERT_EQ(a.status, 0) << a.output;
  const auto b = train_student(teacher, dir + "/parallel", extra, l, 5);
  ASSERT_EQ(b.status, 0) << b.output;
  const auto ref = read_metrics(dir + "/serial"), got = read_metrics(dir + "/parallel");
  ASSERT_EQ(ref.size(), got.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    SCOPED_TRACE(got[i].dump());
    if (l.hidden && ref[i].contains("loss")) {
      EXPECT_TRUE(ref[i]["hidden_loss"].is_number());
    }
    for (const char* k : {"loss", "kd_loss", "ce_loss", "hidden_loss", "val_loss"})
      if (ref[i].contains(k) && !ref[i][k].is_null()) {
        EXPECT_LE(rel(got[i][k].get<double>(), ref[i][k].get<double>()), 1e-5) << k;
      }
  }
  // Key biases have no gradient in exact arithmetic (the softmax ignores a constant per query), so
  // AdamW turns their rounding noise, which differs between layouts, into steps: they stay near 0
  // (~1e-7) but differ by ~1e-6. A floor of 1e-2 bounds them by 1e-5; every other tensor is
  // larger than that and keeps the relative bound.
  testing::expect_same_parameters(dir + "/parallel", dir + "/serial", 1e-3, 1e-2);
}

// dp (ZeRO-1), tp (reverse KL), pp under 1F1B (reverse KL), each with hidden-state pairs, and
// all three at once under GPipe (forward KL, no pairs); each costs CI 12-18 s on two cores.
INSTANTIATE_TEST_SUITE_P(Layouts, DistillParallelEqualsSerial,
                         ::testing::Values(Layout{2, 1, 1, "gpipe", false, true},
                                           Layout{1, 2, 1, "gpipe", true, true},
                                           Layout{1, 1, 2, "1f1b", true, true}, Layout{2, 2, 2}),
                         [](const auto& info) { return info.param.name(); });

// An MoE teacher (ci-tiny-moe) into the dense student, and the dense teacher into an MoE student;
// then BF16 teacher and student, and the same student with an FP8 teacher; an MoE teacher under ep
// is an error.
TEST(DistillTrain, MoeTeachersMoeStudentsBf16AndFp8Teachers) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string dir = testing::fresh_dir("distill-kinds");
  const std::string soft = " --set 'distill.curriculum=[{alpha: 1}]'";
  const std::string moe_teacher = train_teacher("recipes/ci-tiny-moe.yaml", " --set train.steps=8");
  const auto a = train_student(moe_teacher, dir + "/moe-teacher", soft, {}, 3);
  ASSERT_EQ(a.status, 0) << a.output;
  const std::string teacher = train_teacher();
  const auto b = run_cli(fmt::format(
      "train recipes/ci-tiny-moe.yaml{} --set data.micro_batch=4 --set train.steps=3"
      " --set distill.teacher={} --set distill.teacher_precision=fp32 --set train.out_dir={}{}",
      kShort, teacher, dir + "/moe-student", soft));
  ASSERT_EQ(b.status, 0) << b.output;
  const auto c = train_student(
      teacher, dir + "/bf16",
      " --set precision.compute=bf16 --set distill.teacher_precision=bf16" + soft, {}, 3);
  ASSERT_EQ(c.status, 0) << c.output;
  // The FP8 teacher: the same student and data, so the first step's KD differs from the BF16
  // teacher's only by the teacher's E4M3 rounding (its logits ~2% apart, tests/train/teacher_test).
  const auto d = train_student(
      teacher, dir + "/fp8-teacher",
      " --set precision.compute=bf16 --set distill.teacher_precision=fp8" + soft, {}, 3);
  ASSERT_EQ(d.status, 0) << d.output;
  EXPECT_NE(d.output.find("parameters, fp8)"), std::string::npos) << d.output;
  // An MoE teacher under expert parallelism is not built: a clear error.
  const auto ep = run_cli(fmt::format("train recipes/ci-tiny-moe.yaml{} --set data.micro_batch=4"
                                      " --set train.steps=3 --set parallel.dp=2 --set parallel.ep=2"
                                      " --set distill.teacher={} --set train.out_dir={}",
                                      kShort, moe_teacher, dir + "/ep"),
                          testing::mpirun(2));
  EXPECT_EQ(ep.status, 2) << ep.output;
  EXPECT_NE(ep.output.find("an MoE teacher under expert parallelism is not built yet"),
            std::string::npos)
      << ep.output;
  for (const std::string run : {"/moe-teacher", "/moe-student", "/bf16", "/fp8-teacher"}) {
    const auto m = read_metrics(dir + run);
    ASSERT_GE(m.size(), 3u) << run;
    EXPECT_LT(m[2]["kd_loss"].get<double>(), m[0]["kd_loss"].get<double>()) << run;
  }
  const double kd_bf16 = read_metrics(dir + "/bf16")[0]["kd_loss"].get<double>();
  const double kd_fp8 = read_metrics(dir + "/fp8-teacher")[0]["kd_loss"].get<double>();
  EXPECT_LE(rel(kd_fp8, kd_bf16), 0.03) << kd_fp8 << " vs " << kd_bf16;
}

TEST(DistillTrain, BadTeachersAreUserErrors) {
  ASSERT_TRUE(std::filesystem::exists(testing::ci_dataset())) << "run scripts/prepare-data.sh";
  const std::string dir = testing::fresh_dir("distill-errors");
  const auto missing = train_student(dir + "/nothing-here", dir + "/a");
  EXPECT_EQ(missing.status, 2) << missing.output;
  EXPECT_NE(missing.output.find("distill.teacher = '" + dir + "/nothing-here'"), std::string::npos)
      << missing.output;
  // A teacher of another tokenizer (random tokens over 100 ids).
  const std::string other =
      train_teacher("recipes/ci-tiny.yaml", " --set data.path=mock --set model.vocab_size=100");
  const auto tok = train_student(other, dir + "/b");
  EXPECT_EQ(tok.status, 2) << tok.output;
  EXPECT_NE(tok.output.find("was trained with tokenizer mock"), std::string::npos) << tok.output;
  EXPECT_NE(tok.output.find("must share one tokenizer"), std::string::npos) << tok.output;
  // A teacher with one head, shorter sequences: tp 2 cannot split it, and 64-token sequences do
  // not fit it.
  const std::string narrow =
      train_teacher("recipes/ci-tiny.yaml", " --set model.num_heads=1 --set model.max_seq_len=32");
  const auto split = run_cli(
      fmt::format(
          "train recipes/ci-tiny-distill.yaml{} --set parallel.tp=2 --set distill.teacher={}"
          " --set train.out_dir={}/c",
          kShort, narrow, dir),
      testing::mpirun(2));
  EXPECT_EQ(split.status, 2) << split.output;
  EXPECT_NE(split.output.find("model.num_heads = 1, which parallel.tp = 2 does not divide"),
            std::string::npos)
      << split.output;
  const auto longer = train_student(narrow, dir + "/d", " --set data.seq_len=64");
  EXPECT_EQ(longer.status, 2) << longer.output;
  EXPECT_NE(longer.output.find("model.max_seq_len = 32, shorter than data.seq_len = 64"),
            std::string::npos)
      << longer.output;
  // Hidden-state pairs: a teacher block it lacks, and under pp 2 a pair split over two stages
  // (the student's block 1 on stage 0, the teacher's block 3 on stage 1).
  const auto past =
      train_student(narrow, dir + "/e", " --set 'distill.hidden_pairs=[{student: 2, teacher: 9}]'");
  EXPECT_EQ(past.status, 2) << past.output;
  EXPECT_NE(past.output.find("distill.hidden_pairs[0].teacher = 9: more than the teacher's 4 "
                             "blocks"),
            std::string::npos)
      << past.output;
  const auto stages = train_student(
      narrow, dir + "/f",
      " --set 'distill.hidden_pairs=[{student: 2, teacher: 4}, {student: 1, teacher: 3}]'",
      Layout{1, 1, 2, "1f1b"});
  EXPECT_EQ(stages.status, 2) << stages.output;
  EXPECT_NE(stages.output.find("distill.hidden_pairs[1] = {student: 1, teacher: 3}: under "
                               "parallel.pp = 2 the student's block 1 is on pipeline stage 0"),
            std::string::npos)
      << stages.output;
  EXPECT_NE(stages.output.find("the teacher's block 3 on stage 1"), std::string::npos)
      << stages.output;
}

}  // namespace
}  // namespace tessera
