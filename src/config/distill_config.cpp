// The curriculum of a distillation: the default phases, phase ends in steps, and the values of a
// step (with linear and cosine ramps between phases), including the hidden-loss weight.
#include "config/distill_config.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace tessera {

namespace config {
bool distill_enabled(const void* d) { return static_cast<const DistillConfig*>(d)->enabled(); }
bool hidden_loss_enabled(const void* d) {
  return !static_cast<const DistillConfig*>(d)->hidden_pairs.empty();
}
}  // namespace config

Curriculum default_curriculum() {
  CurriculumPhase soft, mixed, hard;
  soft.end_fraction = 1.0f / 3.0f;
  soft.alpha = 1.0f;
  mixed.end_fraction = 2.0f / 3.0f;
  mixed.alpha = 0.7f;
  hard.alpha = 0.0f;
  return {soft, mixed, hard};
}

std::vector<int64_t> curriculum_ends(const DistillConfig& d, int64_t total_steps) {
  std::vector<int64_t> ends;
  for (const CurriculumPhase& p : d.curriculum) {
    if (p.end_step > 0)
      ends.push_back(p.end_step);
    else if (p.end_fraction > 0.0f)
      ends.push_back(std::llround(double(p.end_fraction) * double(total_steps)));
    else
      ends.push_back(total_steps);  // the last phase may run to the end (checked by the parser)
  }
  return ends;
}

namespace {

float phase_temperature(const DistillConfig& d, const CurriculumPhase& p) {
  return p.temperature > 0.0f ? p.temperature : d.temperature;
}

// beta: the phase's own (auto is negative), distill.hidden_weight, or 0 without hidden pairs.
float phase_hidden_weight(const DistillConfig& d, const CurriculumPhase& p) {
  if (d.hidden_pairs.empty()) return 0.0f;
  return p.hidden_weight >= 0.0f ? p.hidden_weight : d.hidden_weight;
}

// Whether a phase's values need the teacher: soft labels or a hidden-state loss.
bool phase_needs_teacher(const DistillConfig& d, const CurriculumPhase& p) {
  return p.alpha > 0.0f || phase_hidden_weight(d, p) > 0.0f;
}

// The fraction of the way from the previous phase's values to this one's, `into` steps after
// the phase began.
double ramp_weight(const CurriculumPhase& p, int64_t into) {
  if (p.ramp == CurriculumRamp::none || p.ramp_steps <= 0 || into >= p.ramp_steps) return 1.0;
  const double x = double(into) / double(p.ramp_steps);
  if (p.ramp == CurriculumRamp::linear) return x;
  return 0.5 * (1.0 - std::cos(std::numbers::pi * x));
}

}  // namespace

DistillWeights curriculum_at(const DistillConfig& d, int64_t step, int64_t total_steps) {
  const Curriculum& c = d.curriculum;
  if (c.empty()) return {};
  const std::vector<int64_t> ends = curriculum_ends(d, total_steps);
  size_t i = 0;
  while (i + 1 < c.size() && step >= ends[i]) ++i;
  const CurriculumPhase& p = c[i];
  DistillWeights w{p.alpha, phase_temperature(d, p), phase_hidden_weight(d, p)};
  if (i == 0) return w;
  const double t = ramp_weight(p, step - ends[i - 1]);
  if (t >= 1.0) return w;
  const CurriculumPhase& prev = c[i - 1];
  const auto mix = [t](double a, double b) { return float(a + t * (b - a)); };
  return {mix(prev.alpha, p.alpha), mix(phase_temperature(d, prev), w.temperature),
          mix(phase_hidden_weight(d, prev), w.hidden_weight)};
}

bool teacher_needed_from(const DistillConfig& d, int64_t step, int64_t total_steps) {
  if (!d.enabled()) return false;
  const std::vector<int64_t> ends = curriculum_ends(d, total_steps);
  for (size_t i = 0; i < d.curriculum.size(); ++i) {
    const bool last = i + 1 == d.curriculum.size();
    if (!last && ends[i] <= step) continue;  // over before `step`
    const CurriculumPhase& p = d.curriculum[i];
    // A ramp into this phase carries the previous phase's alpha and beta in with it until it ends.
    const bool ramped_in = i > 0 && p.ramp != CurriculumRamp::none &&
                           step < ends[i - 1] + p.ramp_steps &&
                           phase_needs_teacher(d, d.curriculum[i - 1]);
    if (phase_needs_teacher(d, p) || ramped_in) return true;
  }
  return false;
}

}  // namespace tessera
