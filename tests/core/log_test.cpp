// Logging: level filtering, rank tags, rank-0-only info, timestamps, and whole lines under threads.
// Captures stderr through GoogleTest; every test restores the global log settings.
#include <gtest/gtest.h>

#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/log.h"

namespace tessera {
namespace {

class Log : public ::testing::Test {
 protected:
  void SetUp() override { reset(); }
  void TearDown() override { reset(); }
  static void reset() {
    log_set_level(LogLevel::info);
    log_set_rank(-1, 0, false);
    log_set_timestamps(false);
  }
};

TEST_F(Log, LevelsFilterAndPrefix) {
  ::testing::internal::CaptureStderr();
  log_info("step {} loss {:.2f}", 3, 1.5);
  log_debug("hidden {}", 1);
  log_warn("careful {}", "x");
  log_set_level(LogLevel::debug);
  log_debug("shown {}", 2);
  log_set_level(LogLevel::error);
  log_warn("suppressed");
  log_write(LogLevel::error, "bad");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(),
            "step 3 loss 1.50\nwarning: careful x\ndebug: shown 2\nerror: bad\n");
  EXPECT_EQ(log_level(), LogLevel::error);
}

TEST_F(Log, RankTagsAndRankZeroOnlyInfo) {
  ::testing::internal::CaptureStderr();
  log_set_rank(1, 4, false);
  log_info("info from 1");
  log_warn("warn from 1");
  log_set_rank(1, 4, true);
  log_info("all ranks");
  log_set_rank(0, 4, false);
  log_info("from 0");
  log_set_rank(0, 1, false);
  log_info("alone");
  log_set_rank(2, false);  // world size unknown: still tagged
  log_warn("unknown world");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(),
            "[rank 1] warning: warn from 1\n[rank 1] all ranks\n[rank 0] from 0\nalone\n"
            "[rank 2] warning: unknown world\n");
}

TEST_F(Log, Timestamps) {
  log_set_timestamps(true);
  ::testing::internal::CaptureStderr();
  log_info("tick");
  const std::string out = ::testing::internal::GetCapturedStderr();
  // Expect "[" spaces digits "." three digits "s] tick\n".
  const size_t close = out.find("s] tick\n");
  ASSERT_TRUE(out.rfind('[', 0) == 0 && close != std::string::npos) << out;
  EXPECT_EQ(close + 8, out.size()) << out;
  const std::string number = out.substr(1, close - 1);
  const size_t first = number.find_first_not_of(' ');
  ASSERT_NE(first, std::string::npos) << out;
  const std::string digits = number.substr(first);
  const size_t dot = digits.find('.');
  ASSERT_TRUE(dot != std::string::npos && dot > 0 && digits.size() - dot == 4) << out;
  EXPECT_EQ(digits.find_first_not_of("0123456789."), std::string::npos) << out;
}

TEST_F(Log, ConcurrentLinesStayWhole) {
  const int num_threads = 4, num_lines = 200;
  ::testing::internal::CaptureStderr();
  std::vector<std::thread> threads;
  for (int t = 0; t < num_threads; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < num_lines; ++i)
        log_info("thread {} line {} {}", t, i, std::string(64, 'x'));
    });
  }
  for (std::thread& th : threads) th.join();
  std::istringstream in(::testing::internal::GetCapturedStderr());
  std::set<std::string> seen;
  std::string line;
  int count = 0;
  while (std::getline(in, line)) {
    ++count;
    seen.insert(line);
  }
  EXPECT_EQ(count, num_threads * num_lines);
  for (int t = 0; t < num_threads; ++t)
    for (int i = 0; i < num_lines; ++i)
      ASSERT_TRUE(seen.count(fmt::format("thread {} line {} {}", t, i, std::string(64, 'x'))))
          << t << " " << i;
}

}  // namespace
}  // namespace tessera
