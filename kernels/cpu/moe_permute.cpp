// CPU MoE dispatch plan (slots sorted stably by expert, capacity dropping by position) and the
// token permute/unpermute row moves with their backwards (kernels/ops_moe.h defines each).
// Shapes: N tokens, K slots per token (slot s = t*K + j), E experts, R rows of the permuted
// buffer, C model width. Sums in double, in j order; each output row has one writer.
#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/moe.h"

namespace tessera::cpu {

namespace {

// An i32 index tensor of the given shape in host memory.
void check_index(const Tensor& t, const Shape& s, const char* op, const char* name) {
  check_host(t, op, name);
  TS_CHECK(t.dtype == DType::i32, "{}: {} is {}, expected i32", op, name, t.str());
  check_shape(t, s, op, name);
}

// A (rows, C) float tensor of the op's dtype.
void check_rows(const Tensor& t, DType dtype, int64_t rows, int64_t num_c, const char* op,
                const char* name) {
  check_like(t, dtype, Shape{rows, num_c}, op, name);
}

// The first float operand: 2-D (rows, C), f32 or f64.
void check_first_rows(const Tensor& t, const char* op, const char* name) {
  check_compute_dtype(t, op, name);
  TS_CHECK(t.ndim() == 2, "{}: {} must be (rows, C), got {}", op, name, t.str());
}

// Every entry of `idx` is -1 (unused / dropped) or in [0, limit). Serial, before any parallel
// loop (a throw inside an OpenMP region terminates).
void check_entries(const Tensor& idx, int64_t limit, const char* op, const char* name,
                   const char* limit_name) {
  const int32_t* v = idx.ptr<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TS_CHECK(v[i] >= -1 && v[i] < limit, "{}: {}[{}] = {} is neither -1 nor in [0, {} = {})", op,
             name, i, v[i], limit_name, limit);
}

// slot_row (N, K) i32 on the host; returns {N, K}.
std::pair<int64_t, int64_t> check_slot_row(const Tensor& slot_row, const char* op) {
  check_host(slot_row, op, "slot_row");
  TS_CHECK(slot_row.ndim() == 2, "{}: slot_row must be (N, K), got {}", op, slot_row.str());
  check_index(slot_row, slot_row.shape, op, "slot_row");
  return {slot_row.dim(0), slot_row.dim(1)};
}

// out[t] = sum over t's kept slots j of w[t, j] * rows[slot_row[t, j]] (w null: weight 1), summed
// in double in j order: moe_unpermute, and moe_permute_backward with unit weights.
template <class T>
void combine_rows(T* out, const T* rows, const int32_t* sr, const T* w, int64_t num_t, int64_t topk,
                  int64_t num_c) {
#pragma omp parallel for schedule(static) if (num_t * topk * num_c > kMinParallelWork)
  for (int64_t t = 0; t < num_t; ++t) {
    for (int64_t c = 0; c < num_c; ++c) {
      double acc = 0.0;
      for (int64_t j = 0; j < topk; ++j) {
        const int32_t r = sr[t * topk + j];
        if (r >= 0) acc += (w ? double(w[t * topk + j]) : 1.0) * double(rows[r * num_c + c]);
      }
      out[t * num_c + c] = T(acc);
    }
  }
}

// slot_row and row_slot of one plan: inverse of each other on the kept slots.
void check_inverse(const Tensor& slot_row, const Tensor& row_slot, const char* op) {
  const int32_t* sr = slot_row.ptr<int32_t>();
  const int32_t* rs = row_slot.ptr<int32_t>();
  for (int64_t s = 0; s < slot_row.numel(); ++s)
    TS_CHECK(sr[s] < 0 || rs[sr[s]] == s, "{}: slot_row[{}] = {} but row_slot[{}] = {}", op, s,
             sr[s], sr[s], rs[sr[s]]);
  for (int64_t r = 0; r < row_slot.numel(); ++r)
    TS_CHECK(rs[r] < 0 || sr[rs[r]] == r, "{}: row_slot[{}] = {} but slot_row[{}] = {}", op, r,
             rs[r], rs[r], sr[rs[r]]);
}

}  // namespace

void moe_dispatch_plan(Tensor tokens_per_expert, Tensor offsets, Tensor slot_row, Tensor row_slot,
                       Tensor topk_idx, int64_t capacity) {
  constexpr const char* kOp = "moe_dispatch_plan";
  check_host(topk_idx, kOp, "topk_idx");
  TS_CHECK(topk_idx.ndim() == 2 && topk_idx.dtype == DType::i32,
           "{}: topk_idx must be i32 (N, K), got {}", kOp, topk_idx.str());
  check_host(tokens_per_expert, kOp, "tokens_per_expert");
  TS_CHECK(tokens_per_expert.ndim() == 1 && tokens_per_expert.numel() >= 1,
           "{}: tokens_per_expert must be (E) with E >= 1, got {}", kOp, tokens_per_expert.str());
  const int64_t num_e = tokens_per_expert.numel(), num_slots = topk_idx.numel();
  check_index(tokens_per_expert, Shape{num_e}, kOp, "tokens_per_expert");
  check_index(offsets, Shape{num_e + 1}, kOp, "offsets");
  check_index(slot_row, topk_idx.shape, kOp, "slot_row");
  check_host(row_slot, kOp, "row_slot");
  TS_CHECK(row_slot.ndim() == 1 && row_slot.dtype == DType::i32,
           "{}: row_slot must be i32 (R), got {}", kOp, row_slot.str());
  TS_CHECK(num_slots < (int64_t(1) << 31), "{}: {} slots do not fit i32 indices", kOp, num_slots);
  const int32_t* idx = topk_idx.ptr<int32_t>();
  for (int64_t s = 0; s < num_slots; ++s)
    TS_CHECK(idx[s] >= 0 && idx[s] < num_e, "{}: topk_idx[{}] = {} is outside [0, E = {})", kOp, s,
             idx[s], num_e);

  // p(s): the slot's position among the slots of its expert, in slot order (a stable sort).
  std::vector<int64_t> count(num_e, 0), position(num_slots);
  for (int64_t s = 0; s < num_slots; ++s) position[s] = count[idx[s]]++;
  auto kept = [&](int64_t p) { return capacity <= 0 || p < capacity; };
  int32_t* tpe = tokens_per_expert.ptr<int32_t>();
  int32_t* off = offsets.ptr<int32_t>();
  off[0] = 0;
  for (int64_t e = 0; e < num_e; ++e) {
    tpe[e] = int32_t(count[e]);
    off[e + 1] = int32_t(off[e] + (capacity <= 0 ? count[e] : std::min(count[e], capacity)));
  }
  const int64_t num_rows = row_slot.numel();
  TS_CHECK(off[num_e] <= num_rows, "{}: {} slots are kept but row_slot has only R = {} rows", kOp,
           off[num_e], num_rows);
  int32_t* sr = slot_row.ptr<int32_t>();
  int32_t* rs = row_slot.ptr<int32_t>();
  std::fill(rs, rs + num_rows, -1);
  for (int64_t s = 0; s < num_slots; ++s) {
    sr[s] = kept(position[s]) ? int32_t(off[idx[s]] + position[s]) : -1;
    if (sr[s] >= 0) rs[sr[s]] = int32_t(s);
  }
}

void moe_permute(Tensor xp, Tensor x, Tensor row_slot, int topk) {
  constexpr const char* kOp = "moe_permute";
  check_first_rows(x, kOp, "x");
  const int64_t num_t = x.dim(0), num_c = x.dim(1);
  check_host(xp, kOp, "xp");
  TS_CHECK(xp.ndim() == 2, "{}: xp must be (R, C), got {}", kOp, xp.str());
  const int64_t num_rows = xp.dim(0);
  check_rows(xp, x.dtype, num_rows, num_c, kOp, "xp");
  check_index(row_slot, Shape{num_rows}, kOp, "row_slot");
  TS_CHECK(topk >= 1, "{}: topk must be >= 1, got {}", kOp, topk);
  TS_CHECK(!overlaps(xp, x), "{}: xp must not alias x", kOp);
  check_entries(row_slot, num_t * topk, kOp, "row_slot", "N*K");
  const int32_t* rs = row_slot.ptr<int32_t>();
  dispatch_float(x.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.ptr<T>();
    T* dst = xp.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t r = 0; r < num_rows; ++r) {
      T* row = dst + r * num_c;
      if (rs[r] < 0) {
        std::fill(row, row + num_c, T(0));
        continue;
      }
      const T* token = src + (rs[r] / topk) * num_c;
      std::copy(token, token + num_c, row);
    }
  });
}

