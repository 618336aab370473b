// Metrics: the JSONL writer (on resume the file is rewritten without records from steps that will
// be replayed, so metrics.jsonl reads as one uninterrupted run), the step and evaluation records
// with their progress lines, and the op profile.
#include "train/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "kernels/op_profile.h"

namespace tessera {

MetricsWriter::MetricsWriter(const std::string& path, int64_t resume_from_step) : path_(path) {
  std::vector<std::string> kept;
  if (resume_from_step > 0) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const auto rec = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (rec.is_object() && rec.contains("step") && rec["step"].get<int64_t>() <= resume_from_step)
        kept.push_back(line);
    }
  }
  file_ = std::fopen(path.c_str(), "w");
  if (!file_) TS_USER_ERROR("cannot write metrics file '{}': {}", path, std::strerror(errno));
  for (const std::string& l : kept) std::fprintf(file_, "%s\n", l.c_str());
  std::fflush(file_);
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!file_) return;
  const std::string s = record.dump();
  if (std::fprintf(file_, "%s\n", s.c_str()) < 0 || std::fflush(file_) != 0)
    TS_SYSTEM_ERROR("writing {} failed: {}", path_, std::strerror(errno));
}

namespace {

// FLOPs per token for training: 6N (forward + backward of every weight) plus 12·L·h·s for the
// attention scores and values (s = sequence length, h = hidden); N counts every parameter once.
// Active parameters only: an MoE token passes through K of the E routed experts.
double flops_per_token(const ModelConfig& m, int seq_len) {
  return 6.0 * double(m.num_active_params()) + 12.0 * m.num_layers * double(m.hidden) * seq_len;
}
constexpr double kPeakBf16Flops = 989e12;  // H100/H200 SXM dense BF16

}  // namespace

RunMetrics::RunMetrics(Run& run, TrainExporter* exporter)
    : run_(run),
      exporter_(exporter),
      start_(std::chrono::steady_clock::now()),
      step_flops_(flops_per_token(run.recipe().model, run.recipe().data.seq_len) *
                  double(run.recipe().tokens_per_step())) {
  if (run.rank0())
    writer_.emplace((std::filesystem::path(run.recipe().train.out_dir) / "metrics.jsonl").string(),
                    run.start_step());
}

void RunMetrics::record_step(int64_t done, const StepResult& s, double seconds) {
  ++window_steps_;
  window_skipped_ += s.skipped ? 1 : 0;
  if (!writer_) return;
  const Recipe& r = run_.recipe();
  const double tok_per_s = double(r.tokens_per_step()) / seconds;
  const int num_gpus = run_.ctx().world_size();
  nlohmann::json rec = {{"step", done},
                        {"loss", s.loss},
                        {"lr", s.lr},
                        {"grad_norm", s.grad_norm},
                        {"tokens_per_s", tok_per_s},
                        {"tokens", done * r.tokens_per_step()},
                        {"step_s", seconds},
                        {"mem_gb", run_.arena().peak() / 1e9}};
  if (num_gpus > 1) rec["tokens_per_s_per_rank"] = tok_per_s / num_gpus;
  if (r.qat.enabled()) rec["qat"] = s.qat;
  if (run_.scaler()) {
    rec["loss_scale"] = s.loss_scale;  // the scale this step's backward used
    rec["skipped"] = s.skipped ? 1 : 0;
    if (s.skipped) rec.erase("grad_norm");  // not computed: the gradients overflowed
  }
  if (r.parallel.pp > 1 && r.logging.profile_ops) {
    // Stage 0's compute time within the forward/backward phase (optimizer excluded): the bubble
    // is its idle fraction, to compare with (p - 1) / (m + p - 1).
    rec["pipeline_busy_s"] = s.busy_s;
    rec["pipeline_s"] = s.pipeline_s;
    rec["pipeline_bubble"] = 1.0 - s.busy_s / s.pipeline_s;
  }
  std::string moe;
  if (!s.moe.empty()) {
    double aux = 0.0, z = 0.0, dropped = 0.0;
    nlohmann::json layers = nlohmann::json::array();
    for (const MoeLayerMetrics& m : s.moe) {
      aux += m.aux_loss;
      z += m.z_loss;
      dropped += m.dropped / double(s.moe.size());
      layers.push_back({{"layer", m.layer},
                        {"aux_loss", m.aux_loss},
                        {"z_loss", m.z_loss},
                        {"max_tokens", m.max_tokens},
                        {"mean_tokens", m.mean_tokens},
                        {"dropped", m.dropped}});
    }
    rec["moe_aux_loss"] = aux;  // summed over layers
    rec["moe_z_loss"] = z;
    rec["moe_dropped"] = dropped;  // mean over layers
    rec["moe_layers"] = layers;
    moe = fmt::format(" | aux {:.4f}", aux);
  }
  std::string kd;
  if (s.distill) {
    rec["alpha"] = s.kd_weights.alpha;
    rec["temperature"] = s.kd_weights.temperature;
    // A step with alpha 0 runs no teacher: its KD loss is not known.
    rec["kd_loss"] = s.kd_weights.alpha > 0.0f ? nlohmann::json(s.kd_loss) : nlohmann::json();
    rec["ce_loss"] = s.ce_loss;
    // Likewise the hidden-state loss at beta 0 (always, without distill.hidden_pairs).
    const float beta = s.kd_weights.hidden_weight;
    rec["hidden_weight"] = beta;
    rec["hidden_loss"] = beta > 0.0f ? nlohmann::json(s.hidden_loss) : nlohmann::json();
    kd = s.kd_weights.alpha > 0.0f
             ? fmt::format(" | ce {:.4f} kd {:.4f} (alpha {:.2f}, T {:.2f})", s.ce_loss, s.kd_loss,
                           s.kd_weights.alpha, s.kd_weights.temperature)
         : beta > 0.0f ? fmt::format(" | ce {:.4f} (alpha 0)", s.ce_loss)
                       : std::string(" | alpha 0: no teacher");
    if (beta > 0.0f) kd += fmt::format(" | hidden {:.4f} (beta {:.2f})", s.hidden_loss, beta);
  }
  std::string mfu;
  StepSample sample{
      done, s.loss, tok_per_s, r.tokens_per_step(), seconds, double(run_.arena().peak())};
  if (run_.scaler()) sample.loss_scale = s.loss_scale;
  if (run_.device() == Device::cuda) {
    sample.mfu = step_flops_ / seconds / (kPeakBf16Flops * num_gpus);
    rec["mfu"] = *sample.mfu;
    mfu = fmt::format(" | mfu {:.1f}%", 100.0 * *sample.mfu);
    size_t free_bytes = 0, total_bytes = 0;
    if (device_memory_info(run_.device(), &free_bytes, &total_bytes)) {
      sample.device_used_bytes = double(total_bytes - free_bytes);
      rec["device_used_gb"] = *sample.device_used_bytes / 1e9;
    }
  }
  writer_->write(rec);
  if (exporter_) exporter_->record_step(sample);
  if (done % r.logging.every != 0 && done != r.train.steps) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = elapsed / double(done - run_.start_step()) * double(r.train.steps - done);
  const std::string scale =
      run_.scaler() ? fmt::format(" | scale {}{}", s.loss_scale, s.skipped ? " (skipped)" : "")
                    : std::string();
  log_info("step {:>5}/{} | loss {:.4f}{}{} | lr {:.2e} | norm {:.3f}{} | {:.0f} tok/s{} | eta {}",
           done, r.train.steps, s.loss, kd, moe, s.lr, s.grad_norm, scale, tok_per_s, mfu,
           format_duration(eta));
}

