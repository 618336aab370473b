// The flight recorder (sequence numbers per group, the ring, states, its cost) and the watchdog's
// decision and thread, without MPI: fake communicators report pending operations and a fake
// clock drives the recorder.
#include "parallel/watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>

#include "core/error.h"

namespace tessera {
namespace {

int64_t g_fake_ns = 0;
int64_t fake_clock() { return g_fake_ns; }
constexpr int64_t kSec = 1'000'000'000;

// A communicator that moves nothing and reports whatever pending operation the test sets.
class FakeComm final : public Communicator {
 public:
  explicit FakeComm(std::string name) : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  Device device() const override { return Device::cpu; }
  const std::string& name() const override { return name_; }
  CommHandle all_reduce_async(Tensor, ReduceOp) override { TS_BUG("unused"); }
  CommHandle reduce_scatter_async(Tensor, Tensor, ReduceOp) override { TS_BUG("unused"); }
  CommHandle all_gather_async(Tensor, Tensor) override { TS_BUG("unused"); }
  CommHandle all_to_all_v_async(Tensor, const std::vector<int64_t>&, Tensor,
                                const std::vector<int64_t>&) override {
    TS_BUG("unused");
  }
  CommHandle send_async(Tensor, int, int) override { TS_BUG("unused"); }
  CommHandle recv_async(Tensor, int, int) override { TS_BUG("unused"); }
  void broadcast(Tensor, int) override { TS_BUG("unused"); }
  void barrier() override { TS_BUG("unused"); }
  std::optional<PendingOp> oldest_pending() override { return pending; }
  void abort_for_watchdog() override { aborted = true; }

  std::optional<PendingOp> pending;
  bool aborted = false;

 private:
  std::string name_;
};

TEST(FlightRecorder, NumbersEachGroupAndKeepsTheLastOps) {
  g_fake_ns = 100 * kSec;
  FlightRecorder rec(3, /*capacity=*/4, fake_clock);
  const int dp = rec.add_group("dp", "mpi"), pp = rec.add_group("pp", "nccl");
  const OpTicket a = rec.begin(dp, "all_reduce", 10, -1);
  const OpTicket b = rec.begin(pp, "send", 5, 1);
  const OpTicket c = rec.begin(dp, "all_gather", 20, -1);
  EXPECT_EQ(a.seq, 1u);
  EXPECT_EQ(b.seq, 1u);
  EXPECT_EQ(c.seq, 2u);
  EXPECT_FALSE(a.skipped);
  g_fake_ns += 2 * kSec;
  rec.waiting(a);
  rec.done(b);
  std::vector<OpRecord> last = rec.last(10);
  ASSERT_EQ(last.size(), 3u);  // only what was recorded
  EXPECT_STREQ(last[0].op, "all_reduce");
  EXPECT_EQ(last[0].state, OpState::waiting);
  EXPECT_EQ(last[0].start_ns, 102 * kSec);  // the wait restarts the clock
  EXPECT_EQ(last[1].state, OpState::done);
  EXPECT_EQ(last[1].peer, 1);
  EXPECT_EQ(last[1].end_ns, 102 * kSec);
  EXPECT_EQ(last[2].state, OpState::posted);
  EXPECT_EQ(rec.group_label(last[1].group), "pp/nccl");
  EXPECT_EQ(rec.issued_summary(), "dp/mpi 2, pp/nccl 1");

  // Two more wrap the ring of 4: the oldest goes, and updating it is a no-op.
  rec.begin(dp, "all_reduce", 1, -1);
  const OpTicket e = rec.begin(dp, "all_reduce", 1, -1);
  rec.done(a);
  last = rec.last(10);
  ASSERT_EQ(last.size(), 4u);
  EXPECT_STREQ(last[0].op, "send");
  EXPECT_EQ(last[3].seq, e.seq);
  EXPECT_EQ(rec.last(2).front().seq, 3u);
}

TEST(FlightRecorder, TrackerReportsTheBlockedOperation) {
  g_fake_ns = 5 * kSec;
  FlightRecorder rec(0, 8, fake_clock);
  OpTracker track(&rec, "world", "mpi");
  const OpTicket t = track.begin("barrier", 0);
  EXPECT_FALSE(track.blocked());  // posted is not blocked (MPI progresses inside calls only)
  g_fake_ns += kSec;
  track.wait_begin(t, "barrier", 0);
  ASSERT_TRUE(track.blocked());
  EXPECT_EQ(track.blocked()->since_ns, 6 * kSec);
  EXPECT_EQ(track.blocked()->seq, 1u);
  track.wait_end(t);
  EXPECT_FALSE(track.blocked());
  EXPECT_EQ(rec.last(1)[0].state, OpState::done);
  // Without a recorder nothing is tracked.
  OpTracker off(nullptr, "tp", "mpi");
  const OpTicket u = off.begin("all_reduce", 4);
  off.wait_begin(u, "all_reduce", 4);
  EXPECT_EQ(u.id, 0u);
  EXPECT_FALSE(off.blocked());
}

// The hot path: begin, waiting and done of one operation (three lock/unlock pairs).
TEST(FlightRecorder, RecordingIsCheap) {
  FlightRecorder rec(0);
  const int g = rec.add_group("dp", "mpi");
  constexpr int kOps = 200000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kOps; ++i) {
    const OpTicket t = rec.begin(g, "all_reduce", i, -1);
    rec.waiting(t);
    rec.done(t);
  }
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() /
      kOps;
  std::printf("flight recorder: %.0f ns per operation\n", ns);
  EXPECT_LT(ns, 5000.0);  // loose: sanitizers and a loaded machine; ~300 ns on a CI core
}

PendingOp pending(const char* op, uint64_t seq, int64_t since_ns) {
  return PendingOp{op, seq, 16, -1, since_ns};
}

TEST(Watchdog, FiresOnlyPastTheTimeoutOnTheOldestOperation) {
  FakeComm dp("dp"), pp("pp"), idle("tp");
  const std::vector<Communicator*> comms = {&idle, &dp, &pp};
  const int64_t now = 1000 * kSec;
  dp.pending = pending("all_reduce", 7, now - 2 * kSec);
  EXPECT_FALSE(find_hang(comms, now, 3.0));
  pp.pending = pending("recv", 4, now - 5 * kSec);
  std::optional<Hang> h = find_hang(comms, now, 3.0);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->comm, &pp);
  EXPECT_EQ(h->op.seq, 4u);
  EXPECT_DOUBLE_EQ(h->seconds, 5.0);
  dp.pending = pending("all_reduce", 7, now - 9 * kSec);
  h = find_hang(comms, now, 3.0);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->comm, &dp);
}

