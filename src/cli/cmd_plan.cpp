// `tessera plan RECIPE [--set key=value ...] [--gpu-gb N]`: the device memory one rank of each
// pipeline stage needs under the recipe's layout (dp x tp x pp, ep, ZeRO, precision,
// recomputation), from the recipe alone: no MPI, no GPU, no allocation. The trainer checks the
// same plan against the free memory before it allocates (train/memory_plan.h).
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "train/memory_plan.h"
#include "train/train_data.h"

namespace tessera::cli {
namespace {

struct PlanArgs {
  std::string recipe_path;
  std::vector<std::string> overrides;
  double gpu_gb = 80.0;
};

double gb(size_t bytes) { return double(bytes) / 1e9; }

int run_plan(const PlanArgs& args) {
  Recipe r = load_recipe(args.recipe_path, args.overrides);
  // An explicit vocabulary needs no data; `auto` reads it from the dataset, as training does.
  const int vocab = r.model.vocab_size > 0 ? r.model.vocab_size : TrainData(r).vocab_size();
  finalize_model_vocab(r.model, vocab, r.file, r.parallel.tp);
  const std::vector<StagePlan> stages = plan_stages(r, Device::cuda);
  const ParallelConfig& p = r.parallel;
  std::printf(
      "%s: %.3fB parameters (%.3fB active), dp %d x tp %d x pp %d, ep %d, zero %d, %s, micro "
      "batch %d x %d tokens\n",
      r.file.c_str(), r.model.num_params() / 1e9, r.model.num_active_params() / 1e9, p.dp, p.tp,
      p.pp, p.ep, p.zero, to_string(r.precision.compute), r.data.micro_batch, r.data.seq_len);
  std::printf("GB per rank (1e9 bytes); every tp and ep rank of a stage holds the same:\n");
  std::printf("%-6s %-9s %12s %10s %10s %12s %10s %8s %8s %8s %9s  %s\n", "stage", "layers",
              "params held", "parameters", "optimizer", "activations", "workspace", "fp8",
              "teacher", "qat", "total", "fits?");
  bool all_fit = true;
  for (const StagePlan& s : stages) {
    const MemoryPlan& m = s.plan;
    const bool fits = gb(m.total()) <= args.gpu_gb;
    all_fit = all_fit && fits;
    const std::string layers =
        std::to_string(s.first_layer) + "-" + std::to_string(s.first_layer + s.num_layers - 1);
    std::printf("%-6d %-9s %11.3fB %10.2f %10.2f %12.2f %10.2f %8.2f %8.2f %8.2f %9.2f  %s\n",
                s.stage, layers.c_str(), s.params_held / 1e9, gb(m.params), gb(m.optimizer),
                gb(m.train_acts), gb(m.workspace), gb(m.fp8), gb(m.teacher), gb(m.qat),
                gb(m.total()), fits ? "yes" : "NO");
  }
  std::printf("%s %.0f GB per GPU%s\n", all_fit ? "fits in" : "does NOT fit in", args.gpu_gb,
              stages.front().plan.workspace == 0 && !cuda_available()
                  ? " (workspace: sized by cuDNN on a GPU, 0 here; allow a few hundred MB)"
                  : "");
  return 0;
}

RunFn setup_plan(CLI::App& sub) {
  auto args = std::make_shared<PlanArgs>();
  add_recipe_options(sub, args->recipe_path, args->overrides, "plan");
  sub.add_option("--gpu-gb", args->gpu_gb, "device memory per GPU to compare with, in GB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return [args] { return run_plan(*args); };
}

const Command kPlan("plan", "print the device memory each pipeline stage's ranks need", setup_plan);

}  // namespace
}  // namespace tessera::cli
