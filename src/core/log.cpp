// Levelled, rank-tagged log lines on stderr. One mutex serialises both the settings and the
// writes, so concurrent threads never interleave within a line. No log files here: metrics go to
// JSONL through src/train, not through this.
#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>

namespace tessera {

namespace {

using Clock = std::chrono::steady_clock;

// Initialised during static initialisation, i.e. at program start for timestamps' purposes.
const Clock::time_point g_start = Clock::now();

std::atomic<LogLevel> g_level{LogLevel::info};  // read unlocked by log_info() before formatting

std::mutex g_mutex;    // guards everything below and the stderr writes
int g_rank = -1;       // -1: single process (or MPI not up yet)
int g_world_size = 0;  // 0: unknown
bool g_all_ranks_print = false;
bool g_timestamps = false;

std::string_view level_prefix(LogLevel level) {
  switch (level) {
    case LogLevel::debug: return "debug: ";
    case LogLevel::info: return "";
    case LogLevel::warn: return "warning: ";
    case LogLevel::error: return "error: ";
  }
  return "";
}

}  // namespace

void log_set_level(LogLevel level) { g_level.store(level); }
LogLevel log_level() { return g_level.load(); }

void log_set_rank(int rank, bool all_ranks_print) { log_set_rank(rank, 0, all_ranks_print); }

void log_set_rank(int rank, int world_size, bool all_ranks_print) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_rank = rank;
  g_world_size = world_size;
  g_all_ranks_print = all_ranks_print;
}

void log_set_timestamps(bool enabled) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_timestamps = enabled;
}

void log_write(LogLevel level, const std::string& message) {
  if (level < log_level()) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (level <= LogLevel::info && g_rank > 0 && !g_all_ranks_print) return;
  std::string line;
  if (g_timestamps) {
    const double seconds = std::chrono::duration<double>(Clock::now() - g_start).count();
    line += fmt::format("[{:9.3f}s] ", seconds);
  }
  if (g_rank >= 0 && g_world_size != 1) line += fmt::format("[rank {}] ", g_rank);
  line += level_prefix(level);
  line += message;
  line += '\n';
  // One fwrite per line under the lock: lines from different threads never mix.
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace tessera
