// load_export_model (export_model.h): a checkpoint's parameters merged whole from whatever layout
// wrote them, its recipe and its tokenizer. Optimizer moments, FP8 scaling state and
// distillation's projections are not read: only the tensors the model declares.
#include "export/export_model.h"

#include <fmt/ranges.h>

#include <filesystem>

#include "core/error.h"
#include "core/sha256.h"
#include "data/dataset.h"
#include "io/checkpoint.h"
#include "model/transformer.h"

namespace tessera::exporting {
namespace {

namespace fs = std::filesystem;

// A step directory, or a run directory's newest complete checkpoint.
std::string resolve_step_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) TS_USER_ERROR("export: checkpoint path '{}' does not exist", dir);
  if (io::is_complete_checkpoint(dir)) return dir;
  if (!fs::is_directory(dir, ec))
    TS_USER_ERROR(
        "export: '{}' is not a directory; give a run directory or one of its "
        "checkpoints/step_<N> directories",
        dir);
  int64_t step = 0;
  if (io::parse_step_dir_name(fs::path(dir).lexically_normal().filename().string(), &step))
    TS_USER_ERROR("export: {} is not a complete checkpoint (no {} marker: an interrupted write)",
                  dir, io::kCompleteMarker);
  const std::string latest = io::latest_checkpoint(dir);
  if (latest.empty())
    TS_USER_ERROR(
        "export: no complete checkpoint under {} (expected a run directory holding "
        "checkpoints/step_<N>, or a step directory)",
        dir);
  return latest;
}

// The checkpoint's own tokenizer, or (checkpoints that predate meta tokenizer_json) the one stored
// in the recipe's dataset, which must hash to the checkpoint's tokenizer_hash.
void read_tokenizer(const io::CheckpointReader& ck, const Recipe& r, ExportModel& m) {
  const std::string& dir = ck.path();
  const std::string hash = ck.has_meta("tokenizer_hash") ? ck.meta("tokenizer_hash") : "";
  if (ck.has_meta("tokenizer_json")) {
    m.tokenizer_json = ck.meta("tokenizer_json");
    m.tokenizer_hash = sha256_hex(m.tokenizer_json);
    if (!hash.empty() && hash != m.tokenizer_hash)
      TS_USER_ERROR(
          "export: checkpoint {} is corrupt: its tokenizer_json hashes to {}, its "
          "tokenizer_hash says {}",
          dir, m.tokenizer_hash, hash);
    return;
  }
  if (r.data.mock())
    TS_USER_ERROR(
        "export: checkpoint {} was trained on mock data (data.path = mock): it has no tokenizer "
        "to export",
        dir);
  const std::string& path = r.data.path.front().path;  // a blend shares one tokenizer
  std::error_code ec;
  if (!fs::exists(path, ec))
    TS_USER_ERROR(
        "export: checkpoint {} predates stored tokenizers (no metadata 'tokenizer_json'), and "
        "its recipe's dataset data.path = {} (where the tokenizer would come from) does not "
        "exist here; run the export from the directory the training ran in",
        dir, path);
  const TokenDataset ds = TokenDataset::open(path);
  if (!hash.empty() && ds.tokenizer_hash() != hash)
    TS_USER_ERROR(
        "export: checkpoint {} was trained with tokenizer {}, but its recipe's dataset {} now "
        "holds tokenizer {}; the checkpoint's tokenizer cannot be recovered",
        dir, hash, path, ds.tokenizer_hash());
  m.tokenizer_json = ds.tokenizer_json();
  m.tokenizer_hash = ds.tokenizer_hash();
}

// The whole tensor in f32; vocabulary tables cut to their first `vocab_rows` rows.
ExportTensor read_tensor(const io::CheckpointReader& ck, const ParamSpec& spec, int vocab_rows) {
  const std::string& name = spec.name;
  if (!ck.has_tensor(name))
    TS_USER_ERROR("export: checkpoint {} lacks parameter '{}'", ck.path(), name);
  const Shape full = spec.full_shape();
  ExportTensor t;
  t.shape.assign(full.dims.begin(), full.dims.begin() + full.ndim);
  const std::vector<int64_t>& gs = ck.global_shape(name);
  const bool vocab_table = name == "embed.wte" || name == "lm_head.weight";
  if (vocab_table) t.shape[0] = vocab_rows;
  const bool fits =
      vocab_table ? gs.size() == 2 && gs[1] == t.shape[1] && gs[0] >= vocab_rows : gs == t.shape;
  if (!fits)
    TS_USER_ERROR(
        "export: checkpoint {}: tensor '{}' has shape [{}], its recipe's model needs [{}]",
        ck.path(), name, fmt::join(gs, ", "), fmt::join(t.shape, ", "));
  const DType dt = ck.dtype(name);
  if (!dtype_is_float(dt))
    TS_USER_ERROR("export: checkpoint {}: parameter '{}' is {}, not a float type", ck.path(), name,
                  dtype_name(dt));
  const int64_t n = t.numel();
  std::vector<char> raw(dtype_storage_bytes(dt, n));
  ck.read_slice(name, std::vector<int64_t>(t.shape.size(), 0), t.shape, raw.data());
  t.data.resize(size_t(n));
  convert_buffer(raw.data(), dt, t.data.data(), DType::f32, n);
  return t;
}

}  // namespace

int64_t ExportTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const ExportTensor& ExportModel::at(const std::string& name) const {
  const auto it = tensors.find(name);
  TS_CHECK(it != tensors.end(), "exported model has no tensor '{}'", name);
  return it->second;
}

ExportModel load_export_model(const std::string& dir) {
  ExportModel m;
  m.checkpoint_dir = resolve_step_dir(dir);
  const io::CheckpointReader ck = io::CheckpointReader::open(m.checkpoint_dir);
  m.step = ck.step();
  if (!ck.has_meta("recipe"))
    TS_USER_ERROR("export: checkpoint {} stores no recipe (metadata 'recipe')", m.checkpoint_dir);
  m.recipe = parse_recipe(ck.meta("recipe"), m.checkpoint_dir + "/recipe");
  read_tokenizer(ck, m.recipe, m);
  const ModelConfig& cfg = m.recipe.model;
  const ParamStore declared = Transformer::declared_params(cfg, ModelShard{});
  for (const Param& p : declared.all())
    m.tensors.emplace(p.spec.name, read_tensor(ck, p.spec, cfg.vocab_size));
  return m;
}

}  // namespace tessera::exporting
