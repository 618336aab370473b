// LossScaler state machine: growth after exactly growth_interval clean steps, backoff only after
// `hysteresis` overflows and hysteresis re-armed only by growth (Megatron-LM's rules), the skip
// flag, the min/max clamps, the error after max_overflows_at_min overflows at min, and the
// checkpoint state (round trip, corrupt states, states from a changed config).
#include "optim/loss_scaler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_error;

// Small numbers so each rule shows within a few steps; powers of two so every product is exact.
LossScalerConfig small_config() {
  LossScalerConfig c;
  c.initial = 1024.0f;
  c.growth_factor = 2.0f;
  c.backoff_factor = 0.5f;
  c.growth_interval = 3;
  c.hysteresis = 2;
  c.min = 1.0f;
  c.max = 65536.0f;
  c.max_overflows_at_min = 3;
  return c;
}

void run(LossScaler& s, const std::vector<bool>& found_inf) {
  for (bool inf : found_inf) s.update(inf);
}

TEST(LossScaler, StartsAtInitialWithHysteresisArmed) {
  const LossScaler s(small_config());
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.state(), (LossScaler::State{1024.0f, 0, 2, 0, 0, 0}));
  // The recipe's defaults: 2^16 up to 2^24, Megatron's growth/backoff/interval/hysteresis.
  const LossScaler d{LossScalerConfig{}};
  EXPECT_EQ(d.scale(), 65536.0f);
  EXPECT_EQ(d.config().max, 16777216.0f);
  EXPECT_EQ(d.state().hysteresis_left, 2);
}

TEST(LossScaler, GrowsAfterExactlyGrowthIntervalCleanSteps) {
  LossScaler s(small_config());
  run(s, {false, false});
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.state().growth_tracker, 2);
  s.update(false);
  EXPECT_EQ(s.scale(), 2048.0f);
  EXPECT_EQ(s.state().growth_tracker, 0);
  run(s, {false, false});
  EXPECT_EQ(s.scale(), 2048.0f);
  s.update(false);
  EXPECT_EQ(s.scale(), 4096.0f);
}

TEST(LossScaler, AnOverflowRestartsTheGrowthCount) {
  LossScaler s(small_config());
  run(s, {false, false, true});  // one overflow: hysteresis 2 -> 1, no backoff
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.state().growth_tracker, 0);
  run(s, {false, false});
  EXPECT_EQ(s.scale(), 1024.0f);  // 4 clean steps in all, but only 2 since the overflow
  s.update(false);
  EXPECT_EQ(s.scale(), 2048.0f);
}

TEST(LossScaler, BacksOffOnlyAfterHysteresisOverflows) {
  LossScalerConfig c = small_config();
  c.hysteresis = 3;
  LossScaler s(c);
  run(s, {true, true});
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.state().hysteresis_left, 1);
  s.update(true);
  EXPECT_EQ(s.scale(), 512.0f);
  EXPECT_EQ(s.state().hysteresis_left, 0);
  // Hysteresis spent: every further overflow backs off (Megatron), and the counter stays at 0.
  s.update(true);
  EXPECT_EQ(s.scale(), 256.0f);
  s.update(true);
  EXPECT_EQ(s.scale(), 128.0f);
  EXPECT_EQ(s.state().hysteresis_left, 0);
}

TEST(LossScaler, HysteresisIsReArmedOnlyByGrowth) {
  LossScaler s(small_config());  // hysteresis 2, growth_interval 3
  s.update(true);
  EXPECT_EQ(s.state().hysteresis_left, 1);
  run(s, {false, false});  // clean steps, but no growth: hysteresis stays spent by one
  EXPECT_EQ(s.state().hysteresis_left, 1);
  s.update(true);  // the second overflow since growth, not in a row: backs off
  EXPECT_EQ(s.scale(), 512.0f);
  run(s, {false, false, false});  // growth re-arms hysteresis
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.state().hysteresis_left, 2);
  s.update(true);
  EXPECT_EQ(s.scale(), 1024.0f);
}

TEST(LossScaler, SkipsExactlyTheOverflowingSteps) {
  LossScaler s(small_config());
  const std::vector<bool> pattern = {false, true, false, false, true, true, false, true};
  int64_t num_skipped = 0;
  for (bool inf : pattern) {
    EXPECT_EQ(s.update(inf), inf);
    num_skipped += inf;
  }
  EXPECT_EQ(s.state().steps, int64_t(pattern.size()));
  EXPECT_EQ(s.state().skipped, num_skipped);
}

