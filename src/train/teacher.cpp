// The distillation teacher: its spec from the checkpoint (with the checks against the student),
// its shard, arena and weights, and its forward.
#include "train/teacher.h"

#include <filesystem>
#include <vector>

#include "config/layout_check.h"
#include "io/checkpoint.h"
#include "kernels/ops.h"
#include "train/checkpointing.h"
#include "train/run_options.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;

// A complete step directory as given, or a run directory's latest checkpoint; `who` names the
// setting in the error ("<recipe>: distill.teacher").
std::string resolve_teacher_dir(const std::string& given, const std::string& who) {
  if (io::is_complete_checkpoint(given)) return given;
  std::error_code ec;
  const std::string latest = fs::is_directory(given, ec) ? io::latest_checkpoint(given) : "";
  if (latest.empty())
    TS_USER_ERROR(
        "{} = '{}' is neither a complete checkpoint step directory nor a run directory holding "
        "one; train the teacher first (tessera train TEACHER_RECIPE) and name its run or one of "
        "its runs/<name>/checkpoints/step_<N>",
        who, given);
  return latest;
}

// The student's tp must split the teacher's heads and FFN as it splits its own.
void check_teacher_split(const Recipe& r, const TeacherSpec& t) {
  const ModelConfig& m = t.model;
  const int tp = r.parallel.tp;
  const auto need = [&](int64_t value, const char* what) {
    if (value % tp != 0)
      TS_USER_ERROR(
          "{}: distill.teacher {} has {} = {}, which parallel.tp = {} does not divide (the "
          "teacher is split over the student's tp group)",
          r.file, t.dir, what, value, tp);
  };
  need(m.num_heads, "model.num_heads");
  need(m.num_kv_heads, "model.num_kv_heads");
  need(m.ffn_hidden, "model.ffn_hidden");
  if (m.moe.enabled() && m.moe.shared_experts > 0)
    need(int64_t(m.moe.shared_experts) * m.moe.shared_ffn_hidden,
         "moe.shared_experts x moe.shared_ffn_hidden");
  if (m.num_layers < r.parallel.pp)
    TS_USER_ERROR(
        "{}: distill.teacher {} has model.num_layers = {}, fewer than the parallel.pp = {} "
        "stages it is split over",
        r.file, t.dir, m.num_layers, r.parallel.pp);
  if (m.moe.enabled() && r.parallel.ep > 1)
    TS_USER_ERROR(
        "{}: distill.teacher {} is an MoE model and parallel.ep = {}: an MoE teacher under "
        "expert parallelism is not built yet; use ep 1",
        r.file, t.dir, r.parallel.ep);
}

// The pipeline stage holding global block `block` (0-based) of a split, and that stage's first
// block.
struct StageOf {
  int stage = 0, first = 0, count = 0;
};
StageOf stage_of(const std::vector<int>& stage_layers, int block) {
  StageOf s;
  for (; s.stage < int(stage_layers.size()); ++s.stage) {
    s.count = stage_layers[s.stage];
    if (block < s.first + s.count) return s;
    s.first += s.count;
  }
  TS_BUG("block {} past a split of {} stages", block, stage_layers.size());
}

