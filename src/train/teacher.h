// Teacher: the frozen model of a distillation (the recipe's distill.teacher), read from a Tessera
// checkpoint of any family and size, dense or MoE. It holds its weights in
// distill.teacher_precision with no gradients, masters or optimizer state, split over the
// student's tensor-parallel group like the student (its own layers, on the one pipeline stage),
// replicated over dp; it runs forward only, one micro-batch at a time, and writes its logits
// where the student's KD loss reads them. Its memory is an arena of its own, planned with the
// student's (MemoryPlan::teacher), so it can be freed when the curriculum no longer needs it.
#pragma once
#include <memory>
#include <string>

#include "config/recipe.h"
#include "core/memory.h"
#include "model/transformer.h"

namespace tessera {

// What the teacher is, from its checkpoint alone (nothing allocated).
struct TeacherSpec {
  std::string dir;    // the checkpoint step directory
  ModelConfig model;  // its model section, padded to the student's vocabulary
  DType dtype = DType::bf16;
};

// Reads distill.teacher (a step directory, or a run directory: its latest checkpoint) and checks
// it against the student: the same tokenizer (by the stored hash; skipped when tokenizer_hash is
// empty, as in `tessera plan`) and vocabulary, and a model the student's tp splits. Every
// failure is a user error naming distill.teacher, the checkpoint and the recipe.
TeacherSpec read_teacher_spec(const Recipe& student, const std::string& tokenizer_hash);

// The teacher's shard on a rank whose student shard is `student` (same tp rank; every layer).
ModelShard teacher_shard(const TeacherSpec& t, const ModelShard& student);

class Teacher {
 public:
  // Bytes of its arena: the weights and one forward's activations at (B, T).
  static size_t bytes_needed(const TeacherSpec& t, const ModelShard& student, int B, int T,
                             ops::AttentionImpl attention);
  // Allocates, loads the weights (each rank its tp slice, from any layout that saved them).
  Teacher(const TeacherSpec& t, const ModelShard& student, Device device, int B, int T,
          ops::AttentionImpl attention);
  Teacher(const Teacher&) = delete;
  Teacher& operator=(const Teacher&) = delete;

  // Runs the teacher on tokens (B, T) and writes its logits (B*T, Vl) into `out`, rounded to
  // out's dtype.
  void forward(Tensor tokens, Tensor out);
  const Transformer& model() const { return *model_; }
  size_t bytes() const { return arena_.capacity(); }

 private:
  Arena arena_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<Activations> acts_;
};

}  // namespace tessera
