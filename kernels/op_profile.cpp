// Op profiler: CUDA event pairs are kept until profile_report() resolves them, so timing never
// synchronizes inside a step; host ops are timed directly.
#include "kernels/op_profile.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>

#ifdef TESSERA_CUDA
#include <cuda_runtime.h>
#endif

namespace tessera::ops {

namespace {

struct State {
  std::mutex mutex;
  bool enabled = false;
  std::map<std::string, OpTime> totals;
#ifdef TESSERA_CUDA
  struct Pending {
    const char* op;
    cudaEvent_t start, stop;
  };
  std::vector<Pending> pending;
  std::vector<cudaEvent_t> free_events;
#endif
};

State& state() {
  static State s;
  return s;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

#ifdef TESSERA_CUDA
cudaEvent_t take_event(State& s) {
  if (!s.free_events.empty()) {
    cudaEvent_t e = s.free_events.back();
    s.free_events.pop_back();
    return e;
  }
  cudaEvent_t e;
  if (cudaEventCreate(&e) != cudaSuccess) TS_SYSTEM_ERROR("cudaEventCreate failed");
  return e;
}
#endif

}  // namespace

void profile_enable(bool on) { state().enabled = on; }
bool profile_enabled() { return state().enabled; }

void profile_reset() {
  profile_report();
  std::lock_guard<std::mutex> lock(state().mutex);
  state().totals.clear();
}

std::vector<OpTime> profile_report() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
#ifdef TESSERA_CUDA
  for (auto& p : s.pending) {
    if (cudaEventSynchronize(p.stop) != cudaSuccess) TS_SYSTEM_ERROR("cudaEventSynchronize failed");
    float ms = 0.0f;
    if (cudaEventElapsedTime(&ms, p.start, p.stop) != cudaSuccess)
      TS_SYSTEM_ERROR("cudaEventElapsedTime failed");
    OpTime& t = s.totals[p.op];
    t.op = p.op;
    t.calls += 1;
    t.ms += ms;
    s.free_events.push_back(p.start);
    s.free_events.push_back(p.stop);
  }
  s.pending.clear();
#endif
  std::vector<OpTime> out;
  for (const auto& [name, t] : s.totals) out.push_back(t);
  std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

ProfileScope::ProfileScope(const char* op, Device device, Stream stream)
    : op_(op), device_(device), stream_(stream) {
  State& s = state();
  if (!s.enabled) return;
#ifdef TESSERA_CUDA
  if (device == Device::cuda) {
    std::lock_guard<std::mutex> lock(s.mutex);
    cudaEvent_t start = take_event(s), stop = take_event(s);
    cudaEventRecord(start, static_cast<cudaStream_t>(stream_.handle));
    s.pending.push_back({op, start, stop});
    slot_ = static_cast<int>(s.pending.size()) - 1;
    return;
  }
#endif
  t0_ = now_ms();
}

ProfileScope::~ProfileScope() {
  State& s = state();
  if (!s.enabled) return;
#ifdef TESSERA_CUDA
  if (slot_ >= 0) {
    std::lock_guard<std::mutex> lock(s.mutex);
    cudaEventRecord(s.pending[slot_].stop, static_cast<cudaStream_t>(stream_.handle));
    return;
  }
#endif
  if (device_ != Device::cpu) return;
  const double ms = now_ms() - t0_;
  std::lock_guard<std::mutex> lock(s.mutex);
  OpTime& t = s.totals[op_];
  t.op = op_;
  t.calls += 1;
  t.ms += ms;
}

}  // namespace tessera::ops
