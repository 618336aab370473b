// Pipeline schedules as per-stage action lists (GPipe, 1F1B) and their validator: a per-stage
// order check followed by a lock-step run of all stages with the executor's p2p semantics.
#include "parallel/pipeline_schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>

#include "core/error.h"

namespace tessera {

const char* pipe_op_name(PipeOp op) {
  switch (op) {
    case PipeOp::recv_forward: return "recv_forward";
    case PipeOp::forward: return "forward";
    case PipeOp::send_forward: return "send_forward";
    case PipeOp::recv_backward: return "recv_backward";
    case PipeOp::backward: return "backward";
    case PipeOp::send_backward: return "send_backward";
  }
  TS_BUG("bad PipeOp {}", static_cast<int>(op));
}

// GPipe runs its backwards in ascending microbatch order 0..M-1 (the GPipe paper draws them
// descending; both are valid and, with every activation of the step alive on the last stage, both
// let it start backward immediately and give the same unit-time bubble). Ascending is chosen so
// that each stage accumulates parameter gradients in the same microbatch order as the serial
// trainer's gradient accumulation and as 1F1B: gpipe, 1f1b and pp = 1 can then be compared bit
// for bit. It also makes the last backward of the step microbatch M-1 under both schedules, which
// is where the data-parallel gradient buckets are launched (Megatron's is-last-microbatch rule).
// Descending would only reuse the last forward's activations while still warm in cache.
std::vector<PipeAction> make_schedule(PipelineSchedule kind, int stage, int num_stages,
                                      int num_microbatches) {
  TS_CHECK(num_stages >= 1 && stage >= 0 && stage < num_stages && num_microbatches >= 1,
           "stage {} of {} stages, {} microbatches", stage, num_stages, num_microbatches);
  const bool first = stage == 0, last = stage == num_stages - 1;
  std::vector<PipeAction> actions;
  // Sends come right after the compute and before the next recv: they are asynchronous, so posting
  // them early lets the neighbour start while this stage waits for its own input.
  const auto forward_step = [&](int m) {
    if (!first) actions.push_back({PipeOp::recv_forward, m});
    actions.push_back({PipeOp::forward, m});
    if (!last) actions.push_back({PipeOp::send_forward, m});
  };
  const auto backward_step = [&](int m) {
    if (!last) actions.push_back({PipeOp::recv_backward, m});
    actions.push_back({PipeOp::backward, m});
    if (!first) actions.push_back({PipeOp::send_backward, m});
  };
  const int M = num_microbatches;
  if (kind == PipelineSchedule::gpipe) {
    for (int m = 0; m < M; ++m) forward_step(m);
    for (int m = 0; m < M; ++m) backward_step(m);
    return actions;
  }
  // 1F1B (PipeDream-flush): stage s runs ahead by the number of stages after it, so the first
  // gradient comes back exactly when its warm-up ends; after that each backward frees the
  // activations of one microbatch before the next forward stores another.
  const int num_warmup = std::min(num_stages - stage - 1, M);
  const int num_steady = M - num_warmup;
  for (int m = 0; m < num_warmup; ++m) forward_step(m);
  for (int i = 0; i < num_steady; ++i) {
    forward_step(num_warmup + i);
    backward_step(i);
  }
  for (int m = num_steady; m < M; ++m) backward_step(m);  // cool-down
  return actions;
}

std::string to_string(const std::vector<PipeAction>& schedule, bool with_p2p) {
  static constexpr std::array<const char*, 6> kTokens = {"RF", "F", "SF", "RB", "B", "SB"};
  std::string out;
  for (const PipeAction& a : schedule) {
    const bool compute = a.op == PipeOp::forward || a.op == PipeOp::backward;
    if (!compute && !with_p2p) continue;
    if (!out.empty()) out += ' ';
    out += fmt::format("{}{}", kTokens[static_cast<int>(a.op)], a.microbatch);
  }
  return out;
}

int ScheduleCheck::makespan() const {
  return finish_time.empty() ? 0 : *std::max_element(finish_time.begin(), finish_time.end());
}

double ScheduleCheck::idle_fraction(int stage) const {
  const int total = makespan();
  return total == 0 ? 0.0 : double(total - busy_time.at(stage)) / total;
}

namespace {

constexpr int kNumOps = 6;

std::string where(int stage, int idx, PipeAction a) {
  return fmt::format("stage {} action {} ({} microbatch {})", stage, idx, pipe_op_name(a.op),
                     a.microbatch);
}

// Per-stage order rules; returns an error message or "" and fills peak live / busy time.
std::string check_stage(const std::vector<PipeAction>& actions, int stage, int num_stages, int M,
                        int* peak_live, int* busy_time) {
  const bool first = stage == 0, last = stage == num_stages - 1;
  std::vector<std::array<bool, kNumOps>> done(M, std::array<bool, kNumOps>{});
  const auto has = [&](int m, PipeOp op) { return done[m][static_cast<int>(op)]; };
  int live = 0;
  *peak_live = 0;
  *busy_time = 0;
  for (int i = 0; i < int(actions.size()); ++i) {
    const PipeAction a = actions[i];
    const int m = a.microbatch;
    const auto bad = [&](std::string_view why) {
      return fmt::format("{}: {}", where(stage, i, a), why);
    };
    if (m < 0 || m >= M) return bad(fmt::format("microbatch out of range [0, {})", M));
    if (first && (a.op == PipeOp::recv_forward || a.op == PipeOp::send_backward))
      return bad("stage 0 has no previous stage to talk to");
    if (last && (a.op == PipeOp::send_forward || a.op == PipeOp::recv_backward))
      return bad("the last stage has no next stage to talk to (its forward ends in the loss)");
    if (has(m, a.op))
      return bad("appears twice on this stage (each op exactly once per microbatch)");
    switch (a.op) {
      case PipeOp::forward:
        if (!first && !has(m, PipeOp::recv_forward))
          return bad("forward without its activation received first");
        *peak_live = std::max(*peak_live, ++live);
        *busy_time += kForwardTime;
        break;
      case PipeOp::backward:
        if (!has(m, PipeOp::forward)) return bad("backward before its own forward");
        if (!last && !has(m, PipeOp::recv_backward))
          return bad("backward without its gradient received first");
        --live;
        *busy_time += kBackwardTime;
        break;
      case PipeOp::send_forward:
        if (!has(m, PipeOp::forward)) return bad("send of something not computed yet");
        break;
      case PipeOp::send_backward:
        if (!has(m, PipeOp::backward)) return bad("send of something not computed yet");
        break;
      case PipeOp::recv_forward:
      case PipeOp::recv_backward: break;
    }
    done[m][static_cast<int>(a.op)] = true;
  }
  for (int m = 0; m < M; ++m) {
    for (int k = 0; k < kNumOps; ++k) {
      const auto op = static_cast<PipeOp>(k);
      const bool needed = !(first && (op == PipeOp::recv_forward || op == PipeOp::send_backward)) &&
                          !(last && (op == PipeOp::send_forward || op == PipeOp::recv_backward));
      if (needed && !done[m][k])
        return fmt::format(
            "stage {}: {} of microbatch {} is missing (each op exactly once per "
            "microbatch)",
            stage, pipe_op_name(op), m);
    }
  }
  return "";
}

// One direction of one link, in posting order. NCCL (and our MPI path) match p2p in posting order.
struct Message {
  int microbatch;
  int post_time;
  int recv_time = -1;
};
struct Channel {
  std::vector<Message> messages;
  size_t head = 0;  // first message not yet received
};

}  // namespace

ScheduleCheck validate_schedules(const std::vector<std::vector<PipeAction>>& per_stage,
                                 int num_microbatches, int max_outstanding_sends) {
  const int P = int(per_stage.size()), M = num_microbatches;
  TS_CHECK(P >= 1 && M >= 1 && max_outstanding_sends >= 1, "{} stages, {} microbatches, {} sends",
           P, M, max_outstanding_sends);
  ScheduleCheck check;
  std::vector<int> peak(P), busy(P);
  for (int s = 0; s < P; ++s) {
    check.error = check_stage(per_stage[s], s, P, M, &peak[s], &busy[s]);
    if (!check.error.empty()) return check;
  }

  // Lock-step run. forward_ch[s] carries activations s -> s+1, backward_ch[s] gradients s+1 -> s.
  // Each stage has a clock: compute advances it, a recv waits for the send's post time, and a send
  // past the buffer limit waits for the receive time of the oldest outstanding send. The result
  // does not depend on the order stages are stepped in: every wait is on a specific message.
  std::vector<Channel> forward_ch(std::max(P - 1, 0)), backward_ch(std::max(P - 1, 0));
  std::vector<int> pc(P, 0), clock(P, 0);
  // Returns false when stage s is blocked; sets check.error on a mismatch.
  const auto try_step = [&](int s) {
    const PipeAction a = per_stage[s][pc[s]];
    const auto send = [&](Channel& ch) {
      const size_t k = ch.messages.size();
      if (k - ch.head >= size_t(max_outstanding_sends)) return false;
      if (k >= size_t(max_outstanding_sends))
        clock[s] = std::max(clock[s], ch.messages[k - max_outstanding_sends].recv_time);
      ch.messages.push_back({a.microbatch, clock[s]});
      return true;
    };
    const auto recv = [&](Channel& ch, int from) {
      if (ch.head == ch.messages.size()) return false;
      Message& msg = ch.messages[ch.head];
      if (msg.microbatch != a.microbatch) {
        check.error = fmt::format(
            "{}: stage {} posted microbatch {} next in this direction; sends and recvs between "
            "neighbours must match in order",
            where(s, pc[s], a), from, msg.microbatch);
        return false;
      }
      clock[s] = std::max(clock[s], msg.post_time);
      msg.recv_time = clock[s];
      ++ch.head;
      return true;
    };
    bool progressed = true;
    switch (a.op) {
      case PipeOp::forward: clock[s] += kForwardTime; break;
      case PipeOp::backward: clock[s] += kBackwardTime; break;
      case PipeOp::send_forward: progressed = send(forward_ch[s]); break;
      case PipeOp::recv_forward: progressed = recv(forward_ch[s - 1], s - 1); break;
      case PipeOp::send_backward: progressed = send(backward_ch[s - 1]); break;
      case PipeOp::recv_backward: progressed = recv(backward_ch[s], s + 1); break;
    }
    if (progressed) ++pc[s];
    return progressed;
  };

  for (;;) {
    bool progressed = false, all_done = true;
    for (int s = 0; s < P; ++s) {
      while (pc[s] < int(per_stage[s].size()) && try_step(s)) progressed = true;
      if (!check.error.empty()) return check;
      all_done = all_done && pc[s] == int(per_stage[s].size());
    }
    if (all_done) break;
    if (!progressed) {
      std::string waits;
      for (int s = 0; s < P; ++s) {
        if (pc[s] == int(per_stage[s].size())) continue;
        waits += fmt::format("{}{} waits", waits.empty() ? "" : "; ",
                             where(s, pc[s], per_stage[s][pc[s]]));
      }
      check.error = "deadlock: " + waits;
      return check;
    }
  }
  check.ok = true;
  check.peak_live = std::move(peak);
  check.busy_time = std::move(busy);
  check.finish_time = std::move(clock);
  return check;
}

int peak_live_microbatches(PipelineSchedule kind, int stage, int num_stages, int num_microbatches) {
  int peak = 0, busy = 0;
  const std::string error = check_stage(make_schedule(kind, stage, num_stages, num_microbatches),
                                        stage, num_stages, num_microbatches, &peak, &busy);
  TS_CHECK(error.empty(), "generated schedule is invalid: {}", error);
  return peak;
}

double theoretical_bubble(int p, int m) {
  TS_CHECK(p >= 1 && m >= 1, "p = {}, m = {}", p, m);
  return double(p - 1) / double(m + p - 1);
}

}  // namespace tessera
