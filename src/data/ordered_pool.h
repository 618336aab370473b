// Runs work(i) for i in [0, n) on a pool of threads and hands each result to consume(i, result) on
// the calling thread in index order, so output assembled in consume() does not depend on the
// number of threads. At most `max_ahead` results are claimed but not yet consumed, which bounds
// memory when results are large (e.g. a whole encoded file). The first exception, from a worker or
// from consume(), stops the pool and is rethrown on the calling thread.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace tessera {

template <class R>
void run_ordered(int64_t n, int num_threads, int64_t max_ahead,
                 const std::function<R(int64_t)>& work,
                 const std::function<void(int64_t, R&&)>& consume) {
  std::mutex mutex;
  std::condition_variable changed;
  int64_t next_claim = 0, next_consume = 0;
  std::map<int64_t, R> ready;
  std::exception_ptr error;
  bool stop = false;
  const auto fail = [&](std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!error) error = e;
    stop = true;
    changed.notify_all();
  };
  const auto worker = [&] {
    for (;;) {
      int64_t i = 0;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(
            lock, [&] { return stop || next_claim >= n || next_claim < next_consume + max_ahead; });
        if (stop || next_claim >= n) return;
        i = next_claim++;
      }
      try {
        R r = work(i);
        std::lock_guard<std::mutex> lock(mutex);
        ready.emplace(i, std::move(r));
        changed.notify_all();
      } catch (...) {
        fail(std::current_exception());
        return;
      }
    }
  };
  std::vector<std::jthread> threads;
  for (int t = 0; t < std::max(1, num_threads); ++t) threads.emplace_back(worker);
  for (int64_t i = 0; i < n; ++i) {
    std::optional<R> r;  // R need not be default-constructible
    {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return stop || ready.count(i) > 0; });
      if (stop) break;
      r.emplace(std::move(ready.at(i)));
      ready.erase(i);
      next_consume = i + 1;
      changed.notify_all();
    }
    try {
      consume(i, std::move(*r));
    } catch (...) {
      fail(std::current_exception());
      break;
    }
  }
  threads.clear();  // joins
  if (error) std::rethrow_exception(error);
}

}  // namespace tessera