// Each hidden-state pair names a teacher block the teacher has, on the pipeline stage of its
// student block (the teacher's state must be where the student's is); returns the pairs with the
// teacher's width.
std::vector<HiddenPair> resolve_hidden_pairs(const Recipe& r, const TeacherSpec& t) {
  const std::vector<int> student_split = resolve_stage_layers(r);
  const std::vector<int> teacher_split = teacher_stage_layers(t, r.parallel.pp);
  std::vector<HiddenPair> out;
  for (size_t i = 0; i < r.distill.hidden_pairs.size(); ++i) {
    const DistillHiddenPair& p = r.distill.hidden_pairs[i];
    if (p.teacher > t.model.num_layers)
      TS_USER_ERROR(
          "{}: distill.hidden_pairs[{}].teacher = {}: more than the teacher's {} blocks "
          "(distill.teacher {} has model.num_layers = {})",
          r.file, i, p.teacher, t.model.num_layers, t.dir, t.model.num_layers);
    const StageOf s = stage_of(student_split, p.student - 1);
    const StageOf u = stage_of(teacher_split, p.teacher - 1);
    if (s.stage != u.stage)
      TS_USER_ERROR(
          "{}: distill.hidden_pairs[{}] = {{student: {}, teacher: {}}}: under parallel.pp = {} "
          "the student's block {} is on pipeline stage {} (its blocks {}..{}) and the teacher's "
          "block {} on stage {} (its blocks {}..{}); a pair's two blocks must share a stage (the "
          "teacher's {} blocks are split evenly over the stages, the student's by "
          "parallel.stage_layers); choose another pair or another split",
          r.file, i, p.student, p.teacher, r.parallel.pp, p.student, s.stage, s.first + 1,
          s.first + s.count, p.teacher, u.stage, u.first + 1, u.first + u.count,
          t.model.num_layers);
    out.push_back(HiddenPair{p.student, p.teacher, t.model.hidden});
  }
  return out;
}

ExecOptions teacher_exec(ops::AttentionImpl attention) {
  ExecOptions exec;
  exec.attention = attention;
  exec.frozen = true;
  return exec;
}

}  // namespace

TeacherSpec read_teacher_spec(const Recipe& r, const std::string& tokenizer_hash) {
  TeacherSpec t;
  t.dir = resolve_teacher_dir(r.distill.teacher, r.file + ": distill.teacher");
  const io::CheckpointReader ck = io::CheckpointReader::open(t.dir);
  t.model = parse_recipe(ck.meta("recipe"), t.dir + "/recipe").model;
  if (!tokenizer_hash.empty() && ck.has_meta("tokenizer_hash") &&
      ck.meta("tokenizer_hash") != tokenizer_hash)
    TS_USER_ERROR(
        "{}: distill.teacher {} was trained with tokenizer {}, but the student's data "
        "(data.path) uses tokenizer {}; teacher and student must share one tokenizer",
        r.file, t.dir, ck.meta("tokenizer_hash"), tokenizer_hash);
  if (t.model.vocab_size != r.model.vocab_size)
    TS_USER_ERROR(
        "{}: distill.teacher {} has model.vocab_size = {}, the student {}; teacher and student "
        "must share one vocabulary",
        r.file, t.dir, t.model.vocab_size, r.model.vocab_size);
  if (t.model.max_seq_len < r.data.seq_len)
    TS_USER_ERROR(
        "{}: distill.teacher {} has model.max_seq_len = {}, shorter than data.seq_len = {}", r.file,
        t.dir, t.model.max_seq_len, r.data.seq_len);
  // Padding rows never reach a loss: the teacher takes the student's, so both split the
  // vocabulary into the same column slices under tp.
  t.model.padded_vocab_size = r.model.padded_vocab_size;
  t.model.vocab_pad_multiple = r.model.vocab_pad_multiple;
  check_teacher_split(r, t);
  t.dtype = r.distill.teacher_precision == TeacherPrecision::fp32 ? DType::f32 : DType::bf16;
  t.fp8 = r.distill.teacher_precision == TeacherPrecision::fp8;
  t.fp8_scaling = fp8_scaling_config(r.precision.fp8);
  t.hidden_pairs = resolve_hidden_pairs(r, t);
  return t;
}

TeacherSpec read_teacher_checkpoint(const std::string& given, const std::string& tokenizer_hash,
                                    DType dtype, const std::string& who) {
  TeacherSpec t;
  t.dir = resolve_teacher_dir(given, who);
  const io::CheckpointReader ck = io::CheckpointReader::open(t.dir);
  t.model = parse_recipe(ck.meta("recipe"), t.dir + "/recipe").model;
  if (ck.has_meta("tokenizer_hash") && ck.meta("tokenizer_hash") != tokenizer_hash)
    TS_USER_ERROR("{} = {} was trained with tokenizer {}, the data has tokenizer {}", who, t.dir,
                  ck.meta("tokenizer_hash"), tokenizer_hash);
  t.dtype = dtype;
  return t;
}

