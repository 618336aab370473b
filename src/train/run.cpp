// Run: built once, in this order — device and dtype, data (the vocabulary), the layout, the
// memory plan (before any allocation), the model and its precision policy, data-parallel
// synchronisation and the optimizer, loaders, loss scaler, resume, the pipeline executor.
#include "train/run.h"

#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>

#include "config/layout_check.h"
#include "core/log.h"
#include "io/checkpoint.h"
#include "kernels/ops.h"
#include "parallel/mpi_runtime.h"
#include "train/run_options.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;

Device resolve_device(const Recipe& r) {
  if (r.train.device == DeviceChoice::cpu) return Device::cpu;
  if (r.train.device == DeviceChoice::cuda && !cuda_available())
    TS_USER_ERROR(
        "{}: train.device is 'cuda' but no CUDA device is usable here ({}); use "
        "train.device: cpu or auto",
        r.file,
#ifdef TESSERA_CUDA
        "no GPU visible to this process"
#else
        "this build has no CUDA backend"
#endif
    );
  return cuda_available() ? Device::cuda : Device::cpu;  // cuda, or auto
}

// The parallel context of this process: MPI's world when a launcher started us, else one rank.
std::unique_ptr<ParallelContext> make_context(const Recipe& r, Device device) {
  const ParallelConfig& p = r.parallel;
  if (!mpi_active()) {
    validate_layout(r, 1);  // a layout needing several ranks says how to launch it
    return ParallelContext::single(device);
  }
  validate_layout(r, world_size());
  return std::make_unique<ParallelContext>(ParallelSizes{p.tp, p.dp, p.pp, p.ep}, device,
                                           to_string(p.order));
}

AdamWConfig adamw_config(const OptimConfig& o) {
  AdamWConfig a;
  a.beta1 = o.beta1;
  a.beta2 = o.beta2;
  a.eps = o.eps;
  a.weight_decay = o.weight_decay;
  a.no_decay = o.no_decay;
  return a;
}

// Rank 0 writes the resolved recipe into the run directory and logs it with the layout.
void record_recipe(const Recipe& r, const ParallelContext& ctx) {
  if (ctx.rank() != 0) return;
  const std::string resolved = recipe_to_yaml(r);
  fs::create_directories(r.train.out_dir);
  std::ofstream out(fs::path(r.train.out_dir) / "recipe.yaml");
  out << resolved;
  if (!out) TS_USER_ERROR("cannot write {}/recipe.yaml (train.out_dir)", r.train.out_dir);
  const ParallelConfig& p = r.parallel;
  log_info("resolved recipe ({}):\n{}", r.file, resolved);
  log_info(
      "layout: world {} = dp {} x tp {} x pp {} (order {}), ep {}, zero {}, schedule {}, {} "
      "micro-batches of {} per dp rank per step, global batch {} sequences, stages {}",
      ctx.world_size(), p.dp, p.tp, p.pp, to_string(p.order), p.ep, p.zero,
      p.pp > 1 ? to_string(p.schedule) : "none", r.micro_batches_per_step(), r.data.micro_batch,
      r.global_batch(), fmt::join(resolve_stage_layers(r), "/"));
}

// ZeRO-1 with 16-bit compute keeps the FP32 masters in the optimizer's shards: seed them with the
// exact f32 draws (the store only holds their rounded values). A resume overwrites them.
void seed_sharded_masters(Transformer& model, DistributedOptimizer& opt, uint64_t seed) {
  if (model.params().has_master()) return;
  HostOptimizerState init;
  init.allocate(DType::f32, model.params().padded_num_elements());
  for (int i = 0; i < model.params().size(); ++i)
    model.params().draw_init(i, seed, static_cast<float*>(init.master_of(model.params()[i]).data));
  opt.load_state(model.params(), init);
}

}  // namespace

