// Kit of the preemption tests: a training job started in the background (so a test can signal
// mpirun, the launcher or one rank at a chosen moment), its ranks found through /proc, and the
// bitwise comparison of a resumed run with an uninterrupted one.
#pragma once
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint.h"
#include "tests/common/cli.h"
#include "tests/common/runs.h"

namespace tessera::testing {

// The small job every preemption test trains (the arguments after `tessera train`): ci-tiny
// shrunk to milliseconds a step on the CI corpus, evaluating every 7 steps and saving every 10,
// under dp 2 (`layout` may change that).
inline std::string preempt_args(const std::string& out_dir, int steps,
                                const std::string& layout = " --set parallel.dp=2") {
  return "recipes/ci-tiny.yaml --set model.num_layers=2 --set model.hidden=64"
         " --set model.max_seq_len=32 --set data.seq_len=32 --set data.micro_batch=4"
         " --set optim.warmup_steps=5 --set train.eval_every=7 --set train.eval_batches=2"
         " --set train.sample_tokens=0 --set checkpoint.every=10 --set checkpoint.keep=2"
         " --set logging.every=10 --set train.steps=" +
         std::to_string(steps) + " --set train.out_dir=" + out_dir + layout;
}

// A process running `command` through /bin/sh, its output in `log`. The command is exec'd, so
// pid() is that of its program (mpirun, the launcher script) rather than of a shell.
class Job {
 public:
  Job(const std::string& command, const std::string& log) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      const std::string cmd = "cd '" + std::string(TESSERA_SOURCE_DIR) + "' && exec " + command;
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  ~Job() {
    if (pid_ > 0 && !status_) {  // a failed test: leave nothing running
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  pid_t pid() const { return pid_; }
  // The exit status (128 + signal when a signal ended it); -1 when it outlived `timeout_s`.
  int wait(double timeout_s = 300.0) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (!status_) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      } else if (std::chrono::steady_clock::now() > end) {
        return -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    return *status_;
  }
  std::string output() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

inline std::string read_proc(pid_t pid, const char* what) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/" + what);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// True when `pid` catches SIGTERM and SIGUSR1 (the SigCgt mask of /proc/PID/status): tessera
// has installed its handlers. Before that, these signals would end the process as by default.
inline bool catches_stop_signals(pid_t pid) {
  const std::string st = read_proc(pid, "status");
  const size_t at = st.find("SigCgt:");
  if (at == std::string::npos) return false;
  const unsigned long long mask = std::strtoull(st.c_str() + at + 7, nullptr, 16);
  const auto bit = [](int signo) { return 1ull << (signo - 1); };
  return (mask & bit(SIGTERM)) && (mask & bit(SIGUSR1));
}

// The tessera ranks below `ancestor` (mpirun, or the launcher above it), by world rank, once all
// `np` of them exist and catch the stop signals; empty after `timeout_s`.
inline std::vector<pid_t> wait_for_ranks(pid_t ancestor, int np, double timeout_s = 120.0) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const auto parent_of = [](pid_t p) -> pid_t {
    const std::string stat = read_proc(p, "stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) return -1;
    std::istringstream rest(stat.substr(close + 2));
    char state;
    pid_t ppid = -1;
    rest >> state >> ppid;
    return ppid;
  };
  while (std::chrono::steady_clock::now() < end) {
    std::vector<pid_t> ranks(np, -1);
    int ready = 0;
    for (const auto& e : std::filesystem::directory_iterator("/proc")) {
      const std::string name = e.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      const pid_t p = std::stoi(name);
      bool below = false;
      for (pid_t a = parent_of(p); a > 1 && !below; a = parent_of(a)) below = a == ancestor;
      if (!below || read_proc(p, "cmdline").find("tessera") == std::string::npos) continue;
      const std::string env = read_proc(p, "environ");
      const std::string key = std::string("OMPI_COMM_WORLD_RANK=");
      const size_t at = env.find(key);
      if (at == std::string::npos || (at > 0 && env[at - 1] != '\0')) continue;
      const int rank = std::atoi(env.c_str() + at + key.size());
      if (rank >= 0 && rank < np && catches_stop_signals(p)) {
        ranks[rank] = p;
        ++ready;
      }
    }
    if (ready == np) return ranks;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return {};
}

// What rank 0 printed for a stopped run: "preempted (WHY) at step S: checkpoint written to DIR;".
struct Preempted {
  int64_t step = -1;
  std::string dir, reason;
};
inline std::optional<Preempted> find_preempted(const std::string& output) {
  static const std::regex re(
      R"(preempted \(([^)]*)\) at step (\d+): checkpoint written to ([^;]+); resume with: )");
  std::smatch m;
  if (!std::regex_search(output, m, re)) return std::nullopt;
  return Preempted{std::stoll(m[2]), m[3], m[1]};
}

// Every tensor (parameters and optimizer moments) and the step metadata of two checkpoints,
// byte for byte.
inline void expect_identical_checkpoints(const std::string& a_dir, const std::string& b_dir) {
  const auto a = io::CheckpointReader::open(a_dir);
  const auto b = io::CheckpointReader::open(b_dir);
  ASSERT_EQ(a.tensor_names(), b.tensor_names());
  for (const std::string& name : a.tensor_names()) {
    ASSERT_EQ(a.dtype(name), b.dtype(name)) << name;
    const size_t bytes = size_t(a.numel(name)) * dtype_size(a.dtype(name));
    std::vector<char> x(bytes), y(bytes);
    a.read_full(name, x.data());
    b.read_full(name, y.data());
    EXPECT_EQ(std::memcmp(x.data(), y.data(), bytes), 0) << name << " differs";
  }
  for (const char* key : {"step", "optimizer_step", "loader", "loss_scaler"}) {
    ASSERT_EQ(a.has_meta(key), b.has_meta(key)) << key;
    if (a.has_meta(key)) {
      EXPECT_EQ(a.meta(key), b.meta(key)) << key;
    }
  }
}

// The training and validation losses of every step of two runs' metrics.jsonl, bit for bit.
inline void expect_identical_losses(const std::string& a_dir, const std::string& b_dir) {
  const auto losses = [](const std::string& dir) {
    std::map<std::pair<int64_t, std::string>, double> out;
    for (const auto& j : read_metrics(dir))
      for (const char* key : {"loss", "val_loss"})
        if (j.contains(key)) out[{j["step"].get<int64_t>(), key}] = j[key].get<double>();
    return out;
  };
  const auto a = losses(a_dir), b = losses(b_dir);
  EXPECT_FALSE(b.empty());
  EXPECT_EQ(a, b);
}

// The seed of a test's random moments: TESSERA_PREEMPT_SEED when set (to repeat a failure),
// else a fresh one; printed either way.
inline uint64_t preempt_seed() {
  const char* env = std::getenv("TESSERA_PREEMPT_SEED");
  const uint64_t seed = env && *env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("random moments from TESSERA_PREEMPT_SEED=%llu\n",
              static_cast<unsigned long long>(seed));
  return seed;
}

// Who gets the signal in a trial: TERM to one rank (the others learn of it at the next step
// boundary), USR1 to mpirun (which forwards it to every rank), or TERM to launch/mpirun.sh
// (which turns it into USR1 for mpirun; a TERM to mpirun itself kills the job, docs/CLUSTER.md).
enum class Target { one_rank, mpirun_usr1, launcher_term };

inline const char* target_name(Target t) {
  return t == Target::one_rank      ? "TERM to one rank"
         : t == Target::mpirun_usr1 ? "USR1 to mpirun"
                                    : "TERM to launch/mpirun.sh";
}

// The command line of a 2-rank job of `args`, through mpirun or the launcher.
inline std::string job_command(const std::string& args, bool launcher) {
  if (!launcher) return mpirun(2) + "'" + tessera_binary() + "' train " + args;
  return "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TESSERA_BIN='" +
         tessera_binary() +
         "' TESSERA_MPIRUN_ARGS='--oversubscribe --bind-to none' bash launch/mpirun.sh -n 2 " +
         args;
}

// The uninterrupted run a trial must reproduce; returns the seconds from the moment its ranks
// caught the stop signals to its end, the window in which a trial's signal means something.
inline double train_reference(const std::string& dir, const std::string& args) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  Job job(job_command(args, false), dir + "/job.log");
  EXPECT_EQ(wait_for_ranks(job.pid(), 2).size(), 2u) << job.output();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(job.wait(), 0) << job.output();
  EXPECT_NE(io::latest_checkpoint(dir), "") << job.output();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One trial: the job of `args` (2 ranks, out_dir `dir`, `steps` steps) gets `target`'s signal
// `delay_s` after its ranks catch it. It must exit 0 having printed where its checkpoint is, a
// complete one of the printed step; the printed resume command must then finish the run, bit for
// bit the reference's (every tensor of the last checkpoint and every loss). A signal after the
// last step's boundary lets the run finish as usual: then the finished run is compared.
// Returns the step it stopped at (`steps` for a run that finished).
inline int64_t preempt_trial(const std::string& dir, const std::string& args,
                             const std::string& reference, int steps, Target target, double delay_s,
                             std::mt19937_64& rng) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  Job job(job_command(args, target == Target::launcher_term), dir + "/job.log");
  const std::vector<pid_t> ranks = wait_for_ranks(job.pid(), 2);
  EXPECT_EQ(ranks.size(), 2u) << "the ranks never installed their handlers:\n" << job.output();
  if (ranks.size() != 2) return -1;
  std::this_thread::sleep_for(std::chrono::duration<double>(delay_s));
  const int rank = int(rng() % 2);
  if (target == Target::one_rank) kill(ranks[rank], SIGTERM);
  if (target == Target::mpirun_usr1) kill(job.pid(), SIGUSR1);
  if (target == Target::launcher_term) kill(job.pid(), SIGTERM);
  const int status = job.wait();
  const std::string out = job.output();
  const std::optional<Preempted> p = find_preempted(out);
  std::printf("%s%s after %.2f s: %s\n", target_name(target),
              target == Target::one_rank ? (rank == 0 ? " (rank 0)" : " (rank 1)") : "", delay_s,
              status != 0 ? "FAILED"
              : p         ? ("stopped at step " + std::to_string(p->step)).c_str()
                          : "finished first");
  EXPECT_EQ(status, 0) << out;
  if (status != 0) return -1;
  int64_t stopped = steps;
  if (p) {
    stopped = p->step;
    EXPECT_LE(p->step, steps);
    EXPECT_EQ(p->dir, dir + "/checkpoints/step_" + std::to_string(p->step));
    EXPECT_TRUE(io::is_complete_checkpoint(p->dir)) << out;
    EXPECT_EQ(io::latest_checkpoint(dir), p->dir);
    const size_t at = out.find("resume with: tessera ");
    const std::string resume = out.substr(at + 21, out.find('\n', at) - at - 21);
    const CliResult r = run_cli(resume, mpirun(2));
    EXPECT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("at step " + std::to_string(p->step)), std::string::npos) << r.output;
  } else {
    EXPECT_NE(out.find("final: step " + std::to_string(steps)), std::string::npos) << out;
  }
  expect_identical_checkpoints(io::latest_checkpoint(dir), io::latest_checkpoint(reference));
  expect_identical_losses(dir, reference);
  return stopped;
}

// `trials` trials of random targets (from `targets`) at random moments within the reference
// run's time from its ranks' start-up to its end, each resumed and compared with the reference.
inline void random_preemptions(const std::string& root, const std::string& layout, int trials,
                               const std::vector<Target>& targets) {
  const int steps = 20;
  const std::string reference = root + "/reference";
  const double window_s = train_reference(reference, preempt_args(reference, steps, layout));
  std::mt19937_64 rng(preempt_seed());
  for (int i = 0; i < trials; ++i) {
    const std::string dir = root + "/trial" + std::to_string(i);
    const Target target = targets[rng() % targets.size()];
    const double delay = std::uniform_real_distribution<double>(0.0, window_s)(rng);
    SCOPED_TRACE(::testing::Message()
                 << "trial " << i << ": " << target_name(target) << " after " << delay << " s");
    preempt_trial(dir, preempt_args(dir, steps, layout), reference, steps, target, delay, rng);
    if (::testing::Test::HasFailure()) return;
  }
}

}  // namespace tessera::testing
