// Writer and reader of Tessera's export format (tessera_format.h for the layout).
#include "export/tessera_format.h"

#include <fmt/ranges.h>

#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "export/weight_quant.h"
#include "io/h5.h"

namespace tessera::exporting {
namespace {

namespace h5 = io::h5;

// The dtype of the tensors kept in float: the quant type itself for f32/f16/bf16 exports; for
// int8/int4 the precision the model computed in (bf16 under bf16 and fp8 compute).
DType float_dtype_of(const ExportModel& m, ExportQuant q) {
  switch (q) {
    case ExportQuant::f16: return DType::f16;
    case ExportQuant::bf16: return DType::bf16;
    case ExportQuant::f32: return DType::f32;
    default: break;
  }
  switch (m.recipe.precision.compute) {
    case Compute::fp16: return DType::f16;
    case Compute::bf16:
    case Compute::fp8: return DType::bf16;
    case Compute::fp32: return DType::f32;
  }
  TS_BUG("compute {}", int(m.recipe.precision.compute));
}

// The format's names of the float types (fixed here, whatever core/dtype.h prints).
std::string float_name(DType d) {
  return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : "bf16";
}

void write_array(const h5::Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                 hid_t mem_type, size_t elem_bytes, const std::vector<int64_t>& dims,
                 const void* data) {
  h5::Handle d = h5::create_dataset(ctx, loc, name, file_type, dims, elem_bytes, true);
  h5::write_dataset(ctx, d.id(), mem_type, data, name);
  d.close(ctx, "H5Dclose", name);
}

void write_float_tensor(const h5::Ctx& ctx, hid_t group, const std::string& name,
                        const ExportTensor& t, DType dt) {
  if (dt == DType::f32) {
    write_array(ctx, group, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 4, t.shape, t.data.data());
  } else {
    std::vector<uint16_t> bits(t.data.size());
    convert_buffer(t.data.data(), DType::f32, bits.data(), dt, t.numel());
    write_array(ctx, group, name, H5T_STD_U16LE, H5T_NATIVE_UINT16, 2, t.shape, bits.data());
  }
  h5::Handle d = h5::open_dataset(ctx, group, name);
  h5::write_attr_string(ctx, d.id(), "dtype", float_name(dt));
}

void write_quantized(const h5::Ctx& ctx, hid_t tensors, const std::string& name,
                     const QuantizedWeight& q) {
  h5::Handle g = h5::create_group(ctx, tensors, name);
  h5::write_attr_i64s(ctx, g.id(), "shape", q.shape);
  h5::write_attr_i64(ctx, g.id(), "bits", int64_t(q.bits));
  h5::write_attr_i64(ctx, g.id(), "group_size", q.group);
  h5::write_attr_i64(ctx, g.id(), "rows", q.rows);
  h5::write_attr_i64(ctx, g.id(), "cols", q.cols);
  if (q.bits == quant::IntBits::int8) {
    write_array(ctx, g.id(), "codes", H5T_STD_I8LE, H5T_NATIVE_INT8, 1, {q.rows, q.cols},
                q.codes.data());
  } else {
    std::vector<uint8_t> packed(size_t(q.rows * q.cols / 2));
    pack_int4(q.codes.data(), q.rows * q.cols, packed.data());  // K is even: rows stay aligned
    write_array(ctx, g.id(), "codes", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, {q.rows, q.cols / 2},
                packed.data());
  }
  write_array(ctx, g.id(), "scales", H5T_STD_U16LE, H5T_NATIVE_UINT16, 2,
              {q.rows, q.cols / q.group}, q.scales.data());
  g.close(ctx, "H5Gclose", name);
}

void write_file(const ExportModel& m, const ExportOptions& o, const std::string& path) {
  h5::File f = h5::File::create(path);
  const h5::Ctx& ctx = f.ctx();
  const DType fdt = float_dtype_of(m, o.quant);
  const bool integer = o.quant == ExportQuant::int8 || o.quant == ExportQuant::int4;
  const quant::IntBits bits =
      o.quant == ExportQuant::int4 ? quant::IntBits::int4 : quant::IntBits::int8;
  const int64_t group = integer ? resolve_group_size(m, bits, o.group_size) : 0;
  const QatSettings qat = qat_settings(m.recipe);
  h5::write_attr_string(ctx, f.id(), "tessera_format", kTesseraExportTag);
  h5::write_attr_i64(ctx, f.id(), "format_version", kTesseraExportVersion);
  h5::write_attr_string(ctx, f.id(), "quant", to_string(o.quant));
  h5::write_attr_string(ctx, f.id(), "float_dtype", float_name(fdt));
  h5::write_attr_string(ctx, f.id(), "source_checkpoint", m.checkpoint_dir, h5::StrType::vlen);
  h5::write_attr_i64(ctx, f.id(), "step", m.step);
  h5::write_attr_string(ctx, f.id(), "tokenizer_hash", m.tokenizer_hash);
  h5::write_attr_string(ctx, f.id(), "trained_compute", to_string(m.recipe.precision.compute));
  h5::write_attr_i64(ctx, f.id(), "qat", integer && qat.enabled && qat.bits == bits ? 1 : 0);
  h5::write_string_dataset(ctx, f.id(), "model_config", model_config_yaml(m.recipe));
  h5::write_string_dataset(ctx, f.id(), "tokenizer_json", m.tokenizer_json);
  h5::Handle tensors = h5::create_group(ctx, f.id(), "tensors");
  for (const auto& [name, t] : m.tensors) {
    if (integer && is_quantized_weight(m, name))
      write_quantized(ctx, tensors.id(), name, quantize_weight(m, name, bits, group));
    else
      write_float_tensor(ctx, tensors.id(), name, t, fdt);
  }
  tensors.close(ctx, "H5Gclose", "tensors");
  f.close();
}

int64_t product(const std::vector<int64_t>& v) {
  int64_t n = 1;
  for (int64_t d : v) n *= d;
  return n;
}

TesseraExportTensor read_float(const h5::Ctx& ctx, hid_t tensors, const std::string& name,
                               bool with_data) {
  TesseraExportTensor t;
  h5::Handle d = h5::open_dataset(ctx, tensors, name);
  t.shape = h5::dataset_dims(ctx, d.id(), name);
  const std::string dt = h5::read_attr_string(ctx, d.id(), "dtype");
  if (dt == "f32")
    t.dtype = DType::f32;
  else if (dt == "f16")
    t.dtype = DType::f16;
  else if (dt == "bf16")
    t.dtype = DType::bf16;
  else
    h5::fail_content(ctx, "tensor '" + name + "' has dtype '" + dt + "' (f32, f16 or bf16)");
  const int64_t n = product(t.shape);
  t.stored_bytes = n * int64_t(dtype_size(t.dtype));
  if (!with_data) return t;
  t.values.resize(size_t(n));
  if (t.dtype == DType::f32) {
    h5::read_box(ctx, d.id(), H5T_NATIVE_FLOAT, std::vector<int64_t>(t.shape.size(), 0), t.shape,
                 t.values.data(), t.shape, std::vector<int64_t>(t.shape.size(), 0), name);
  } else {
    std::vector<uint16_t> bits(static_cast<size_t>(n));
    h5::read_box(ctx, d.id(), H5T_NATIVE_UINT16, std::vector<int64_t>(t.shape.size(), 0), t.shape,
                 bits.data(), t.shape, std::vector<int64_t>(t.shape.size(), 0), name);
    convert_buffer(bits.data(), t.dtype, t.values.data(), DType::f32, n);
  }
  return t;
}

template <class T>
std::vector<T> read_2d(const h5::Ctx& ctx, hid_t group, const std::string& name, hid_t mem_type,
                       const std::vector<int64_t>& want, const std::string& tensor) {
  h5::Handle d = h5::open_dataset(ctx, group, name);
  if (h5::dataset_dims(ctx, d.id(), name) != want)
    h5::fail_content(
        ctx, fmt::format("tensor '{}': {} is not ({})", tensor, name, fmt::join(want, ", ")));
  std::vector<T> out(size_t(product(want)));
  h5::read_box(ctx, d.id(), mem_type, {0, 0}, want, out.data(), want, {0, 0}, name);
  return out;
}

TesseraExportTensor read_quantized(const h5::Ctx& ctx, hid_t tensors, const std::string& name,
                                   bool with_data) {
  TesseraExportTensor t;
  t.quantized = true;
  h5::Handle g = h5::open_group(ctx, tensors, name);
  t.shape = h5::read_attr_i64s(ctx, g.id(), "shape");
  const int64_t bits = h5::read_attr_i64(ctx, g.id(), "bits");
  t.group = h5::read_attr_i64(ctx, g.id(), "group_size");
  t.rows = h5::read_attr_i64(ctx, g.id(), "rows");
  t.cols = h5::read_attr_i64(ctx, g.id(), "cols");
  const bool sane = (bits == 8 || bits == 4) && t.shape.size() >= 2 && t.cols == t.shape.back() &&
                    t.rows * t.cols == product(t.shape) && t.group > 0 && t.cols % t.group == 0 &&
                    (bits == 8 || t.cols % 2 == 0);
  if (!sane)
    h5::fail_content(ctx,
                     fmt::format("quantized tensor '{}' has inconsistent attributes (bits "
                                 "{}, shape ({}), rows {}, cols {}, group_size {})",
                                 name, bits, fmt::join(t.shape, ", "), t.rows, t.cols, t.group));
  t.bits = bits == 8 ? quant::IntBits::int8 : quant::IntBits::int4;
  const int64_t code_cols = bits == 8 ? t.cols : t.cols / 2;
  const std::vector<int64_t> scale_dims{t.rows, t.cols / t.group};
  t.stored_bytes = t.rows * code_cols + 2 * product(scale_dims);
  if (!with_data) return t;
  if (bits == 8) {
    t.codes = read_2d<int8_t>(ctx, g.id(), "codes", H5T_NATIVE_INT8, {t.rows, t.cols}, name);
  } else {
    const std::vector<uint8_t> packed =
        read_2d<uint8_t>(ctx, g.id(), "codes", H5T_NATIVE_UINT8, {t.rows, code_cols}, name);
    t.codes.resize(size_t(t.rows * t.cols));
    unpack_int4(packed.data(), t.rows * t.cols, t.codes.data());
  }
  t.scales = read_2d<uint16_t>(ctx, g.id(), "scales", H5T_NATIVE_UINT16, scale_dims, name);
  return t;
}

// The top-level sections of recipe_to_yaml's text (a key at column 0 and its indented lines).
std::string yaml_sections(const std::string& text, const std::vector<std::string>& keys) {
  std::istringstream in(text);
  std::string line, out;
  bool keep = false;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] != ' ' && line[0] != '#') {
      keep = false;
      for (const std::string& k : keys) keep = keep || line.rfind(k + ":", 0) == 0;
    }
    if (keep) out += line + "\n";
  }
  return out;
}

}  // namespace

