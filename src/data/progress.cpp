// ProgressLine (see progress.h).
#include "data/progress.h"

#include <unistd.h>

namespace tessera {

namespace {
constexpr double kLogIntervalSeconds = 5.0;
}

ProgressLine::ProgressLine(std::FILE* out, bool redraw, double interval_s)
    : out_(out),
      redraw_(redraw),
      interval_s_(interval_s),
      last_(std::chrono::steady_clock::now()) {}

ProgressLine ProgressLine::for_stderr() {
  return ProgressLine(stderr, ::isatty(::fileno(stderr)) == 1, kLogIntervalSeconds);
}

ProgressLine::~ProgressLine() { finish(); }

void ProgressLine::update(const std::string& text, bool force) {
  const auto now = std::chrono::steady_clock::now();
  if (redraw_) {
    // "\033[K" clears what a longer previous text left at the end of the line.
    std::fprintf(out_, "\r%s\033[K", text.c_str());
    shown_ = true;
  } else {
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!force && since < interval_s_) return;
    std::fprintf(out_, "%s\n", text.c_str());
  }
  last_ = now;
  std::fflush(out_);
}

void ProgressLine::finish() {
  if (!shown_) return;
  std::fputc('\n', out_);
  std::fflush(out_);
  shown_ = false;
}

}  // namespace tessera
