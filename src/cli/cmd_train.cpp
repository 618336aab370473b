// `tessera train RECIPE [--set section.key=value ...]`, under mpirun/srun or alone. MPI is
// initialized only when a launcher started the process, so a plain serial run never needs it.
// SIGTERM/SIGUSR1 end the job with a checkpoint and exit status 0 (stop_signals.h).
#include <cstdio>
#include <memory>
#include <optional>

#include "cli/command.h"
#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_runtime.h"
#include "train/stop_signals.h"
#include "train/trainer.h"

namespace tessera::cli {
namespace {

struct TrainArgs {
  std::string recipe_path;
  std::vector<std::string> overrides;
};

// A recipe error is the same on every rank (each parses the same file and overrides): rank 0
// reports it once and ends the job (main.cpp); the other ranks wait to be ended with it.
Recipe load_on_every_rank(const TrainArgs& args) {
  try {
    return load_recipe(args.recipe_path, args.overrides);
  } catch (const Error& e) {
    if (world_rank() > 0) await_job_end_by_rank0(e.exit_code());
    throw;
  }
}

// A word as a POSIX shell reads it back: quoted unless it is plain.
std::string shell_word(const std::string& w) {
  const bool plain = !w.empty() && w.find_first_not_of(
                                       "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP"
                                       "QRSTUVWXYZ0123456789_./=:,+-@%") == std::string::npos;
  if (plain) return w;
  std::string q = "'";
  for (const char c : w) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The command that continues a stopped run: the same one, resuming from the newest checkpoint
// (a later --set wins over an earlier one).
std::string resume_command(const TrainArgs& args) {
  std::string cmd = "tessera train " + shell_word(args.recipe_path);
  for (const std::string& o : args.overrides) cmd += " --set " + shell_word(o);
  return cmd + " --set checkpoint.resume=latest";
}

int run_train(const TrainArgs& args) {
  // Before MPI starts, so a signal during start-up is already a request to stop.
  install_stop_signal_handlers();
  std::optional<MpiRuntime> mpi;
  if (launched_by_mpi_launcher()) mpi.emplace(nullptr, nullptr);
  const Recipe recipe = load_on_every_rank(args);
  log_set_level(recipe.logging.level);
  const TrainSummary s = train(recipe);
  if (s.preempted) {
    if (world_rank() == 0)
      std::printf("preempted (%s) at step %lld: checkpoint written to %s; resume with: %s\n",
                  s.stop_reason.c_str(), static_cast<long long>(s.last_step), s.checkpoint.c_str(),
                  resume_command(args).c_str());
    std::fflush(stdout);
    return 0;
  }
  if (world_rank() == 0)
    std::printf("final: step %lld | train_loss %.4f | val_loss %.4f | train time %.1fs\n",
                static_cast<long long>(s.last_step), s.last_train_loss, s.final_val_loss,
                s.train_seconds);
  return 0;
}

RunFn setup_train(CLI::App& sub) {
  auto args = std::make_shared<TrainArgs>();
  add_recipe_options(sub, args->recipe_path, args->overrides, "train");
  return [args] { return run_train(*args); };
}

const Command kTrain("train", "train a model from a YAML recipe", setup_train);

}  // namespace
}  // namespace tessera::cli
