// JSONL metrics writer. On resume the file is rewritten without records from steps that will be
// replayed, so metrics.jsonl always reads as one uninterrupted run.
#include "train/metrics.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"

namespace tessera {

MetricsWriter::MetricsWriter(const std::string& path, int64_t resume_from_step) : path_(path) {
  std::vector<std::string> kept;
  if (resume_from_step > 0) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const auto rec = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (rec.is_object() && rec.contains("step") && rec["step"].get<int64_t>() <= resume_from_step)
        kept.push_back(line);
    }
  }
  file_ = std::fopen(path.c_str(), "w");
  if (!file_) TS_USER_ERROR("cannot write metrics file '{}': {}", path, std::strerror(errno));
  for (const std::string& l : kept) std::fprintf(file_, "%s\n", l.c_str());
  std::fflush(file_);
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!file_) return;
  const std::string s = record.dump();
  if (std::fprintf(file_, "%s\n", s.c_str()) < 0 || std::fflush(file_) != 0)
    TS_SYSTEM_ERROR("writing {} failed: {}", path_, std::strerror(errno));
}

std::string format_duration(double seconds) {
  if (seconds < 60) return fmt::format("{:.1f}s", seconds);
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s < 3600) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
}

}  // namespace tessera
