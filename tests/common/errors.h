// Error expectations for tests: a call must throw a tessera::Error of a given kind whose message
// holds every given fragment. Part of the shared test kit (tests/common).
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace tessera::testing {

// Runs `fn`, which must throw a tessera::Error of `kind`; returns its message after checking that
// it contains each fragment ("" and a test failure when nothing was thrown).
inline std::string expect_error(const std::function<void()>& fn, ErrorKind kind,
                                const std::vector<std::string>& fragments) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << msg;
    for (const std::string& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << "message lacks \"" << f << "\": " << msg;
    return msg;
  }
  std::string wanted;
  for (const std::string& f : fragments) wanted += " \"" + f + "\"";
  ADD_FAILURE() << "no tessera::Error thrown; expected one containing" << wanted;
  return "";
}

inline std::string expect_user_error(const std::function<void()>& fn,
                                     const std::vector<std::string>& fragments) {
  return expect_error(fn, ErrorKind::user, fragments);
}

}  // namespace tessera::testing
