// EngineModel::load: the weights of a Tessera export (quantized linears kept as codes and FP16
// scales, float tensors converted to the engine's dtype) or of a training checkpoint (f32, any
// layout merged by exporting::load_export_model), placed on the engine's device; and
// EngineModel::synthetic, random weights of any shape made one tensor at a time (benchmarks).
#include <filesystem>
#include <functional>
#include <random>
#include <set>

#include <fmt/format.h>

#include "core/error.h"
#include "export/export_model.h"
#include "export/tessera_format.h"
#include "infer/engine_model.h"
#include "kernels/quantize.h"
#include "model/transformer.h"

namespace tessera {

using exporting::TesseraExportTensor;

// Where the host tensors come from, one at a time (each is taken once and may then be freed).
struct TensorSource {
  std::function<bool(const std::string&)> has;
  std::function<TesseraExportTensor(const std::string&)> take;
};

// Builds an EngineModel's tensors from a source of host tensors (a Tessera export's, a
// checkpoint's widened to that form, or random ones).
struct EngineModelLoader {
  EngineModel& m;
  TensorSource source;
  std::string where;

  TesseraExportTensor get(const std::string& name) const {
    if (!source.has(name))
      TS_USER_ERROR("{}: the model has no tensor '{}' (config {} layers, family {})", where, name,
                    m.cfg_.num_layers, int(m.cfg_.family));
    return source.take(name);
  }
  bool has(const std::string& name) const { return source.has(name); }

  // Copies `bytes` host bytes into a fresh buffer on the engine's device.
  void* place(const void* host, size_t bytes) {
    m.storage_.emplace_back(m.options_.device, std::max<size_t>(bytes, 1));
    void* dev = m.storage_.back().data();
    copy_bytes(dev, m.options_.device, host, Device::cpu, bytes);
    m.weight_bytes_ += int64_t(bytes);
    return dev;
  }

  // A float tensor in `dtype` (the engine's, or f32 for routers).
  Tensor floats(const std::string& name, DType dtype) {
    const TesseraExportTensor t = get(name);
    if (t.quantized)
      TS_USER_ERROR("{}: '{}' is quantized where a float tensor is expected", where, name);
    return place_floats(t, dtype);
  }
  Tensor place_floats(const TesseraExportTensor& t, DType dtype) {
    Shape shape;
    for (int64_t d : t.shape) shape.dims[shape.ndim++] = d;
    const int64_t n = shape.numel();
    std::vector<uint8_t> host(dtype_storage_bytes(dtype, n));
    convert_buffer(t.values.data(), DType::f32, host.data(), dtype, n);
    return Tensor(place(host.data(), host.size()), dtype, m.options_.device, shape);
  }
  Tensor optional_floats(const std::string& name) {
    return has(name) ? floats(name, m.options_.dtype) : Tensor();
  }

  // A linear's weight (out, in), or for routed experts (E, out, in) one InferWeight per expert.
  std::vector<ops::InferWeight> weights(const std::string& name, DType float_dtype) {
    const TesseraExportTensor t = get(name);
    const int64_t experts = t.shape.size() == 3 ? t.shape[0] : 1;
    const int64_t out = t.shape[t.shape.size() - 2], in = t.shape.back();
    std::vector<ops::InferWeight> ws(size_t(experts), ops::InferWeight{});
    if (!t.quantized) {
      const Tensor all = place_floats(t, float_dtype).view({experts * out, in});
      for (int64_t e = 0; e < experts; ++e) ws[e].w = all.slice(e * out, (e + 1) * out);
      return ws;
    }
    const bool int4 = t.bits == quant::IntBits::int4;
    if (int4 && in % 2 != 0)
      TS_USER_ERROR("{}: int4 weight '{}' has an odd row length {}", where, name, in);
    const DType code_type = int4 ? DType::i4 : DType::i8;
    const int64_t rows = experts * out, groups = in / t.group;
    Tensor codes, scales;
    if (int4) {
      std::vector<uint8_t> packed(size_t(rows * in / 2));
      pack_int4(t.codes.data(), rows * in, packed.data());
      codes = Tensor(place(packed.data(), packed.size()), code_type, m.options_.device, {rows, in});
    } else {
      codes =
          Tensor(place(t.codes.data(), t.codes.size()), code_type, m.options_.device, {rows, in});
    }
    scales = Tensor(place(t.scales.data(), t.scales.size() * 2), DType::f16, m.options_.device,
                    {rows, groups});
    for (int64_t e = 0; e < experts; ++e) {
      ws[e].w = codes.slice(e * out, (e + 1) * out);
      ws[e].scales = scales.slice(e * out, (e + 1) * out);
      ws[e].group = t.group;
    }
    return ws;
  }

