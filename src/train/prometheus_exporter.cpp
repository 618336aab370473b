// TrainExporter: the tessera_train_* metric families and their updates, and the user error for a
// port that cannot be bound.
#include "train/prometheus_exporter.h"

#include "config/enums.h"
#include "core/error.h"
#include "core/log.h"

namespace tessera {

TrainExporter::TrainExporter(const Recipe& recipe)
    : step_(registry_.add_gauge("tessera_train_step", "optimizer steps completed").get()),
      loss_(registry_.add_gauge("tessera_train_loss", "training loss of the latest step").get()),
      tokens_per_s_(registry_
                        .add_gauge("tessera_train_tokens_per_second",
                                   "tokens per second of the latest step, all ranks")
                        .get()),
      tokens_total_(registry_
                        .add_counter("tessera_train_tokens_total",
                                     "tokens trained by this process, all ranks (a resumed run "
                                     "counts from 0 again)")
                        .get()),
      // 10 ms .. 82 s: a tiny CPU model's step up to a large model's with many micro-batches.
      step_seconds_(registry_
                        .add_histogram("tessera_train_step_seconds", "wall time of a step",
                                       exponential_buckets(0.01, 2.0, 14))
                        .get()),
      memory_(registry_.add_gauge("tessera_train_memory_bytes",
                                  "memory of rank 0: arena_peak (the arena's high-water mark, "
                                  "metrics.jsonl's mem_gb), device_used (CUDA: the device's "
                                  "memory in use, device_used_gb)",
                                  {"kind"})),
      server_(registry_) {
  registry_
      .add_gauge("tessera_train_info", "the run's model family and compute precision (1)",
                 {"model", "precision"})
      .labels({to_string(recipe.model.family), to_string(recipe.precision.compute)})
      .set(1.0);
  const int port = recipe.logging.prometheus_port;
  TS_CHECK(port > 0, "TrainExporter with logging.prometheus_port {}", port);
  if (const auto err = server_.start("0.0.0.0", port))
    TS_USER_ERROR(
        "{}: logging.prometheus_port: cannot serve metrics on port {}: {} (is another process "
        "using it? choose a free port, or 0 to turn the endpoint off)",
        recipe.file, port, *err);
  log_info("prometheus: serving http://0.0.0.0:{}/metrics", server_.port());
}

void TrainExporter::record_step(const StepSample& s) {
  step_.set(double(s.step));
  loss_.set(s.loss);
  tokens_per_s_.set(s.tokens_per_s);
  tokens_total_.add(double(s.tokens));
  step_seconds_.observe(s.seconds);
  memory_.labels({"arena_peak"}).set(s.arena_peak_bytes);
  if (s.device_used_bytes) memory_.labels({"device_used"}).set(*s.device_used_bytes);
  if (s.mfu) {
    if (!mfu_)
      mfu_ = &registry_
                  .add_gauge("tessera_train_mfu",
                             "model FLOPs utilization of the latest step against the dense BF16 "
                             "peak of the GPUs (0..1)")
                  .get();
    mfu_->set(*s.mfu);
  }
  if (s.loss_scale) {
    if (!loss_scale_)
      loss_scale_ = &registry_
                         .add_gauge("tessera_train_loss_scale",
                                    "fp16 loss scale the latest step's backward used")
                         .get();
    loss_scale_->set(*s.loss_scale);
  }
}

}  // namespace tessera
