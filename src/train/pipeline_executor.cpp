// PipelineExecutor: interprets a stage's action list. Consecutive p2p actions are posted as one
// group; sends go out of one of two alternating buffers and stay in flight while the next
// micro-batch computes; receives land in two alternating buffers and are copied into the
// micro-batch's activations once they arrive.
#include "train/pipeline_executor.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "kernels/ops.h"

namespace tessera {

namespace {
bool is_p2p(PipeOp op) { return op != PipeOp::forward && op != PipeOp::backward; }
// Tags keep MPI's matching honest (NCCL matches by order): activation or gradient, micro-batch.
int tag_of(PipeOp op, int m) {
  const bool grad = op == PipeOp::send_backward || op == PipeOp::recv_backward;
  return 2 * m + (grad ? 1 : 0);
}
// The teacher's activation of micro-batch m: above the student's tags and the handshake's.
int teacher_tag(int num_micro, int m) { return 2 * num_micro + 1 + m; }
// The teacher cache's rows travel with the last stage's training batches.
CachedRowsDims cached_rows(const ModelShard& s, const ExecOptions& exec) {
  if (!s.last_stage() || exec.distill_top_k == 0) return {};
  return {exec.distill_top_k, exec.distill_num_temps};
}

}  // namespace

size_t PipelineExecutor::bytes_needed(const ModelConfig& cfg, const ModelShard& shard, DType dtype,
                                      PipelineSchedule kind, int M, int B, int T, Device device,
                                      const ExecOptions& exec, TeacherDims teacher) {
  const ModelShard s = shard.resolved(cfg);
  const int live = peak_live_microbatches(kind, s.pp_rank, s.pp_size, M);
  // The first training set owns the scratch (and the recomputation set); the others share them.
  size_t total = Activations::bytes_needed(cfg, dtype, B, T, true, s, exec);
  total += (live - 1) * Activations::bytes_needed(cfg, dtype, B, T, true, s, exec, true);
  total += live * Batch::bytes_needed(B, T, device, cached_rows(s, exec));
  total += Activations::bytes_needed(cfg, dtype, B, T, false, s, exec, true) +
           Batch::bytes_needed(B, T, device);
  if (s.pp_size > 1)
    total += 8 * Arena::aligned(dtype_storage_bytes(dtype, int64_t(B) * T * cfg.hidden));
  if (s.pp_size > 1 && teacher.hidden > 0) {
    const size_t row =
        Arena::aligned(dtype_storage_bytes(teacher.dtype, int64_t(B) * T * teacher.hidden));
    total += 4 * row + (s.first_stage() ? 0 : live * row);
  }
  return total;
}

PipelineExecutor::PipelineExecutor(Transformer& model, Communicator& pp_comm, PipelineSchedule kind,
                                   int num_microbatches, int B, int T, Arena& arena,
                                   TeacherDims teacher)
    : model_(model),
      comm_(pp_comm),
      kind_(kind),
      num_micro_(num_microbatches),
      stage_(pp_comm.rank()),
      num_stages_(pp_comm.size()),
      B_(B),
      T_(T) {
  TS_CHECK(model.shard().pp_rank == stage_ && model.shard().pp_size == num_stages_,
           "model stage {}/{} vs pp group rank {}/{}", model.shard().pp_rank, model.shard().pp_size,
           stage_, num_stages_);
  const char* trace = std::getenv("TESSERA_PIPELINE_TRACE");
  trace_ = trace && trace[0] == '1';
  const int live = peak_live_microbatches(kind, stage_, num_stages_, num_microbatches);
  train_slots_.resize(live);
  // One stage op runs at a time: every set shares the first one's scratch and, when
  // recomputing, its block set (Activations' `share`).
  Activations* first = nullptr;
  for (Slot& s : train_slots_) {
    s.acts = std::make_unique<Activations>(model, B, T, /*training=*/true, &arena, first);
    s.batch = std::make_unique<Batch>(B, T, model.device(), arena,
                                      cached_rows(model.shard(), model.exec()));
    if (s.batch->has_teacher_rows())  // the KD loss reads the set's batch's rows
      s.acts->bind_teacher_rows(s.batch->topk_logits, s.batch->topk_ids, s.batch->teacher_lse);
    if (!first) first = s.acts.get();
  }
  eval_slots_.resize(1);
  eval_slots_[0].acts =
      std::make_unique<Activations>(model, B, T, /*training=*/false, &arena, first);
  eval_slots_[0].batch = std::make_unique<Batch>(B, T, model.device(), arena);
  if (num_stages_ > 1) {
    const int64_t N = int64_t(B) * T, C = model.config().hidden;
    for (P2PBuffers* p : {&send_fwd_, &recv_fwd_, &send_bwd_, &recv_bwd_})
      for (Tensor& t : p->buf) t = arena.alloc(model.dtype(), {N, C});
    if (teacher.hidden > 0) {
      for (P2PBuffers* p : {&send_teacher_, &recv_teacher_})
        for (Tensor& t : p->buf) t = arena.alloc(teacher.dtype, {N, teacher.hidden});
      if (stage_ > 0)
        for (Slot& s : train_slots_) s.teacher_in = arena.alloc(teacher.dtype, {N, teacher.hidden});
    }
    connect_neighbours();
  }
}

void PipelineExecutor::connect_neighbours() {
  // NCCL connects a pair of ranks lazily, per direction, the first time they exchange data, and
  // that handshake blocks the host until the peer also enters NCCL for the same direction. The
  // first step would then deadlock: stage 0 posting {send act 1, recv grad 0} blocks on connecting
  // the gradient direction while stage 1 waits for act 1 before it will ever send a gradient.
  // So every stage exchanges one row with both neighbours in both directions, in one group,
  // before the first step.
  std::vector<Communicator::P2POp> ops;
  const int tag = 2 * num_micro_;  // above every micro-batch tag
  if (stage_ > 0) {
    ops.push_back({true, send_bwd_.buf[0].slice(0, 1), stage_ - 1, tag});
    ops.push_back({false, recv_fwd_.buf[0].slice(0, 1), stage_ - 1, tag});
  }
  if (stage_ < num_stages_ - 1) {
    ops.push_back({true, send_fwd_.buf[0].slice(0, 1), stage_ + 1, tag});
    ops.push_back({false, recv_bwd_.buf[0].slice(0, 1), stage_ + 1, tag});
  }
  if (trace_) std::fprintf(stderr, "[pipeline stage %d] connecting neighbours\n", stage_);
  for (CommHandle& h : comm_.batch_p2p(ops)) h->wait();
  // The handshake completes on the device: wait for it here, so that a hang shows at this line.
  ops::synchronize(model_.device());
  if (trace_) std::fprintf(stderr, "[pipeline stage %d] neighbours connected\n", stage_);
}

PipelineExecutor::Slot& PipelineExecutor::slot_of(int m) {
  for (Slot& s : *slots_)
    if (s.microbatch == m) return s;
  TS_BUG("stage {}: micro-batch {} has no activation set", stage_, m);
}

PipelineExecutor::Slot& PipelineExecutor::take_slot(int m) {
  for (Slot& s : *slots_)
    if (s.microbatch < 0) {
      s.microbatch = m;
      return s;
    }
  TS_BUG("stage {}: no free activation set for micro-batch {} ({} sets)", stage_, m,
         slots_->size());
}

void PipelineExecutor::release_slot(int m) { slot_of(m).microbatch = -1; }

void PipelineExecutor::post_p2p(const std::vector<PipeAction>& group) {
  std::vector<Communicator::P2POp> ops;
  std::vector<std::pair<PipeAction, int>> recvs;   // action, index into ops
  std::vector<std::pair<CommHandle*, int>> sends;  // where each send's handle goes, op index
  std::vector<std::pair<int, int>> teacher_recvs;  // micro-batch, index into ops
  const bool with_teacher = training_ && teacher_;
  for (const PipeAction& a : group) {
    const int b = a.microbatch % 2;
    switch (a.op) {
      case PipeOp::send_forward:
      case PipeOp::send_backward: {
        P2PBuffers& p = a.op == PipeOp::send_forward ? send_fwd_ : send_bwd_;
        if (p.inflight[b]) p.inflight[b]->wait();  // the send of micro-batch m - 2 used it
        p.inflight[b].reset();
        Slot& s = slot_of(a.microbatch);
        copy_tensor(p.buf[b],
                    a.op == PipeOp::send_forward ? s.acts->stage_output() : s.acts->stage_grad());
        sends.push_back({&p.inflight[b], int(ops.size())});
        ops.push_back({true, p.buf[b], a.op == PipeOp::send_forward ? stage_ + 1 : stage_ - 1,
                       tag_of(a.op, a.microbatch)});
        if (with_teacher && a.op == PipeOp::send_forward) {  // filled by run_teacher
          sends.push_back({&send_teacher_.inflight[b], int(ops.size())});
          ops.push_back(
              {true, send_teacher_.buf[b], stage_ + 1, teacher_tag(num_micro_, a.microbatch)});
        }
        // A micro-batch's activation set is free once its last product on this stage is copied
        // out: its input gradient in training, its output in evaluation. Freeing it here lets a
        // receive in the same group reuse it.
        if ((training_ && a.op == PipeOp::send_backward) ||
            (!training_ && a.op == PipeOp::send_forward))
          release_slot(a.microbatch);
        break;
      }
      case PipeOp::recv_forward:
      case PipeOp::recv_backward: {
        P2PBuffers& p = a.op == PipeOp::recv_forward ? recv_fwd_ : recv_bwd_;
        recvs.push_back({a, int(ops.size())});
        ops.push_back({false, p.buf[b], a.op == PipeOp::recv_forward ? stage_ - 1 : stage_ + 1,
                       tag_of(a.op, a.microbatch)});
        if (with_teacher && a.op == PipeOp::recv_forward) {
          teacher_recvs.push_back({a.microbatch, int(ops.size())});
          ops.push_back(
              {false, recv_teacher_.buf[b], stage_ - 1, teacher_tag(num_micro_, a.microbatch)});
        }
        break;
      }
      default: TS_BUG("post_p2p given a compute action");
    }
  }
  std::vector<CommHandle> handles = comm_.batch_p2p(ops);
  for (auto& [h, idx] : sends) *h = std::move(handles[idx]);
  for (auto& [a, idx] : recvs) {
    handles[idx]->wait();
    if (a.op == PipeOp::recv_forward) {
      Slot& s = take_slot(a.microbatch);
      copy_tensor(s.acts->stage_input(), ops[idx].tensor);
    } else {
      copy_tensor(slot_of(a.microbatch).acts->stage_grad(), ops[idx].tensor);
    }
  }
  for (auto& [m, idx] : teacher_recvs) {
    handles[idx]->wait();
    copy_tensor(slot_of(m).teacher_in, ops[idx].tensor);
  }
}

double PipelineExecutor::run_teacher(int m, Slot& s) {
  teacher_->forward(s.batch->tokens, s.teacher_in);
  if (stage_ == num_stages_ - 1) {
    const Tensor logits = teacher_->logits(), out = s.acts->teacher_logits();
    if (logits.dtype == out.dtype)
      copy_tensor(out, logits);
    else
      ops::cast(out, logits);
  } else {
    P2PBuffers& p = send_teacher_;
    const int b = m % 2;
    if (p.inflight[b]) p.inflight[b]->wait();  // the send of micro-batch m - 2 used it
    p.inflight[b].reset();
    copy_tensor(p.buf[b], teacher_->output());
  }
  if (!model_.hidden_loss().active()) return 0.0;
  // The teacher's states of this stage's pairs, read before its next forward overwrites them.
  std::vector<Tensor> states;
  for (const HiddenLoss::Local& l : model_.hidden_loss().local())
    states.push_back(teacher_->hidden_state(l.pair.teacher));
  return model_.hidden_forward(*s.acts, s.batch->targets, states);
}

PipelineExecutor::Result PipelineExecutor::run(const std::vector<PipeAction>& actions,
                                               const FillFn& fill, float loss_scale, bool training,
                                               const std::function<void()>& before_last_backward) {
  Result res;
  training_ = training;
  const bool last = stage_ == num_stages_ - 1;
  int last_backward = -1;
  for (size_t i = 0; i < actions.size(); ++i)
    if (actions[i].op == PipeOp::backward) last_backward = int(i);
  size_t i = 0;
  while (i < actions.size()) {
    const PipeAction a = actions[i];
    if (trace_) {
      std::fprintf(stderr, "[pipeline stage %d] %s %s micro-batch %d\n", stage_,
                   training ? "train" : "eval", pipe_op_name(a.op), a.microbatch);
      std::fflush(stderr);
    }
    if (is_p2p(a.op)) {
      std::vector<PipeAction> group;
      while (i < actions.size() && is_p2p(actions[i].op)) group.push_back(actions[i++]);
      post_p2p(group);
      continue;
    }
    // Busy time is the compute alone: drain what is queued (including the wait for this
    // micro-batch's receive, which belongs to the bubble) before the clock starts.
    if (measure_busy_) ops::synchronize(model_.device());
    const auto t0 = std::chrono::steady_clock::now();
    if (a.op == PipeOp::forward) {
      Slot& s = stage_ == 0 ? take_slot(a.microbatch) : slot_of(a.microbatch);
      fill(a.microbatch, *s.batch);
      s.batch->upload();
      model_.forward_stage(*s.acts, s.batch->tokens);
      TS_CHECK(!training || teacher_ || !model_.hidden_loss().active(),
               "the hidden-state term is active without a teacher");
      if (training && teacher_) res.hidden_sum += run_teacher(a.microbatch, s);
      if (last) {
        const LossValues loss = model_.loss_forward(*s.acts, s.batch->labels);
        const int64_t valid = s.batch->num_valid();
        // Training reports the whole objective; evaluation the cross-entropy, token-weighted.
        res.loss_sum += training ? loss.total : loss.ce * double(valid);
        res.valid += valid;
        if (training) add_losses(res.parts, loss);
        if (!training) release_slot(a.microbatch);
      }
    } else {  // backward
      Slot& s = slot_of(a.microbatch);
      if (int(i) == last_backward && before_last_backward) before_last_backward();
      model_.backward_stage(*s.acts, s.batch->tokens, s.batch->labels, loss_scale);
      if (stage_ == 0) release_slot(a.microbatch);
    }
    if (measure_busy_) {
      ops::synchronize(model_.device());
      busy_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    ++i;
  }
  return res;
}

PipelineExecutor::Result PipelineExecutor::train_step(
    const FillFn& fill, float loss_scale, const std::function<void()>& before_last_backward) {
  slots_ = &train_slots_;
  const Result r = run(make_schedule(kind_, stage_, num_stages_, num_micro_), fill, loss_scale,
                       true, before_last_backward);
  drain_sends();
  return r;
}

void PipelineExecutor::drain_sends() {
  for (P2PBuffers* p : {&send_fwd_, &send_bwd_, &send_teacher_})
    for (CommHandle& h : p->inflight)
      if (h) {
        h->wait();
        h.reset();
      }
}

PipelineExecutor::Result PipelineExecutor::eval(const FillFn& fill, int count) {
  slots_ = &eval_slots_;
  // Forward only: GPipe's first half.
  std::vector<PipeAction> actions;
  for (int m = 0; m < count; ++m) {
    if (stage_ > 0) actions.push_back({PipeOp::recv_forward, m});
    actions.push_back({PipeOp::forward, m});
    if (stage_ < num_stages_ - 1) actions.push_back({PipeOp::send_forward, m});
  }
  const Result r = run(actions, fill, 1.0f, false, {});
  drain_sends();
  slots_ = nullptr;
  return r;
}

}  // namespace tessera