TEST(Watchdog, LineNamesRankOpGroupSeqAndTheLastOps) {
  g_fake_ns = 50 * kSec;
  FlightRecorder rec(1, 16, fake_clock);
  const int g = rec.add_group("dp", "mpi");
  rec.done(rec.begin(g, "all_reduce", 16, -1));
  const OpTicket t = rec.begin(g, "all_reduce", 16, -1);
  rec.waiting(t);
  g_fake_ns += 4 * kSec;
  FakeComm dp("dp");
  const Hang h{&dp, pending("all_reduce", t.seq, 50 * kSec), 4.0};
  const std::string line = hang_line(rec, h, 3.0);
  EXPECT_NE(line.find("rank 1: stuck in all_reduce on group 'dp' (mpi, seq 2, 16 elements) for "
                      "4.0 s (parallel.timeout_s 3)"),
            std::string::npos)
      << line;
  EXPECT_NE(line.find("issued per group: dp/mpi 2"), std::string::npos) << line;
  EXPECT_NE(line.find("last ops: dp/mpi all_reduce#1 done, dp/mpi all_reduce#2 waiting 4.0s"),
            std::string::npos)
      << line;
}

TEST(Watchdog, ThreadReportsAHangOnceAndStopsPromptly) {
  FlightRecorder rec(0);
  FakeComm dp("dp");
  dp.pending = pending("all_reduce", 3, rec.now_ns() - 10 * kSec);
  std::atomic<int> calls{0};
  std::string got;
  {
    Watchdog wd({&dp}, rec, 0.5, [&](const std::string& line) {
      got = line;
      calls.fetch_add(1);
    });
    for (int i = 0; i < 200 && calls.load() == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(calls.load(), 1);
  EXPECT_NE(got.find("stuck in all_reduce on group 'dp'"), std::string::npos) << got;

  // Nothing pending: no report, and the destructor does not wait for a poll period.
  FakeComm quiet("tp");
  const auto t0 = std::chrono::steady_clock::now();
  {
    Watchdog wd({&quiet}, rec, 600.0, [&](const std::string&) { calls.fetch_add(1); });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
  EXPECT_EQ(calls.load(), 1);
}

}  // namespace
}  // namespace tessera
