// Transformer: decoder-only language model = token (+ learned position) embedding, L blocks, final
// norm, LM head (tied to the embedding or its own), softmax cross-entropy. Explicit forward and
// backward; activations live in a separate Activations object sized for one (B, T), so the same
// weights serve training, evaluation and sampling at other shapes.
// Model parallelism (ModelShard): a pipeline stage holds layers [first, first + n); the first stage
// also the embedding, the last the final norm, head and loss. Tensor parallelism splits heads, FFN
// columns and the (padded) vocabulary of the embedding, head and cross-entropy over tp ranks.
// Shape letters: B batch, T time, C width, V padded vocabulary (Vl = V / tp local), N = B*T.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/memory.h"
#include "model/block.h"
#include "model/exec_options.h"
#include "model/hidden_loss.h"
#include "model/objective.h"

namespace tessera {

class Transformer;

// The router's statistics of one MoE block over the training forwards since
// Transformer::reset_moe_stats() (metrics.jsonl reports them per step).
struct MoeLayerStats {
  int layer = -1;              // global block index
  int num_experts = 0;         // E
  int topk = 0;                // K
  int64_t tokens = 0;          // per micro-batch (N = B*T)
  int64_t capacity = 0;        // slots per expert per micro-batch; 0: dropless
  std::vector<double> aux, z;  // per micro-batch, coefficients included
  std::vector<std::vector<int32_t>> tokens_per_expert;  // per micro-batch, before dropping
};

// Everything forward saves for backward, plus backward's temporaries, for one (B, T) on one stage.
// Several sets that never run at the same time (the pipeline's live micro-batches, evaluation)
// share one set's scratch and, when recomputing, its one block set: `share` names that set (same
// model, B and T), which must outlive this one; bytes_needed(shares = true) leaves them out.
class Activations {
 public:
  // Tensors come from `arena` when given (bytes_needed()), else from an arena of its own.
  Activations(const Transformer& model, int B, int T, bool training, Arena* arena = nullptr,
              Activations* share = nullptr);
  Activations(const Activations&) = delete;  // others may point at it (share)
  Activations& operator=(const Activations&) = delete;
  static size_t bytes_needed(const ModelConfig& cfg, DType dtype, int B, int T, bool training,
                             const ModelShard& shard = {}, const ExecOptions& exec = {},
                             bool shares = false);
  int B() const { return B_; }
  int T() const { return T_; }
  size_t bytes() const { return bytes_; }

  // Pipeline boundaries: the stage's input (N,C) (the received activation on stages > 0), its
  // output (N,C) (what is sent on), and the gradient buffer (N,C): before backward_stage on a
  // non-last stage it holds d(output); afterwards d(input).
  Tensor stage_input() const { return resid.front(); }
  Tensor stage_output() const { return resid.back(); }
  Tensor stage_grad() const { return d_resid; }
  // The residual stream (N,C) after the first n of this stage's blocks (0: its input), as the
  // last forward left it (a distillation teacher's hidden states).
  Tensor residual(int n) const { return resid[n]; }
  // Distillation (ExecOptions::distill, last stage, training): where the teacher's logits (N, Vl)
  // for this micro-batch go before loss_forward; empty otherwise.
  Tensor teacher_logits() const { return distill.teacher_logits; }
  // From a teacher cache (ExecOptions::distill_top_k > 0): the loss reads the teacher's rows from
  // these tensors — the batch's cached rows, bound once: top-k logits and ids (N, K) and the lse
  // (nT, 2, N).
  void bind_teacher_rows(Tensor topk_logits, Tensor topk_ids, Tensor teacher_lse) {
    distill.topk_logits = topk_logits;
    distill.topk_ids = topk_ids;
    distill.teacher_lse = teacher_lse;
  }

