// `tessera train RECIPE.yaml [--set section.key=value ...]`, under mpirun/srun or alone. MPI is
// initialized only when a launcher started the process, so a plain serial run never needs it.
#include <cstdio>
#include <optional>

#include "cli/command.h"
#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_runtime.h"
#include "train/trainer.h"

namespace tessera::cli {
namespace {

int run_train(const std::vector<std::string>& args) {
  std::string recipe_path;
  std::vector<std::string> overrides;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--set") {
      if (i + 1 >= args.size()) TS_USER_ERROR("--set needs section.key=value");
      overrides.push_back(args[++i]);
    } else if (args[i].rfind("--set=", 0) == 0) {
      overrides.push_back(args[i].substr(6));
    } else if (args[i] == "-h" || args[i] == "--help") {
      std::printf("usage: tessera train RECIPE.yaml [--set section.key=value ...]\n");
      return 0;
    } else if (args[i].rfind("-", 0) == 0) {
      TS_USER_ERROR("tessera train: unknown option '{}'", args[i]);
    } else if (recipe_path.empty()) {
      recipe_path = args[i];
    } else {
      TS_USER_ERROR("tessera train: unexpected argument '{}' (one recipe at a time)", args[i]);
    }
  }
  if (recipe_path.empty())
    TS_USER_ERROR("usage: tessera train RECIPE.yaml [--set section.key=value ...]");
  std::optional<MpiRuntime> mpi;
  if (launched_by_mpi_launcher()) mpi.emplace(nullptr, nullptr);
  const Recipe recipe = load_recipe(recipe_path, overrides);
  log_set_level(recipe.logging.level);
  const TrainSummary s = train(recipe);
  if (world_rank() == 0)
    std::printf("final: step %lld | train_loss %.4f | val_loss %.4f | train time %.1fs\n",
                static_cast<long long>(s.last_step), s.last_train_loss, s.final_val_loss,
                s.train_seconds);
  return 0;
}

const Command kTrain("train", "train a model from a YAML recipe", run_train);

}  // namespace
}  // namespace tessera::cli
