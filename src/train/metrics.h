// Metrics: one JSON object per line in <out_dir>/metrics.jsonl (for tools and plots) and a human
// progress line on the terminal, for every step and every evaluation (rank 0 writes; every rank
// may call). Also the per-op profile of logging.profile_ops.
#pragma once
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include "train/evaluate.h"
#include "train/prometheus_exporter.h"
#include "train/run.h"
#include "train/train_step.h"

namespace tessera {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  // Keeps earlier lines of a resumed run up to `resume_from_step` (a resumed run continues the
  // file, dropping lines of steps it will replay).
  MetricsWriter(const std::string& path, int64_t resume_from_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const nlohmann::json& record);  // one line, flushed

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

// The run's records: per step {step, loss, lr, grad_norm, tokens_per_s, tokens, step_s, mem_gb,
// and per configuration loss_scale/skipped (fp16), pipeline_* (pp > 1 with profile_ops), mfu and
// device_used_gb (CUDA), alpha, temperature, hidden_weight, ce_loss, kd_loss and hidden_loss
// (distilling; a term's loss is null when its weight is 0)}; per evaluation {step, val_loss,
// val_ppl, val_tokens, and under fp16 the overflow rate since the previous evaluation}.
class RunMetrics {
 public:
  // `exporter` (rank 0 with logging.prometheus_port, else null) gets every step's values too.
  explicit RunMetrics(Run& run, TrainExporter* exporter = nullptr);
  // `done` = steps completed (the 1-based step just taken); `seconds` its wall time.
  void record_step(int64_t done, const StepResult& s, double seconds);
  void record_eval(int64_t step, const EvalResult& e);

 private:
  Run& run_;
  std::optional<MetricsWriter> writer_;  // rank 0
  TrainExporter* exporter_;
  std::chrono::steady_clock::time_point start_;
  double step_flops_;
  int64_t window_steps_ = 0, window_skipped_ = 0;  // fp16: steps since the last evaluation
};

// logging.profile_ops: times every op of the steps after a warm-up (cuBLASLt heuristics and cuDNN
// plans are built first) and reports a table and <out_dir>/op_profile.json at the end.
class OpProfile {
 public:
  explicit OpProfile(const Run& run) : run_(run) {}
  void before_step(int64_t step);
  void after_step(double seconds);
  void report();  // rank 0 writes

 private:
  static constexpr int kWarmupSteps = 3;
  const Run& run_;
  double seconds_ = 0.0;
  int64_t steps_ = 0;
};

// "12m05s", "3.2s".
std::string format_duration(double seconds);

}  // namespace tessera
