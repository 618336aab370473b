// begin_distill_step: the curriculum applied to one step (see distill.h).
#include "train/distill.h"

namespace tessera {

DistillWeights begin_distill_step(Run& run, int64_t step) {
  const Recipe& r = run.recipe();
  if (!run.kd_loss()) return {};
  if (!teacher_needed_from(r.distill, step, r.train.steps)) run.free_teacher();
  const DistillWeights w = curriculum_at(r.distill, step, r.train.steps);
  // A step with alpha 0 runs neither the teacher nor the KD term: plain cross-entropy, bit for
  // bit (the objective skips zero-weight terms); with beta 0 the hidden-state term runs nothing.
  run.kd_loss()->set(w.alpha, w.temperature);
  run.model().objective().set_ce_weight(1.0f - w.alpha);
  run.model().hidden_loss().set_weight(w.hidden_weight);
  // From a teacher cache the batches bring the teacher's rows: no model runs for the KD term.
  const bool cached = run.data().teacher_cache() != nullptr;
  const bool needed = (w.alpha > 0.0f && !cached) || w.hidden_weight > 0.0f;
  Teacher* teacher = needed ? run.teacher() : nullptr;
  TS_CHECK(!needed || teacher, "step {}: alpha {}, beta {} but the teacher was freed", step + 1,
           w.alpha, w.hidden_weight);
  run.pipe().set_teacher(teacher);
  return w;
}

}  // namespace tessera
