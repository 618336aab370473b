// ProgressLine: redrawn in place on a terminal (carriage return, no newline until finish), one
// line per interval otherwise, the last state always shown when forced.
#include "data/progress.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace tessera {
namespace {

std::string contents(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  for (int c; (c = std::fgetc(f)) != EOF;) s += char(c);
  return s;
}

TEST(ProgressLine, RedrawsInPlaceOnATerminal) {
  std::FILE* f = std::tmpfile();
  {
    ProgressLine p(f, /*redraw=*/true, 1e9);
    p.update("1/3 files");
    p.update("2/3 files");
  }  // finish() on destruction ends the line
  EXPECT_EQ(contents(f), "\r1/3 files\033[K\r2/3 files\033[K\n");
  std::fclose(f);
}

TEST(ProgressLine, LogsALinePerIntervalOtherwise) {
  std::FILE* f = std::tmpfile();
  {
    ProgressLine p(f, /*redraw=*/false, 1e9);  // an interval that never passes in this test
    p.update("1/3 files");
    p.update("2/3 files");
    p.update("3/3 files", /*force=*/true);
  }
  EXPECT_EQ(contents(f), "3/3 files\n");
  std::fclose(f);
  f = std::tmpfile();
  {
    ProgressLine every(f, /*redraw=*/false, 0.0);
    every.update("a");
    every.update("b");
  }
  EXPECT_EQ(contents(f), "a\nb\n");
  std::fclose(f);
}

}  // namespace
}  // namespace tessera