void RunMetrics::record_eval(int64_t step, const EvalResult& e) {
  const int64_t steps = window_steps_, skipped = window_skipped_;
  window_steps_ = window_skipped_ = 0;
  if (!writer_) return;
  log_info("eval step {}: val_loss {:.4f} | perplexity {:.2f} | {} tokens", step, e.loss,
           std::exp(e.loss), e.tokens);
  nlohmann::json rec = {{"step", step},
                        {"val_loss", e.loss},
                        {"val_ppl", std::exp(e.loss)},
                        {"val_tokens", e.tokens}};
  if (const LossScaler* scaler = run_.scaler()) {
    const double rate = steps > 0 ? double(skipped) / double(steps) : 0.0;
    const LossScaler::State st = scaler->state();
    rec["overflow_rate"] = rate;
    rec["overflow_steps"] = skipped;
    rec["skipped_total"] = st.skipped;
    rec["loss_scale"] = st.scale;
    log_info(
        "eval step {}: fp16 overflow rate {:.2f}% ({} of {} steps since the last "
        "evaluation; {} skipped in all), loss scale {}",
        step, 100.0 * rate, skipped, steps, st.skipped, st.scale);
  }
  writer_->write(rec);
}

void OpProfile::before_step(int64_t step) {
  if (!run_.recipe().logging.profile_ops || step != run_.start_step() + kWarmupSteps) return;
  ops::profile_reset();
  ops::profile_enable(true);
}

void OpProfile::after_step(double seconds) {
  if (!ops::profile_enabled()) return;
  seconds_ += seconds;
  ++steps_;
}

void OpProfile::report() {
  if (!ops::profile_enabled()) return;
  ops::profile_enable(false);
  if (!run_.rank0()) return;
  const std::vector<ops::OpTime> times = ops::profile_report();
  double op_ms = 0.0;
  for (const auto& t : times) op_ms += t.ms;
  const int64_t n = std::max<int64_t>(steps_, 1);
  const double step_ms = steps_ > 0 ? 1e3 * seconds_ / double(steps_) : 0.0;
  std::string table =
      fmt::format("op profile over {} steps ({:.2f} ms/step, {:.2f} ms/step in ops):\n", steps_,
                  step_ms, op_ms / double(n));
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& t : times) {
    const double per_step = t.ms / double(n);
    table += fmt::format("  {:<24} {:>6} calls/step {:>9.3f} ms/step {:>6.1f}%\n", t.op,
                         t.calls / n, per_step, step_ms > 0 ? 100.0 * per_step / step_ms : 0.0);
    rows.push_back({{"op", t.op}, {"calls", t.calls}, {"ms", t.ms}, {"ms_per_step", per_step}});
  }
  log_info("{}", table);
  std::ofstream(std::filesystem::path(run_.recipe().train.out_dir) / "op_profile.json")
      << nlohmann::json{{"steps", steps_}, {"step_ms", step_ms}, {"ops", rows}}.dump(2);
}

std::string format_duration(double seconds) {
  if (seconds < 60) return fmt::format("{:.1f}s", seconds);
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s < 3600) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
}

}  // namespace tessera