  EngineLinear linear(const std::string& name) {
    EngineLinear l;
    l.weight = weights(name + ".weight", m.options_.dtype).front();
    l.bias = optional_floats(name + ".bias");
    return l;
  }
  EngineNorm norm(const std::string& name) {
    return EngineNorm{floats(name + ".weight", m.options_.dtype), optional_floats(name + ".bias")};
  }
  EngineFfn ffn(const std::string& name, int64_t width) {
    EngineFfn f;
    f.width = width;
    if (m.cfg_.activation == ActivationKind::gelu) {
      f.in = linear(name + ".fc");
      f.out = linear(name + ".proj");
    } else {
      f.in = linear(name + ".gate");
      f.up = linear(name + ".up");
      f.out = linear(name + ".down");
    }
    return f;
  }

  void moe(EngineLayer& layer, const std::string& name) {
    const MoeConfig& moe = m.cfg_.moe;
    layer.router = weights(name + ".router.weight", DType::f32).front();
    const bool gelu = m.cfg_.activation == ActivationKind::gelu;
    const auto in =
        weights(name + (gelu ? ".experts.fc.weight" : ".experts.gate.weight"), m.options_.dtype);
    const auto out =
        weights(name + (gelu ? ".experts.proj.weight" : ".experts.down.weight"), m.options_.dtype);
    std::vector<ops::InferWeight> up;
    if (!gelu) up = weights(name + ".experts.up.weight", m.options_.dtype);
    layer.experts.resize(in.size());
    for (size_t e = 0; e < in.size(); ++e) {
      EngineFfn& f = layer.experts[e];
      f.width = in[e].out_features();
      f.in.weight = in[e];
      f.out.weight = out[e];
      if (!gelu) f.up.weight = up[e];
    }
    if (moe.shared_experts > 0)
      layer.shared = ffn(name + ".shared", int64_t(moe.shared_experts) * moe.shared_ffn_hidden);
  }

  void all() {
    const ModelConfig& c = m.cfg_;
    m.wte_ = floats("embed.wte", m.options_.dtype);
    if (c.position == PositionKind::learned) m.wpe_ = floats("embed.wpe", m.options_.dtype);
    m.layers_.resize(size_t(c.num_layers));
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = fmt::format("layers.{}", l);
      EngineLayer& L = m.layers_[size_t(l)];
      L.ln1 = norm(p + ".ln1");
      L.ln2 = norm(p + ".ln2");
      L.wq = linear(p + ".attn.wq");
      L.wk = linear(p + ".attn.wk");
      L.wv = linear(p + ".attn.wv");
      L.wo = linear(p + ".attn.wo");
      if (c.qk_norm) {
        L.q_norm = floats(p + ".attn.q_norm.weight", m.options_.dtype);
        L.k_norm = floats(p + ".attn.k_norm.weight", m.options_.dtype);
      }
      L.is_moe = c.moe.is_moe_layer(l);
      if (L.is_moe)
        moe(L, p + ".moe");
      else
        L.mlp = ffn(p + ".mlp", c.ffn_hidden);
    }
    m.final_norm_ = norm("final_norm");
    if (c.tied_embeddings)
      m.lm_head_ = ops::InferWeight{m.wte_, Tensor(), 0};
    else
      m.lm_head_ = weights("lm_head.weight", m.options_.dtype).front();
  }
};

