// Bucket layout properties for many dp sizes and bucket sizes (pure, one process), and the launch
// order of DistributedDataParallel observed through recording fake communicators.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "optim/data_parallel.h"
#include "tests/optim/dp_test_util.h"

namespace tessera {
namespace {

using testing::add_specs;
using testing::synthetic_specs;

ParamStore registered(const std::vector<ParamSpec>& specs) {
  ParamStore store;
  add_specs(store, specs);
  return store;
}

int64_t numel_of(const Param& p) { return p.spec.shape.numel(); }

struct LayoutCase {
  int dp;
  int64_t bucket_numel;
  int pp_rank, pp_size;
};

class BucketLayoutTest : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(BucketLayoutTest, TilesBufferFromTheEndAndShardsExactlyOnce) {
  const LayoutCase c = GetParam();
  const ParamStore store = registered(synthetic_specs(0, 1, c.pp_rank, c.pp_size));
  const BucketLayout layout(store, c.dp, c.bucket_numel);
  const auto& buckets = layout.buckets();
  ASSERT_FALSE(buckets.empty());
  EXPECT_EQ(layout.padded_numel() % c.dp, 0);
  EXPECT_GE(layout.padded_numel(), store.num_elements());
  EXPECT_LT(layout.padded_numel() - store.num_elements(), c.dp);

  // Contiguous, descending, multiples of dp, bucket 0 at the end, the last one at 0.
  EXPECT_EQ(buckets.front().end, layout.padded_numel());
  EXPECT_EQ(buckets.back().begin, 0);
  int64_t shard = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    const GradBucket& bk = buckets[b];
    EXPECT_LT(bk.begin, bk.end);
    EXPECT_EQ(bk.begin % c.dp, 0);
    EXPECT_EQ(bk.end % c.dp, 0);
    if (b > 0) {
      EXPECT_EQ(bk.end, buckets[b - 1].begin);
    }
    EXPECT_EQ(bk.shard_offset, shard);
    shard += bk.numel() / c.dp;
    // A bucket smaller than the target is the last one or borders a tied-embedding bucket.
    const bool borders_held = bk.held || (b > 0 && buckets[b - 1].held) ||
                              (b + 1 < buckets.size() && buckets[b + 1].held);
    if (bk.numel() < c.bucket_numel) {
      EXPECT_TRUE(bk.begin == 0 || borders_held) << "bucket " << b;
    }
  }
  EXPECT_EQ(shard, layout.shard_numel());

  // Every bucket starts at a parameter start (rounded up to dp), or the embedding's rounded down.
  for (const GradBucket& bk : buckets) {
    if (bk.begin == 0) continue;
    bool at_param = false;
    for (const Param& p : store.all()) {
      const int64_t off = static_cast<int64_t>(p.offset);
      at_param |= bk.begin == ParamStore::padded(off, c.dp);
      at_param |= p.spec.embedding_group && bk.begin == off / c.dp * c.dp;
    }
    EXPECT_TRUE(at_param) << "bucket at " << bk.begin;
  }

  // A tied embedding lies in exactly one bucket, which is held; no other bucket is held.
  for (const Param& p : store.all()) {
    int holding = 0;
    for (const GradBucket& bk : buckets) {
      const int64_t off = static_cast<int64_t>(p.offset);
      if (off < bk.end && off + numel_of(p) > bk.begin) {
        holding += 1;
        if (p.spec.embedding_group) {
          EXPECT_TRUE(bk.held);
        }
      }
    }
    if (p.spec.embedding_group) {
      EXPECT_EQ(holding, 1) << p.spec.name;
    }
  }
  const auto num_embedding = std::count_if(store.all().begin(), store.all().end(),
                                           [](const Param& p) { return p.spec.embedding_group; });
  EXPECT_EQ(
      std::count_if(buckets.begin(), buckets.end(), [](const GradBucket& b) { return b.held; }),
      num_embedding);