std::string teacher_precision_name(const TeacherSpec& t) {
  return t.fp8 ? "fp8" : std::string(dtype_name(t.dtype));
}

std::vector<int> teacher_stage_layers(const TeacherSpec& t, int pp) {
  std::vector<int> counts(pp, t.model.num_layers / pp);
  for (int s = 0; s < t.model.num_layers % pp; ++s) ++counts[s];
  return counts;
}

ModelShard teacher_shard(const TeacherSpec& t, const ModelShard& student) {
  return ModelShard::make(t.model, student.tp_size, student.tp_rank, student.pp_size,
                          student.pp_rank, teacher_stage_layers(t, student.pp_size),
                          student.tp_comm);
}

size_t Teacher::bytes_needed(const TeacherSpec& t, const ModelShard& student, int B, int T,
                             ops::AttentionImpl attention) {
  const ModelShard s = teacher_shard(t, student);
  const ExecOptions exec = teacher_exec(attention);
  const size_t fp8 =
      t.fp8 ? Fp8Linears::frozen_bytes(t.model, s, int64_t(B) * T, t.fp8_scaling) : 0;
  return Transformer::param_bytes(t.model, s, t.dtype, 1, /*with_master=*/false,
                                  /*fp32_grads=*/false, /*with_grads=*/false) +
         Activations::bytes_needed(t.model, t.dtype, B, T, /*training=*/false, s, exec) + fp8;
}

Teacher::Teacher(const TeacherSpec& t, const ModelShard& student, Device device, int B, int T,
                 ops::AttentionImpl attention) {
  const ExecOptions exec = teacher_exec(attention);
  const ModelShard shard = teacher_shard(t, student);
  arena_ = Arena(device, bytes_needed(t, student, B, T, attention), "teacher");
  model_ = std::make_unique<Transformer>(t.model, t.dtype, device, &arena_, shard, 1,
                                         /*with_master=*/false, exec);
  // Each rank reads its slices (FP32 masters) and rounds them to the teacher's dtype.
  const io::CheckpointReader ck = io::CheckpointReader::open(t.dir);
  for (const Param& p : model_->params().all()) {
    const int64_t n = p.spec.shape.numel();
    std::vector<float> master(n);
    read_param_slice(ck, p.spec.name, p.spec, t.model.vocab_size, DType::f32, master.data());
    std::vector<char> value(dtype_storage_bytes(t.dtype, n));
    convert_buffer(master.data(), DType::f32, value.data(), t.dtype, n);
    copy_bytes(p.value.data, device, value.data(), Device::cpu, value.size());
  }
  acts_ = std::make_unique<Activations>(*model_, B, T, /*training=*/false, &arena_);
  if (t.fp8) {  // after the weights are loaded: they are quantized once, here
    fp8_ = std::make_unique<Fp8Linears>(device, t.fp8_scaling);
    fp8_->attach_frozen(*model_, int64_t(B) * T, arena_, shard.tp_comm);
  }
  TS_CHECK(arena_.used() == arena_.capacity(), "the teacher's plan reserved {} bytes, it took {}",
           arena_.capacity(), arena_.used());
}

Tensor Teacher::hidden_state(int blocks) const {
  const ModelShard& s = model_->shard();
  const int local = blocks - s.first_layer;
  TS_CHECK(local >= 1 && local <= s.num_layers,
           "the teacher's state after {} blocks is not on stage {} (blocks {}..{})", blocks,
           s.pp_rank, s.first_layer + 1, s.first_layer + s.num_layers);
  return acts_->residual(local);
}

void Teacher::forward(Tensor tokens, Tensor input) {
  if (!model_->shard().first_stage()) copy_tensor(acts_->stage_input(), input);
  model_->forward_stage(*acts_, tokens);
  if (fp8_) fp8_->end_forward(model_->shard().tp_comm);
}

}  // namespace tessera
