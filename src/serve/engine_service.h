// The engine behind `tessera serve`: one thread owns the Engine and runs steps while there is
// work; HTTP handler threads submit requests and read each request's events from its own queue
// (blocking, with a timeout so a handler can notice a client that went away and cancel). It also
// keeps the engine's Prometheus metrics: tokens, time to first token, inter-token latency,
// running/waiting requests, KV blocks, batch size, finishes by reason.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/prometheus.h"
#include "infer/engine.h"

namespace tessera::serve {

// One request's side of the service: the events the engine produced for it, in order.
class RequestStream {
 public:
  // Waits up to `timeout` for events; returns them (empty on timeout). After the finishing event
  // has been returned, done() is true.
  std::vector<EngineEvent> wait(std::chrono::milliseconds timeout);
  bool done() const;

 private:
  friend class EngineService;
  void push(EngineEvent e);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineEvent> events_;
  bool finished_ = false, delivered_finish_ = false;
  RequestId id_ = -1;
  std::chrono::steady_clock::time_point submitted_, last_token_;
  bool has_token_ = false;
};

class EngineService {
 public:
  EngineService(std::unique_ptr<Engine> engine, MetricsRegistry& metrics);
  ~EngineService();  // stops the thread; pending requests are abandoned
  EngineService(const EngineService&) = delete;
  EngineService& operator=(const EngineService&) = delete;

  // Hands a request to the engine thread. Requests the engine refuses (tessera user errors) end
  // at once with a FinishReason::error event holding the message.
  std::shared_ptr<RequestStream> submit(std::vector<int32_t> prompt, const SamplingParams& p);
  // The client went away: the engine aborts the request at its next step.
  void cancel(const std::shared_ptr<RequestStream>& s);

  const Engine& engine() const { return *engine_; }  // immutable parts only (tokenizer, model)

 private:
  struct Submission {
    std::vector<int32_t> prompt;
    SamplingParams params;
    std::shared_ptr<RequestStream> stream;
  };
  void run();
  void admit(std::vector<Submission>& batch);
  void deliver(const std::vector<EngineEvent>& events);
  void update_gauges(double step_seconds);

  std::unique_ptr<Engine> engine_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Submission> submissions_;
  std::vector<std::shared_ptr<RequestStream>> cancellations_;
  bool stop_ = false;
  std::string failure_;  // set when a step failed: later submissions end at once with it
  std::unordered_map<RequestId, std::shared_ptr<RequestStream>> live_;  // engine thread only

  // Metrics (thread-safe themselves).
  Counter &prompt_tokens_, &generated_tokens_;
  CounterFamily& finished_;
  Histogram &ttft_, &itl_, &step_time_, &batch_tokens_;
  Gauge &running_, &waiting_, &kv_used_, &kv_free_, &batch_size_;
  std::thread thread_;  // last: starts after everything above exists
};

}  // namespace tessera::serve
