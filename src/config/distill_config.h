// DistillConfig (the recipe's `distill` section): knowledge distillation from a frozen teacher
// checkpoint into the student the rest of the recipe describes, the optional hidden-state loss
// (pairs of student and teacher blocks), and the curriculum — phases of the soft-label weight
// alpha, the temperature and the hidden-loss weight beta (loss = alpha KD + (1 - alpha) CE +
// beta hidden), evaluated per step by curriculum_at(). The teacher is a checkpoint run online
// (distill.teacher) or a top-k cache of its logits (distill.teacher_cache, data/teacher_cache.h);
// neither (the default) means no distillation, and every other key then is an error.
#pragma once
#include <cstdint>
#include <vector>

#include "config/enums.h"
#include "config/field.h"

namespace tessera {

namespace config {
// `r` that applies only when the section's distill.hidden_pairs is not empty.
bool hidden_loss_enabled(const void* distill);
constexpr Rule hidden_loss_rule(Rule r) {
  r.when = hidden_loss_enabled;
  r.when_doc = "distill.hidden_pairs is given";
  return r;
}
}  // namespace config

// clang-format off
#define TESSERA_CURRICULUM_PHASE_FIELDS(X)                                                        \
  X(int, end_step, 0, config::kNonNegative,                                                       \
    "the step this phase ends at (exclusive); give it or end_fraction, except in the last phase") \
  X(float, end_fraction, 0.0f, config::kUnitClosed,                                               \
    "the phase's end as a fraction of train.steps (rounded to a step)")                          \
  X(float, alpha, 1.0f, config::kUnitClosed,                                                      \
    "soft-label weight: loss = alpha KD + (1 - alpha) CE")                                       \
  X(float, temperature, 0.0f, config::or_auto(config::kPositive),                                 \
    "softmax temperature of both distributions; auto: distill.temperature")                      \
  X(CurriculumRamp, ramp, CurriculumRamp::none, config::kAny,                                     \
    "how alpha, temperature and hidden_weight move from the previous phase's values")                           \
  X(int, ramp_steps, 0, config::kNonNegative,                                                     \
    "the ramp's length in steps from the phase's start (linear or cosine)")                      \
  X(float, hidden_weight, -1.0f, config::or_auto(config::kNonNegative, -1.0),                     \
    "weight beta of the hidden-state loss (ramps like alpha); auto: distill.hidden_weight")
// clang-format on

// One phase of a curriculum: its values hold from its start (the previous phase's end, or step 0)
// to its end, after a ramp from the previous phase's values when one is asked for.
struct CurriculumPhase {
  TESSERA_CONFIG_FIELDS(CurriculumPhase, TESSERA_CURRICULUM_PHASE_FIELDS)
};
using Curriculum = std::vector<CurriculumPhase>;

// One pair of the hidden-state loss: the student's residual stream after its first `student`
// blocks against the teacher's after its first `teacher` blocks (1-based block counts: the
// outputs of block `student` and block `teacher`).
// clang-format off
#define TESSERA_HIDDEN_PAIR_FIELDS(X)                                                             \
  X(int, student, 0, config::required(config::kPositive),                                        \
    "the student's residual stream after this many blocks (1 .. model.num_layers)")             \
  X(int, teacher, 0, config::required(config::kPositive),                                        \
    "the teacher's residual stream after this many of its blocks")
// clang-format on

struct DistillHiddenPair {
  TESSERA_CONFIG_FIELDS(DistillHiddenPair, TESSERA_HIDDEN_PAIR_FIELDS)
};

// The seed article's curriculum: soft labels only for the first third of training, then a 70/30
// mix of soft and hard labels, then hard labels only (alpha 1.0 -> 0.7 -> 0.0).
Curriculum default_curriculum();

// clang-format off
#define TESSERA_DISTILL_FIELDS(X)                                                                 \
  X(std::string, teacher, "", config::kAny,                                                       \
    "the online teacher: a Tessera checkpoint step directory, or a run directory (its latest checkpoint)") \
  X(std::string, teacher_cache, "", config::kAny,                                                 \
    "the offline teacher instead: a top-k cache file written by tessera distill-cache (sparse KD, no teacher in memory)") \
  X(TeacherPrecision, teacher_precision, TeacherPrecision::bf16, config::distill_rule(config::kAny), \
    "dtype of the online teacher's weights and forward (no gradients, no optimizer state); fp8: bf16 with FP8 block-linear GEMMs, scaled as precision.fp8") \
  X(float, temperature, 2.0f, config::distill_rule(config::kPositive),                            \
    "softmax temperature of phases that give none (the KD term is scaled by T^2)")              \
  X(bool, reverse_kl, false, config::distill_rule(config::kAny),                                  \
    "KL(student || teacher) instead of the forward KL(teacher || student)")                      \
  X(Curriculum, curriculum, default_curriculum(), config::distill_rule(config::kAny),             \
    "phases of alpha and temperature, in order; default: alpha 1.0, 0.7, 0.0 over thirds of train.steps") \
  X(std::vector<DistillHiddenPair>, hidden_pairs, {},                                              \
    config::distill_rule(config::allow_empty(config::kAny)),                                       \
    "hidden-state loss: pairs {student: S, teacher: L} of residual streams, MSE through a learned projection when the widths differ; empty: none") \
  X(float, hidden_weight, 1.0f, config::hidden_loss_rule(config::kNonNegative),                  \
    "beta of the phases whose hidden_weight is auto")
// clang-format on

struct DistillConfig {
  TESSERA_CONFIG_FIELDS(DistillConfig, TESSERA_DISTILL_FIELDS)
  bool enabled() const { return !teacher.empty() || !teacher_cache.empty(); }
  bool online() const { return !teacher.empty(); }  // a teacher model runs beside the student
  bool has_hidden_loss() const { return enabled() && !hidden_pairs.empty(); }
};

// The curriculum's values for one step.
struct DistillWeights {
  float alpha = 0.0f;          // KD weight; CE gets 1 - alpha
  float temperature = 1.0f;    // T
  float hidden_weight = 0.0f;  // beta of the hidden-state loss (0 without distill.hidden_pairs)
  bool operator==(const DistillWeights&) const = default;
};

// Where each phase ends, in steps (end_fraction resolved against total_steps; a last phase that
// gives no end runs to total_steps).
std::vector<int64_t> curriculum_ends(const DistillConfig& d, int64_t total_steps);
// The values for 0-based `step` of a run of total_steps: the first phase whose end is after
// `step`, or the last phase past every end; within a ramp, interpolated from the previous phase.
DistillWeights curriculum_at(const DistillConfig& d, int64_t step, int64_t total_steps);
// True while some step from `step` on has alpha > 0 or a hidden-loss weight > 0 (once false, the
// teacher can be freed).
bool teacher_needed_from(const DistillConfig& d, int64_t step, int64_t total_steps);

}  // namespace tessera