  // The pieces of all dp ranks cover every parameter element exactly once; each lies inside one
  // parameter and one chunk of its rank; state offsets of one rank do not overlap.
  std::vector<int> covered(store.num_elements(), 0);
  for (int r = 0; r < c.dp; ++r) {
    const std::vector<ShardPiece> pieces = layout.shard_pieces(store, r);
    std::vector<int> state_used(layout.shard_numel(), 0);
    int64_t last_end = -1;
    for (const ShardPiece& pc : pieces) {
      ASSERT_LT(pc.flat_begin, pc.flat_end);
      EXPECT_GE(pc.flat_begin, last_end);  // increasing flat order
      last_end = pc.flat_end;
      const Param& p = store[pc.param_idx];
      EXPECT_GE(pc.flat_begin, static_cast<int64_t>(p.offset));
      EXPECT_LE(pc.flat_end, static_cast<int64_t>(p.offset) + numel_of(p));
      bool in_chunk = false;
      for (int b = 0; b < static_cast<int>(buckets.size()); ++b) {
        if (pc.flat_begin >= layout.chunk_begin(b, r) && pc.flat_end <= layout.chunk_end(b, r)) {
          in_chunk = true;
          EXPECT_EQ(pc.state_offset,
                    buckets[b].shard_offset + pc.flat_begin - layout.chunk_begin(b, r));
        }
      }
      EXPECT_TRUE(in_chunk);
      for (int64_t i = pc.flat_begin; i < pc.flat_end; ++i) covered[i] += 1;
      for (int64_t s = pc.state_offset; s < pc.state_offset + pc.numel(); ++s) {
        ASSERT_LT(s, layout.shard_numel());
        state_used[s] += 1;
      }
    }
    EXPECT_TRUE(std::all_of(state_used.begin(), state_used.end(), [](int u) { return u <= 1; }));
  }
  for (int64_t i = 0; i < store.num_elements(); ++i) ASSERT_EQ(covered[i], 1) << "element " << i;
}

INSTANTIATE_TEST_SUITE_P(Layouts, BucketLayoutTest,
                         ::testing::Values(LayoutCase{1, 1, 0, 1}, LayoutCase{1, 40, 0, 1},
                                           LayoutCase{2, 40, 0, 1}, LayoutCase{3, 17, 0, 1},
                                           LayoutCase{4, 64, 0, 1}, LayoutCase{8, 40, 0, 2},
                                           LayoutCase{4, 40, 1, 2}, LayoutCase{5, 1000000, 1, 2},
                                           LayoutCase{16, 7, 1, 3}, LayoutCase{2, 1000000, 0, 1}));

TEST(BucketLayout, BigBucketsGiveOneBucketPlusTheEmbedding) {
  const ParamStore store = registered(synthetic_specs(0, 1, 0, 1));
  const BucketLayout layout(store, 4, 1 << 30);
  ASSERT_EQ(layout.buckets().size(), 2u);  // everything after the embedding, then the embedding
  EXPECT_FALSE(layout.buckets()[0].held);
  EXPECT_TRUE(layout.buckets()[1].held);
}

// ---- expert parallelism ----------------------------------------------------------------------

// The synthetic model with a routed-expert tensor after each block's w1 and one at the very end
// (slices of (E, 7, 3) along dim 0, two experts per ep rank), registered with expert runs aligned
// to dp.
ParamStore with_experts(int dp) {
  ParamStore store;
  store.align_expert_runs(dp);
  const auto expert = [](const std::string& name) {
    ParamSpec s{name, {2, 7, 3}, ParamClass::weight, InitKind::normal, 0.5f};
    s.shard_dim = 0;
    s.expert_parallel = true;
    return s;
  };
  for (const ParamSpec& spec : synthetic_specs(0, 1, 0, 1)) {
    store.add(spec);
    if (spec.name.ends_with("w1.bias")) store.add(expert(spec.name + ".experts"));
  }
  store.add(expert("last.experts"));
  return store;
}

struct ExpertCase {
  int dp, ep;
  int64_t bucket_numel;
};

class ExpertBucketTest : public ::testing::TestWithParam<ExpertCase> {};

// Expert buckets hold only experts and split over the dp / ep ranks of expert_dp; dense ones split
// over dp. Over the ranks of one expert_dp group (the dp ranks at the same ep position) every
// expert element is updated exactly once, and over all dp ranks every dense element.
TEST_P(ExpertBucketTest, KindsNeverMixAndEachGroupShardsItsKindOnce) {
  const ExpertCase c = GetParam();
  const ParamStore store = with_experts(c.dp);
  const BucketLayout layout(store, c.dp, c.bucket_numel, c.ep);
  const auto& buckets = layout.buckets();
  int64_t shard = 0;
  int experts = 0;
  for (int b = 0; b < static_cast<int>(buckets.size()); ++b) {
    const GradBucket& bk = buckets[b];
    EXPECT_EQ(bk.begin % c.dp, 0);
    EXPECT_EQ(layout.group_size(b), bk.expert ? c.dp / c.ep : c.dp);
    EXPECT_EQ(bk.shard_offset, shard);
    shard += layout.chunk_numel(b);
    experts += bk.expert;
    for (int i = bk.first_param; i < bk.end_param; ++i) {
      const Param& p = store[i];
      const int64_t off = static_cast<int64_t>(p.offset);
      if (off < bk.end && off + numel_of(p) > bk.begin) {
        EXPECT_EQ(p.spec.expert_parallel, bk.expert) << p.spec.name << " in bucket " << b;
      }
    }
  }
  EXPECT_EQ(shard, layout.shard_numel());
  EXPECT_GE(experts, 3);
  for (int e = 0; e < c.ep; ++e) {
    std::vector<int> covered(store.num_elements(), 0);
    for (int d = 0; d < c.dp; ++d) {
      const bool same_experts = d % c.ep == e;
      for (const ShardPiece& pc : layout.shard_pieces(store, d))
        if (same_experts || !store[pc.param_idx].spec.expert_parallel)
          for (int64_t i = pc.flat_begin; i < pc.flat_end; ++i) covered[i] += 1;
    }
    for (const Param& p : store.all())
      for (int64_t i = 0; i < numel_of(p); ++i)
        ASSERT_EQ(covered[p.offset + i], 1) << p.spec.name << " element " << i << " ep " << e;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ExpertBucketTest,
                         ::testing::Values(ExpertCase{2, 2, 1}, ExpertCase{4, 2, 40},
                                           ExpertCase{4, 4, 17}, ExpertCase{6, 3, 1000000},
                                           ExpertCase{8, 2, 40}, ExpertCase{4, 1, 40}),
                         [](const auto& info) {
                           return "dp" + std::to_string(info.param.dp) + "_ep" +
                                  std::to_string(info.param.ep) + "_bucket" +
                                  std::to_string(info.param.bucket_numel);
                         });

TEST(ParamStore, ExpertRunsStartAtTheAlignment) {
  const ParamStore store = with_experts(8);
  for (int i = 1; i < store.size(); ++i)
    if (store[i].spec.expert_parallel != store[i - 1].spec.expert_parallel) {
      EXPECT_EQ(store[i].offset % 8, 0u) << store[i].spec.name;
    }
}

// ---- launch order through recording fakes -------------------------------------------------

struct CommEvent {
  std::string comm, op;
  const void* data;  // all_reduce: the tensor; reduce_scatter / all_gather: `in`
  const void* out;   // reduce_scatter / all_gather: `out`; else null
  int64_t numel;     // of `data`
};

class DoneRequest final : public CommRequest {
 public:
  void wait() override {}
};

// Records every call and moves no data (so sums are not checked here; the MPI tests do that).
class RecordingCommunicator final : public Communicator {
 public:
  RecordingCommunicator(std::string name, int size, std::vector<CommEvent>* log)
      : name_(std::move(name)), size_(size), log_(log) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  Device device() const override { return Device::cpu; }
  const std::string& name() const override { return name_; }
  CommHandle all_reduce_async(Tensor t, ReduceOp) override { return record("all_reduce", t, {}); }
  CommHandle reduce_scatter_async(Tensor out, Tensor in, ReduceOp) override {
    return record("reduce_scatter", in, out);
  }
  CommHandle all_gather_async(Tensor out, Tensor in) override {
    return record("all_gather", in, out);
  }
  CommHandle all_to_all_v_async(Tensor out, const std::vector<int64_t>&, Tensor in,
                                const std::vector<int64_t>&) override {
    return record("all_to_all_v", in, out);
  }
  CommHandle send_async(Tensor t, int, int) override { return record("send", t, {}); }
  CommHandle recv_async(Tensor t, int, int) override { return record("recv", t, {}); }
  void broadcast(Tensor t, int) override { record("broadcast", t, {}); }
  void barrier() override { record("barrier", {}, {}); }

 protected:
  double all_reduce_scalar_device(double x, ReduceOp) override { return x; }

 private:
  CommHandle record(const char* op, Tensor t, Tensor out) {
    log_->push_back({name_, op, t.data, out.data, t.numel()});
    return std::make_unique<DoneRequest>();
  }
  std::string name_;
  int size_;
  std::vector<CommEvent>* log_;
};

struct RecordingGroups {
  explicit RecordingGroups(int dp_size = 2)
      : dp("dp", dp_size, &log), dp_host("dp_host", dp_size, &log) {}
  std::vector<CommEvent> log;
  RecordingCommunicator dp, dp_host;
  RecordingCommunicator tp{"tp", 2, &log}, embedding{"embedding", 2, &log},
      model_host{"model_host", 2, &log};
  DataParallelGroups groups() { return {&dp, &tp, &embedding, &dp_host, &model_host}; }
};

// Index of the bucket whose gradient slice starts at `data`, or -1.
int bucket_at(const ParamStore& store, const BucketLayout& layout, const void* data) {
  for (int b = 0; b < static_cast<int>(layout.buckets().size()); ++b)
    if (store.flat_grads().slice(layout.buckets()[b].begin, layout.buckets()[b].end).data == data)
      return b;
  return -1;
}

class LaunchOrderTest : public ::testing::TestWithParam<int> {};

TEST_P(LaunchOrderTest, BucketsFollowReadinessAndTheEmbeddingGoesLast) {
  const int zero = GetParam();
  RecordingGroups rec;
  ParamStore store;
  add_specs(store, synthetic_specs(0, 1, 0, 1));
  store.allocate(DType::f32, Device::cpu, nullptr, /*pad_multiple=*/2, /*with_master=*/true);
  DataParallelConfig cfg;
  cfg.zero_stage = zero;
  cfg.bucket_bytes = 30 * sizeof(float);
  DistributedDataParallel ddp(store, rec.groups(), cfg);
  const BucketLayout& layout = ddp.layout();
  const auto& buckets = layout.buckets();
  ASSERT_GE(buckets.size(), 5u);

  // Earlier micro-batches: readiness launches nothing.
  for (int i = store.size() - 1; i >= 0; --i) ddp.grads_ready_from(i);
  EXPECT_TRUE(rec.log.empty());

  ddp.begin_last_microbatch();
  std::vector<int> launched;  // bucket indices in launch order
  for (int i = store.size() - 1; i >= 0; --i) {
    const size_t before = rec.log.size();
    ddp.grads_ready_from(i);
    for (size_t e = before; e < rec.log.size(); ++e) {
      const CommEvent& ev = rec.log[e];
      if (ev.comm == "tp") {  // a tp_partial parameter summed before its first bucket
        bool found = false;
        for (int j = 0; j < store.size(); ++j)
          if (store[j].grad.data == ev.data) {
            found = true;
            EXPECT_TRUE(store[j].spec.tp_partial_grad);
            EXPECT_EQ(ev.numel, store[j].grad.numel());
          }
        EXPECT_TRUE(found);
        continue;
      }
      ASSERT_EQ(ev.comm, "dp");
      EXPECT_EQ(ev.op, zero == 0 ? "all_reduce" : "reduce_scatter");
      const int b = bucket_at(store, layout, ev.data);
      ASSERT_GE(b, 0);
      EXPECT_EQ(ev.numel, buckets[b].numel());
      if (zero == 1) {  // rank 0's chunk, in place
        EXPECT_EQ(ev.out, ev.data);
      }
      launched.push_back(b);
    }
    // Exactly the unheld buckets lying at or after parameter i have been launched.
    std::vector<int> expected;
    for (int b = 0; b < static_cast<int>(buckets.size()); ++b)
      if (!buckets[b].held && buckets[b].begin >= static_cast<int64_t>(store[i].offset))
        expected.push_back(b);
    EXPECT_EQ(launched, expected) << "after grads_ready_from(" << i << ")";
  }
  // Every tp_partial parameter was summed over tp before the bucket holding its first element.
  for (int j = 0; j < store.size(); ++j) {
    if (!store[j].spec.tp_partial_grad) continue;
    size_t tp_at = rec.log.size(), bucket_first = rec.log.size();
    for (size_t e = 0; e < rec.log.size(); ++e) {
      if (rec.log[e].comm == "tp" && rec.log[e].data == store[j].grad.data)
        tp_at = std::min(tp_at, e);
      if (rec.log[e].comm == "dp") {
        const GradBucket& bk = buckets[bucket_at(store, layout, rec.log[e].data)];
        const int64_t off = static_cast<int64_t>(store[j].offset);
        if (off < bk.end && off + store[j].grad.numel() > bk.begin)
          bucket_first = std::min(bucket_first, e);
      }
    }
    EXPECT_LT(tp_at, bucket_first) << store[j].spec.name;
  }

  const size_t before_finish = rec.log.size();
  ddp.finish();
  // finish(): the embedding sum, then the held bucket (the last one launched).
  ASSERT_EQ(rec.log.size(), before_finish + 2);
  EXPECT_EQ(rec.log[before_finish].comm, "embedding");
  EXPECT_EQ(rec.log[before_finish].data, store.find("wte").grad.data);
  EXPECT_EQ(rec.log[before_finish + 1].comm, "dp");
  const int held = bucket_at(store, layout, rec.log[before_finish + 1].data);
  ASSERT_GE(held, 0);
  EXPECT_TRUE(buckets[held].held);
  EXPECT_EQ(held, static_cast<int>(buckets.size()) - 1);  // wte is parameter 0: the last bucket

  // A step without early launches: finish() launches everything in bucket order.
  rec.log.clear();
  ddp.finish();
  std::vector<int> order;
  for (const CommEvent& ev : rec.log)
    if (ev.comm == "dp") order.push_back(bucket_at(store, layout, ev.data));
  ASSERT_EQ(order.size(), buckets.size());
  EXPECT_TRUE(std::is_sorted(order.begin(), order.end()));
  EXPECT_EQ(rec.log.front().comm, "embedding");
}

INSTANTIATE_TEST_SUITE_P(Zero, LaunchOrderTest, ::testing::Values(0, 1));

TEST(DistributedDataParallel, RejectsStoreNotPaddedForDp) {
  RecordingGroups rec(3);
  ParamStore store;
  add_specs(store, synthetic_specs(0, 1, 0, 1));
  ASSERT_NE(store.num_elements() % 3, 0)
      << "the test needs a parameter count that 3 does not divide";
  store.allocate(DType::f32, Device::cpu, nullptr, /*pad_multiple=*/1);
  EXPECT_THROW(DistributedDataParallel(store, rec.groups(), DataParallelConfig{}), Error);
}

}  // namespace
}  // namespace tessera
