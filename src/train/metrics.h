// Metrics: one JSON object per line in <out_dir>/metrics.jsonl (for tools and plots) and a
// human progress line (step, loss, tokens/s, ETA) on the terminal.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdio>
#include <string>

namespace tessera {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  // append: keep earlier lines (a resumed run continues the file, dropping lines past `from_step`).
  MetricsWriter(const std::string& path, int64_t resume_from_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const nlohmann::json& record);  // one line, flushed

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

// "12m05s", "3.2s".
std::string format_duration(double seconds);

}  // namespace tessera
