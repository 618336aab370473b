// The three error tiers: user errors exit 2, bugs and system errors exit 1, messages say which.
#include <gtest/gtest.h>

#include "core/error.h"

namespace tessera {

TEST(Error, TiersAndExitCodes) {
  try {
    TS_USER_ERROR("recipe {}: key '{}' has value '{}'", "r.yaml", "train.steps", "abc");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_EQ(e.exit_code(), 2);
    EXPECT_NE(std::string(e.what()).find("train.steps"), std::string::npos);
  }
  try {
    TS_CHECK(1 + 1 == 3, "arithmetic {}", 42);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bug);
    EXPECT_EQ(e.exit_code(), 1);
    EXPECT_NE(std::string(e.what()).find("bug"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("error_test.cpp"), std::string::npos);
  }
  set_error_rank(3);
  try {
    TS_SYSTEM_ERROR("H5Fopen failed for {}", "x.h5");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::system);
    EXPECT_NE(std::string(e.what()).find("[rank 3]"), std::string::npos);
  }
  set_error_rank(-1);
}

}  // namespace tessera