 private:
  friend class Transformer;
  int B_, T_;
  bool training_, recompute_;
  size_t bytes_ = 0;
  Arena own_;
  std::vector<Tensor> resid;      // L+1 x (N,C): input of local block l, resid[L] = last output
  Tensor embed32;                 // (N,C) f32, first stage with fp32_embedding: the FP32 lookup
  std::vector<BlockActs> blocks;  // L sets, or 1 shared set when recomputing
  BlockScratch scratch;
  // The set whose recomputation set this one uses (itself unless shared), and, on that set, which
  // set's forward last wrote the LAST block into it (backward may then skip recomputing it).
  Activations* set_owner_ = this;
  const Activations* last_block_of_ = nullptr;
  // Last stage only:
  Tensor lnf_out, lnf_mean, lnf_rstd;  // (N,C), (N), (N)
  Tensor logits;  // (N,Vl); becomes dlogits in backward (f32 with fp32_lm_head)
  // fp32_lm_head only: FP32 copies of the head's input and weight, and FP32 gradients.
  Tensor lnf_out32, head_w32;  // (N,C), (Vl,C)
  // d_lnf32 (N,C); head_dw32 and head_dw (Vl,C) f32 and the model dtype, training with gradients
  // in the compute dtype only (FP32 gradients take the head's f32 product directly).
  Tensor d_lnf32, head_dw32, head_dw;
  Tensor losses, lse;      // (N), (N)
  Tensor ce_stats;         // (3,N) tp > 1: row max, then sum of exp and target logit
  DistillBuffers distill;  // ExecOptions::distill, training: the KD term's tensors
  Tensor d_lnf;            // (N,C)
  Tensor d_resid;          // (N,C)
  // Training with hidden-state pairs on this stage: per pair (N,Ct), P h_s - h_t from
  // hidden_forward until backward_stage turns it into its gradient; hidden_ready_ between them,
  // with the micro-batch's valid targets.
  std::vector<Tensor> hidden_diff;
  bool hidden_ready_ = false;
  int64_t hidden_valid_ = 0;
};

class Transformer {
 public:
  // Parameters come from `arena` when given (param_bytes()). The flat parameter buffers are padded
  // to pad_multiple elements; with_master = false keeps no FP32 master copy (ZeRO-1 shards it).
  Transformer(const ModelConfig& cfg, DType dtype, Device device, Arena* arena = nullptr,
              const ModelShard& shard = {}, int64_t pad_multiple = 1, bool with_master = true,
              const ExecOptions& exec = {});
  // hidden_pairs: ExecOptions::hidden_pairs (their projections are parameters of the stage).
  static size_t param_bytes(const ModelConfig& cfg, const ModelShard& shard, DType dtype,
                            int64_t pad_multiple = 1, bool with_master = true,
                            bool fp32_grads = false, bool with_grads = true,
                            const std::vector<HiddenPair>& hidden_pairs = {});
  static int64_t local_num_params(const ModelConfig& cfg, const ModelShard& shard,
                                  const std::vector<HiddenPair>& hidden_pairs = {});
  // This rank's parameters declared (names, shapes, offsets) but not allocated: enough to plan
  // memory and data-parallel buckets before anything is allocated.
  static ParamStore declared_params(const ModelConfig& cfg, const ModelShard& shard,
                                    const std::vector<HiddenPair>& hidden_pairs = {});
  // The linears for_each_linear visits on this rank, declared but not allocated: their weights'
  // names and local shapes, for planning what a LinearCompute keeps per linear (FP8 copies).
  struct LinearDecl {
    std::string name;  // the weight's parameter name
    int64_t out_features = 0, in_features = 0;
    bool shares_input_with_previous = false;
  };
  static std::vector<LinearDecl> declared_linears(const ModelConfig& cfg, const ModelShard& shard);
  // The sizes one rank computes with: heads, KV heads, FFN width and vocabulary divided by tp,
  // the stage's layer count. Names and initialization still use the whole config.
  static ModelConfig local_config(const ModelConfig& cfg, const ModelShard& shard);

  const ModelConfig& config() const { return cfg_; }
  const ModelShard& shard() const { return shard_; }
  DType dtype() const { return dtype_; }
  // precision.high_precision: [embedding] in effect: asked for, and the compute dtype is 16-bit
  // (under FP32 the table already is the master).
  bool fp32_embedding() const { return exec_.fp32_embedding && params_.has_separate_master(); }
  const ExecOptions& exec() const { return exec_; }
  Device device() const { return device_; }
  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  void init_weights(uint64_t seed) { params_.init(seed); }

  // Whole-model convenience for one stage (pp == 1): forward_stage, then the loss when targets
  // are given (returns their mean over valid targets; without targets returns 0 and only the
  // logits are meaningful). tokens/targets (B,T) i32 live on the model's device.
  double forward(Activations& acts, Tensor tokens, Tensor targets) const;
  // Backpropagates d(loss_scale * mean loss) into the parameter gradients (accumulating).
  void backward(Activations& acts, Tensor tokens, Tensor targets, float loss_scale);

