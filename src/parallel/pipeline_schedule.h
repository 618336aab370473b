// Pipeline-parallel schedules as data: each stage's ordered list of p2p and compute actions for one
// step (GPipe, or 1F1B as in Megatron-Core's forward_backward_pipelining_without_interleaving), and
// a validator that runs every stage's list against the executor's p2p semantics. No MPI here: the
// executor that runs these lists lives elsewhere, so every (stage, num_stages) pair is testable in
// one process. Interleaved (virtual-stage) schedules are not built.
#pragma once
#include <string>
#include <vector>

#include "config/enums.h"  // PipelineSchedule and its names (gpipe, 1f1b)

namespace tessera {

// Megatron's p2p names. "forward" direction is stage s -> s+1 (activations), "backward" is
// s+1 -> s (activation gradients). The last stage's forward ends in the loss and its backward
// starts from it, so it has no send_forward / recv_backward; stage 0 has no recv_forward /
// send_backward.
enum class PipeOp { recv_forward, forward, send_forward, recv_backward, backward, send_backward };

struct PipeAction {
  PipeOp op;
  int microbatch;
  bool operator==(const PipeAction&) const = default;
};

const char* pipe_op_name(PipeOp op);

// One stage's actions for one step of num_microbatches micro-batches.
//   gpipe: all forwards (recv_forward m, forward m, send_forward m) for m = 0..M-1, then all
//     backwards (recv_backward m, backward m, send_backward m) for m = 0..M-1, ascending (the .cpp
//     says why).
//   one_f_one_b: warm-up of min(num_stages - stage - 1, M) forwards, a steady phase alternating one
//     forward and one backward, a cool-down of the remaining backwards.
std::vector<PipeAction> make_schedule(PipelineSchedule kind, int stage, int num_stages,
                                      int num_microbatches);

// Compact text, one token per action: "F3" forward, "B3" backward; with_p2p adds "RF3" / "SF3"
// (recv/send forward) and "RB3" / "SB3" (recv/send backward).
std::string to_string(const std::vector<PipeAction>& schedule, bool with_p2p = false);

// Unit-time model used by validate_schedules: communication is free, compute costs these.
inline constexpr int kForwardTime = 1;
inline constexpr int kBackwardTime = 2;

struct ScheduleCheck {
  bool ok = false;
  // Empty when ok; otherwise names the stage, the action index, the op and the microbatch.
  std::string error;
  // Per stage, filled only when ok:
  std::vector<int> peak_live;    // max microbatches with forward done and backward not yet
  std::vector<int> finish_time;  // unit-time completion of the stage's last action
  std::vector<int> busy_time;    // kForwardTime per forward + kBackwardTime per backward

  int makespan() const;                   // max finish_time: the step's duration
  double idle_fraction(int stage) const;  // (makespan - busy_time) / makespan
};

// Checks the lists of all stages (per_stage[s] is stage s) for one step. Per stage, in list order:
// microbatch in range, no p2p past either end of the pipeline, each forward after its activation
// was received (stage > 0), each backward after its own forward and (stage < last) after its
// gradient was received, each send after the thing it sends was computed, every op exactly once
// per microbatch. Then it runs all stages together with the executor's p2p semantics: a send is
// asynchronous, but at most max_outstanding_sends unreceived sends per direction may be in flight
// (the executor double-buffers: 2), so posting one more waits until the oldest is received; a
// recv waits until the neighbour has posted its next send in that direction, which must carry the
// same microbatch (NCCL p2p matches in posting order, with no tags). Reports a deadlock when no
// stage can progress before all are done.
ScheduleCheck validate_schedules(const std::vector<std::vector<PipeAction>>& per_stage,
                                 int num_microbatches, int max_outstanding_sends = 2);

// Peak live microbatches of one stage's generated schedule: the executor sizes its activation
// sets with it. 1F1B: min(num_stages - stage, M); GPipe: M.
int peak_live_microbatches(PipelineSchedule kind, int stage, int num_stages, int num_microbatches);

// Idle fraction of a step's time, per stage, for a synchronous (flushing) pipeline of p stages
// and m microbatches: (p - 1) / (m + p - 1). Megatron's paper quotes the ratio to ideal compute,
// (p - 1) / m; this is the same bubble measured against the whole step.
double theoretical_bubble(int p, int m);

}  // namespace tessera
