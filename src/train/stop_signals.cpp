// SIGTERM/SIGUSR1 handlers that set a flag (see stop_signals.h). The flag is necessarily
// process-wide: a signal handler can reach nothing else.
#include "train/stop_signals.h"

#include <atomic>
#include <csignal>

#include "core/error.h"

namespace tessera {

namespace {

std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "a signal handler may only touch lock-free");

extern "C" void on_stop_signal(int signo) { g_stop_signal.store(signo, std::memory_order_relaxed); }

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (const int signo : {SIGTERM, SIGUSR1})
    if (sigaction(signo, &sa, nullptr) != 0)
      TS_SYSTEM_ERROR("sigaction({}) failed: cannot install the preemption handler", signo);
}

int stop_signal_received() { return g_stop_signal.load(std::memory_order_relaxed); }

void clear_stop_signal() { g_stop_signal.store(0, std::memory_order_relaxed); }

}  // namespace tessera
