// Helpers for the recipe tests: a small valid recipe with known line numbers, and a check that a
// call fails with a user error whose message contains given fragments.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace tessera::testing {

// Line numbers (1-based) are relied on by the tests: model 1..7, data 8..11, train 12..14.
inline const char* kBaseRecipe = R"(model:
  family: gpt2
  vocab_size: 100
  num_layers: 2
  hidden: 32
  num_heads: 4
  max_seq_len: 16
data:
  path: data/x.h5
  seq_len: 16
  micro_batch: 2
train:
  steps: 10
  out_dir: runs/t
)";

// Runs `fn`, which must throw a user error; returns its message after checking each fragment.
inline std::string expect_user_error(const std::function<void()>& fn,
                                     const std::vector<std::string>& fragments) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::user) << msg;
    for (const std::string& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << "message lacks \"" << f << "\": " << msg;
    return msg;
  }
  std::string wanted;
  for (const std::string& f : fragments) wanted += " \"" + f + "\"";
  ADD_FAILURE() << "no error thrown; expected a user error containing" << wanted;
  return "";
}

}  // namespace tessera::testing
