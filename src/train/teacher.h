// Teacher: the frozen model of a distillation (the recipe's distill.teacher), read from a Tessera
// checkpoint of any family and size, dense or MoE. It holds its weights in
// distill.teacher_precision with no gradients, masters or optimizer state, split over the
// student's tensor-parallel group and pipeline stages like the student (its own layers, evenly
// over the stages), replicated over dp; it runs forward only, one micro-batch at a time, beside
// the student's forward on each stage, and its logits reach the student's KD loss on the last. Its
// memory is an arena of its own, planned with the student's (MemoryPlan::teacher), so it can be
// freed when the curriculum no longer needs it. An FP8 teacher is bf16 with its block linears as
// FP8 GEMMs (Fp8Linears::attach_frozen: weights quantized once, its state and copies in the arena).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/recipe.h"
#include "core/memory.h"
#include "model/transformer.h"
#include "optim/fp8_linear.h"

namespace tessera {

// What the teacher is, from its checkpoint alone (nothing allocated).
struct TeacherSpec {
  std::string dir;            // the checkpoint step directory
  ModelConfig model;          // its model section, padded to the student's vocabulary
  DType dtype = DType::bf16;  // of its weights and activations (bf16 when fp8)
  // distill.teacher_precision fp8: the block linears run as FP8 GEMMs with these scaling knobs
  // (precision.fp8), everything else in bf16, as precision.compute: fp8 does for a student.
  bool fp8 = false;
  Fp8ScalingConfig fp8_scaling;
  // distill.hidden_pairs with the teacher's width: the student's ExecOptions::hidden_pairs.
  std::vector<HiddenPair> hidden_pairs;
};

// Reads distill.teacher (a step directory, or a run directory: its latest checkpoint) and checks
// it against the student: the same tokenizer (by the stored hash; skipped when tokenizer_hash is
// empty, as in `tessera plan`) and vocabulary, a model the student's tp splits, and hidden-state
// pairs naming teacher blocks it has, each on its student block's pipeline stage. Every failure
// is a user error naming distill.teacher (or the pair), the checkpoint and the recipe.
TeacherSpec read_teacher_spec(const Recipe& student, const std::string& tokenizer_hash);

// A teacher checkpoint on its own, whole (tp 1, pp 1) with its own vocabulary padding, in
// `dtype` (`tessera distill-cache`): `given` is a step or run directory, checked against the
// data's tokenizer; `who` names the setting in errors.
TeacherSpec read_teacher_checkpoint(const std::string& given, const std::string& tokenizer_hash,
                                    DType dtype, const std::string& who);

// "bf16", "fp32" or "fp8" (its distill.teacher_precision), for logs.
std::string teacher_precision_name(const TeacherSpec& t);

// The teacher's pipeline split: its layers spread evenly over the student's pp stages (the first
// stages take one more when pp does not divide them), so its memory follows the student's.
std::vector<int> teacher_stage_layers(const TeacherSpec& t, int pp);
// The teacher's shard on a rank whose student shard is `student`: the same tp rank and pipeline
// stage, this stage's share of the teacher's layers.
ModelShard teacher_shard(const TeacherSpec& t, const ModelShard& student);

// What travels between pipeline stages for the teacher: its residual stream (N, hidden) in its
// dtype. hidden 0: no teacher.
struct TeacherDims {
  int hidden = 0;
  DType dtype = DType::f32;
};
inline TeacherDims teacher_dims(const std::optional<TeacherSpec>& t) {
  return t ? TeacherDims{t->model.hidden, t->dtype} : TeacherDims{};
}

class Teacher {
 public:
  // Bytes of its arena: the weights and one forward's activations at (B, T) (FP8: also its
  // scaling state, the FP8 weight copies and the quantized input scratch).
  static size_t bytes_needed(const TeacherSpec& t, const ModelShard& student, int B, int T,
                             ops::AttentionImpl attention);
  // Allocates, loads the weights (each rank its tp slice, from any layout that saved them).
  Teacher(const TeacherSpec& t, const ModelShard& student, Device device, int B, int T,
          ops::AttentionImpl attention);
  Teacher(const Teacher&) = delete;
  Teacher& operator=(const Teacher&) = delete;

  // This stage's forward for one micro-batch: the first stage embeds tokens (B, T), the others
  // start from `input` (B*T, hidden), the previous stage's output(). Then output() holds this
  // stage's output (not the last stage) and, on the last stage, logits() the teacher's logits.
  // FP8: the forward's input amaxes then update the scales (agreed over tp: a collective).
  void forward(Tensor tokens, Tensor input);
  Tensor output() const { return acts_->stage_output(); }   // (B*T, hidden)
  Tensor logits() const { return model_->logits(*acts_); }  // (B*T, Vl), last stage
  // (B*T, hidden): its residual stream after its first `blocks` blocks (global count), which
  // must end on this stage, from the last forward.
  Tensor hidden_state(int blocks) const;
  const Transformer& model() const { return *model_; }
  size_t bytes() const { return arena_.capacity(); }
  const Fp8Linears* fp8() const { return fp8_.get(); }  // null unless an FP8 teacher

 private:
  Arena arena_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<Activations> acts_;
  std::unique_ptr<Fp8Linears> fp8_;  // its memory is arena_'s
};

}  // namespace tessera