void moe_permute_backward(Tensor dx, Tensor dxp, Tensor slot_row) {
  constexpr const char* kOp = "moe_permute_backward";
  check_first_rows(dxp, kOp, "dxp");
  const int64_t num_rows = dxp.dim(0), num_c = dxp.dim(1);
  const auto [num_t, topk] = check_slot_row(slot_row, kOp);
  check_rows(dx, dxp.dtype, num_t, num_c, kOp, "dx");
  TS_CHECK(!overlaps(dx, dxp), "{}: dx must not alias dxp", kOp);
  check_entries(slot_row, num_rows, kOp, "slot_row", "R");
  const int32_t* sr = slot_row.ptr<int32_t>();
  dispatch_float(dxp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    combine_rows<T>(dx.ptr<T>(), dxp.ptr<T>(), sr, nullptr, num_t, topk, num_c);
  });
}

void moe_unpermute(Tensor out, Tensor yp, Tensor slot_row, Tensor topk_w) {
  constexpr const char* kOp = "moe_unpermute";
  check_first_rows(yp, kOp, "yp");
  const int64_t num_rows = yp.dim(0), num_c = yp.dim(1);
  const auto [num_t, topk] = check_slot_row(slot_row, kOp);
  check_rows(out, yp.dtype, num_t, num_c, kOp, "out");
  check_like(topk_w, yp.dtype, slot_row.shape, kOp, "topk_w");
  TS_CHECK(!overlaps(out, yp) && !overlaps(out, topk_w), "{}: out must not alias an input", kOp);
  check_entries(slot_row, num_rows, kOp, "slot_row", "R");
  const int32_t* sr = slot_row.ptr<int32_t>();
  dispatch_float(yp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    combine_rows<T>(out.ptr<T>(), yp.ptr<T>(), sr, topk_w.ptr<T>(), num_t, topk, num_c);
  });
}