std::string model_config_yaml(const Recipe& r) {
  return yaml_sections(recipe_to_yaml(r), {"model", "moe"});
}

ModelConfig parse_model_config_yaml(const std::string& yaml, const std::string& file) {
  // A recipe needs a data and a train section; these placeholders only complete it.
  const std::string recipe = yaml +
                             "data:\n  path: mock\n  seq_len: 1\n  micro_batch: 1\n"
                             "train:\n  steps: 1\n  out_dir: unused\n";
  return parse_recipe(recipe, file).model;
}

void write_tessera_export(const ExportModel& m, const ExportOptions& o) {
  write_file_atomically(o.out, [&](const std::string& tmp) { write_file(m, o, tmp); });
}

bool is_tessera_export(const std::string& path) {
  h5::File f = h5::File::open_read(path);
  return h5::attr_exists(f.ctx(), f.id(), "tessera_format") &&
         h5::read_attr_string(f.ctx(), f.id(), "tessera_format") == kTesseraExportTag;
}

TesseraExport read_tessera_export(const std::string& path, bool with_data) {
  h5::File f = h5::File::open_read(path);
  const h5::Ctx& ctx = f.ctx();
  if (!h5::attr_exists(ctx, f.id(), "tessera_format") ||
      h5::read_attr_string(ctx, f.id(), "tessera_format") != kTesseraExportTag)
    TS_USER_ERROR("{} is not a Tessera export (no root attribute tessera_format = {})", path,
                  kTesseraExportTag);
  TesseraExport e;
  e.format_version = h5::read_attr_i64(ctx, f.id(), "format_version");
  if (e.format_version != kTesseraExportVersion)
    TS_USER_ERROR("{}: Tessera export format_version {}, this build reads {}", path,
                  e.format_version, kTesseraExportVersion);
  e.quant = h5::read_attr_string(ctx, f.id(), "quant");
  e.float_dtype = h5::read_attr_string(ctx, f.id(), "float_dtype");
  e.source_checkpoint = h5::read_attr_string(ctx, f.id(), "source_checkpoint");
  e.step = h5::read_attr_i64(ctx, f.id(), "step");
  e.tokenizer_hash = h5::read_attr_string(ctx, f.id(), "tokenizer_hash");
  e.trained_compute = h5::read_attr_string(ctx, f.id(), "trained_compute");
  e.qat = h5::read_attr_i64(ctx, f.id(), "qat") != 0;
  e.model_config_yaml = h5::read_string_dataset(ctx, f.id(), "model_config");
  e.model = parse_model_config_yaml(e.model_config_yaml, path + ":/model_config");
  e.tokenizer_json = h5::read_string_dataset(ctx, f.id(), "tokenizer_json");
  if (sha256_hex(e.tokenizer_json) != e.tokenizer_hash)
    TS_USER_ERROR("{}: /tokenizer_json does not hash to the root attribute tokenizer_hash {}", path,
                  e.tokenizer_hash);
  h5::Handle tensors = h5::open_group(ctx, f.id(), "tensors");
  for (const std::string& name : h5::link_names(ctx, tensors.id())) {
    const bool group = h5::object_kind(ctx, tensors.id(), name) == h5::ObjectKind::group;
    e.tensors.emplace(name, group ? read_quantized(ctx, tensors.id(), name, with_data)
                                  : read_float(ctx, tensors.id(), name, with_data));
  }
  return e;
}

}  // namespace tessera::exporting
