// Bucketed gradient sync and the distributed optimizer under mpirun (CPU, MPI), for every
// (tp, dp, pp) factorization of the world: summed gradients against a double reference built
// from every rank's deterministic contributions, ZeRO-0/1 steps against AdamW in one process,
// the global gradient norm against the serial norm, and the checkpoint state round trip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "optim/distributed_optimizer.h"
#include "parallel/mpi_runtime.h"
#include "tests/optim/dp_test_util.h"

namespace tessera::testing {
namespace {

constexpr uint64_t kSeed = 77;

std::vector<ParallelSizes> factorizations(int world) {
  std::vector<ParallelSizes> out;
  for (int tp = 1; tp <= world; ++tp)
    for (int dp = 1; tp * dp <= world; ++dp)
      if (world % (tp * dp) == 0) out.push_back({tp, dp, world / (tp * dp)});
  return out;
}

std::string layout_name(ParallelSizes s) {
  return "tp" + std::to_string(s.tp) + " dp" + std::to_string(s.dp) + " pp" + std::to_string(s.pp);
}

void write_f32(const Tensor& t, const std::vector<double>& values) {
  float* p = t.ptr<float>();
  for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<float>(values[i]);
}

// One rank's model position in one layout: its store, sync and optimizer.
struct Rank {
  ParallelSizes sizes;
  std::unique_ptr<ParallelContext> ctx;
  RankCoord c;
  std::vector<ParamSpec> specs;
  ParamStore store;
  std::unique_ptr<DistributedDataParallel> ddp;
  std::unique_ptr<DistributedOptimizer> opt;

  Rank(ParallelSizes s, int zero, int64_t bucket_bytes, const AdamWConfig& acfg)
      : sizes(s), ctx(std::make_unique<ParallelContext>(s, Device::cpu)), c(ctx->coord()) {
    specs = synthetic_specs(c.tp_rank, s.tp, c.pp_rank, s.pp);
    add_specs(store, specs);
    store.allocate(DType::f32, Device::cpu, nullptr, s.dp, /*with_master=*/zero == 0);
    store.init(kSeed);
    DataParallelConfig cfg;
    cfg.zero_stage = zero;
    cfg.bucket_bytes = bucket_bytes;
    ddp = std::make_unique<DistributedDataParallel>(store, DataParallelGroups::from(*ctx), cfg);
    opt = std::make_unique<DistributedOptimizer>(store, *ddp, acfg);
  }

  // This rank's own gradients for `step`, then the overlapped sync of a last micro-batch.
  void backward_and_sync(int step, bool exact) {
    store.zero_grad();
    ddp->begin_last_microbatch();
    for (int i = store.size() - 1; i >= 0; --i) {  // backward produces the last parameters first
      Param& p = store[i];
      std::vector<double> g(p.grad.numel());
      for (int64_t e = 0; e < p.grad.numel(); ++e)
        g[e] = grad_contribution(p.spec, c.tp_rank, c.dp_rank, c.pp_rank, step, e, exact);
      write_f32(p.grad, g);
      ddp->grads_ready_from(i);
    }
    ddp->finish();
  }

  double reference(const ParamSpec& spec, int step, int64_t i, bool exact) const {
    return reduced_grad(spec, c.tp_rank, sizes.tp, sizes.dp, c.pp_rank, sizes.pp, step, i, exact);
  }

