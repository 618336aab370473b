// `tessera distill-cache --teacher CKPT --data DATASET --top-k K --out FILE.h5 [...]`: the
// offline teacher of a distillation — the teacher's top-k logits over a dataset's training
// windows, which a recipe's distill.teacher_cache then trains from with no teacher in memory
// (train/distill_cache.h).
#include <memory>
#include <optional>

#include "cli/command.h"
#include "config/enums.h"
#include "parallel/mpi_runtime.h"
#include "train/distill_cache.h"

namespace tessera::cli {
namespace {

struct CacheArgs {
  DistillCacheOptions o;
  std::string precision, device = "auto";
};

int run_distill_cache(CacheArgs& a) {
  std::optional<MpiRuntime> mpi;  // under mpirun: one rank only (write_teacher_cache checks)
  if (launched_by_mpi_launcher()) mpi.emplace(nullptr, nullptr);
  if (!a.precision.empty()) {
    a.o.precision = *enum_from_name<TeacherPrecision>(a.precision);
    a.o.precision_given = true;
  }
  a.o.device = *enum_from_name<DeviceChoice>(a.device);
  write_teacher_cache(a.o);
  return 0;
}

RunFn setup_distill_cache(CLI::App& sub) {
  auto a = std::make_shared<CacheArgs>();
  DistillCacheOptions& o = a->o;
  sub.add_option("--teacher", o.teacher,
                 "the teacher: a checkpoint step directory, or a run directory (its latest)")
      ->required();
  sub.add_option("--data", o.data,
                 "the token dataset (tessera prepare) whose train windows to cache")
      ->required();
  sub.add_option("--top-k", o.top_k, "logits kept per position (the rest is one tail bucket)")
      ->required()
      ->check(integer_at_least(1));
  sub.add_option("--out", o.out, "the cache file to write (HDF5, written atomically)")->required();
  sub.add_option("--seq-len", o.seq_len,
                 "window length; default: --windows-of's data.seq_len, else the teacher's "
                 "model.max_seq_len")
      ->check(integer_at_least(1));
  sub.add_option("--temperature", o.temperatures,
                 "a temperature to store the log-sum-exps at (repeatable); default: those "
                 "--windows-of's curriculum distils at, else 1 and 2")
      ->check(CLI::PositiveNumber);
  sub.add_option("--precision", a->precision,
                 "the teacher's precision: bf16, fp32 or fp8 (FP8 block linears, bf16 "
                 "elsewhere); default: --windows-of's "
                 "distill.teacher_precision, else bf16")
      ->check(CLI::IsMember({"bf16", "fp32", "fp8"}));
  sub.add_option("--micro-batch", o.micro_batch, "windows per teacher forward")
      ->capture_default_str()
      ->check(integer_at_least(1));
  sub.add_option("--device", a->device, "cpu, cuda or auto")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  sub.add_option("--windows-of", o.windows_of,
                 "a student recipe: cache only the windows its run distils on (at its seq_len); "
                 "default: every train window")
      ->type_name("RECIPE");
  sub.add_option("--set", o.overrides, "override a key of the --windows-of recipe (repeatable)")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false);
  return [a] { return run_distill_cache(*a); };
}

const Command kDistillCache("distill-cache",
                            "write a teacher's top-k logits over a dataset for offline "
                            "distillation (distill.teacher_cache)",
                            setup_distill_cache);

}  // namespace
}  // namespace tessera::cli