TEST(LossScaler, GrowthClampsAtMax) {
  LossScalerConfig c = small_config();
  c.initial = 4.0f;
  c.max = 10.0f;  // not a power of two: 4 -> 8 -> 10, not 16
  c.growth_interval = 1;
  LossScaler s(c);
  s.update(false);
  EXPECT_EQ(s.scale(), 8.0f);
  s.update(false);
  EXPECT_EQ(s.scale(), 10.0f);
  s.update(false);
  EXPECT_EQ(s.scale(), 10.0f);
}

TEST(LossScaler, GrowthNearFloatMaxClampsInsteadOfOverflowing) {
  LossScalerConfig c = small_config();
  c.max = std::numeric_limits<float>::max();
  c.initial = c.max / 1.5f;
  c.growth_interval = 1;
  LossScaler s(c);
  s.update(false);  // initial * 2 rounds to +inf
  EXPECT_EQ(s.scale(), c.max);
}

TEST(LossScaler, BackoffClampsAtMin) {
  LossScalerConfig c = small_config();
  c.initial = 4.0f;
  c.min = 3.0f;  // 4 * 0.5 = 2 is below it
  c.hysteresis = 1;
  c.max_overflows_at_min = 100;
  LossScaler s(c);
  s.update(true);
  EXPECT_EQ(s.scale(), 3.0f);
  s.update(true);
  EXPECT_EQ(s.scale(), 3.0f);
}

TEST(LossScaler, AnAbsurdInitialScaleBacksOffEveryStep) {
  LossScalerConfig c = small_config();
  c.initial = std::ldexp(1.0f, 40);
  c.max = c.initial;
  LossScaler s(c);
  // hysteresis 2: the first overflow spends it, then each one halves the scale.
  int num_steps = 0;
  while (s.scale() > 65536.0f) {
    EXPECT_TRUE(s.update(true));
    ++num_steps;
  }
  EXPECT_EQ(num_steps, 1 + 24);
  EXPECT_EQ(s.scale(), 65536.0f);
}

TEST(LossScaler, StopsAfterMaxOverflowsAtMin) {
  LossScalerConfig c = small_config();
  c.initial = 2.0f;
  c.hysteresis = 1;
  LossScaler s(c);  // max_overflows_at_min 3
  s.update(true);   // 2 -> 1: reaching min does not count
  EXPECT_EQ(s.scale(), 1.0f);
  EXPECT_EQ(s.state().overflows_at_min, 0);
  run(s, {true, true});
  EXPECT_EQ(s.state().overflows_at_min, 2);
  const std::string msg = expect_error([&] { s.update(true); }, ErrorKind::user, {});
  for (const char* fragment : {"3 consecutive steps", "precision.loss_scale.min = 1", "step 4",
                               "optim.lr", "data", "bf16"})
    EXPECT_NE(msg.find(fragment), std::string::npos) << fragment << " not in: " << msg;
  EXPECT_EQ(s.state().overflows_at_min, 3);
  EXPECT_EQ(s.state().steps, 4);
  EXPECT_EQ(s.state().skipped, 4);
}

TEST(LossScaler, ACleanStepResetsTheOverflowsAtMinCount) {
  LossScalerConfig c = small_config();
  c.initial = 1.0f;  // already at min
  c.growth_interval = 1000;
  LossScaler s(c);
  run(s, {true, true, false, true, true, false, true, true});
  EXPECT_EQ(s.state().overflows_at_min, 2);
  EXPECT_EQ(s.scale(), 1.0f);
  expect_error([&] { s.update(true); }, ErrorKind::user, {});
}

TEST(LossScaler, MaxOverflowsAtMinOfOneStopsAtTheFirstOverflowAtMin) {
  LossScalerConfig c = small_config();
  c.initial = 1.0f;
  c.max_overflows_at_min = 1;  // DeepSpeed's raise_error_at_min_scale
  LossScaler s(c);
  expect_error([&] { s.update(true); }, ErrorKind::user, {});
}

// A deterministic overflow pattern with bursts (so backoffs happen) and long clean stretches (so
// growth happens).
std::vector<bool> overflow_pattern(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<bool> out;
  while (int(out.size()) < n) {
    const int clean = int(rng() % 9), burst = int(rng() % 4);
    out.insert(out.end(), clean, false);
    out.insert(out.end(), burst, true);
  }
  out.resize(n);
  return out;
}

