// load_export_model: a single-file reader of a checkpoint's parameters (any layout: the reader
// assembles each full tensor from the shards), its recipe and its dataset's tokenizer.
// (The gguf branch's minimal version: the export-core branch owns this file.)
#include "export/export_model.h"

#include <filesystem>

#include "core/dtype.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/checkpoint.h"

namespace tessera::exporting {

int64_t ExportTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const ExportTensor& ExportModel::at(const std::string& name) const {
  const auto it = tensors.find(name);
  TS_CHECK(it != tensors.end(), "export model has no tensor {}", name);
  return it->second;
}

namespace {

std::string resolve_step_dir(const std::string& dir) {
  if (io::is_complete_checkpoint(dir)) return dir;
  const std::string latest = io::latest_checkpoint(dir);
  if (latest.empty())
    TS_USER_ERROR(
        "{}: not a complete checkpoint (step directory with COMPLETE) nor a run "
        "directory holding one under checkpoints/",
        dir);
  return latest;
}

}  // namespace

ExportModel load_export_model(const std::string& dir) {
  ExportModel m;
  m.checkpoint_dir = resolve_step_dir(dir);
  const io::CheckpointReader ck = io::CheckpointReader::open(m.checkpoint_dir);
  m.step = ck.step();
  m.recipe = parse_recipe(ck.meta("recipe"), m.checkpoint_dir + "/recipe");
  const int64_t V = m.recipe.model.vocab_size;
  for (const std::string& name : ck.tensor_names()) {
    if (name.rfind("optim.", 0) == 0) continue;
    ExportTensor t;
    t.shape = ck.global_shape(name);
    const int64_t n = ck.numel(name);
    const DType dt = ck.dtype(name);
    std::vector<char> raw(dtype_storage_bytes(dt, n));
    ck.read_full(name, raw.data());
    t.data.resize(size_t(n));
    convert_buffer(raw.data(), dt, t.data.data(), DType::f32, n);
    if ((name == "embed.wte" || name == "lm_head.weight") && t.shape[0] > V) {
      t.shape[0] = V;  // padding rows: row-major, so the first V rows are a prefix
      t.data.resize(size_t(V * t.shape[1]));
    }
    m.tensors.emplace(name, std::move(t));
  }
  if (m.recipe.data.mock())
    TS_USER_ERROR("{}: trained on mock data, which has no tokenizer", m.checkpoint_dir);
  const std::string data_path = m.recipe.data.path.at(0).path;
  if (!std::filesystem::exists(data_path))
    TS_USER_ERROR("{}: its dataset {} (where the tokenizer is read from) does not exist",
                  m.checkpoint_dir, data_path);
  const TokenDataset ds = TokenDataset::open(data_path);
  m.tokenizer_json = ds.tokenizer_json();
  m.tokenizer_hash = ds.tokenizer_hash();
  if (ck.has_meta("tokenizer_hash") && ck.meta("tokenizer_hash") != m.tokenizer_hash)
    TS_USER_ERROR("{}: trained with tokenizer {}, but its dataset {} now holds tokenizer {}",
                  m.checkpoint_dir, ck.meta("tokenizer_hash"), data_path, m.tokenizer_hash);
  return m;
}

}  // namespace tessera::exporting
