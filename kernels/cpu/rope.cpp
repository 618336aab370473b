// Rotary position embedding, CPU reference (NeoX / Hugging Face "rotate_half" pairing): element i
// of each head vector is rotated together with element i + D/2. Angles and the rotation are
// computed in double. Backward is the same rotation by the negative angle (rotations are
// orthogonal). rope_rows_forward (kernels/ops_infer.h) rotates each row by its own position with
// the very same angle and rotation code, so it equals rope_forward bit for bit.
// Shape letters: B batch, T time, H heads, D head dim (even); M rows.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/infer.h"

namespace tessera::cpu {
namespace {

// out = R(sign * angle) inp for every head vector, with R the rotate_half rotation:
//   out[i]       = x1 cos - x2 sin,   out[i + D/2] = x2 cos + x1 sin,
//   x1 = inp[i], x2 = inp[i + D/2],  angle = (t + pos_offset) * inv_freq[i],
//   inv_freq[i] = 1 / theta^(2i / D)   (Hugging Face's 1 / base^(arange(0, D, 2) / D)).
// out may alias inp exactly: each pair is read completely before either element is written.

// inv_freq (D/2) for head dim D.
std::vector<double> inverse_frequencies(int64_t head_dim, double theta) {
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = 1.0 / std::pow(theta, double(2 * i) / double(head_dim));
  return inv_freq;
}

// cos and sign * sin (D/2 each) of the angles at position `pos`.
void position_angles(double pos, const std::vector<double>& inv_freq, double sign, double* cos_t,
                     double* sin_t) {
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double angle = pos * inv_freq[i];
    cos_t[i] = std::cos(angle);
    sin_t[i] = sign * std::sin(angle);
  }
}

// One head vector (D = 2 * half) rotated by the angles of one position.
template <class T>
void rotate_head(T* y, const T* x, int64_t half, const double* cos_t, const double* sin_t) {
  for (int64_t i = 0; i < half; ++i) {
    const double x1 = x[i];
    const double x2 = x[i + half];
    y[i] = T(x1 * cos_t[i] - x2 * sin_t[i]);
    y[i + half] = T(x2 * cos_t[i] + x1 * sin_t[i]);
  }
}

template <class T>
void rotate(T* out, const T* inp, int64_t num_b, int64_t num_t, int64_t num_h, int64_t head_dim,
            double theta, int pos_offset, double sign) {
  const int64_t half = head_dim / 2;
  const std::vector<double> inv_freq = inverse_frequencies(head_dim, theta);  // (D/2)

  // Parallel over t: every output element is written by exactly one thread, no reductions.
#pragma omp parallel for schedule(static) if (num_b * num_t * num_h * head_dim > kMinParallelWork)
  for (int64_t t = 0; t < num_t; ++t) {
    std::vector<double> cos_t(half), sin_t(half);  // (D/2) for this position
    position_angles(double(t) + double(pos_offset), inv_freq, sign, cos_t.data(), sin_t.data());
    for (int64_t b = 0; b < num_b; ++b) {
      for (int64_t h = 0; h < num_h; ++h) {
        const int64_t base = ((b * num_t + t) * num_h + h) * head_dim;
        rotate_head(out + base, inp + base, half, cos_t.data(), sin_t.data());
      }
    }
  }
}

// Checks and dispatch shared by forward (sign +1) and backward (sign -1).
void rope_apply(Tensor out, Tensor inp, float theta, int pos_offset, double sign, const char* op,
                const char* out_name, const char* inp_name) {
  check_compute_dtype(inp, op, inp_name);
  check_float(out, inp.dtype, op, out_name);
  TS_CHECK(inp.ndim() == 4, "{}: {} must be (B, T, H, D), got {}", op, inp_name, inp.str());
  check_shape(out, inp.shape, op, out_name);
  TS_CHECK(!overlaps(out, inp) || out.data == inp.data,
           "{}: {} partially overlaps {}; only exact aliasing (in place) is supported", op,
           out_name, inp_name);
  TS_CHECK(inp.dim(3) % 2 == 0, "{}: head dim D = {} must be even", op, inp.dim(3));
  TS_CHECK(theta > 0.0f, "{}: theta = {} must be positive", op, theta);
  const int64_t num_b = inp.dim(0), num_t = inp.dim(1), num_h = inp.dim(2);
  const int64_t head_dim = inp.dim(3);
  dispatch_float(inp.dtype, op, [&](auto zero) {
    using T = decltype(zero);
    rotate(out.ptr<T>(), inp.ptr<T>(), num_b, num_t, num_h, head_dim, theta, pos_offset, sign);
  });
}

}  // namespace

void rope_forward(Tensor out, Tensor inp, float theta, int pos_offset) {
  rope_apply(out, inp, theta, pos_offset, +1.0, "rope_forward", "out", "inp");
}

// The Jacobian of a rotation is the rotation itself, so dinp = R(angle)^T dout = R(-angle) dout.
void rope_backward(Tensor dinp, Tensor dout, float theta, int pos_offset) {
  rope_apply(dinp, dout, theta, pos_offset, -1.0, "rope_backward", "dinp", "dout");
}

// Row m rotated by the angles of position pos[m] (its time is 0, its offset pos[m]: the angle is
// (0.0 + pos[m]) * inv_freq[i], the same double rope_forward forms); pos[m] < 0 copies the row.
void rope_rows_forward(Tensor out, Tensor inp, Tensor pos, float theta) {
  constexpr const char* kOp = "rope_rows_forward";
  check_compute_dtype(inp, kOp, "inp");
  TS_CHECK(inp.ndim() == 3, "{}: inp must be (M,H,D), got {}", kOp, inp.str());
  check_like(out, inp.dtype, inp.shape, kOp, "out");
  TS_CHECK(!overlaps(out, inp) || out.data == inp.data,
           "{}: out partially overlaps inp; only exact aliasing (in place) is supported", kOp);
  TS_CHECK(inp.dim(2) % 2 == 0, "{}: head dim D = {} must be even", kOp, inp.dim(2));
  TS_CHECK(theta > 0.0f, "{}: theta = {} must be positive", kOp, theta);
  check_host(pos, kOp, "pos");
  TS_CHECK(pos.dtype == DType::i32, "{}: pos must be i32, got {}", kOp, pos.str());
  check_shape(pos, {inp.dim(0)}, kOp, "pos");
  const int64_t num_m = inp.dim(0), num_h = inp.dim(1), head_dim = inp.dim(2), half = head_dim / 2;
  const int32_t* position = pos.ptr<int32_t>();
  dispatch_float(inp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const std::vector<double> inv_freq = inverse_frequencies(head_dim, double(theta));
#pragma omp parallel for schedule(static) if (num_m * num_h * head_dim > kMinParallelWork)
    for (int64_t m = 0; m < num_m; ++m) {
      const T* x = inp.ptr<T>() + m * num_h * head_dim;
      T* y = out.ptr<T>() + m * num_h * head_dim;
      if (position[m] < 0) {
        if (y != x) std::copy(x, x + num_h * head_dim, y);
        continue;
      }
      std::vector<double> cos_t(half), sin_t(half);  // (D/2) for this row's position
      position_angles(double(0) + double(position[m]), inv_freq, 1.0, cos_t.data(), sin_t.data());
      for (int64_t h = 0; h < num_h; ++h)
        rotate_head(y + h * head_dim, x + h * head_dim, half, cos_t.data(), sin_t.data());
    }
  });
}

}  // namespace tessera::cpu
