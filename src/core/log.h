// Logging: levelled, rank-tagged lines on stderr; only rank 0 prints info unless asked.
#pragma once
#include <fmt/format.h>

#include <string>

namespace tessera {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3 };

void log_set_level(LogLevel level);
void log_set_rank(int rank, bool all_ranks_print);  // world size unknown: tag whenever rank >= 0
// Lines carry "[rank r]" when rank >= 0 and world_size > 1; only rank 0 (or a rank < 0, meaning a
// single process) prints debug/info unless all_ranks_print; warnings and errors print everywhere.
void log_set_rank(int rank, int world_size, bool all_ranks_print);
// Prefix each line with the seconds elapsed since the program started (off by default).
void log_set_timestamps(bool enabled);
LogLevel log_level();
void log_write(LogLevel level, const std::string& message);

template <class... A>
void log_debug(fmt::format_string<A...> f, A&&... a) {
  if (log_level() <= LogLevel::debug)
    log_write(LogLevel::debug, fmt::format(f, std::forward<A>(a)...));
}
template <class... A>
void log_info(fmt::format_string<A...> f, A&&... a) {
  if (log_level() <= LogLevel::info)
    log_write(LogLevel::info, fmt::format(f, std::forward<A>(a)...));
}
template <class... A>
void log_warn(fmt::format_string<A...> f, A&&... a) {
  log_write(LogLevel::warn, fmt::format(f, std::forward<A>(a)...));
}

}  // namespace tessera
