// Fp8ScalingState in one process (CPU): initial buffers, update through the op, the amax
// reduction over a fake tensor-parallel group that plays the other rank's values, and checkpoint
// snapshots (round trip, history-length change, validation errors). The multi-rank reduction is
// in fp8_scaling_mpi_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "optim/fp8_scaling.h"
#include "parallel/communicator.h"
#include "tests/common/errors.h"

namespace tessera {
namespace {

using testing::expect_user_error;

std::vector<float> to_host(const Tensor& t) {
  std::vector<float> v(t.numel());
  copy_bytes(v.data(), Device::cpu, t.data, t.device, t.nbytes());
  return v;
}
void set(const Tensor& t, std::vector<float> v) {
  ASSERT_EQ(int64_t(v.size()), t.numel());
  copy_bytes(t.data, t.device, v.data(), Device::cpu, t.nbytes());
}

class DoneRequest final : public CommRequest {
 public:
  void wait() override {}
};

// Plays one rank of a tp group of `size` in one process: all_reduce(max) maxes the tensor with
// what the other ranks hold (`peer`), and every call is recorded. Anything else is a failure.
class PeerMaxCommunicator final : public Communicator {
 public:
  PeerMaxCommunicator(int size, std::vector<float> peer) : size_(size), peer_(std::move(peer)) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  Device device() const override { return Device::cpu; }
  const std::string& name() const override { return name_; }
  CommHandle all_reduce_async(Tensor t, ReduceOp op) override {
    ++calls;
    reduced = t.data;
    last_op = op;
    EXPECT_EQ(t.numel(), int64_t(peer_.size()));
    float* v = t.ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = std::max(v[i], peer_[i]);
    return std::make_unique<DoneRequest>();
  }
  CommHandle reduce_scatter_async(Tensor, Tensor, ReduceOp) override { return unexpected(); }
  CommHandle all_gather_async(Tensor, Tensor) override { return unexpected(); }
  CommHandle all_to_all_v_async(Tensor, const std::vector<int64_t>&, Tensor,
                                const std::vector<int64_t>&) override {
    return unexpected();
  }
  CommHandle send_async(Tensor, int, int) override { return unexpected(); }
  CommHandle recv_async(Tensor, int, int) override { return unexpected(); }
  void broadcast(Tensor, int) override { unexpected(); }
  void barrier() override { unexpected(); }

  int calls = 0;
  const void* reduced = nullptr;
  ReduceOp last_op = ReduceOp::sum;

 protected:
  double all_reduce_scalar_device(double x, ReduceOp) override { return x; }

 private:
  CommHandle unexpected() {
    ADD_FAILURE() << "unexpected communication";
    return std::make_unique<DoneRequest>();
  }
  int size_;
  std::vector<float> peer_;
  std::string name_ = "tp";
};

Fp8ScalingConfig config(int len, ops::Fp8AmaxCompute compute, int margin) {
  Fp8ScalingConfig cfg;
  cfg.amax_history_len = len;
  cfg.amax_compute = compute;
  cfg.margin = margin;
  return cfg;
}

TEST(Fp8ScalingState, StartsNeutralAndUpdatesPerFormat) {
  Fp8ScalingState state(Device::cpu, {DType::e4m3, DType::e5m2, DType::e4m3},
                        config(3, ops::Fp8AmaxCompute::max, 1));
  EXPECT_EQ(to_host(state.scales()), (std::vector<float>{1, 1, 1}));
  EXPECT_EQ(to_host(state.scale_invs()), (std::vector<float>{1, 1, 1}));
  EXPECT_EQ(to_host(state.amaxes()), (std::vector<float>{0, 0, 0}));
  EXPECT_EQ(to_host(state.amax_history()), std::vector<float>(9, 0.0f));
  EXPECT_EQ(state.amax(1).data, static_cast<float*>(state.amaxes().data) + 1);
  set(state.amaxes(), {2.0f, 4.0f, 0.0f});
  state.update();
  // margin 1 halves the scale; the third tensor saw only zeros and keeps scale 1.
  EXPECT_EQ(to_host(state.scales()), (std::vector<float>{448.0f / 2 / 2, 57344.0f / 4 / 2, 1.0f}));
  EXPECT_EQ(to_host(state.amaxes()), (std::vector<float>{0, 0, 0}));
  EXPECT_EQ(to_host(state.amax_history()), (std::vector<float>{2, 4, 0, 0, 0, 0, 0, 0, 0}));
}

TEST(Fp8ScalingState, ReduceAmaxTakesTheGroupMaxBeforeTheUpdate) {
  Fp8ScalingState state(Device::cpu, {DType::e4m3, DType::e5m2},
                        config(2, ops::Fp8AmaxCompute::most_recent, 0));
  PeerMaxCommunicator tp(2, {8.0f, 1.0f});
  set(state.amaxes(), {2.0f, 4.0f});
  state.reduce_amax(&tp);
  EXPECT_EQ(tp.calls, 1);
  EXPECT_EQ(tp.reduced, state.amaxes().data);
  EXPECT_EQ(tp.last_op, ReduceOp::max);
  state.update();
  EXPECT_EQ(to_host(state.scales()), (std::vector<float>{448.0f / 8.0f, 57344.0f / 4.0f}));

  // No group, or a group of one: nothing to reduce.
  PeerMaxCommunicator alone(1, {100.0f, 100.0f});
  state.reduce_amax(nullptr);
  state.reduce_amax(&alone);
  EXPECT_EQ(alone.calls, 0);
}

TEST(Fp8ScalingState, GatherLoadRoundTripAndHistoryLengthChange) {
  const std::vector<DType> formats{DType::e4m3, DType::e5m2};
  Fp8ScalingState a(Device::cpu, formats, config(3, ops::Fp8AmaxCompute::max, 0));
  for (float x : {1.0f, 2.0f, 3.0f, 0.5f}) {
    set(a.amaxes(), {x, 10 * x});
    a.update();
  }
  const Fp8ScalingState::State snap = a.gather();
  EXPECT_EQ(snap.history_len, 3);
  EXPECT_EQ(snap.amax_history, (std::vector<float>{0.5f, 5, 3, 30, 2, 20}));

  Fp8ScalingState b(Device::cpu, formats, config(3, ops::Fp8AmaxCompute::max, 0));
  set(b.amaxes(), {7.0f, 7.0f});  // stale amaxes are cleared by load
  b.load(snap);
  EXPECT_EQ(to_host(b.amax_history()), snap.amax_history);
  EXPECT_EQ(to_host(b.scales()), snap.scale);
  EXPECT_EQ(to_host(b.scale_invs()), snap.scale_inv);
  EXPECT_EQ(to_host(b.amaxes()), (std::vector<float>{0, 0}));
  // Both continue identically.
  for (Fp8ScalingState* s : {&a, &b}) {
    set(s->amaxes(), {0.25f, 1.0f});
    s->update();
  }
  EXPECT_EQ(to_host(a.scales()), to_host(b.scales()));

  // A shorter history keeps the newest rows; a longer one pads with zeros.
  Fp8ScalingState shorter(Device::cpu, formats, config(2, ops::Fp8AmaxCompute::max, 0));
  shorter.load(snap);
  EXPECT_EQ(to_host(shorter.amax_history()), (std::vector<float>{0.5f, 5, 3, 30}));
  Fp8ScalingState longer(Device::cpu, formats, config(4, ops::Fp8AmaxCompute::max, 0));
  longer.load(snap);
  EXPECT_EQ(to_host(longer.amax_history()), (std::vector<float>{0.5f, 5, 3, 30, 2, 20, 0, 0}));
}

// What gemm_fp8 reads: each scale_inv(i) is 16-byte aligned (cuBLASLt's rule) and equals
// scale_invs()[i] at construction, after every update, and after a load.
void expect_aligned_copies(const Fp8ScalingState& s) {
  const std::vector<float> inv = to_host(s.scale_invs());
  for (int64_t i = 0; i < s.num_tensors(); ++i) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(s.scale_inv(i).data) % 16, 0u) << i;
    EXPECT_EQ(to_host(s.scale_inv(i)), std::vector<float>{inv[i]}) << i;
  }
}

