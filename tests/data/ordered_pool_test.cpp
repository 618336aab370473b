// run_ordered: results reach consume() in index order for any thread count, no more than
// max_ahead are outstanding, and an exception from a worker or from consume() is rethrown.
#include "data/ordered_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>

namespace tessera {
namespace {

TEST(OrderedPool, InOrderForAnyThreadCountWithBoundedLookahead) {
  for (int threads : {1, 2, 5}) {
    for (int64_t ahead : {1, 3}) {
      std::atomic<int64_t> claimed{0};
      int64_t consumed = 0, worst_ahead = 0;
      std::vector<int64_t> order;
      run_ordered<std::string>(
          40, threads, ahead,
          [&](int64_t i) {
            const int64_t c = ++claimed;
            // Later items finish first at times, so reordering is needed.
            std::this_thread::sleep_for(std::chrono::microseconds((40 - i) % 7 * 100));
            return std::to_string(i) + ":" + std::to_string(c);
          },
          [&](int64_t i, std::string&& r) {
            order.push_back(i);
            EXPECT_EQ(r.substr(0, r.find(':')), std::to_string(i));
            ++consumed;
            worst_ahead = std::max(worst_ahead, claimed.load() - consumed);
          });
      ASSERT_EQ(order.size(), 40u);
      for (int64_t i = 0; i < 40; ++i) EXPECT_EQ(order[size_t(i)], i);
      EXPECT_LE(worst_ahead, ahead) << threads << " threads";
    }
  }
}

TEST(OrderedPool, ErrorsAreRethrown) {
  const auto work = [](int64_t i) -> int {
    if (i == 13) throw std::runtime_error("work 13");
    return int(i);
  };
  EXPECT_THROW(run_ordered<int>(100, 3, 4, work, [](int64_t, int&&) {}), std::runtime_error);
  int seen = 0;
  try {
    run_ordered<int>(
        100, 3, 4, [](int64_t i) { return int(i); },
        [&](int64_t i, int&&) {
          ++seen;
          if (i == 5) throw std::runtime_error("consume 5");
        });
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "consume 5");
  }
  EXPECT_EQ(seen, 6);
}

}  // namespace
}  // namespace tessera
