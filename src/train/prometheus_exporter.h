// logging.prometheus_port: rank 0's training metrics (step, loss, tokens/s, MFU, loss scale,
// memory, tokens trained, step times) in a MetricsRegistry that a MetricsServer serves.
#pragma once
#include <cstdint>
#include <optional>

#include "config/recipe.h"
#include "core/prometheus.h"
#include "http/metrics_server.h"

namespace tessera {

// One step as metrics.jsonl records it (train/metrics.h), in base units.
struct StepSample {
  int64_t step = 0;  // steps completed
  double loss = 0.0;
  double tokens_per_s = 0.0;
  int64_t tokens = 0;  // trained in this step, all ranks
  double seconds = 0.0;
  double arena_peak_bytes = 0.0;
  std::optional<double> mfu;                // CUDA runs
  std::optional<double> loss_scale;         // fp16 runs
  std::optional<double> device_used_bytes;  // CUDA runs
};

class TrainExporter {
 public:
  // Serves on port logging.prometheus_port (> 0) of every interface, so a Prometheus elsewhere
  // can scrape the job. A port that cannot be bound is a user error naming the field, the port
  // and the recipe file. Built before the Run, so a taken port stops the job at once.
  explicit TrainExporter(const Recipe& recipe);

  // Every step: the gauges, the token counter and the step-time histogram. MFU, the loss scale
  // and device memory appear at their first value (runs without them export none).
  void record_step(const StepSample& s);

  int port() const { return server_.port(); }

 private:
  MetricsRegistry registry_;  // before server_, which renders it until stopped
  Gauge& step_;
  Gauge& loss_;
  Gauge& tokens_per_s_;
  Counter& tokens_total_;
  Histogram& step_seconds_;
  GaugeFamily& memory_;
  Gauge* mfu_ = nullptr;
  Gauge* loss_scale_ = nullptr;
  MetricsServer server_;
};

}  // namespace tessera
