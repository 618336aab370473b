// The single [[noreturn]] funnel behind TS_USER_ERROR, TS_CHECK, TS_BUG and TS_SYSTEM_ERROR.
#include "core/error.h"

#include <atomic>

namespace tessera {

namespace {
std::atomic<int> g_rank{-1};
}

void set_error_rank(int rank) { g_rank.store(rank); }
int error_rank() { return g_rank.load(); }

void fail(ErrorKind kind, const std::string& message, const char* file, int line) {
  std::string text;
  const int rank = error_rank();
  const std::string rank_tag = rank >= 0 ? fmt::format("[rank {}] ", rank) : std::string();
  switch (kind) {
    case ErrorKind::user: text = fmt::format("{}error: {}", rank_tag, message); break;
    case ErrorKind::bug:
      text = fmt::format("{}bug: {} ({}:{})", rank_tag, message, file ? file : "?", line);
      break;
    case ErrorKind::system:
      text = fmt::format("{}system error: {} ({}:{})", rank_tag, message, file ? file : "?", line);
      break;
  }
  throw Error(kind, text);
}

}  // namespace tessera
