// A one-line progress report for long commands (e.g. `tessera prepare`): redrawn in place with
// '\r' when the stream is a terminal, otherwise printed as a new line at most every few seconds,
// so logs of batch jobs stay short and readable. Not thread-safe: one thread reports.
#pragma once
#include <chrono>
#include <cstdio>
#include <string>

namespace tessera {

class ProgressLine {
 public:
  // `redraw`: overwrite the line in place (a terminal); else a line per `interval_s` seconds.
  ProgressLine(std::FILE* out, bool redraw, double interval_s);
  // On stderr, redrawn when stderr is a terminal, else a line every 5 s.
  static ProgressLine for_stderr();
  ~ProgressLine();  // finish()
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

  // Shows `text` now if the interval has passed (always when redrawing, or with `force`).
  void update(const std::string& text, bool force = false);
  // Ends an in-place line with a newline (once); a no-op in line mode.
  void finish();

 private:
  std::FILE* out_;
  bool redraw_;
  double interval_s_;
  bool shown_ = false;                          // something is on the in-place line
  std::chrono::steady_clock::time_point last_;  // of the last line printed
};

}  // namespace tessera