  // Pipeline pieces. forward_stage: the first stage embeds `tokens`, the others read
  // acts.stage_input(); the last stage also computes the logits. loss_forward (last stage):
  // the objective's values for this micro-batch (each a mean over valid targets; activations
  // allocated for inference give the cross-entropy alone). backward_stage:
  // the last stage starts from the loss (targets, loss_scale); the others from acts.stage_grad();
  // the first stage ends in the embedding, the others leave d(input) in acts.stage_grad().
  void forward_stage(Activations& acts, Tensor tokens) const;
  LossValues loss_forward(Activations& acts, Tensor targets) const;
  void backward_stage(Activations& acts, Tensor tokens, Tensor targets, float loss_scale);

  // Called during backward_stage with index i each time every parameter with index >= i has its
  // gradient for this micro-batch (data-parallel buckets start reducing then).
  void set_grad_ready_hook(std::function<void(int)> hook) { grad_ready_ = std::move(hook); }

  // Every linear of every block of this stage, in order (the FP8 policy attaches to them;
  // embeddings, norms, attention and the LM head are not linears here).
  template <class F>
  void for_each_linear(F&& f) {
    for (Block& b : blocks_) b.for_each_linear(f);
  }

  // Every MoE layer of this stage, in order (QAT attaches to their routed experts).
  template <class F>
  void for_each_moe(F&& f) {
    for (Block& b : blocks_)
      if (b.is_moe()) f(b.moe());
  }

  // MoE blocks of this stage: what their training forwards recorded since the last reset (the
  // last ExecOptions::moe_stat_records micro-batches at most). Copies from the device.
  std::vector<MoeLayerStats> moe_stats() const;
  // The MoE layers' aux + z losses of the last forward on `acts` (what their backward adds to the
  // objective's gradient), summed; activations without recomputation only. Tests add it to the
  // objective for finite differences.
  double moe_losses(const Activations& acts) const;
  void reset_moe_stats() { moe_records_ = 0; }

  // The loss on the last stage: cross-entropy, weighted, plus any extra terms.
  Objective& objective() { return objective_; }

  // Distillation's hidden-state term (ExecOptions::hidden_pairs): this stage's pairs and beta.
  HiddenLoss& hidden_loss() { return hidden_; }
  const HiddenLoss& hidden_loss() const { return hidden_; }
  // Training, after forward_stage, while hidden_loss().active(): this stage's part of the term
  // (unweighted) for the micro-batch; targets (B*T) on the host (no device round trip on stages
  // without the loss), teachers[k] (N,Ct) the teacher's state of hidden_loss().local()[k]. The
  // following backward_stage on `acts` adds its gradient.
  double hidden_forward(Activations& acts, std::span<const int32_t> targets,
                        std::span<const Tensor> teachers) const;

  Tensor logits(const Activations& acts) const { return acts.logits; }  // (B*T, Vl)
  int64_t count_valid(Tensor targets) const;

 private:
  friend class Activations;
  struct DeclareOnly {};
  Transformer(DeclareOnly, const ModelConfig& cfg, const ModelShard& shard,
              const std::vector<HiddenPair>& hidden_pairs = {});  // no allocation
  void declare_params();
  Tensor head_weight() const;
  LossInputs loss_inputs(const Activations& a, Tensor targets) const;
  int head_grad_param() const;
  void grads_ready(int idx) const {
    if (grad_ready_) grad_ready_(idx);
  }
  void allocate_moe_records();
  void record_moe_stats(int l, const MoeActs& a) const;

  ModelConfig cfg_;    // the whole model
  ModelConfig local_;  // this rank's sizes
  ModelShard shard_;
  ExecOptions exec_;
  DType dtype_;
  Device device_;
  ParamStore params_;
  int wte_ = -1, wpe_ = -1, lm_head_ = -1;  // lm_head_: own head, or the tied copy (last stage)
  int final_norm_first_ = -1;
  std::vector<Block> blocks_;
  Norm final_norm_;
  std::function<void(int)> grad_ready_;
  Objective objective_;
  HiddenLoss hidden_;
  // Per local MoE block (by local index; empty for dense blocks): (cap, 2) losses and (cap, E)
  // counts, one row per training micro-batch, cap = exec_.moe_stat_records.
  Buffer moe_record_buf_;
  std::vector<Tensor> moe_loss_rec_, moe_count_rec_;
  mutable int64_t moe_records_ = 0;
  mutable int64_t moe_tokens_ = 0;
};

}  // namespace tessera
