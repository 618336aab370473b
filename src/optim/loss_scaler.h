// Dynamic loss scaling for FP16 training: the scale the loss is multiplied by before backward and
// the state machine that moves it on gradient overflow. Pure host logic; the overflow check
// itself (an Inf/NaN in any gradient on any rank, agreed job-wide) and the unscaling of gradients
// are the trainer's. Its config is the recipe's `precision.loss_scale` section
// (LossScalerConfig in config/recipe.h, with the defaults and ranges).
#pragma once
#include <cstdint>

#include "config/recipe.h"

namespace tessera {

// Fails with a bug error naming the field when `cfg` breaks a range above: the recipe reports
// bad values as user errors with file and line, so a bad config reaching here is a broken
// invariant.
void check_loss_scaler_config(const LossScalerConfig& cfg);

// The state machine, once per optimizer step, given found_inf:
//   overflow: skip the step; growth_tracker = 0; hysteresis_left -= 1 (not below 0); when
//             hysteresis_left reaches 0 the scale backs off to max(scale * backoff_factor, min).
//   clean:    growth_tracker += 1; when it reaches growth_interval: growth_tracker = 0,
//             hysteresis_left = hysteresis, scale = min(scale * growth_factor, max).
// So after the first backoff every further overflow backs off again until the scale grows:
// hysteresis is re-armed only by growth, not by a single clean step.
//
// Against Megatron-LM's DynamicGradScaler (megatron/core/optimizer/grad_scaler.py) the decisions
// are the same, with three differences: (1) a `max` clamp on growth (Megatron grows without
// bound); (2) the hysteresis counter stops at 0 where Megatron's keeps going negative (the
// `<= 0` test decides identically, and the state stays bounded for checkpoints); (3) the error
// after max_overflows_at_min consecutive overflows at `min` (Megatron keeps skipping forever).
// Against DeepSpeed's DynamicLossScaler (deepspeed/runtime/fp16/loss_scaler.py): its default,
// consecutive_hysteresis=False, re-arms hysteresis only on growth, as here; with
// consecutive_hysteresis=True any clean step re-arms it, so only `hysteresis` overflows in a row
// back off -- not offered here. DeepSpeed grows every scale_window steps counted from the last
// overflow, which is the same as growth_interval clean steps since the last overflow or growth;
// and with raise_error_at_min_scale it stops at the first overflow at min_scale, which
// max_overflows_at_min = 1 reproduces.
class LossScaler {
 public:
  // Checks `cfg` (check_loss_scaler_config).
  explicit LossScaler(const LossScalerConfig& cfg);

  // The current loss scale: multiply the loss (or the loss gradient seed) by it before backward,
  // and gradients by 1 / scale() before clipping and the optimizer.
  float scale() const { return state_.scale; }
  const LossScalerConfig& config() const { return cfg_; }

  // Called once per optimizer step with the job-wide overflow flag (every rank must pass the same
  // value, or the ranks' scales diverge). Returns true when the step must be skipped, which is
  // exactly when found_inf. Throws a user error when this is the max_overflows_at_min-th
  // consecutive overflowing step taken with the scale already at `min` (the state is updated
  // first, so state() shows the failing step).
  bool update(bool found_inf);

  // Everything needed to resume bitwise: store it in checkpoints.
  struct State {
    float scale = 0.0f;
    int growth_tracker = 0;    // clean steps since the last overflow or growth
    int hysteresis_left = 0;   // overflows left before the next backoff, in [0, hysteresis]
    int64_t steps = 0;         // update() calls
    int64_t skipped = 0;       // of which overflowed (the step was skipped)
    int overflows_at_min = 0;  // consecutive overflowing steps taken with scale == min
    bool operator==(const State&) const = default;
  };
  State state() const { return state_; }

  // Restores a state saved by state(). A state no scaler can reach (non-finite or non-positive
  // scale, negative counters, more skipped steps than steps, more growth_tracker or
  // overflows_at_min steps than clean or skipped steps) is a user error naming the field: the
  // checkpoint is corrupt. A state that only breaks this config's bounds (the recipe's
  // loss_scale changed since the checkpoint) is brought inside them with a warning naming each
  // adjustment: scale clamped to [min, max], growth_tracker to growth_interval - 1,
  // hysteresis_left to hysteresis, overflows_at_min to max_overflows_at_min - 1 (and to 0 when
  // the scale is not at min). Under an unchanged config the load is exact.
  void load(const State& s);

 private:
  LossScalerConfig cfg_;
  State state_;
};

}  // namespace tessera
