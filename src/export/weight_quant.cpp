// Tensor selection and quantization for the integer exports (weight_quant.h).
#include "export/weight_quant.h"

#include <algorithm>

#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"
#include "model/transformer.h"

namespace tessera::exporting {

QatSettings qat_settings(const Recipe& r) {
  QatSettings q;
  q.enabled = r.qat.enabled();
  if (!q.enabled) return q;
  q.bits = r.qat.weights == QatBits::int4 ? quant::IntBits::int4 : quant::IntBits::int8;
  q.group_size = r.qat.group_size;  // resolved at parse time: int4 32, int8 0 unless given
  return q;
}

std::vector<std::string> quantized_weight_names(const ExportModel& m) {
  std::vector<std::string> out;
  for (const Transformer::LinearDecl& l :
       Transformer::declared_linears(m.recipe.model, ModelShard{}))
    if (l.name.find(".router.") == std::string::npos) out.push_back(l.name);
  for (const auto& [name, t] : m.tensors)
    if (name.find(".experts.") != std::string::npos && t.shape.size() == 3) out.push_back(name);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool is_quantized_weight(const ExportModel& m, const std::string& name) {
  const std::vector<std::string> names = quantized_weight_names(m);
  return std::binary_search(names.begin(), names.end(), name);
}

int64_t resolve_group_size(const ExportModel& m, quant::IntBits bits, int64_t requested) {
  const QatSettings qat = qat_settings(m.recipe);
  if (requested > 0) {
    if (qat.enabled && qat.bits == bits && qat.group_size != requested)
      log_warn(
          "export: checkpoint {} trained with QAT at group size {}; --group-size {} gives other "
          "integers than the training forward used",
          m.checkpoint_dir,
          qat.group_size == 0 ? std::string("per channel") : std::to_string(qat.group_size),
          requested);
    return requested;
  }
  if (qat.enabled && qat.bits == bits) return qat.group_size;
  if (qat.enabled)
    log_warn("export: checkpoint {} trained with QAT int{}; this int{} export is post-training",
             m.checkpoint_dir, int(qat.bits), int(bits));
  return bits == quant::IntBits::int8 ? 0 : 32;
}

QuantizedWeight quantize_weight(const ExportModel& m, const std::string& name, quant::IntBits bits,
                                int64_t group) {
  const ExportTensor& t = m.at(name);
  TS_CHECK(t.shape.size() >= 2, "quantizing '{}' of rank {}", name, t.shape.size());
  QuantizedWeight q;
  q.shape = t.shape;
  q.cols = t.shape.back();
  q.rows = t.numel() / q.cols;
  q.group = group > 0 ? group : q.cols;
  q.bits = bits;
  if (q.cols % q.group != 0)
    TS_USER_ERROR(
        "export: --group-size {} does not divide the {} input features of '{}' (checkpoint {})",
        q.group, q.cols, name, m.checkpoint_dir);
  std::vector<float> w = t.data;
  round_as_qat_forward(m.recipe, w);
  q.codes.resize(size_t(q.rows * q.cols));
  q.scales.resize(size_t(q.rows * (q.cols / q.group)));
  quant::quantize_rows(w.data(), q.rows, q.cols, bits, q.group, q.codes.data(), q.scales.data());
  return q;
}

void round_as_qat_forward(const Recipe& r, std::vector<float>& w) {
  // QAT fake-quantized the weight the forward read: the master rounded to the compute dtype.
  const Compute compute = r.precision.compute;
  if (!qat_settings(r).enabled || (compute != Compute::bf16 && compute != Compute::fp16)) return;
  for (float& x : w) x = compute == Compute::bf16 ? round_bf16(x) : round_f16(x);
}

}  // namespace tessera::exporting
