// EngineService: the engine thread's loop (admit submissions, abort cancellations, step, deliver
// events, update metrics) and the request streams handler threads read.
#include "serve/engine_service.h"

#include "core/error.h"
#include "core/log.h"

namespace tessera::serve {

std::vector<EngineEvent> RequestStream::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !events_.empty(); });
  std::vector<EngineEvent> out(events_.begin(), events_.end());
  events_.clear();
  for (const EngineEvent& e : out)
    if (e.finished) delivered_finish_ = true;
  return out;
}

bool RequestStream::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return delivered_finish_;
}

void RequestStream::push(EngineEvent e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = finished_ || e.finished;
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

EngineService::EngineService(std::unique_ptr<Engine> engine, MetricsRegistry& m)
    : engine_(std::move(engine)),
      prompt_tokens_(m.add_counter("tessera_prompt_tokens_total", "prompt tokens admitted").get()),
      generated_tokens_(m.add_counter("tessera_generation_tokens_total", "tokens generated").get()),
      finished_(m.add_counter("tessera_request_finished_total",
                              "requests finished, by reason (stop, length, cancelled, error)",
                              {"reason"})),
      ttft_(m.add_histogram("tessera_time_to_first_token_seconds",
                            "from submission to the first generated token",
                            exponential_buckets(0.001, 2.0, 16))
                .get()),
      itl_(m.add_histogram("tessera_inter_token_latency_seconds",
                           "between consecutive tokens of one request",
                           exponential_buckets(0.0005, 2.0, 16))
               .get()),
      step_time_(m.add_histogram("tessera_engine_step_seconds", "one engine iteration",
                                 exponential_buckets(0.0005, 2.0, 16))
                     .get()),
      batch_tokens_(m.add_histogram("tessera_batch_tokens", "tokens per engine step",
                                    exponential_buckets(1.0, 2.0, 14))
                        .get()),
      running_(m.add_gauge("tessera_requests_running", "requests in the running batch").get()),
      waiting_(m.add_gauge("tessera_requests_waiting", "requests queued for admission").get()),
      kv_used_(m.add_gauge("tessera_kv_cache_blocks_used", "KV cache blocks in use").get()),
      kv_free_(m.add_gauge("tessera_kv_cache_blocks_free", "KV cache blocks free").get()),
      batch_size_(m.add_gauge("tessera_batch_size", "requests in the last engine step").get()),
      thread_([this] { run(); }) {}

EngineService::~EngineService() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::shared_ptr<RequestStream> EngineService::submit(std::vector<int32_t> prompt,
                                                     const SamplingParams& p) {
  auto s = std::make_shared<RequestStream>();
  s->submitted_ = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.empty()) {
      submissions_.push_back(Submission{std::move(prompt), p, s});
    } else {
      EngineEvent ev;
      ev.finished = true;
      ev.reason = FinishReason::error;
      ev.error = failure_;
      s->push(std::move(ev));
    }
  }
  cv_.notify_all();
  return s;
}

void EngineService::cancel(const std::shared_ptr<RequestStream>& s) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancellations_.push_back(s);
  }
  cv_.notify_all();
}

void EngineService::admit(std::vector<Submission>& batch) {
  for (Submission& sub : batch) {
    try {
      const int64_t n = int64_t(sub.prompt.size());
      sub.stream->id_ = engine_->add_request(std::move(sub.prompt), sub.params);
      live_[sub.stream->id_] = sub.stream;
      prompt_tokens_.add(double(n));
    } catch (const Error& e) {
      EngineEvent ev;
      ev.finished = true;
      ev.reason = FinishReason::error;
      ev.error = e.what();
      finished_.labels({"error"}).add();
      sub.stream->push(std::move(ev));
    }
  }
}

void EngineService::deliver(const std::vector<EngineEvent>& events) {
  const auto now = std::chrono::steady_clock::now();
  for (const EngineEvent& e : events) {
    const auto it = live_.find(e.id);
    if (it == live_.end()) continue;
    RequestStream& s = *it->second;
    if (e.token >= 0) {
      generated_tokens_.add();
      const auto since = now - (s.has_token_ ? s.last_token_ : s.submitted_);
      (s.has_token_ ? itl_ : ttft_).observe(std::chrono::duration<double>(since).count());
      s.has_token_ = true;
      s.last_token_ = now;
    }
    if (e.finished) finished_.labels({finish_reason_name(e.reason)}).add();
    it->second->push(e);
    if (e.finished) live_.erase(it);
  }
}

void EngineService::update_gauges(double step_seconds) {
  running_.set(double(engine_->num_running()));
  waiting_.set(double(engine_->num_waiting()));
  kv_used_.set(double(engine_->kv_blocks_used()));
  kv_free_.set(double(engine_->kv_blocks_total() - engine_->kv_blocks_used()));
  batch_size_.set(double(engine_->last_batch_seqs()));
  if (step_seconds >= 0.0) {
    step_time_.observe(step_seconds);
    batch_tokens_.observe(double(engine_->last_batch_rows()));
  }
}

void EngineService::run() {
  update_gauges(-1.0);
  for (;;) {
    std::vector<Submission> batch;
    std::vector<std::shared_ptr<RequestStream>> cancels;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || !submissions_.empty() || !cancellations_.empty() ||
               engine_->has_unfinished();
      });
      if (stop_) return;
      batch.swap(submissions_);
      cancels.swap(cancellations_);
    }
    try {
      admit(batch);
      for (const auto& s : cancels)
        if (s->id_ >= 0 && live_.count(s->id_)) engine_->abort(s->id_);
      if (!engine_->has_unfinished()) {
        update_gauges(-1.0);
        continue;
      }
      const auto t0 = std::chrono::steady_clock::now();
      const std::vector<EngineEvent> events = engine_->step();
      const double dt =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      deliver(events);
      update_gauges(dt);
    } catch (const std::exception& e) {
      // A failing step is a bug or a device failure: every live request ends with the error and
      // the server keeps answering (new requests will likely fail the same way, visibly).
      log_warn("engine step failed: {}", e.what());
      for (auto& [id, s] : live_) {
        EngineEvent ev;
        ev.id = id;
        ev.finished = true;
        ev.reason = FinishReason::error;
        ev.error = std::string("engine failure: ") + e.what();
        finished_.labels({"error"}).add();
        s->push(std::move(ev));
      }
      live_.clear();
      std::lock_guard<std::mutex> lock(mu_);
      failure_ = std::string("engine failure: ") + e.what();
      for (Submission& sub : submissions_) {
        EngineEvent ev;
        ev.finished = true;
        ev.reason = FinishReason::error;
        ev.error = failure_;
        sub.stream->push(std::move(ev));
      }
      submissions_.clear();
      return;
    }
  }
}

}  // namespace tessera::serve
