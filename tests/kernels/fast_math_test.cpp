// Tests of fast_exp (kernels/cpu/fast_math.h), the exponential of the CPU kernels' hot loops:
// within 2 ulp of libm on random points of every range the kernels use and of its whole domain,
// exact at 0, its edges and special values (0 below -708, +inf above 709, NaN for NaN).
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/fast_math.h"

namespace tessera::testing {
namespace {

// |a - b| in units of b's last place.
double ulps(double a, double b) {
  const double ulp = std::nextafter(b, std::numeric_limits<double>::infinity()) - b;
  return std::fabs(a - b) / ulp;
}

// Through an array, as the kernels call it: the loop is the vectorized form.
std::vector<double> fast_exp_all(const std::vector<double>& x) {
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = cpu::fast_exp(x[i]);
  return y;
}

TEST(FastExp, WithinTwoUlpOfLibmOverEachRange) {
  std::mt19937_64 rng(7);
  // Softmax / cross-entropy arguments (<= 0), GELU and SiLU gates, the whole domain.
  const double ranges[][2] = {
      {-1e-6, 1e-6}, {-1.0, 1.0}, {-30.0, 0.0}, {-88.0, 88.0}, {-708.0, 709.0}};
  for (const auto& r : ranges) {
    std::uniform_real_distribution<double> u(r[0], r[1]);
    std::vector<double> x(100001);  // odd: the vector loop's scalar tail runs too
    for (double& v : x) v = u(rng);
    const std::vector<double> y = fast_exp_all(x);
    double worst = 0.0;
    for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, ulps(y[i], std::exp(x[i])));
    EXPECT_LE(worst, 2.0) << "range [" << r[0] << ", " << r[1] << "]";
  }
}

TEST(FastExp, EdgesAndSpecialValues) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(cpu::fast_exp(0.0), 1.0);
  EXPECT_EQ(cpu::fast_exp(-0.0), 1.0);
  EXPECT_LE(ulps(cpu::fast_exp(-708.0), std::exp(-708.0)), 2.0);  // 2^n = 2^-1021, still normal
  EXPECT_LE(ulps(cpu::fast_exp(709.0), std::exp(709.0)), 2.0);    // 2^n = 2^1023
  EXPECT_LE(ulps(cpu::fast_exp(std::log(2.0) / 2), std::exp(std::log(2.0) / 2)), 2.0);
  EXPECT_EQ(cpu::fast_exp(-708.5), 0.0);
  EXPECT_EQ(cpu::fast_exp(-kInf), 0.0);
  EXPECT_EQ(cpu::fast_exp(709.5), kInf);
  EXPECT_EQ(cpu::fast_exp(kInf), kInf);
  EXPECT_TRUE(std::isnan(cpu::fast_exp(std::numeric_limits<double>::quiet_NaN())));
  // Through the vector loop too: specials between ordinary values.
  const std::vector<double> y = fast_exp_all(
      {1.0, std::numeric_limits<double>::quiet_NaN(), -kInf, kInf, -1.0, 710.0, -800.0});
  EXPECT_LE(ulps(y[0], std::exp(1.0)), 2.0);
  EXPECT_TRUE(std::isnan(y[1]));
  EXPECT_EQ(y[2], 0.0);
  EXPECT_EQ(y[3], kInf);
  EXPECT_LE(ulps(y[4], std::exp(-1.0)), 2.0);
  EXPECT_EQ(y[5], kInf);
  EXPECT_EQ(y[6], 0.0);
}

}  // namespace
}  // namespace tessera::testing
