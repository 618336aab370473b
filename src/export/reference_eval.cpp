// Reference evaluation of exported weights: weight rounding as the export stores it, a CPU f32
// Transformer loaded with them, windowed perplexity in double, greedy generation, .npy output.
#include "export/reference_eval.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "core/error.h"
#include "export/gguf_blocks.h"
#include "export/gguf_writer.h"
#include "export/weight_quant.h"
#include "io/fs_util.h"
#include "kernels/quantize.h"
#include "model/transformer.h"
#include "train/generate.h"

namespace tessera::exporting {

const char* weight_quant_name(WeightQuant q) {
  switch (q) {
    case WeightQuant::f32: return "f32";
    case WeightQuant::f16: return "f16";
    case WeightQuant::bf16: return "bf16";
    case WeightQuant::q8_0: return "q8_0";
    case WeightQuant::q4_0: return "q4_0";
    case WeightQuant::int8: return "int8";
    case WeightQuant::int4: return "int4";
  }
  return "?";
}

namespace {

bool is_gguf_type(WeightQuant q, GgufType* out) {
  switch (q) {
    case WeightQuant::f16: *out = GgufType::f16; return true;
    case WeightQuant::bf16: *out = GgufType::bf16; return true;
    case WeightQuant::q8_0: *out = GgufType::q8_0; return true;
    case WeightQuant::q4_0: *out = GgufType::q4_0; return true;
    default: return false;
  }
}

// Row-wise integer quantization and back (int8 / int4 in groups of `group` along the row).
std::vector<float> int_round_trip(const ExportTensor& t, quant::IntBits bits, int64_t group) {
  const int64_t cols = t.shape.back(), rows = t.numel() / cols;
  std::vector<int8_t> codes(static_cast<size_t>(t.numel()));
  std::vector<uint16_t> scales(static_cast<size_t>(rows * (cols / group)));
  quant::quantize_rows(t.data.data(), rows, cols, bits, group, codes.data(), scales.data());
  std::vector<float> out(static_cast<size_t>(t.numel()));
  quant::dequantize_rows(codes.data(), scales.data(), rows, cols, group, out.data());
  return out;
}

}  // namespace

std::map<std::string, ExportTensor> reference_weights(const ExportModel& m, WeightQuant quant,
                                                      int group_size, const std::string& where) {
  std::map<std::string, ExportTensor> out = m.tensors;
  if (quant == WeightQuant::f32) return out;
  GgufType gguf;
  const bool as_gguf = is_gguf_type(quant, &gguf);
  for (auto& [name, t] : out) {
    const int64_t cols = t.shape.back(), rows = t.numel() / cols;
    const TensorRole role = tensor_role(name, t.shape.size());
    if (as_gguf) {
      const GgmlType gt = gguf_storage_type(gguf, role, cols);
      if (gt == GgmlType::q8_0 || gt == GgmlType::q4_0) round_as_qat_forward(m.recipe, t.data);
      const std::vector<uint8_t> packed = pack_gguf_rows(gt, t.data.data(), rows, cols);
      t.data = unpack_gguf_rows(gt, packed.data(), rows, cols);
      continue;
    }
    if (role != TensorRole::block_linear) continue;
    const bool int8 = quant == WeightQuant::int8;
    const quant::IntBits bits = int8 ? quant::IntBits::int8 : quant::IntBits::int4;
    const int64_t resolved = resolve_group_size(m, bits, group_size);  // the export's default
    const int64_t group = resolved > 0 ? resolved : cols;
    if (cols % group != 0)
      TS_USER_ERROR("{}: group size {} does not divide the {} input features of {}", where, group,
                    cols, name);
    round_as_qat_forward(m.recipe, t.data);
    t.data = int_round_trip(t, bits, group);
  }
  return out;
}

double PerplexityResult::perplexity() const {
  return tokens_scored > 0 ? std::exp(nll_sum / double(tokens_scored)) : NAN;
}

ReferenceModel::ReferenceModel(const ExportModel& m, WeightQuant quant, int group_size, int ctx,
                               const std::string& where) {
  ModelConfig cfg = m.recipe.model;
  cfg.padded_vocab_size = cfg.vocab_size;  // the export model's tables have no padding rows
  vocab_ = cfg.vocab_size;
  ctx_ = ctx > 0 ? ctx : cfg.max_seq_len;
  if (ctx_ > cfg.max_seq_len)
    TS_USER_ERROR("{}: --ctx {} is longer than the model's max_seq_len {}", where, ctx_,
                  cfg.max_seq_len);
  const std::map<std::string, ExportTensor> weights =
      reference_weights(m, quant, group_size, where);
  model_ = std::make_unique<Transformer>(cfg, DType::f32, Device::cpu);
  for (Param& p : model_->params().all()) {
    const auto it = weights.find(p.spec.name);
    TS_CHECK(it != weights.end(), "{}: no tensor {} in the export model", where, p.spec.name);
    TS_CHECK(int64_t(it->second.data.size()) == p.spec.shape.numel(),
             "{}: {} has {} values, the "
             "model {}",
             where, p.spec.name, it->second.data.size(), p.spec.shape.numel());
    std::memcpy(p.value.data, it->second.data.data(), it->second.data.size() * sizeof(float));
  }
  acts_ = std::make_unique<Activations>(*model_, 1, ctx_, /*training=*/false);
}

ReferenceModel::~ReferenceModel() = default;

PerplexityResult ReferenceModel::perplexity(const std::vector<int32_t>& tokens,
                                            std::vector<float>* logits_out) const {
  PerplexityResult r;
  std::vector<int32_t> window(ctx_);
  Tensor ids(window.data(), DType::i32, Device::cpu, {1, ctx_});
  const int64_t V = vocab_;
  for (size_t start = 0; start + 1 < tokens.size(); start += size_t(ctx_)) {
    const int n = int(std::min<size_t>(size_t(ctx_), tokens.size() - start));
    if (n < 2) break;
    std::fill(window.begin(), window.end(), 0);  // causal: padding after n cannot reach 0..n-1
    std::copy(tokens.begin() + start, tokens.begin() + start + n, window.begin());
    model_->forward(*acts_, ids, Tensor());
    const float* logits = static_cast<const float*>(model_->logits(*acts_).data);  // (ctx, V)
    for (int t = 0; t + 1 < n; ++t) {
      const float* row = logits + int64_t(t) * V;
      const int64_t best = std::max_element(row, row + V) - row;
      const double mx = row[best];
      double sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      const double nll = std::log(sum) + mx - double(row[window[t + 1]]);
      r.nll_sum += nll;
      r.nll.push_back(float(nll));
      r.top1.push_back(int32_t(best));
      ++r.tokens_scored;
      if (logits_out) logits_out->insert(logits_out->end(), row, row + V);
    }
  }
  return r;
}

std::vector<int32_t> ReferenceModel::greedy(const std::vector<int32_t>& prompt,
                                            int num_tokens) const {
  TS_CHECK(int(prompt.size()) + num_tokens <= ctx_, "greedy: {} + {} tokens exceed the window {}",
           prompt.size(), num_tokens, ctx_);
  return generate(*model_, *acts_, prompt, num_tokens, /*temperature=*/0.0f, /*seed=*/0,
                  /*stop_token=*/-1);
}

void write_npy_f32(const std::string& path, const std::vector<float>& values, int64_t rows,
                   int64_t cols) {
  TS_CHECK(int64_t(values.size()) == rows * cols, "npy: {} values for ({}, {})", values.size(),
           rows, cols);
  std::string header =
      fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", rows, cols);
  // Magic (6) + version (2) + length (2) + header, padded with spaces and a newline to 64 bytes.
  const size_t total = (10 + header.size() + 1 + 63) / 64 * 64;
  header.append(total - 10 - header.size() - 1, ' ');
  header += '\n';
  std::string prefix("\x93NUMPY\x01\x00", 8);
  prefix += char(header.size() & 0xff);
  prefix += char(header.size() >> 8);
  io::TempPath tmp(path);
  FILE* f = std::fopen(tmp.path.c_str(), "wb");
  if (!f) TS_SYSTEM_ERROR("cannot create {}: {}", tmp.path, std::strerror(errno));
  const bool ok = std::fwrite(prefix.data(), 1, prefix.size(), f) == prefix.size() &&
                  std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
                  std::fwrite(values.data(), sizeof(float), values.size(), f) == values.size() &&
                  std::fflush(f) == 0;
  const int err = errno;
  std::fclose(f);
  if (!ok) TS_SYSTEM_ERROR("writing {}: {}", tmp.path, std::strerror(err));
  io::fsync_file(tmp.path);
  io::rename_path(tmp.path, path);
  tmp.committed = true;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  io::fsync_dir(parent.empty() ? "." : parent.string());
}

}  // namespace tessera::exporting
