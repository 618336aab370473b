// PipelineExecutor: runs one stage's schedule (parallel/pipeline_schedule.h) for a step: forward
// and backward of each micro-batch on this stage's Transformer, and the double-buffered p2p
// transfers of activations and their gradients to the neighbouring stages.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "model/transformer.h"
#include "parallel/communicator.h"
#include "parallel/pipeline_schedule.h"
#include "train/batch.h"
#include "train/teacher.h"

namespace tessera {

class PipelineExecutor {
 public:
  // Fills micro-batch m (host vectors of `batch`); the executor uploads it.
  using FillFn = std::function<void(int m, Batch& batch)>;

  // pp_comm: this rank's pipeline group (its rank is the stage). Training activation sets are
  // sized by the schedule's peak live micro-batches; everything comes from `arena`. teacher:
  // distillation's teacher activations between stages (each live set on stages > 0 keeps its
  // micro-batch's teacher input; two send and two receive buffers).
  PipelineExecutor(Transformer& model, Communicator& pp_comm, PipelineSchedule kind,
                   int num_microbatches, int B, int T, Arena& arena, TeacherDims teacher = {});
  static size_t bytes_needed(const ModelConfig& cfg, const ModelShard& shard, DType dtype,
                             PipelineSchedule kind, int num_microbatches, int B, int T,
                             Device device, const ExecOptions& exec = {}, TeacherDims teacher = {});

  struct Result {
    double loss_sum = 0.0;  // last stage: sum over micro-batches of their mean loss (train) or
                            // of loss * valid tokens (eval); other stages 0
    int64_t valid = 0;      // last stage: valid target tokens seen
    // Training, last stage: the sums over micro-batches of the objective's parts (the
    // cross-entropy and each extra term, unweighted).
    LossValues parts;
    // Training with distillation's hidden-state term active, any stage: the sum over
    // micro-batches of this stage's part of it (unweighted; Transformer::hidden_forward).
    double hidden_sum = 0.0;
  };
  // Distillation: the teacher whose stage forward runs beside each training forward (its
  // activations travel with the student's; on the last stage its logits go to the activation
  // set's teacher_logits; its hidden states meet the student's in the model's hidden-state term
  // when that is active); null: none. Evaluation never runs it.
  void set_teacher(Teacher* teacher) { teacher_ = teacher; }
  // One step's forwards and backwards. Each micro-batch's loss is scaled by loss_scale in
  // backward. before_last_backward runs just before the step's final backward on this stage (the
  // data-parallel buckets are launched during it).
  Result train_step(const FillFn& fill, float loss_scale,
                    const std::function<void()>& before_last_backward = {});
  // Forward only over `count` micro-batches (evaluation); loss summed weighted by valid tokens.
  Result eval(const FillFn& fill, int count);

  // Bubble measurement: when on, the device is synchronized around every forward and backward and
  // the compute time is summed (it perturbs overlap slightly; only for measurement runs).
  void set_measure_busy(bool on) { measure_busy_ = on; }
  double take_busy_seconds() {
    const double s = busy_s_;
    busy_s_ = 0.0;
    return s;
  }

  int stage() const { return stage_; }
  int num_stages() const { return num_stages_; }

 private:
  struct Slot {
    std::unique_ptr<Activations> acts;
    std::unique_ptr<Batch> batch;
    Tensor teacher_in;  // (N, teacher hidden): distilling, stages > 0
    int microbatch = -1;
  };
  // p2p: two alternating buffers per direction and side; a send stays in flight until its buffer
  // is needed again.
  struct P2PBuffers {
    Tensor buf[2];
    CommHandle inflight[2];
  };

  Result run(const std::vector<PipeAction>& actions, const FillFn& fill, float loss_scale,
             bool training, const std::function<void()>& before_last_backward);
  void connect_neighbours();
  void drain_sends();  // waits for every send still in flight
  Slot& slot_of(int m);
  Slot& take_slot(int m);
  void release_slot(int m);
  // Posts a run of consecutive p2p actions as one group (Megatron's batched isend/irecv), then
  // waits for its receives and copies them into the micro-batches' activations.
  void post_p2p(const std::vector<PipeAction>& group);
  // The teacher's stage forward for micro-batch m: its output into the send buffer, or on the
  // last stage its logits into the activation set; then, when the hidden-state term is active,
  // this stage's part of it (returned; 0 otherwise).
  double run_teacher(int m, Slot& s);

  Transformer& model_;
  Communicator& comm_;
  PipelineSchedule kind_;
  int num_micro_, stage_, num_stages_, B_, T_;
  bool training_ = true;
  bool measure_busy_ = false;
  bool trace_ = false;  // TESSERA_PIPELINE_TRACE=1: every action to stderr, to locate a hang
  double busy_s_ = 0.0;
  std::vector<Slot> train_slots_;
  std::vector<Slot> eval_slots_;        // one: evaluation frees a set as soon as its output is sent
  std::vector<Slot>* slots_ = nullptr;  // the set in use
  P2PBuffers send_fwd_, recv_fwd_, send_bwd_, recv_bwd_;
  P2PBuffers send_teacher_, recv_teacher_;  // distilling under pp: the teacher's activations
  Teacher* teacher_ = nullptr;
};

}  // namespace tessera
