// Pipeline schedules without MPI: properties of GPipe and 1F1B for 1..8 stages and 1..16
// microbatches, the unit-time bubble against (p-1)/(m+p-1), the 4 x 8 1F1B schedule by hand, and
// mutated schedules (deadlock, dropped/duplicated/reordered actions) the validator must reject.
#include "parallel/pipeline_schedule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"

namespace tessera {
namespace {

using Schedules = std::vector<std::vector<PipeAction>>;
constexpr int kMaxStages = 8, kMaxMicrobatches = 16;

Schedules all_stages(PipelineSchedule kind, int num_stages, int num_microbatches) {
  Schedules out;
  for (int s = 0; s < num_stages; ++s)
    out.push_back(make_schedule(kind, s, num_stages, num_microbatches));
  return out;
}

int index_of(const std::vector<PipeAction>& actions, PipeOp op, int m) {
  const auto it = std::find(actions.begin(), actions.end(), PipeAction{op, m});
  return it == actions.end() ? -1 : int(it - actions.begin());
}

// Removes the action at `from` and reinserts it so it lands at index `to` of the result.
void move_action(std::vector<PipeAction>& actions, int from, int to) {
  const PipeAction a = actions.at(from);
  actions.erase(actions.begin() + from);
  actions.insert(actions.begin() + to, a);
}

void expect_rejected(const ScheduleCheck& check, const std::string& needle) {
  EXPECT_FALSE(check.ok);
  EXPECT_NE(check.error.find(needle), std::string::npos)
      << "error: '" << check.error << "'\nexpected to contain: '" << needle << "'";
}

TEST(PipelineSchedule, RecipeNames) {
  EXPECT_EQ(enum_from_name<PipelineSchedule>("gpipe"), PipelineSchedule::gpipe);
  EXPECT_EQ(enum_from_name<PipelineSchedule>("1f1b"), PipelineSchedule::one_f_one_b);
  EXPECT_STREQ(to_string(PipelineSchedule::one_f_one_b), "1f1b");
  EXPECT_EQ(enum_from_name<PipelineSchedule>("interleaved"), std::nullopt);
}

class ScheduleProperties : public ::testing::TestWithParam<PipelineSchedule> {};

// Every stage of every (num_stages, M): validation passes; each microbatch is forwarded and
// backwarded exactly once, backward after forward (counted here, independently of the validator);
// no p2p past the ends; peak live activations match the closed forms.
TEST_P(ScheduleProperties, ValidForAllSizes) {
  const PipelineSchedule kind = GetParam();
  for (int p = 1; p <= kMaxStages; ++p) {
    for (int M = 1; M <= kMaxMicrobatches; ++M) {
      SCOPED_TRACE(testing::Message() << "p=" << p << " M=" << M);
      const Schedules stages = all_stages(kind, p, M);
      const ScheduleCheck check = validate_schedules(stages, M);
      ASSERT_TRUE(check.ok) << check.error;
      for (int s = 0; s < p; ++s) {
        const auto& acts = stages[s];
        for (int m = 0; m < M; ++m) {
          EXPECT_EQ(std::count(acts.begin(), acts.end(), PipeAction{PipeOp::forward, m}), 1);
          EXPECT_EQ(std::count(acts.begin(), acts.end(), PipeAction{PipeOp::backward, m}), 1);
          EXPECT_LT(index_of(acts, PipeOp::forward, m), index_of(acts, PipeOp::backward, m));
        }
        for (const PipeAction& a : acts) {
          const bool to_prev = a.op == PipeOp::recv_forward || a.op == PipeOp::send_backward;
          const bool to_next = a.op == PipeOp::send_forward || a.op == PipeOp::recv_backward;
          EXPECT_FALSE(s == 0 && to_prev);
          EXPECT_FALSE(s == p - 1 && to_next);
        }
        const int expected_peak = kind == PipelineSchedule::gpipe ? M : std::min(p - s, M);
        EXPECT_EQ(check.peak_live[s], expected_peak) << "stage " << s;
        EXPECT_EQ(peak_live_microbatches(kind, s, p, M), expected_peak) << "stage " << s;
        EXPECT_EQ(check.busy_time[s], M * (kForwardTime + kBackwardTime));
      }
    }
  }
}

// Unit time, forward 1 and backward 2, communication free. GPipe: the last stage finishes its
// forwards at (p-1) + M; gradient 0 then needs 2 per stage to reach stage 0, which then runs M
// backwards back to back, so makespan = (p-1) + M + 2(p-1) + 2M = 3(M + p - 1) exactly, every
// stage is busy 3M, and each stage's idle fraction is 3(p-1) / 3(M+p-1) = (p-1)/(M+p-1).
// 1F1B reorders the same work without lengthening the step: the same makespan, hence the same
// bubble (its gain is memory: see peak live above).
TEST_P(ScheduleProperties, UnitTimeBubbleMatchesTheory) {
  const PipelineSchedule kind = GetParam();
  for (int p = 1; p <= kMaxStages; ++p) {
    for (int M = 1; M <= kMaxMicrobatches; ++M) {
      SCOPED_TRACE(testing::Message() << "p=" << p << " M=" << M);
      const ScheduleCheck check = validate_schedules(all_stages(kind, p, M), M);
      ASSERT_TRUE(check.ok) << check.error;
      EXPECT_EQ(check.makespan(), 3 * (M + p - 1));
      EXPECT_EQ(check.finish_time[0], check.makespan());  // stage 0 runs the last backward
      for (int s = 0; s < p; ++s)
        EXPECT_NEAR(check.idle_fraction(s), theoretical_bubble(p, M), 1e-12) << "stage " << s;
    }
  }
}

// One buffer per direction suffices for both generated schedules (the executor uses two).
TEST_P(ScheduleProperties, ValidWithSingleSendBuffer) {
  for (int p = 1; p <= kMaxStages; ++p) {
    for (int M = 1; M <= kMaxMicrobatches; ++M) {
      const ScheduleCheck check = validate_schedules(all_stages(GetParam(), p, M), M, 1);
      EXPECT_TRUE(check.ok) << "p=" << p << " M=" << M << ": " << check.error;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, ScheduleProperties,
                         ::testing::Values(PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b),
                         [](const auto& info) {
                           return info.param == PipelineSchedule::gpipe ? "gpipe" : "one_f_one_b";
                         });

// 4 stages, 8 microbatches, 1F1B, written by hand: stage s warms up with 3 - s forwards, then
// alternates, then cools down with the same number of backwards.
TEST(PipelineSchedule, OneFOneBFourStagesEightMicrobatches) {
  const std::vector<std::string> expected = {
      "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
      "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
      "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
      "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
  };
  for (int s = 0; s < 4; ++s)
    EXPECT_EQ(to_string(make_schedule(PipelineSchedule::one_f_one_b, s, 4, 8)), expected[s]) << s;
  // With the p2p actions: a middle stage receives before and sends after each compute.
  EXPECT_EQ(to_string(make_schedule(PipelineSchedule::one_f_one_b, 2, 4, 3), true),
            "RF0 F0 SF0 RF1 F1 SF1 RB0 B0 SB0 RF2 F2 SF2 RB1 B1 SB1 RB2 B2 SB2");
  EXPECT_EQ(to_string(make_schedule(PipelineSchedule::gpipe, 0, 2, 2), true),
            "F0 SF0 F1 SF1 RB0 B0 RB1 B1");
}

// Run `body(kind, p, M)` over a range of sizes with at least two stages (mutations need p2p).
template <typename Body>
void for_pipelines(Body body) {
  for (PipelineSchedule kind : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b}) {
    for (int p = 2; p <= 5; ++p) {
      for (int M = 1; M <= 8; ++M) {
        SCOPED_TRACE(testing::Message() << to_string(kind) << " p=" << p << " M=" << M);
        body(kind, p, M);
      }
    }
  }
}

// Stage s waits for gradient 0 before sending activation 0, which stage s+1 needs to make it.
TEST(PipelineScheduleMutation, SwappedSendAndRecvDeadlocks) {
  for_pipelines([](PipelineSchedule kind, int p, int M) {
    for (int s = 0; s + 1 < p; ++s) {
      Schedules stages = all_stages(kind, p, M);
      auto& acts = stages[s];
      const int send = index_of(acts, PipeOp::send_forward, 0);
      const int recv = index_of(acts, PipeOp::recv_backward, 0);
      std::swap(acts[send], acts[recv]);
      const ScheduleCheck check = validate_schedules(stages, M);
      expect_rejected(check, "deadlock: ");
      expect_rejected(
          check, fmt::format("stage {} action {} (recv_backward microbatch 0) waits", s, send));
      expect_rejected(check,
                      fmt::format("stage {} action 0 (recv_forward microbatch 0) waits", s + 1));
    }
  });
}

TEST(PipelineScheduleMutation, DroppedSendIsMissing) {
  for_pipelines([](PipelineSchedule kind, int p, int M) {
    for (int s = 0; s < p; ++s) {
      const auto reference = make_schedule(kind, s, p, M);
      for (int i = 0; i < int(reference.size()); ++i) {
        const PipeAction a = reference[i];
        if (a.op != PipeOp::send_forward && a.op != PipeOp::send_backward) continue;
        Schedules stages = all_stages(kind, p, M);
        stages[s].erase(stages[s].begin() + i);
        expect_rejected(validate_schedules(stages, M),
                        fmt::format("stage {}: {} of microbatch {} is missing", s,
                                    pipe_op_name(a.op), a.microbatch));
      }
    }
  });
}

TEST(PipelineScheduleMutation, DuplicatedForward) {
  for_pipelines([](PipelineSchedule kind, int p, int M) {
    for (int s = 0; s < p; ++s) {
      for (int m = 0; m < M; ++m) {
        Schedules stages = all_stages(kind, p, M);
        const int f = index_of(stages[s], PipeOp::forward, m);
        stages[s].insert(stages[s].begin() + f + 1, PipeAction{PipeOp::forward, m});
        expect_rejected(
            validate_schedules(stages, M),
            fmt::format("stage {} action {} (forward microbatch {}): appears twice", s, f + 1, m));
      }
    }
  });
}

TEST(PipelineScheduleMutation, BackwardBeforeItsForward) {
  for_pipelines([](PipelineSchedule kind, int p, int M) {
    for (int s = 0; s < p; ++s) {
      for (int m = 0; m < M; ++m) {
        Schedules stages = all_stages(kind, p, M);
        const int f = index_of(stages[s], PipeOp::forward, m);
        move_action(stages[s], index_of(stages[s], PipeOp::backward, m), f);
        expect_rejected(validate_schedules(stages, M),
                        fmt::format("stage {} action {} (backward microbatch {}): backward before "
                                    "its own forward",
                                    s, f, m));
      }
    }
  });
}

// Stage s sends m+1 before m (both computed, so each stage's own order is fine); the neighbour
// receives in posting order and finds the wrong microbatch. Both directions.
TEST(PipelineScheduleMutation, SendsOutOfOrder) {
  for_pipelines([](PipelineSchedule kind, int p, int M) {
    for (int s = 0; s < p; ++s) {
      for (int m = 0; m + 1 < M; ++m) {
        for (PipeOp op : {PipeOp::send_forward, PipeOp::send_backward}) {
          if (op == PipeOp::send_forward ? s == p - 1 : s == 0) continue;
          Schedules stages = all_stages(kind, p, M);
          auto& acts = stages[s];
          move_action(acts, index_of(acts, op, m), index_of(acts, op, m + 1));
          const bool fwd = op == PipeOp::send_forward;
          const int peer = fwd ? s + 1 : s - 1;
          const PipeOp recv_op = fwd ? PipeOp::recv_forward : PipeOp::recv_backward;
          const int recv = index_of(stages[peer], recv_op, m);
          expect_rejected(validate_schedules(stages, M),
                          fmt::format("stage {} action {} ({} microbatch {}): stage {} posted "
                                      "microbatch {} next in this direction; sends and recvs "
                                      "between neighbours must match in order",
                                      peer, recv, pipe_op_name(recv_op), m, s, m + 1));
        }
      }
    }
  });
}

// The remaining per-stage rules, each on one hand-picked mutation of a 3-stage, 4-microbatch GPipe.
TEST(PipelineScheduleMutation, PerStageRules) {
  const auto base = [] { return all_stages(PipelineSchedule::gpipe, 3, 4); };
  {  // stage 1 forwards microbatch 2 before receiving it
    Schedules st = base();
    const int r = index_of(st[1], PipeOp::recv_forward, 2);
    move_action(st[1], r, r + 1);
    expect_rejected(validate_schedules(st, 4),
                    fmt::format("stage 1 action {} (forward microbatch 2): forward without its "
                                "activation received first",
                                r));
  }
  {  // stage 1 runs backward 1 before receiving its gradient
    Schedules st = base();
    const int r = index_of(st[1], PipeOp::recv_backward, 1);
    move_action(st[1], r, r + 1);
    expect_rejected(validate_schedules(st, 4),
                    fmt::format("stage 1 action {} (backward microbatch 1): backward without its "
                                "gradient received first",
                                r));
  }
  {  // stage 0 sends activation 3 before computing it
    Schedules st = base();
    const int f = index_of(st[0], PipeOp::forward, 3);
    move_action(st[0], index_of(st[0], PipeOp::send_forward, 3), f);
    expect_rejected(validate_schedules(st, 4),
                    fmt::format("stage 0 action {} (send_forward microbatch 3): send of something "
                                "not computed yet",
                                f));
  }
  {  // p2p past the ends of the pipeline, and a microbatch out of range
    Schedules st = base();
    st[0].insert(st[0].begin(), PipeAction{PipeOp::recv_forward, 0});
    expect_rejected(validate_schedules(st, 4),
                    "stage 0 action 0 (recv_forward microbatch 0): "
                    "stage 0 has no previous stage");
    st = base();
    st[2].push_back(PipeAction{PipeOp::send_forward, 3});
    expect_rejected(validate_schedules(st, 4), "the last stage has no next stage");
    st = base();
    st[1][0].microbatch = 4;
    expect_rejected(validate_schedules(st, 4),
                    "stage 1 action 0 (recv_forward microbatch 4): "
                    "microbatch out of range [0, 4)");
  }
  {  // a stage's list cut short: its missing forward is named
    Schedules st = base();
    st[2].clear();
    expect_rejected(validate_schedules(st, 4), "stage 2: recv_forward of microbatch 0 is missing");
  }
}

// A cycle through full send buffers: stage 0 posts six activations before receiving a gradient;
// stage 1 takes three, then posts three gradients before taking more. Two buffers per direction
// deadlock (stage 0 blocks on its sixth send, stage 1 on its third); three suffice.
TEST(PipelineScheduleMutation, SendBufferLimitCanDeadlock) {
  const auto parse = [](const std::string& text) {
    std::vector<PipeAction> out;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = text.find(' ', pos);
      if (end == std::string::npos) end = text.size();
      const std::string tok = text.substr(pos, end - pos);
      const size_t digit = tok.find_first_of("0123456789");
      const std::string name = tok.substr(0, digit);
      const PipeOp op = name == "F"    ? PipeOp::forward
                        : name == "B"  ? PipeOp::backward
                        : name == "RF" ? PipeOp::recv_forward
                        : name == "SF" ? PipeOp::send_forward
                        : name == "RB" ? PipeOp::recv_backward
                                       : PipeOp::send_backward;
      out.push_back({op, std::stoi(tok.substr(digit))});
      pos = end + 1;
    }
    return out;
  };
  const Schedules stages = {
      parse("F0 SF0 F1 SF1 F2 SF2 F3 SF3 F4 SF4 F5 SF5 RB0 B0 RB1 B1 RB2 B2 RB3 B3 RB4 B4 RB5 B5"),
      parse("RF0 F0 B0 RF1 F1 B1 RF2 F2 B2 SB0 SB1 SB2 RF3 F3 B3 SB3 RF4 F4 B4 SB4 RF5 F5 B5 SB5"),
  };
  EXPECT_EQ(to_string(stages[0], true),
            "F0 SF0 F1 SF1 F2 SF2 F3 SF3 F4 SF4 F5 SF5 RB0 B0 RB1 B1 RB2 B2 RB3 B3 RB4 B4 RB5 B5");
  expect_rejected(validate_schedules(stages, 6, 2),
                  "deadlock: stage 0 action 11 (send_forward microbatch 5) waits; "
                  "stage 1 action 11 (send_backward microbatch 2) waits");
  const ScheduleCheck roomy = validate_schedules(stages, 6, 3);
  EXPECT_TRUE(roomy.ok) << roomy.error;
}

}  // namespace
}  // namespace tessera