std::unique_ptr<EngineModel> EngineModel::load(const std::string& path,
                                               const EngineModelOptions& options) {
  if (options.dtype != DType::f32 && options.dtype != DType::bf16 && options.dtype != DType::f16)
    TS_USER_ERROR("{}: the engine computes in fp32, bf16 or fp16, not {}", path,
                  dtype_name(options.dtype));
  if (options.device == Device::cpu && options.dtype != DType::f32)
    TS_USER_ERROR("{}: the CPU engine computes in fp32 (asked for {})", path,
                  dtype_name(options.dtype));
  if (!std::filesystem::exists(path)) TS_USER_ERROR("{}: no such model file or directory", path);
  std::unique_ptr<EngineModel> m(new EngineModel());
  m->options_ = options;
  m->source_ = path;
  auto tensors = std::make_shared<std::map<std::string, TesseraExportTensor>>();
  if (std::filesystem::is_regular_file(path) && exporting::is_tessera_export(path)) {
    exporting::TesseraExport e = exporting::read_tessera_export(path);
    m->cfg_ = e.model;
    m->tokenizer_json_ = std::move(e.tokenizer_json);
    m->weight_format_ = e.quant;
    *tensors = std::move(e.tensors);
    for (const auto& [name, t] : *tensors)
      if (t.quantized) {
        m->weight_format_ = t.group == t.cols ? e.quant : fmt::format("{}-g{}", e.quant, t.group);
        break;
      }
  } else {
    exporting::ExportModel e = exporting::load_export_model(path);
    m->cfg_ = e.recipe.model;
    m->tokenizer_json_ = std::move(e.tokenizer_json);
    m->weight_format_ = "f32 (checkpoint)";
    for (auto& [name, t] : e.tensors) {
      TesseraExportTensor& x = (*tensors)[name];
      x.shape = t.shape;
      x.values = std::move(t.data);
    }
  }
  m->cfg_.padded_vocab_size = m->cfg_.vocab_size;  // exported tables have no padding rows
  const TensorSource source{
      [tensors](const std::string& n) { return tensors->count(n) != 0; },
      [tensors](const std::string& n) {  // moved out: the host copy is freed once placed
        TesseraExportTensor t = std::move(tensors->at(n));
        tensors->erase(n);
        return t;
      }};
  EngineModelLoader{*m, source, path}.all();
  return m;
}

std::unique_ptr<EngineModel> EngineModel::synthetic(const ModelConfig& config,
                                                    const SyntheticWeights& w,
                                                    const EngineModelOptions& options) {
  std::unique_ptr<EngineModel> m(new EngineModel());
  m->options_ = options;
  m->cfg_ = config;
  m->cfg_.padded_vocab_size = config.vocab_size;
  m->source_ = "synthetic";
  const bool quantized = w.format == "int8" || w.format == "int4";
  if (!quantized && w.format != "float")
    TS_USER_ERROR("synthetic weights: format '{}' is not float, int8 or int4", w.format);
  m->weight_format_ = quantized && w.group > 0 ? fmt::format("{}-g{}", w.format, w.group)
                      : quantized              ? w.format
                                               : "float";
  // Every parameter of the model by name and shape; the block linears are the ones an int8/int4
  // export quantizes (as exporting::quantized_weight_names: not the router).
  auto shapes = std::make_shared<std::map<std::string, std::vector<int64_t>>>();
  const ParamStore declared = Transformer::declared_params(m->cfg_, ModelShard{});
  for (const Param& p : declared.all()) {
    const Shape s = p.spec.full_shape();
    (*shapes)[p.spec.name] = std::vector<int64_t>(s.dims.begin(), s.dims.begin() + s.ndim);
  }
  auto linears = std::make_shared<std::set<std::string>>();
  for (const Transformer::LinearDecl& l : Transformer::declared_linears(m->cfg_, ModelShard{}))
    if (l.name.find(".router.") == std::string::npos) linears->insert(l.name);
  for (const auto& [name, shape] : *shapes)
    if (name.find(".experts.") != std::string::npos && shape.size() == 3) linears->insert(name);
  const auto take = [shapes, linears, w, quantized](const std::string& name) {
    TesseraExportTensor t;
    t.shape = shapes->at(name);
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    std::mt19937_64 gen(w.seed ^ std::hash<std::string>{}(name));
    std::normal_distribution<float> normal(0.0f, w.std);
    t.values.resize(size_t(n));
    const bool norm =
        name.find("norm") != std::string::npos || name.find(".ln") != std::string::npos;
    for (float& x : t.values) x = norm ? 1.0f : normal(gen);
    if (!quantized || !linears->count(name)) return t;
    t.quantized = true;
    t.bits = w.format == "int8" ? quant::IntBits::int8 : quant::IntBits::int4;
    t.cols = t.shape.back();
    t.rows = n / t.cols;
    t.group = w.group > 0 ? w.group : t.cols;
    t.codes.resize(size_t(n));
    t.scales.resize(size_t(t.rows * (t.cols / t.group)));
    quant::quantize_rows(t.values.data(), t.rows, t.cols, t.bits, t.group, t.codes.data(),
                         t.scales.data());
    t.values.clear();
    return t;
  };
  const TensorSource source{[shapes](const std::string& n) { return shapes->count(n) != 0; }, take};
  EngineModelLoader{*m, source, "synthetic model"}.all();
  return m;
}

}  // namespace tessera
