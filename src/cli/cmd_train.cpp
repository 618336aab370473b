// `tessera train RECIPE [--set section.key=value ...]`, under mpirun/srun or alone. MPI is
// initialized only when a launcher started the process, so a plain serial run never needs it.
#include <cstdio>
#include <memory>
#include <optional>

#include "cli/command.h"
#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_runtime.h"
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

int run_train(const TrainArgs& args) {
  std::optional<MpiRuntime> mpi;
  if (launched_by_mpi_launcher()) mpi.emplace(nullptr, nullptr);
  const Recipe recipe = load_on_every_rank(args);
  log_set_level(recipe.logging.level);
  const TrainSummary s = train(recipe);
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