void moe_unpermute_backward(Tensor dyp, Tensor d_topk_w, Tensor dout, Tensor yp, Tensor slot_row,
                            Tensor row_slot, Tensor topk_w) {
  constexpr const char* kOp = "moe_unpermute_backward";
  check_first_rows(yp, kOp, "yp");
  const int64_t num_rows = yp.dim(0), num_c = yp.dim(1);
  const auto [num_t, topk] = check_slot_row(slot_row, kOp);
  check_index(row_slot, Shape{num_rows}, kOp, "row_slot");
  check_rows(dyp, yp.dtype, num_rows, num_c, kOp, "dyp");
  check_rows(dout, yp.dtype, num_t, num_c, kOp, "dout");
  check_like(topk_w, yp.dtype, slot_row.shape, kOp, "topk_w");
  check_like(d_topk_w, yp.dtype, slot_row.shape, kOp, "d_topk_w");
  for (const Tensor* in : {&dout, &yp, &topk_w})
    TS_CHECK(!overlaps(dyp, *in) && !overlaps(d_topk_w, *in),
             "{}: dyp and d_topk_w must not alias an input", kOp);
  TS_CHECK(!overlaps(dyp, d_topk_w), "{}: dyp and d_topk_w must not alias", kOp);
  check_entries(slot_row, num_rows, kOp, "slot_row", "R");
  check_entries(row_slot, num_t * topk, kOp, "row_slot", "N*K");
  check_inverse(slot_row, row_slot, kOp);
  const int32_t* sr = slot_row.ptr<int32_t>();
  const int32_t* rs = row_slot.ptr<int32_t>();
  dispatch_float(yp.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* y = yp.ptr<T>();
    const T* d = dout.ptr<T>();
    const T* w = topk_w.ptr<T>();
    T* dy = dyp.ptr<T>();
    T* dw = d_topk_w.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t r = 0; r < num_rows; ++r) {
      const int32_t s = rs[r];
      for (int64_t c = 0; c < num_c; ++c)
        dy[r * num_c + c] = s < 0 ? T(0) : T(double(w[s]) * double(d[(s / topk) * num_c + c]));
    }
#pragma omp parallel for schedule(static) if (num_t * topk * num_c > kMinParallelWork)
    for (int64_t s = 0; s < num_t * topk; ++s) {
      double acc = 0.0;
      if (sr[s] >= 0)
        for (int64_t c = 0; c < num_c; ++c)
          acc += double(d[(s / topk) * num_c + c]) * double(y[sr[s] * num_c + c]);
      dw[s] = T(acc);
    }
  });
}

}  // namespace tessera::cpu
