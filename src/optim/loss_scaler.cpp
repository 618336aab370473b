// The dynamic loss scaler's state machine (see loss_scaler.h for the rules and how they compare
// with Megatron-LM and DeepSpeed), its config check and the checkpoint state check.
#include "optim/loss_scaler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/log.h"

namespace tessera {

void check_loss_scaler_config(const LossScalerConfig& c) {
  TS_CHECK(std::isfinite(c.initial) && c.initial > 0, "loss_scale.initial = {}: expected > 0",
           c.initial);
  TS_CHECK(std::isfinite(c.growth_factor) && c.growth_factor > 1,
           "loss_scale.growth_factor = {}: expected > 1", c.growth_factor);
  TS_CHECK(c.backoff_factor > 0 && c.backoff_factor < 1,
           "loss_scale.backoff_factor = {}: expected in (0, 1)", c.backoff_factor);
  TS_CHECK(c.growth_interval >= 1, "loss_scale.growth_interval = {}: expected >= 1",
           c.growth_interval);
  TS_CHECK(c.hysteresis >= 1, "loss_scale.hysteresis = {}: expected >= 1", c.hysteresis);
  TS_CHECK(std::isfinite(c.min) && c.min > 0 && c.min <= c.initial,
           "loss_scale.min = {}: expected > 0 and <= loss_scale.initial = {}", c.min, c.initial);
  TS_CHECK(std::isfinite(c.max) && c.max >= c.initial,
           "loss_scale.max = {}: expected >= loss_scale.initial = {}", c.max, c.initial);
  TS_CHECK(c.max_overflows_at_min >= 1, "loss_scale.max_overflows_at_min = {}: expected >= 1",
           c.max_overflows_at_min);
}

LossScaler::LossScaler(const LossScalerConfig& cfg) : cfg_(cfg) {
  check_loss_scaler_config(cfg_);
  state_.scale = cfg_.initial;
  state_.hysteresis_left = cfg_.hysteresis;
}

bool LossScaler::update(bool found_inf) {
  State& s = state_;
  ++s.steps;
  if (!found_inf) {
    s.overflows_at_min = 0;
    if (++s.growth_tracker >= cfg_.growth_interval) {
      s.growth_tracker = 0;
      s.hysteresis_left = cfg_.hysteresis;
      // scale * growth_factor may round to +inf near FLT_MAX; the clamp brings it back to max.
      s.scale = std::min(s.scale * cfg_.growth_factor, cfg_.max);
    }
    return false;
  }
  ++s.skipped;
  // "At min" is judged before this step's backoff: the step that first reaches min does not
  // count, so max_overflows_at_min overflows are tolerated at the floor itself.
  const bool was_at_min = s.scale <= cfg_.min;
  s.growth_tracker = 0;
  if (s.hysteresis_left > 0) --s.hysteresis_left;
  if (s.hysteresis_left == 0) s.scale = std::max(s.scale * cfg_.backoff_factor, cfg_.min);
  s.overflows_at_min = was_at_min ? s.overflows_at_min + 1 : 0;
  if (s.overflows_at_min >= cfg_.max_overflows_at_min)
    TS_USER_ERROR(
        "loss scaling: {} consecutive steps had Inf/NaN gradients with the loss scale already at "
        "its floor precision.loss_scale.min = {} (step {}; {} of {} steps skipped): the gradients "
        "overflow FP16 even when barely scaled, so the run has diverged. Lower optim.lr (or "
        "lengthen optim.warmup_steps), check the data for corrupt batches, or train with "
        "precision.compute: bf16, whose range needs no loss scaling",
        s.overflows_at_min, cfg_.min, s.steps, s.skipped, s.steps);
  return true;
}

void LossScaler::load(const State& in) {
  // Intrinsic consistency: no sequence of update() calls under any config produces these.
  auto corrupt = [](const char* field, auto value, const char* expected) {
    TS_USER_ERROR("checkpoint loss scaler state is corrupt: {} = {}, expected {}", field, value,
                  expected);
  };
  if (!std::isfinite(in.scale) || in.scale <= 0) corrupt("scale", in.scale, "a finite value > 0");
  if (in.steps < 0) corrupt("steps", in.steps, ">= 0");
  if (in.skipped < 0 || in.skipped > in.steps)
    corrupt("skipped", in.skipped, fmt::format("in [0, steps = {}]", in.steps).c_str());
  if (in.growth_tracker < 0 || in.growth_tracker > in.steps - in.skipped)
    corrupt("growth_tracker", in.growth_tracker,
            fmt::format("in [0, clean steps = {}]", in.steps - in.skipped).c_str());
  if (in.hysteresis_left < 0) corrupt("hysteresis_left", in.hysteresis_left, ">= 0");
  if (in.overflows_at_min < 0 || in.overflows_at_min > in.skipped)
    corrupt("overflows_at_min", in.overflows_at_min,
            fmt::format("in [0, skipped = {}]", in.skipped).c_str());

  // Bounds of this config, which may differ from the one the checkpoint was written under.
  State s = in;
  auto adjust = [](const char* field, auto from, auto to, const std::string& why) {
    log_warn(
        "loss scaler state from the checkpoint: {} {} -> {} ({}; precision.loss_scale "
        "changed since the checkpoint was written?)",
        field, from, to, why);
  };
  const float clamped = std::clamp(s.scale, cfg_.min, cfg_.max);
  if (clamped != s.scale) {
    adjust("scale", s.scale, clamped,
           fmt::format("outside [min, max] = [{}, {}]", cfg_.min, cfg_.max));
    s.scale = clamped;
  }
  if (s.growth_tracker >= cfg_.growth_interval) {
    adjust("growth_tracker", s.growth_tracker, cfg_.growth_interval - 1,
           fmt::format("growth_interval is {}", cfg_.growth_interval));
    s.growth_tracker = cfg_.growth_interval - 1;
  }
  if (s.hysteresis_left > cfg_.hysteresis) {
    adjust("hysteresis_left", s.hysteresis_left, cfg_.hysteresis,
           fmt::format("hysteresis is {}", cfg_.hysteresis));
    s.hysteresis_left = cfg_.hysteresis;
  }
  if (s.overflows_at_min > 0 && s.scale > cfg_.min) {
    adjust("overflows_at_min", s.overflows_at_min, 0,
           fmt::format("the scale {} is above min {}", s.scale, cfg_.min));
    s.overflows_at_min = 0;
  }
  if (s.overflows_at_min >= cfg_.max_overflows_at_min) {
    adjust("overflows_at_min", s.overflows_at_min, cfg_.max_overflows_at_min - 1,
           fmt::format("max_overflows_at_min is {}", cfg_.max_overflows_at_min));
    s.overflows_at_min = cfg_.max_overflows_at_min - 1;
  }
  state_ = s;
}

}  // namespace tessera
