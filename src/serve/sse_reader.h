// The client side of server-sent events (what `tessera serve` streams): bytes as they arrive in,
// the `data:` payloads of complete events out, in order. For the load generator and the tests.
#pragma once
#include <string>
#include <vector>

namespace tessera::serve {

class SseReader {
 public:
  // Appends `n` bytes; returns the payloads of the events they complete ("data: X\n\n" -> X;
  // events without a data line are skipped).
  std::vector<std::string> feed(const char* data, size_t n) {
    buffer_.append(data, n);
    std::vector<std::string> out;
    for (size_t end; (end = buffer_.find("\n\n")) != std::string::npos;) {
      const std::string event = buffer_.substr(0, end);
      buffer_.erase(0, end + 2);
      if (event.rfind("data: ", 0) == 0) out.push_back(event.substr(6));
    }
    return out;
  }

 private:
  std::string buffer_;  // bytes of the event not yet complete
};

}  // namespace tessera::serve
