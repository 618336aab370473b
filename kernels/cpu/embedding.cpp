// CPU token embedding plus optional learned positions (GPT-2 wte/wpe), also vocabulary-parallel:
// wte may be the rows [vocab_start, vocab_start + Vl) of a (vocab_total, C) table, and tokens
// outside that shard read as a zero row and add nothing to dwte.
// Shapes: B batch, T time, C channels, Vl rows of wte, maxT rows of wpe (T <= maxT).
// Backward accumulates deterministically: positions holding the same token are summed in double
// in position order, and each dwte row is written by exactly one thread.
#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/cpu_ops.h"

namespace tessera::cpu {

namespace {

// Checks every token id lies in [0, V); serial, before any parallel loop (a throw inside an
// OpenMP region would terminate). Names the first bad id and its position.
void check_tokens(const Tensor& tokens, int64_t vocab, const char* op) {
  const int32_t* tok = tokens.ptr<int32_t>();
  const int64_t num_t = tokens.dim(1);
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    TS_CHECK(tok[i] >= 0 && tok[i] < vocab, "{}: token id {} at (b={}, t={}) is outside [0, {})",
             op, tok[i], i / num_t, i % num_t, vocab);
  }
}

// Checks shared by forward and backward; `table` is wte or dwte, `pos` is wpe or dwpe. Returns
// the size of the whole vocabulary (vocab_total, or Vl when it is -1).
int64_t check_embedding(const Tensor& acts, const Tensor& tokens, const Tensor& table,
                        const Tensor& pos, int64_t vocab_start, int64_t vocab_total, const char* op,
                        const char* acts_name) {
  check_compute_dtype(table, op, "wte");
  check_float(acts, table.dtype, op, acts_name);
  check_host(tokens, op, "tokens");
  TS_CHECK(tokens.dtype == DType::i32 && tokens.ndim() == 2,
           "{}: tokens must be i32 (B, T), got {}", op, tokens.str());
  TS_CHECK(table.ndim() == 2, "{}: wte must be (V, C), got {}", op, table.str());
  const int64_t num_b = tokens.dim(0), num_t = tokens.dim(1), num_c = table.dim(1);
  check_shape(acts, Shape{num_b, num_t, num_c}, op, acts_name);
  if (!pos.empty()) {
    check_float(pos, table.dtype, op, "wpe");
    TS_CHECK(pos.ndim() == 2 && pos.dim(1) == num_c && pos.dim(0) >= num_t,
             "{}: wpe must be (maxT, C={}) with maxT >= T={}, got {}", op, num_c, num_t, pos.str());
  }
  const int64_t num_local = table.dim(0);
  if (vocab_total == -1) vocab_total = num_local;
  TS_CHECK(vocab_start >= 0 && vocab_total >= 1 && vocab_start + num_local <= vocab_total,
           "{}: the shard [vocab_start = {}, + Vl = {}) does not fit in vocab_total = {}", op,
           vocab_start, num_local, vocab_total);
  check_tokens(tokens, vocab_total, op);
  return vocab_total;
}

}  // namespace

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start,
                       int64_t vocab_total) {
  constexpr const char* kOp = "embedding_forward";
  check_embedding(out, tokens, wte, wpe, vocab_start, vocab_total, kOp, "out");
  const int64_t num_t = tokens.dim(1), num_c = wte.dim(1), num_rows = tokens.numel();
  const int64_t num_local = wte.dim(0);
  const int32_t* tok = tokens.ptr<int32_t>();
  dispatch_float(out.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    T* o = out.ptr<T>();
    const T* w = wte.ptr<T>();
    const T* p = wpe.empty() ? nullptr : wpe.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t row = 0; row < num_rows; ++row) {
      T* o_row = o + row * num_c;
      const int64_t local = int64_t(tok[row]) - vocab_start;
      const T* p_row = p == nullptr ? nullptr : p + (row % num_t) * num_c;
      if (local < 0 || local >= num_local) {  // another tp rank's row: contributes zero
        if (p_row == nullptr)
          std::fill(o_row, o_row + num_c, T(0));
        else
          std::copy(p_row, p_row + num_c, o_row);
        continue;
      }
      const T* w_row = w + local * num_c;
      if (p_row == nullptr) {
        std::copy(w_row, w_row + num_c, o_row);
        continue;
      }
      for (int64_t c = 0; c < num_c; ++c) o_row[c] = w_row[c] + p_row[c];
    }
  });
}

void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                        int64_t vocab_total) {
  constexpr const char* kOp = "embedding_backward";
  check_embedding(dout, tokens, dwte, dwpe, vocab_start, vocab_total, kOp, "dout");
  const int64_t num_local = dwte.dim(0);
  const int64_t num_b = tokens.dim(0), num_t = tokens.dim(1), num_c = dwte.dim(1);
  const int64_t num_rows = tokens.numel();
  const int32_t* tok = tokens.ptr<int32_t>();

  // Positions of this shard's tokens grouped by token id (stable, so each group is in position
  // order): a repeated token gets one summed update, and distinct groups write distinct dwte rows.
  // Tokens of other shards have no row here and are left out.
  std::vector<int64_t> order;
  order.reserve(num_rows);
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t local = int64_t(tok[i]) - vocab_start;
    if (local >= 0 && local < num_local) order.push_back(i);
  }
  const int64_t num_local_rows = int64_t(order.size());
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return tok[x] < tok[y]; });
  std::vector<int64_t> group_begin;
  for (int64_t i = 0; i < num_local_rows; ++i)
    if (i == 0 || tok[order[i]] != tok[order[i - 1]]) group_begin.push_back(i);
  group_begin.push_back(num_local_rows);
  const int64_t num_groups = int64_t(group_begin.size()) - 1;

  dispatch_float(dout.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* d = dout.ptr<T>();
    T* dw = dwte.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t g = 0; g < num_groups; ++g) {
      std::vector<double> acc(num_c, 0.0);
      for (int64_t i = group_begin[g]; i < group_begin[g + 1]; ++i) {
        const T* d_row = d + order[i] * num_c;
        for (int64_t c = 0; c < num_c; ++c) acc[c] += d_row[c];
      }
      T* dw_row = dw + (int64_t(tok[order[group_begin[g]]]) - vocab_start) * num_c;
      for (int64_t c = 0; c < num_c; ++c) dw_row[c] = T(double(dw_row[c]) + acc[c]);
    }

    if (dwpe.empty()) return;
    T* dp = dwpe.ptr<T>();
#pragma omp parallel for schedule(static) if (num_rows * num_c > kMinParallelWork)
    for (int64_t t = 0; t < num_t; ++t) {
      for (int64_t c = 0; c < num_c; ++c) {
        double acc = 0.0;
        for (int64_t b = 0; b < num_b; ++b) acc += d[(b * num_t + t) * num_c + c];
        dp[t * num_c + c] = T(double(dp[t * num_c + c]) + acc);
      }
    }
  });
}

}  // namespace tessera::cpu