TEST(Fp8ScalingState, GemmScaleCopiesAreAlignedAndCurrent) {
  for (int len : {1, 2, 3}) {  // history lengths that leave the other arrays at odd offsets
    SCOPED_TRACE(len);
    Fp8ScalingState a(Device::cpu, {DType::e4m3, DType::e5m2, DType::e4m3},
                      config(len, ops::Fp8AmaxCompute::max, 0));
    expect_aligned_copies(a);
    set(a.amaxes(), {3.0f, 5.0f, 0.5f});
    a.update();
    EXPECT_NE(to_host(a.scale_inv(0)), std::vector<float>{1.0f});
    expect_aligned_copies(a);
    Fp8ScalingState b(Device::cpu, {DType::e4m3, DType::e5m2, DType::e4m3},
                      config(len, ops::Fp8AmaxCompute::max, 0));
    b.load(a.gather());
    expect_aligned_copies(b);
    EXPECT_EQ(to_host(b.scale_inv(1)), to_host(a.scale_inv(1)));
  }
}

TEST(Fp8ScalingState, LoadRejectsMismatchedOrCorruptSnapshots) {
  Fp8ScalingState state(Device::cpu, {DType::e4m3, DType::e5m2},
                        config(2, ops::Fp8AmaxCompute::max, 0));
  const Fp8ScalingState::State good = state.gather();
  auto with = [&](auto edit) {
    Fp8ScalingState::State s = good;
    edit(s);
    return s;
  };
  expect_user_error([&] { state.load(with([](auto& s) { s.formats[1] = DType::e4m3; })); },
                    {"formats"});
  expect_user_error([&] { state.load(with([](auto& s) { s.amax_history.pop_back(); })); },
                    {"inconsistent sizes"});
  expect_user_error([&] { state.load(with([](auto& s) { s.amax_history[3] = -1.0f; })); },
                    {"amax_history[1, 1]"});
  expect_user_error(
      [&] {
        state.load(
            with([](auto& s) { s.amax_history[0] = std::numeric_limits<float>::quiet_NaN(); }));
      },
      {"amax_history[0, 0]"});
  expect_user_error([&] { state.load(with([](auto& s) { s.scale[0] = 0.0f; })); }, {"scale[0]"});
  expect_user_error([&] { state.load(with([](auto& s) { s.scale[1] = 2.0f; })); },
                    {"scale_inv[1]"});
  // A failed load changes nothing.
  EXPECT_EQ(to_host(state.scales()), (std::vector<float>{1, 1}));
}

TEST(Fp8ScalingConfig, ValidationNamesTheField) {
  expect_user_error(
      [] {
        validate_fp8_scaling_config(config(0, ops::Fp8AmaxCompute::max, 0), {"precision.fp8"});
      },
      {"precision.fp8.amax_history_len"});
  expect_user_error(
      [] {
        validate_fp8_scaling_config(config(4, ops::Fp8AmaxCompute::max, -1), {"precision.fp8"});
      },
      {"precision.fp8.margin"});
}

}  // namespace
}  // namespace tessera