TEST(LossScaler, StateRoundTripContinuesIdentically) {
  LossScalerConfig c = small_config();
  c.max_overflows_at_min = 1000;
  const std::vector<bool> pattern = overflow_pattern(600, 7);
  LossScaler a(c);
  for (int i = 0; i < 300; ++i) a.update(pattern[i]);
  const LossScaler::State saved = a.state();
  LossScaler b(c);
  ASSERT_NE(b.state(), saved);  // so the comparisons below depend on load()
  b.load(saved);
  EXPECT_EQ(b.state(), saved);
  std::vector<float> scales_seen;
  for (int i = 300; i < 600; ++i) {
    EXPECT_EQ(b.update(pattern[i]), a.update(pattern[i]));
    ASSERT_EQ(b.state(), a.state()) << "step " << i;
    scales_seen.push_back(a.scale());
  }
  // The pattern exercised both directions after the load.
  std::sort(scales_seen.begin(), scales_seen.end());
  EXPECT_LT(scales_seen.front(), scales_seen.back());
}

TEST(LossScaler, LoadRejectsCorruptStates) {
  const LossScalerConfig c = small_config();
  const LossScaler::State good{512.0f, 1, 1, 10, 4, 0};
  LossScaler s(c);
  s.load(good);
  EXPECT_EQ(s.state(), good);
  struct Case {
    const char* field;
    std::function<void(LossScaler::State&)> corrupt;
  };
  const std::vector<Case> cases = {
      {"scale", [](auto& x) { x.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"scale", [](auto& x) { x.scale = std::numeric_limits<float>::infinity(); }},
      {"scale", [](auto& x) { x.scale = 0.0f; }},
      {"scale", [](auto& x) { x.scale = -4.0f; }},
      {"steps", [](auto& x) { x.steps = -1; }},
      {"skipped", [](auto& x) { x.skipped = -1; }},
      {"skipped", [](auto& x) { x.skipped = 11; }},
      {"growth_tracker", [](auto& x) { x.growth_tracker = -1; }},
      {"growth_tracker", [](auto& x) { x.growth_tracker = 7; }},  // > 10 - 4 clean steps
      {"hysteresis_left", [](auto& x) { x.hysteresis_left = -1; }},
      {"overflows_at_min", [](auto& x) { x.overflows_at_min = -1; }},
      {"overflows_at_min", [](auto& x) { x.overflows_at_min = 5; }},  // > 4 skipped
  };
  for (const Case& k : cases) {
    LossScaler::State bad = good;
    k.corrupt(bad);
    const std::string msg = expect_error([&] { s.load(bad); }, ErrorKind::user, {});
    EXPECT_NE(msg.find(std::string(k.field) + " = "), std::string::npos) << msg;
    EXPECT_NE(msg.find("corrupt"), std::string::npos) << msg;
    EXPECT_EQ(s.state(), good) << "a rejected load changed the state: " << msg;
  }
}

TEST(LossScaler, LoadBringsAStateFromAnotherConfigInsideThisOnesBounds) {
  LossScalerConfig c = small_config();  // min 1, max 65536, growth_interval 3, hysteresis 2
  LossScaler s(c);
  s.load({1e6f, 5, 4, 20, 2, 0});
  EXPECT_EQ(s.state(), (LossScaler::State{65536.0f, 2, 2, 20, 2, 0}));
  s.load({0.25f, 0, 0, 20, 10, 7});  // below min; 7 overflows at a min of 0.25
  EXPECT_EQ(s.state(), (LossScaler::State{1.0f, 0, 0, 20, 10, 2}));
  s.load({8.0f, 0, 0, 20, 10, 2});  // overflows "at min" but the scale is above this min
  EXPECT_EQ(s.state().overflows_at_min, 0);
  // The clamped growth tracker grows on the next clean step.
  s.load({8.0f, 9, 2, 20, 10, 0});
  s.update(false);
  EXPECT_EQ(s.scale(), 16.0f);
}

TEST(LossScaler, RejectsAnInvalidConfigAsABug) {
  const std::vector<std::function<void(LossScalerConfig&)>> breakers = {
      [](auto& c) { c.initial = 0; },
      [](auto& c) { c.growth_factor = 1.0f; },
      [](auto& c) { c.backoff_factor = 1.0f; },
      [](auto& c) { c.backoff_factor = 0.0f; },
      [](auto& c) { c.growth_interval = 0; },
      [](auto& c) { c.hysteresis = 0; },
      [](auto& c) { c.min = 2048.0f; },  // > initial
      [](auto& c) { c.max = 512.0f; },   // < initial
      [](auto& c) { c.max = std::numeric_limits<float>::infinity(); },
      [](auto& c) { c.max_overflows_at_min = 0; },
  };
  for (const auto& br : breakers) {
    LossScalerConfig c = small_config();
    br(c);
    expect_error([&] { LossScaler s(c); }, ErrorKind::bug, {});
  }
}

}  // namespace
}  // namespace tessera
