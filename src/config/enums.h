// Every option of a recipe that is a choice among names, as an enum with its name table: the
// parser accepts exactly these names, the emitter writes them, docs/RECIPES.md lists them.
// to_string() and enum_from_name() work for any enum that has an EnumNames specialization.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/log.h"
#include "kernels/op_types.h"

namespace tessera {

// The name table of enum E: pairs of (value, name), in the order the docs list them.
template <class E>
struct EnumNames;

template <class E>
concept NamedEnum = requires {
  EnumNames<E>::values;
};

template <NamedEnum E>
const char* to_string(E value) {
  for (const auto& [v, name] : EnumNames<E>::values)
    if (v == value) return name;
  return "?";
}

template <NamedEnum E>
std::optional<E> enum_from_name(std::string_view name) {
  for (const auto& [v, n] : EnumNames<E>::values)
    if (name == n) return v;
  return std::nullopt;
}

template <NamedEnum E>
std::vector<std::string> enum_names() {
  std::vector<std::string> out;
  for (const auto& [v, name] : EnumNames<E>::values) out.push_back(name);
  return out;
}

#define TESSERA_ENUM_NAMES(E, ...)                                       \
  template <>                                                            \
  struct EnumNames<E> {                                                  \
    static constexpr std::pair<E, const char*> values[] = {__VA_ARGS__}; \
  }

// ---- model -------------------------------------------------------------------------------------
enum class ModelFamily { gpt2, llama };
TESSERA_ENUM_NAMES(ModelFamily, {ModelFamily::gpt2, "gpt2"}, {ModelFamily::llama, "llama"});
enum class NormKind { layernorm, rmsnorm };
TESSERA_ENUM_NAMES(NormKind, {NormKind::layernorm, "layernorm"}, {NormKind::rmsnorm, "rmsnorm"});
enum class PositionKind { learned, rope };
TESSERA_ENUM_NAMES(PositionKind, {PositionKind::learned, "learned"}, {PositionKind::rope, "rope"});
enum class ActivationKind { gelu, swiglu };
TESSERA_ENUM_NAMES(ActivationKind, {ActivationKind::gelu, "gelu"},
                   {ActivationKind::swiglu, "swiglu"});

// ---- parallel ----------------------------------------------------------------------------------
enum class PipelineSchedule { gpipe, one_f_one_b };
TESSERA_ENUM_NAMES(PipelineSchedule, {PipelineSchedule::gpipe, "gpipe"},
                   {PipelineSchedule::one_f_one_b, "1f1b"});
// Rank order, innermost (stride 1) axis first (parallel/topology.h draws "tp-dp-pp").
enum class RankOrder { tp_dp_pp, tp_pp_dp, dp_tp_pp, dp_pp_tp, pp_tp_dp, pp_dp_tp };
TESSERA_ENUM_NAMES(RankOrder, {RankOrder::tp_dp_pp, "tp-dp-pp"}, {RankOrder::tp_pp_dp, "tp-pp-dp"},
                   {RankOrder::dp_tp_pp, "dp-tp-pp"}, {RankOrder::dp_pp_tp, "dp-pp-tp"},
                   {RankOrder::pp_tp_dp, "pp-tp-dp"}, {RankOrder::pp_dp_tp, "pp-dp-tp"});

// ---- precision ---------------------------------------------------------------------------------
enum class Compute { fp32, bf16, fp16, fp8 };
TESSERA_ENUM_NAMES(Compute, {Compute::fp32, "fp32"}, {Compute::bf16, "bf16"},
                   {Compute::fp16, "fp16"}, {Compute::fp8, "fp8"});
// Layers kept in FP32 under a narrower compute dtype.
enum class HighPrecisionLayer { embedding, lm_head, router };
TESSERA_ENUM_NAMES(HighPrecisionLayer, {HighPrecisionLayer::embedding, "embedding"},
                   {HighPrecisionLayer::lm_head, "lm_head"},
                   {HighPrecisionLayer::router, "router"});
// The dtype gradients accumulate over micro-batches and reduce over dp in.
enum class GradReduce { fp32, compute };
TESSERA_ENUM_NAMES(GradReduce, {GradReduce::fp32, "fp32"}, {GradReduce::compute, "compute"});
enum class AmaxCompute { max, most_recent };
TESSERA_ENUM_NAMES(AmaxCompute, {AmaxCompute::max, "max"},
                   {AmaxCompute::most_recent, "most_recent"});

// ---- optim -------------------------------------------------------------------------------------
enum class LrScheduleKind { cosine, linear, constant, wsd };
TESSERA_ENUM_NAMES(LrScheduleKind, {LrScheduleKind::cosine, "cosine"},
                   {LrScheduleKind::linear, "linear"}, {LrScheduleKind::constant, "constant"},
                   {LrScheduleKind::wsd, "wsd"});
// Parameter classes that may be exempted from weight decay.
enum class DecayExempt { norms, biases, embeddings };
TESSERA_ENUM_NAMES(DecayExempt, {DecayExempt::norms, "norms"}, {DecayExempt::biases, "biases"},
                   {DecayExempt::embeddings, "embeddings"});

// ---- distill -----------------------------------------------------------------------------------
// The dtype the frozen teacher holds its weights and runs its forward in.
enum class TeacherPrecision { bf16, fp8, fp32 };
TESSERA_ENUM_NAMES(TeacherPrecision, {TeacherPrecision::bf16, "bf16"},
                   {TeacherPrecision::fp8, "fp8"}, {TeacherPrecision::fp32, "fp32"});
// How a curriculum phase's values are reached from the previous phase's: at once, or along a
// linear or cosine ramp over the phase's first ramp_steps steps.
enum class CurriculumRamp { none, linear, cosine };
TESSERA_ENUM_NAMES(CurriculumRamp, {CurriculumRamp::none, "none"},
                   {CurriculumRamp::linear, "linear"}, {CurriculumRamp::cosine, "cosine"});

// ---- qat ---------------------------------------------------------------------------------------
// The integer format fake quantization trains against (kernels/quant_math.h); none: QAT off.
enum class QatBits { none, int8, int4 };
TESSERA_ENUM_NAMES(QatBits, {QatBits::none, "none"}, {QatBits::int8, "int8"},
                   {QatBits::int4, "int4"});
enum class QatActivations { none, int8 };
TESSERA_ENUM_NAMES(QatActivations, {QatActivations::none, "none"}, {QatActivations::int8, "int8"});
// Which linears QAT fake-quantizes: attention (q, k, v, o), the dense MLP, the routed experts
// (grouped GEMMs), the shared experts, and, opt-in, the LM head and the embedding (not built).
enum class QatLayer { attention, mlp, experts, shared_experts, lm_head, embedding };
TESSERA_ENUM_NAMES(QatLayer, {QatLayer::attention, "attention"}, {QatLayer::mlp, "mlp"},
                   {QatLayer::experts, "experts"}, {QatLayer::shared_experts, "shared_experts"},
                   {QatLayer::lm_head, "lm_head"}, {QatLayer::embedding, "embedding"});

// ---- train / logging ---------------------------------------------------------------------------
enum class DeviceChoice { cpu, cuda, auto_ };
TESSERA_ENUM_NAMES(DeviceChoice, {DeviceChoice::cpu, "cpu"}, {DeviceChoice::cuda, "cuda"},
                   {DeviceChoice::auto_, "auto"});
// How attention runs on CUDA (kernels/op_types.h): cuDNN's fused SDPA or Tessera's own kernel.
TESSERA_ENUM_NAMES(ops::AttentionImpl, {ops::AttentionImpl::cudnn, "cudnn"},
                   {ops::AttentionImpl::native, "native"});
TESSERA_ENUM_NAMES(LogLevel, {LogLevel::debug, "debug"}, {LogLevel::info, "info"},
                   {LogLevel::warn, "warn"}, {LogLevel::error, "error"});

#undef TESSERA_ENUM_NAMES

}  // namespace tessera
