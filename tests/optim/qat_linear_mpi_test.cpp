// QatLinears on a row-parallel linear under mpirun (tp 2, CPU): each rank holds half of every
// weight row and half of every input row; with per-channel int8 weights and per-token int8 inputs
// the row amaxes are max-reduced over tp, so each rank's W_fq and weight gradient are exactly the
// columns of one process's, and the all-reduced output equals one process's up to the order of
// the sum.
// Shape letters: M rows, K in features (Kl = K / tp per rank), N out features.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/ops.h"
#include "model/linear.h"
#include "optim/qat_linear.h"
#include "parallel/parallel_context.h"

namespace tessera {
namespace {

constexpr int64_t M = 10, K = 96, N = 24;

std::vector<float> normal(int64_t n, uint64_t seed, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Columns [c0, c0 + cols) of a (rows, width) row-major matrix.
std::vector<float> columns(const std::vector<float>& a, int64_t rows, int64_t width, int64_t c0,
                           int64_t cols) {
  std::vector<float> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(&out[r * cols], &a[r * width + c0], cols * sizeof(float));
  return out;
}

Tensor host(std::vector<float>& v, Shape s) { return Tensor(v.data(), DType::f32, Device::cpu, s); }

std::vector<float> values(const Tensor& t) {
  std::vector<float> v(t.numel());
  std::memcpy(v.data(), t.data, t.nbytes());
  return v;
}

TEST(QatLinearMpi, RowParallelPerChannelInt8EqualsOneProcess) {
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  ASSERT_EQ(world, 2);
  ParallelContext ctx(ParallelSizes{2, 1, 1}, Device::cpu);
  const int r = ctx.coord().tp_rank;
  const int64_t Kl = K / 2;
  QatConfig cfg;
  cfg.weights = QatBits::int8;
  cfg.group_size = 0;  // one scale per output channel: the whole row, across both ranks
  cfg.activations = QatActivations::int8;
  // Every rank draws the same full weight, input and output gradient; the largest |w| of some rows
  // and the largest |x| of some tokens sit in the other rank's half.
  std::vector<float> w = normal(N * K, 1, 0.05f), x = normal(M * K, 2, 1.0f);
  std::vector<float> dy = normal(M * N, 3, 1.0f);
  for (int64_t i = 0; i < N; i += 3) w[i * K + (i % 2 ? 5 : Kl + 7)] = 0.3f;
  for (int64_t i = 0; i < M; i += 2) x[i * K + (i % 4 ? 3 : Kl + 1)] = -4.0f;

  // One process: the whole layer.
  ParamStore full_ps;
  Linear full;
  full.declare(full_ps, "layers.0.attn.wo", int(K), int(N), false, 0.05f);
  full_ps.allocate(DType::f32, Device::cpu);
  full_ps.zero_grad();
  std::memcpy(full_ps[full.weight].value.data, w.data(), w.size() * sizeof(float));
  QatLinears full_q(cfg, Device::cpu, "t.yaml");
  full_q.add(full, full_ps, "layers.0.attn.wo.weight", QatLayer::attention);
  full_q.set_active(true);
  std::vector<float> y_full(M * N);
  full.forward(full_ps, host(y_full, {M, N}), host(x, {M, K}));
  full.backward_weight(full_ps, host(dy, {M, N}), host(x, {M, K}));

  // This rank's half, row-parallel over tp.
  ModelShard shard;
  shard.tp_size = 2;
  shard.tp_rank = r;
  shard.tp_comm = &ctx.comm(Group::tp);
  ParamStore ps;
  Linear lin;
  lin.declare(ps, "layers.0.attn.wo", int(K), int(N), false, 0.05f, TpSplit::row, shard);
  ps.allocate(DType::f32, Device::cpu);
  ps.zero_grad();
  std::vector<float> w_half = columns(w, N, K, r * Kl, Kl), x_half = columns(x, M, K, r * Kl, Kl);
  std::memcpy(ps[lin.weight].value.data, w_half.data(), w_half.size() * sizeof(float));
  QatLinears q(cfg, Device::cpu, "t.yaml");
  q.add(lin, ps, "layers.0.attn.wo.weight", QatLayer::attention, shard.tp_comm);
  q.set_active(true);
  std::vector<float> y(M * N);
  lin.forward(ps, host(y, {M, N}), host(x_half, {M, Kl}));
  ctx.comm(Group::tp).all_reduce(host(y, {M, N}), ReduceOp::sum);
  lin.backward_weight(ps, host(dy, {M, N}), host(x_half, {M, Kl}));

  // W_fq: exactly the columns of one process's. dW = dy^T x_fq and the all-reduced output: the
  // same products summed in another order (BLAS blocks by the matrix width; the output in two
  // halves), within a few f32 roundings; a per-rank scale would differ by ~1e-2.
  EXPECT_EQ(values(q.quantized_weight(ps, 0)),
            columns(values(full_q.quantized_weight(full_ps, 0)), N, K, r * Kl, Kl));
  const std::vector<float> dw = values(ps[lin.weight].grad);
  const std::vector<float> dw_full = columns(values(full_ps[full.weight].grad), N, K, r * Kl, Kl);
  const auto worst = [](const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0.0;
    for (size_t i = 0; i < a.size(); ++i)
      m = std::max(m, double(std::fabs(a[i] - b[i])) / (1.0 + std::fabs(b[i])));
    return m;
  };
  EXPECT_LE(worst(dw, dw_full), 1e-5);
  EXPECT_LE(worst(y, y_full), 1e-5);
}

}  // namespace
}  // namespace tessera
