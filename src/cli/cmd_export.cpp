// `tessera export CKPT --format tessera|gguf|safetensors --quant TYPE [--group-size N] --out PATH
// [--force]`: a trained checkpoint (any layout) written for deployment (src/export/export.h,
// docs/EXPORT.md). The options are checked before the checkpoint is read.
#include <memory>

#include "cli/command.h"
#include "core/log.h"
#include "export/export.h"

namespace tessera::cli {
namespace {

struct ExportArgs {
  std::string checkpoint, format, quant, out;
  int64_t group_size = 0;
  bool force = false;
};

int run_export(const ExportArgs& a) {
  exporting::ExportOptions o;
  o.format = *enum_from_name<exporting::ExportFormat>(a.format);  // CLI11 checked the names
  o.quant = *enum_from_name<exporting::ExportQuant>(a.quant);
  o.group_size = a.group_size;
  o.out = a.out;
  o.force = a.force;
  exporting::check_export_options(o);
  const exporting::ExportModel m = exporting::load_export_model(a.checkpoint);
  log_info("export: {} (step {}, {} tensors) -> {} ({} {})", m.checkpoint_dir, m.step,
           m.tensors.size(), o.out, a.format, a.quant);
  exporting::export_model(m, o);
  log_info("export: wrote {}", o.out);
  return 0;
}

RunFn setup_export(CLI::App& sub) {
  auto a = std::make_shared<ExportArgs>();
  sub.add_option("CKPT", a->checkpoint,
                 "a run directory (its newest complete checkpoint) or a checkpoints/step_<N> "
                 "directory, saved under any parallel layout")
      ->required();
  sub.add_option("--format", a->format,
                 "tessera (one HDF5 file for Tessera's inference engine), gguf (llama.cpp) or "
                 "safetensors (a Hugging Face transformers directory)")
      ->required()
      ->check(CLI::IsMember(enum_names<exporting::ExportFormat>()));
  sub.add_option("--quant", a->quant,
                 "numeric type: f32, f16, bf16 (every format but see docs/EXPORT.md), int8, int4 "
                 "(tessera), q8_0, q4_0 (gguf)")
      ->required()
      ->check(CLI::IsMember(enum_names<exporting::ExportQuant>()));
  sub.add_option("--group-size", a->group_size,
                 "int8/int4: input columns per FP16 scale, 32, 64 or 128; 0: the QAT recipe's "
                 "when it trained with QAT, else per output channel (int8) or 32 (int4)")
      ->capture_default_str()
      ->check(integer_at_least(0));
  sub.add_option("--out", a->out,
                 "the output: a file (tessera, gguf) or a directory (safetensors), written "
                 "atomically")
      ->required();
  sub.add_flag("--force", a->force, "replace an existing output (default: refuse, exit status 2)");
  return [a] { return run_export(*a); };
}

const Command kExport("export",
                      "write a checkpoint for deployment: Tessera int8/int4 HDF5, GGUF or "
                      "safetensors",
                      setup_export);

}  // namespace
}  // namespace tessera::cli