Run::Run(const Recipe& recipe)
    : recipe_(recipe),
      device_(resolve_device(recipe)),
      dtype_(compute_dtype(recipe.precision.compute)),
      data_(recipe) {
  Recipe& r = recipe_;
  const ParallelConfig& par = r.parallel;
  if (device_ == Device::cuda && mpi_active() && world_size() > 1) select_local_gpu();
  finalize_model_vocab(r.model, data_.vocab_size(), r.file, par.tp);
  ctx_ = make_context(r, device_);
  // From here on a collective or transfer that hangs ends the job, naming itself.
  if (par.timeout_s > 0 && ctx_->world_size() > 1)
    watchdog_ = std::make_unique<Watchdog>(ctx_->communicators(), ctx_->recorder(), par.timeout_s);
  // Collective: every rank reports where it runs (binding, OpenMP threads); rank 0 logs it.
  if (const std::string placement = gather_placements(); !placement.empty())
    log_info("placement: {}", placement);
  const RankCoord me = ctx_->coord();
  shard_ = ModelShard::make(r.model, par.tp, me.tp_rank, par.pp, me.pp_rank,
                            resolve_stage_layers(r), &ctx_->comm(Group::tp))
               .with_ep(par.dp, &ctx_->comm(Group::ep), &ctx_->host_comm(Group::ep));
  schedule_ = run_schedule(r);
  flush_micro_ = run_flush_micro(r);
  const TeacherCache* cache = data_.teacher_cache();

  std::optional<TeacherSpec> teacher;
  if (r.distill.online()) teacher = read_teacher_spec(r, data_.tokenizer_hash());
  const PlanInputs plan_in =
      plan_inputs(r, shard_, device_, teacher, cache ? &cache->meta() : nullptr);
  const ExecOptions& exec = plan_in.exec;  // the model runs as planned
  plan_ = plan_memory(r, plan_in);
  check_plan_fits(plan_, device_, r.file);
  arena_ = Arena(device_, plan_.arena(), "device memory");
  if (plan_.workspace > 0)
    ops::use_cuda_workspace(arena_.alloc_bytes(plan_.workspace), plan_.workspace);
  record_recipe(r, *ctx_);

  model_ = std::make_unique<Transformer>(r.model, dtype_, device_, &arena_, shard_, par.dp,
                                         /*with_master=*/par.zero == 0, exec);
  model_->init_weights(r.train.seed);
  if (r.precision.compute == Compute::fp8) {
    fp8_ = std::make_unique<Fp8Linears>(device_, fp8_scaling_config(r.precision.fp8));
    fp8_->attach(*model_);
  }
  if (r.qat.enabled()) {  // the recipe parser refused qat with fp8
    qat_ = std::make_unique<QatLinears>(r.qat, device_, r.file);
    qat_->attach(*model_);
  }
  DataParallelConfig dcfg;
  dcfg.zero_stage = par.zero;
  dcfg.bucket_bytes = par.bucket_bytes();
  ddp_ = std::make_unique<DistributedDataParallel>(model_->params(),
                                                   DataParallelGroups::from(*ctx_), dcfg);
  opt_ = std::make_unique<DistributedOptimizer>(model_->params(), *ddp_, adamw_config(r.optim),
                                                &arena_);
  lr_ = LrSchedule{r.optim.schedule,     r.optim.lr,    r.optim.min_lr,
                   r.optim.warmup_steps, r.train.steps, r.optim.decay_fraction};
  model_->set_grad_ready_hook([this](int idx) { ddp_->grads_ready_from(idx); });
  data_.make_loaders(r, me.dp_rank, par.dp, shard_, device_);
  seed_sharded_masters(*model_, *opt_, r.train.seed);
  if (dtype_ == DType::f16) scaler_.emplace(r.precision.loss_scale);

  const std::string resume = io::resolve_resume(r.train.out_dir, r.checkpoint.resume);
  if (!resume.empty()) {
    resumed_from_ = resume;
    start_step_ =
        load_checkpoint(resume, r, *model_, *opt_, precision_state(), data_.tokenizer_hash());
    if (rank0()) log_info("resumed from {} at step {}", resume, start_step_);
  }
  if (qat_) {
    qat_->set_active(r.qat.active_at(start_step_));  // what an evaluation before any step sees
    if (rank0())
      log_info("qat: {} weights (group {}), {} activations, {} quantized tensors, from step {}",
               to_string(r.qat.weights), r.qat.group_size, to_string(r.qat.activations),
               qat_->num_layers(), r.qat.start_step);
  }
  if (r.distill.enabled()) {
    auto kd = std::make_unique<DistillLoss>(
        r.distill.reverse_kl, cache ? cache->meta().temperatures : std::vector<float>{});
    kd_ = kd.get();
    model_->objective().add_term(std::move(kd));
    if (cache && rank0())
      log_info("distillation: from the teacher cache {} (top {} of teacher {})", cache->path(),
               cache->meta().top_k, cache->meta().teacher);
  }
  if (teacher) {
    // A run resumed after the soft-label phases never loads the teacher.
    if (teacher_needed_from(r.distill, start_step_, r.train.steps)) {
      teacher_ = std::make_unique<Teacher>(*teacher, shard_, device_, r.data.micro_batch,
                                           r.data.seq_len, r.train.attention);
      if (rank0())
        log_info("distillation: teacher {} ({} parameters, {}), {:.2f} GB per rank", teacher->dir,
                 teacher->model.num_params(), teacher_precision_name(*teacher),
                 teacher_->bytes() / 1e9);
    }
    if (rank0() && !teacher->hidden_pairs.empty()) {
      std::string pairs;
      for (const HiddenPair& p : teacher->hidden_pairs)
        pairs += fmt::format("{}{} -> {}", pairs.empty() ? "" : ", ", p.student, p.teacher);
      log_info(
          "distillation: hidden-state loss over {} pair(s) (student blocks -> teacher blocks: "
          "{}), widths {} and {}{}",
          teacher->hidden_pairs.size(), pairs, r.model.hidden, teacher->model.hidden,
          r.model.hidden == teacher->model.hidden ? "" : " (learned projections)");
    }
  }
  pipe_ = std::make_unique<PipelineExecutor>(*model_, ctx_->comm(Group::pp), schedule_,
                                             flush_micro_, r.data.micro_batch, r.data.seq_len,
                                             arena_, teacher_dims(teacher));
  pipe_->set_measure_busy(r.logging.profile_ops && par.pp > 1);
  TS_CHECK(arena_.used() == arena_.capacity(), "the memory plan reserved {} bytes, the run took {}",
           arena_.capacity(), arena_.used());
  if (rank0())
    log_info(
        "model: {} parameters ({}), {} on {}, this rank holds {} and reserved {:.2f} GB "
        "(activations {:.2f} GB), {} tokens per step",
        r.model.num_params(), to_string(r.model.family), dtype_name(dtype_), device_name(device_),
        model_->params().num_elements(), arena_.capacity() / 1e9, plan_.train_acts / 1e9,
        r.tokens_per_step());
}

double Run::replica_sum(double x) {
  const bool reports = shard_.last_stage() && ctx_->coord().tp_rank == 0;
  return ctx_->host_comm(Group::world).all_reduce_scalar(reports ? x : 0.0, ReduceOp::sum);
}

double Run::stage_sum(double x) {
  const bool reports = ctx_->coord().tp_rank == 0;
  return ctx_->host_comm(Group::world).all_reduce_scalar(reports ? x : 0.0, ReduceOp::sum);
}

void Run::free_teacher() {
  if (!teacher_) return;
  teacher_.reset();
  if (rank0()) log_info("distillation: the curriculum no longer needs the teacher; freed it");
}

void Run::save(int64_t step) {
  save_checkpoint(recipe_, *ctx_, *model_, *opt_, precision_state(), step, data_.tokenizer_hash(),
                  data_.tokenizer_json());
}

}  // namespace tessera