  // The serial global norm: every (tp, pp) position's owner parameters, fully reduced, once.
  double serial_norm(int step, bool exact) const {
    double sum = 0.0;
    for (int t = 0; t < sizes.tp; ++t)
      for (int s = 0; s < sizes.pp; ++s)
        for (const ParamSpec& spec : synthetic_specs(t, sizes.tp, s, sizes.pp)) {
          if (!spec.owner) continue;
          for (int64_t i = 0; i < spec.shape.numel(); ++i) {
            const double g = static_cast<float>(
                reduced_grad(spec, t, sizes.tp, sizes.dp, s, sizes.pp, step, i, exact));
            sum += g * g;
          }
        }
    return std::sqrt(sum);
  }
};

class DataParallelMpi : public ::testing::TestWithParam<int> {};

TEST_P(DataParallelMpi, SummedGradientsMatchReference) {
  const int zero = GetParam();
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank r(s, zero, 4 * 23, AdamWConfig{});
    r.backward_and_sync(0, /*exact=*/false);
    // ZeRO-0: every element everywhere; ZeRO-1: the pieces this rank owns.
    // No ASSERT here or below: a rank that left the test early would hang the others.
    int64_t checked = 0, bad = 0;
    std::string first_bad;
    for (const ShardPiece& pc : r.opt->pieces()) {
      const Param& p = r.store[pc.param_idx];
      for (int64_t f = pc.flat_begin; f < pc.flat_end; ++f) {
        const int64_t i = f - static_cast<int64_t>(p.offset);
        const double got = p.grad.ptr<float>()[i], want = r.reference(p.spec, 0, i, false);
        // f32 sums of at most 16 N(0,1) terms: a few ulps of the partial sums.
        if (!(std::fabs(got - want) <= 2e-5) && bad++ == 0)
          first_bad = p.spec.name + "[" + std::to_string(i) + "]: got " + std::to_string(got) +
                      ", want " + std::to_string(want);
        ++checked;
      }
    }
    EXPECT_EQ(bad, 0) << first_bad;
    if (zero == 1 && s.dp > 1) {
      EXPECT_LT(checked, r.store.num_elements());
    } else {
      EXPECT_EQ(checked, r.store.num_elements());
    }
    // Every element is checked on some dp rank.
    const double total = r.ctx->host_comm(Group::dp).all_reduce_scalar(double(checked), ReduceOp::sum);
    EXPECT_EQ(total, zero == 1 ? double(r.store.num_elements()) : double(r.store.num_elements()) * s.dp);
  }
}

TEST_P(DataParallelMpi, StepsMatchAdamWOnSummedGradients) {
  const int zero = GetParam();
  AdamWConfig acfg;
  acfg.weight_decay = 0.03f;
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank r(s, zero, 4 * 23, acfg);
    if (zero == 1 && s.dp > 1) {  // the small buckets must cut parameters into pieces
      int cut = 0;
      for (const ShardPiece& pc : r.opt->pieces()) cut += pc.numel() != r.store[pc.param_idx].grad.numel();
      const double any = r.ctx->host_comm(Group::dp).all_reduce_scalar(cut, ReduceOp::sum);
      EXPECT_GT(any, 0);
    }
    // The serial run: this position's parameters, the fully reduced gradients, plain AdamW.
    ParamStore serial;
    add_specs(serial, r.specs);
    serial.allocate(DType::f32, Device::cpu);
    serial.init(kSeed);
    AdamW adamw(serial, acfg);
    const float lrs[] = {1e-2f, 4e-3f, 2e-2f};
    const float scales[] = {1.0f, 0.6f, 0.9f};
    for (int step = 0; step < 3; ++step) {
      // Multiples of 1/1024: every reduction order gives the exact sum, so the updates must agree
      // bit for bit.
      r.backward_and_sync(step, /*exact=*/true);
      serial.zero_grad();
      for (Param& p : serial.all()) {
        std::vector<double> g(p.grad.numel());
        for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] = r.reference(p.spec, step, i, true);
        write_f32(p.grad, g);
      }
      // The norm: layout independent, equal to the serial one, identical on every rank.
      const double norm = r.opt->global_grad_norm(r.store);
      const double want = r.serial_norm(step, true);
      EXPECT_NEAR(norm, want, 1e-12 * want);
      Communicator& world = r.ctx->host_comm(Group::world);
      EXPECT_EQ(world.all_reduce_scalar(norm, ReduceOp::max), norm);
      EXPECT_EQ(-world.all_reduce_scalar(-norm, ReduceOp::max), norm);

      adamw.step(serial, lrs[step], scales[step]);
      r.opt->step(r.store, lrs[step], scales[step]);
      const size_t bytes = serial.num_elements() * sizeof(float);
      EXPECT_EQ(std::memcmp(r.store.flat_values().data, serial.flat_values().data, bytes), 0)
          << "values differ after step " << step;
    }
  }
}

TEST_P(DataParallelMpi, StateGatherLoadRoundTrip) {
  const int zero = GetParam();
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank a(s, zero, 4 * 19, AdamWConfig{});
    ParamStore serial;
    add_specs(serial, a.specs);
    serial.allocate(DType::f32, Device::cpu);
    serial.init(kSeed);
    AdamW adamw(serial, AdamWConfig{});
    for (int step = 0; step < 2; ++step) {
      a.backward_and_sync(step, true);
      serial.zero_grad();
      for (Param& p : serial.all()) {
        std::vector<double> g(p.grad.numel());
        for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] = a.reference(p.spec, step, i, true);
        write_f32(p.grad, g);
      }
      adamw.step(serial, 1e-2f, 1.0f);
      a.opt->step(a.store, 1e-2f, 1.0f);
    }
    Communicator& dp_host = a.ctx->host_comm(Group::dp);
    HostOptimizerState saved;
    a.opt->gather_state(a.store, &saved);
    const size_t bytes = serial.num_elements() * sizeof(float);
    if (a.c.dp_rank == 0) {  // the gathered state is AdamW's, bit for bit
      EXPECT_EQ(saved.numel, a.store.padded_num_elements());
      EXPECT_EQ(std::memcmp(saved.m.data(), adamw.m().data, bytes), 0);
      EXPECT_EQ(std::memcmp(saved.v.data(), adamw.v().data, bytes), 0);
      EXPECT_EQ(std::memcmp(saved.master.data(), serial.flat_master().data, bytes), 0);
    } else {
      EXPECT_EQ(saved.numel, 0);  // only dp rank 0 receives it
      saved.allocate(DType::f32, a.store.padded_num_elements());
    }
    // The caller would read it from a checkpoint on every rank; here dp rank 0 hands it over.
    for (Buffer* b : {&saved.m, &saved.v, &saved.master})
      dp_host.broadcast(Tensor(b->data(), DType::f32, Device::cpu, {saved.numel}), 0);

    Rank b(s, zero, 4 * 19, AdamWConfig{});
    b.store.init(kSeed + 5);  // different weights: load_state must replace them
    b.opt->load_state(b.store, saved);
    b.opt->set_step_count(a.opt->step_count());
    EXPECT_EQ(std::memcmp(b.store.flat_values().data, a.store.flat_values().data, bytes), 0);
    HostOptimizerState again;
    b.opt->gather_state(b.store, &again);
    if (b.c.dp_rank == 0) {
      EXPECT_EQ(std::memcmp(again.m.data(), saved.m.data(), bytes), 0);
      EXPECT_EQ(std::memcmp(again.v.data(), saved.v.data(), bytes), 0);
      EXPECT_EQ(std::memcmp(again.master.data(), saved.master.data(), bytes), 0);
    }
    for (Rank* x : {&a, &b}) {  // and both continue identically
      x->backward_and_sync(2, false);
      x->opt->step(x->store, 3e-3f, 0.7f);
    }
    EXPECT_EQ(std::memcmp(b.store.flat_values().data, a.store.flat_values().data, bytes), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Zero, DataParallelMpi, ::testing::Values(0, 1));

}  // namespace
}  // namespace tessera::testing
