// `tessera inspect PATH [--recipe] [--no-stats]`: what is in a checkpoint or an HDF5 file.
// PATH may be a checkpoint step dir, a checkpoints dir or a run dir (the latest complete checkpoint
// is picked and named), or any single HDF5 file (e.g. a `tessera prepare` dataset), which is
// listed generically: groups, datasets with type and shape, attributes. For checkpoints: step,
// shards, each tensor's dtype, global shape, element count and, for float tensors, statistics
// computed by reading it in blocks; then metadata with short values (--recipe prints it in full).
// A Tessera export (tessera export --format tessera) gets a summary: its source, numeric types,
// model config and each tensor's storage.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cli/command.h"
#include "core/dtype.h"
#include "core/error.h"
#include "export/tessera_format.h"
#include "io/checkpoint.h"
#include "io/fs_util.h"
#include "io/h5.h"

namespace tessera::cli {
namespace {

namespace fs = std::filesystem;
namespace h5 = io::h5;

// Elements read per block when computing statistics (bounded memory for any tensor size).
constexpr int64_t kStatsBlockElems = int64_t(1) << 22;
// Metadata values and attributes longer than this are cut in the listing.
constexpr size_t kShortValueChars = 72;
// The generic HDF5 walk stops here (hard links can make cycles, and huge files are unreadable).
constexpr int kMaxDepth = 32;
constexpr int kMaxListedObjects = 5000;

std::string shape_text(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", v[i]);
  return s + ")";
}

// Digit runs compare as numbers, so layers.2 lists before layers.10.
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) &&
        std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string na = a.substr(i, ie - i), nb = b.substr(j, je - j);
      const size_t za = na.find_first_not_of('0'), zb = nb.find_first_not_of('0');
      const std::string ta = za == std::string::npos ? "" : na.substr(za);
      const std::string tb = zb == std::string::npos ? "" : nb.substr(zb);
      if (ta.size() != tb.size()) return ta.size() < tb.size();
      if (ta != tb) return ta < tb;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::string short_value(const std::string& v) {
  std::string s;
  for (char c : v) {
    if (s.size() >= kShortValueChars) break;
    s += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  if (s.size() < v.size()) s += fmt::format("... ({} bytes)", v.size());
  return s;
}

// Mean, population std, min and max over the finite elements; NaN and Inf counted apart.
struct Stats {
  int64_t num_finite = 0, num_nan = 0, num_inf = 0;
  double mean = 0, m2 = 0;
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();

  void add(double x) {
    if (std::isnan(x)) {
      ++num_nan;
      return;
    }
    if (std::isinf(x)) {
      ++num_inf;
      return;
    }
    ++num_finite;
    const double delta = x - mean;  // Welford: stable for long tensors
    mean += delta / double(num_finite);
    m2 += delta * (x - mean);
    min = std::min(min, x);
    max = std::max(max, x);
  }
  std::string text() const {
    std::string s = num_finite == 0
                        ? std::string("no finite values")
                        : fmt::format("mean {:.6g}  std {:.6g}  min {:.6g}  max {:.6g}", mean,
                                      std::sqrt(m2 / double(num_finite)), min, max);
    if (num_nan) s += fmt::format("  nan {}", num_nan);
    if (num_inf) s += fmt::format("  inf {}", num_inf);
    return s;
  }
};

// Reads the tensor in blocks of whole rows of dim 0, converted to f64 (exact for every float
// dtype) by core's convert_buffer.
Stats tensor_stats(const io::CheckpointReader& r, const std::string& name) {
  const DType dtype = r.dtype(name);
  const std::vector<int64_t>& shape = r.global_shape(name);
  Stats st;
  int64_t row_elems = 1;
  for (size_t d = 1; d < shape.size(); ++d) row_elems *= shape[d];
  if (row_elems == 0) return st;
  const int64_t num_rows = shape.empty() ? 1 : shape[0];  // a scalar is one row of one
  const int64_t rows_per_block = std::max<int64_t>(1, kStatsBlockElems / row_elems);
  std::vector<int64_t> offset(shape.size(), 0), count = shape;
  std::vector<char> raw;
  std::vector<double> values;
  for (int64_t row = 0; row < num_rows; row += rows_per_block) {
    const int64_t block_rows = std::min(rows_per_block, num_rows - row);
    if (!shape.empty()) {
      offset[0] = row;
      count[0] = block_rows;
    }
    const int64_t n = block_rows * row_elems;
    raw.resize(dtype_storage_bytes(dtype, n));
    values.resize(size_t(n));
    r.read_slice(name, offset, count, raw.data());
    convert_buffer(raw.data(), dtype, values.data(), DType::f64, n);
    for (double v : values) st.add(v);
  }
  return st;
}

void print_checkpoint(const std::string& step_dir, bool full_recipe, bool stats) {
  const io::CheckpointReader r = io::CheckpointReader::open(step_dir);
  std::vector<std::string> names = r.tensor_names();
  std::sort(names.begin(), names.end(), natural_less);
  int64_t total = 0;
  size_t name_width = 4, dtype_width = 5, shape_width = 5;
  for (const std::string& n : names) {
    total += r.numel(n);
    name_width = std::max(name_width, n.size());
    dtype_width = std::max(dtype_width, dtype_name(r.dtype(n)).size());
    shape_width = std::max(shape_width, shape_text(r.global_shape(n)).size());
  }
  fmt::print("checkpoint {}\n", step_dir);
  fmt::print("step {}, {} shard(s), {} tensor(s), {} elements\n\n", r.step(), r.num_shards(),
             names.size(), total);
  fmt::print("{:<{}}  {:<{}} {:<{}} {:>12}\n", "name", name_width, "dtype", dtype_width, "shape",
             shape_width, "elements");
  for (const std::string& n : names) {
    const DType t = r.dtype(n);
    std::string line =
        fmt::format("{:<{}}  {:<{}} {:<{}} {:>12}", n, name_width, dtype_name(t), dtype_width,
                    shape_text(r.global_shape(n)), shape_width, r.numel(n));
    if (stats && dtype_is_float(t) && r.numel(n) > 0) line += "  " + tensor_stats(r, n).text();
    fmt::print("{}\n", line);
  }
  const std::vector<std::string> keys = r.meta_keys();
  fmt::print("\nmetadata ({} key(s))\n", keys.size());
  for (const std::string& k : keys) {
    if (k == "recipe" && full_recipe) continue;
    fmt::print("  {}: {}\n", k, short_value(r.meta(k)));
  }
  if (full_recipe) {
    if (!r.has_meta("recipe")) TS_USER_ERROR("--recipe: checkpoint {} stores no recipe", step_dir);
    const std::string recipe = r.meta("recipe");
    fmt::print("\nrecipe:\n{}", recipe);
    if (!recipe.empty() && recipe.back() != '\n') fmt::print("\n");
  }
}

void print_attrs(const h5::Ctx& ctx, hid_t obj, const std::string& indent) {
  for (const std::string& a : h5::attr_names(ctx, obj))
    fmt::print("{}@{} = {}\n", indent, a, h5::attr_value_text(ctx, obj, a, kShortValueChars));
}

void walk_group(const h5::Ctx& ctx, hid_t group, const std::string& path, int depth,
                int* num_listed) {
  for (const std::string& name : h5::link_names(ctx, group)) {
    if (++*num_listed > kMaxListedObjects) {
      if (*num_listed == kMaxListedObjects + 1)
        fmt::print("... (listing stops after {} objects)\n", kMaxListedObjects);
      return;
    }
    const std::string child = path + (path == "/" ? "" : "/") + name;
    switch (h5::object_kind(ctx, group, name)) {
      case h5::ObjectKind::group: {
        fmt::print("{}/\n", child);
        h5::Handle g = h5::open_group(ctx, group, name);
        print_attrs(ctx, g.id(), "    ");
        if (depth + 1 >= kMaxDepth) {
          fmt::print("    ... (deeper than {} levels: not listed)\n", kMaxDepth);
          continue;
        }
        walk_group(ctx, g.id(), child, depth + 1, num_listed);
        break;
      }
      case h5::ObjectKind::dataset: {
        h5::Handle d = h5::open_dataset(ctx, group, name);
        const std::vector<int64_t> dims = h5::dataset_dims(ctx, d.id(), name);
        int64_t n = 1;
        for (int64_t v : dims) n *= v;
        fmt::print("{}  {} {} ({} elements)\n", child, h5::dataset_type_text(ctx, d.id(), name),
                   dims.empty() ? std::string("scalar") : shape_text(dims), n);
        print_attrs(ctx, d.id(), "    ");
        break;
      }
      case h5::ObjectKind::other:
        fmt::print("{}  (not a group or dataset: dangling link or named type)\n", child);
        break;
    }
  }
}

void print_h5_file(const std::string& path) {
  h5::File f = h5::File::open_read(path);
  fmt::print("HDF5 file {} ({} bytes)\n/\n", path, fs::file_size(path));
  print_attrs(f.ctx(), f.id(), "    ");
  int num_listed = 0;
  walk_group(f.ctx(), f.id(), "/", 0, &num_listed);
}

// The newest complete checkpoint in a checkpoints dir, "" if none.
std::string latest_in(const std::string& ck_dir) {
  const std::vector<io::StepDir> dirs = io::list_step_dirs(ck_dir);
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it)
    if (io::is_complete_checkpoint(it->path)) return it->path;
  return "";
}

void print_tessera_export(const std::string& path) {
  const exporting::TesseraExport e = exporting::read_tessera_export(path, /*with_data=*/false);
  fmt::print("Tessera export {} ({} bytes), format_version {}\n", path, fs::file_size(path),
             e.format_version);
  fmt::print("from checkpoint {} (step {}), trained in {}\n", e.source_checkpoint, e.step,
             e.trained_compute);
  fmt::print("quant {}, float tensors {}, {}\n", e.quant, e.float_dtype,
             e.qat ? "integers as trained with QAT"
                   : (e.quant == "int8" || e.quant == "int4" ? "post-training round-to-nearest"
                                                             : "no integer weights"));
  fmt::print("tokenizer sha256 {} ({} bytes of tokenizer.json)\n\n", e.tokenizer_hash,
             e.tokenizer_json.size());
  fmt::print("model config:\n{}\n", e.model_config_yaml);
  std::vector<std::string> names;
  size_t width = 4;
  int64_t total = 0;
  for (const auto& [name, t] : e.tensors) {
    names.push_back(name);
    width = std::max(width, name.size());
    total += t.stored_bytes;
  }
  std::sort(names.begin(), names.end(), natural_less);
  fmt::print("{} tensor(s), {} bytes of data\n", names.size(), total);
  fmt::print("{:<{}}  {:<12} {:<18} {:>12}\n", "name", width, "storage", "shape", "bytes");
  for (const std::string& n : names) {
    const exporting::TesseraExportTensor& t = e.tensors.at(n);
    const std::string kind = t.quantized ? fmt::format("int{} g{}", int(t.bits), t.group)
                                         : std::string(dtype_name(t.dtype));
    fmt::print("{:<{}}  {:<12} {:<18} {:>12}\n", n, width, kind, shape_text(t.shape),
               t.stored_bytes);
  }
}

struct InspectArgs {
  std::string path;
  bool full_recipe = false;
  bool no_stats = false;
};

int run_inspect(const InspectArgs& args) {
  const std::string& path = args.path;
  const bool full_recipe = args.full_recipe, stats = !args.no_stats;
  std::error_code ec;
  if (!fs::exists(path, ec)) TS_USER_ERROR("inspect: path '{}' does not exist", path);
  if (!fs::is_directory(path, ec)) {
    if (full_recipe) TS_USER_ERROR("inspect: --recipe needs a checkpoint, and {} is a file", path);
    if (exporting::is_tessera_export(path))
      print_tessera_export(path);
    else
      print_h5_file(path);
    return 0;
  }
  if (io::is_complete_checkpoint(path)) {
    print_checkpoint(path, full_recipe, stats);
    return 0;
  }
  int64_t step = 0;
  const std::string base = fs::path(path).lexically_normal().filename().string();
  if (io::parse_step_dir_name(base, &step) || base.rfind(".tmp-step_", 0) == 0)
    TS_USER_ERROR("inspect: {} is not a complete checkpoint (no {} marker: an interrupted write)",
                  path, io::kCompleteMarker);
  const bool is_run_dir = fs::is_directory(io::checkpoints_dir(path), ec);
  const std::string ck_dir = is_run_dir ? io::checkpoints_dir(path) : path;
  const std::vector<io::StepDir> dirs = io::list_step_dirs(ck_dir);
  if (!is_run_dir && dirs.empty())
    TS_USER_ERROR(
        "inspect: {} is not a checkpoint, a checkpoints directory, a run directory or "
        "an HDF5 file",
        path);
  const std::string latest = latest_in(ck_dir);
  if (latest.empty()) TS_USER_ERROR("inspect: no complete checkpoint under {}", ck_dir);
  fmt::print("(latest complete checkpoint under {})\n", ck_dir);
  print_checkpoint(latest, full_recipe, stats);
  return 0;
}

RunFn setup_inspect(CLI::App& sub) {
  auto args = std::make_shared<InspectArgs>();
  sub.add_option("PATH", args->path,
                 "a run directory, its checkpoints/ directory or one step_<N> checkpoint (the "
                 "latest complete checkpoint is shown), a Tessera export (tessera export), or any "
                 "HDF5 file")
      ->required();
  sub.add_flag("--recipe", args->full_recipe, "print the recipe stored in the checkpoint in full");
  sub.add_flag("--no-stats", args->no_stats,
               "skip reading every float tensor for its mean, std, min and max");
  return [args] { return run_inspect(*args); };
}

const Command kInspect(
    "inspect", "show a checkpoint's tensors and metadata, a Tessera export, or an HDF5 file",
    setup_inspect);

}  // namespace
}  // namespace tessera::cli
