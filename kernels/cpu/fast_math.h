// A branch-free double exp for the CPU kernels' hot loops: a loop of it vectorizes, where libm's
// exp is one call per element (a third of a CPU training step went to libm). Test: fast_math_test.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tessera::cpu {

// e^x within 2 ulp of the correctly rounded value (fast_math_test checks random points) for x in
// [-708, 709]; 0 below -708 (the true value is under 3.3e-308: subnormal, below every use's
// resolution), +inf above 709 (a little early: the true value overflows above 709.78; no kernel
// takes exp of anything above ~1), NaN for NaN. Method (Cephes exp): e^x = 2^n e^r with
// n = round(x / ln 2) and r = x - n ln 2 taken in two parts, |r| <= ln(2) / 2; then
// e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), a rational form exact to 2e-16 on that interval.
// Every select compiles to a blend (CMake gives the kernels -fno-trapping-math for that), and n is
// read from the bits of the rounded sum, so no double-to-integer conversion is needed.
inline double fast_exp(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93145751953125e-1, kLn2Lo = 1.42860682030941723212e-6;
  constexpr double kRound = 6755399441055744.0;       // 1.5 * 2^52: adding it rounds to an integer
  constexpr int64_t kRoundBits = 0x4338000000000000;  // its bits; the integer sits in the low bits
  constexpr double kMin = -708.0, kMax = 709.0;       // n in [-1021, 1023]: 2^n is normal
  const double xs = x == x ? x : 0.0;                 // NaN: any finite value (the result is x)
  const double xc = std::min(std::max(xs, kMin), kMax);
  const double t = xc * kLog2e + kRound;
  const double n = t - kRound;
  const double r = (xc - n * kLn2Hi) - n * kLn2Lo;
  const double rr = r * r;
  const double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                        9.99999999999999999910e-1);
  const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                    2.27265548208155028766e-1) *
                       rr +
                   2.00000000000000000009e0;
  const double er = 1.0 + 2.0 * (p / (q - p));
  int64_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int64_t scale_bits = (t_bits - kRoundBits + 1023) << 52;  // 2^n
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const double y = er * scale;
  const double capped = x > kMax ? std::numeric_limits<double>::infinity() : y;
  return x < kMin ? 0.0 : (x != x ? x : capped);
}

}  // namespace tessera::cpu
