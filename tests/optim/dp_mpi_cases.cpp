// Multi-rank data-parallel checks on any device (see dp_mpi_cases.h). Every reference is computed
// in this process from the deterministic contributions of all ranks (dp_test_util.h); the serial
// AdamW runs on the same device and dtype as the distributed one.
#include "tests/optim/dp_mpi_cases.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "core/memory.h"
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

// Host values (double) into a tensor of any dtype on any device, rounded once.
void upload(const Tensor& dst, const std::vector<double>& values) {
  std::vector<char> bytes(dst.nbytes());
  convert_buffer(values.data(), DType::f64, bytes.data(), dst.dtype, dst.numel());
  copy_bytes(dst.data, dst.device, bytes.data(), Device::cpu, bytes.size());
}

std::vector<char> download(const Tensor& t) {
  std::vector<char> bytes(t.nbytes());
  copy_bytes(bytes.data(), Device::cpu, t.data, t.device, bytes.size());
  return bytes;
}

std::vector<double> download_f64(const Tensor& t) {
  const std::vector<char> bytes = download(t);
  std::vector<double> out(t.numel());
  convert_buffer(bytes.data(), t.dtype, out.data(), DType::f64, t.numel());
  return out;
}

// Groups are built once per (layout, device) and shared by every test: each ParallelContext
// creates up to six communicators, and NCCL's per-communicator setup (a fraction of a second on
// every rank) times every test and layout made the NCCL runs take minutes. The cache is emptied
// by an environment's TearDown, inside RUN_ALL_TESTS, so no communicator outlives MPI.
using ContextKey = std::pair<std::vector<int>, int>;
std::map<ContextKey, std::unique_ptr<ParallelContext>>& context_cache() {
  static std::map<ContextKey, std::unique_ptr<ParallelContext>> cache;
  return cache;
}

ParallelContext& shared_context(ParallelSizes s, Device device) {
  const ContextKey key{{s.dp, s.tp, s.pp}, int(device)};
  std::unique_ptr<ParallelContext>& ctx = context_cache()[key];
  if (!ctx) ctx = std::make_unique<ParallelContext>(s, device);
  return *ctx;
}

class ContextCacheTeardown final : public ::testing::Environment {
 public:
  void TearDown() override { context_cache().clear(); }
};
[[maybe_unused]] const ::testing::Environment* const kContextTeardown =
    ::testing::AddGlobalTestEnvironment(new ContextCacheTeardown);

bool same_bytes(const void* a, const void* b, size_t n) { return std::memcmp(a, b, n) == 0; }

// One rank's model position in one layout: its store, sync and optimizer.
struct Rank {
  DpCase dc;
  ParallelSizes sizes;
  ParallelContext* ctx;  // shared_context(): outlives the rank
  RankCoord c;
  std::vector<ParamSpec> specs;
  ParamStore store;
  std::unique_ptr<DistributedDataParallel> ddp;
  std::unique_ptr<DistributedOptimizer> opt;

  Rank(const DpCase& dcase, ParallelSizes s, int64_t bucket_bytes, const AdamWConfig& acfg)
      : dc(dcase), sizes(s), ctx(&shared_context(s, dcase.device)), c(ctx->coord()) {
    specs = synthetic_specs(c.tp_rank, s.tp, c.pp_rank, s.pp);
    add_specs(store, specs);
    store.allocate(dc.dtype, dc.device, nullptr, s.dp, /*with_master=*/dc.zero == 0);
    store.init(kSeed);
    DataParallelConfig cfg;
    cfg.zero_stage = dc.zero;
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
      upload(p.grad, g);
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
            const double g = reduced_grad(spec, t, sizes.tp, sizes.dp, s, sizes.pp, step, i, exact);
            sum += g * g;
          }
        }
    return std::sqrt(sum);
  }

  size_t value_bytes() const { return dtype_storage_bytes(dc.dtype, store.num_elements()); }
};

// AdamW in one process on this position's parameters, fed the fully reduced gradients.
struct Serial {
  ParamStore store;
  std::unique_ptr<AdamW> adamw;

  Serial(const Rank& r, const AdamWConfig& acfg) {
    add_specs(store, r.specs);
    store.allocate(r.dc.dtype, r.dc.device);
    store.init(kSeed);
    adamw = std::make_unique<AdamW>(store, acfg);
  }
  void step(const Rank& r, int step_idx, float lr, float grad_scale) {
    store.zero_grad();
    for (Param& p : store.all()) {
      std::vector<double> g(p.grad.numel());
      for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] = r.reference(p.spec, step_idx, i, true);
      upload(p.grad, g);
    }
    adamw->step(store, lr, grad_scale);
  }
  // Zero moments and these masters: where the distributed run starts (a ZeRO-1 run with 16-bit
  // compute cannot recover the exact f32 initial draws from its values).
  HostOptimizerState initial_state(int64_t padded_numel) const {
    HostOptimizerState st;
    st.allocate(store.master_dtype(), padded_numel);
    const std::vector<char> master = download(store.flat_master());
    std::memcpy(st.master.data(), master.data(), master.size());
    return st;
  }
};

}  // namespace

std::string dp_case_name(const DpCase& c) {
  return std::string(device_name(c.device)) + "_" + std::string(dtype_name(c.dtype)) + "_zero" +
         std::to_string(c.zero);
}

void check_summed_gradients(const DpCase& dc) {
  // bf16 sums of N(0, 1) values round at every step of the reduction; use exact ones there.
  const bool exact = dc.dtype != DType::f32;
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank r(dc, s, 4 * 23, AdamWConfig{});
    r.backward_and_sync(0, exact);
    int64_t checked = 0, bad = 0;
    std::string first_bad;
    for (const ShardPiece& pc : r.opt->pieces()) {
      const Param& p = r.store[pc.param_idx];
      const std::vector<double> grad = download_f64(p.grad);
      for (int64_t f = pc.flat_begin; f < pc.flat_end; ++f) {
        const int64_t i = f - static_cast<int64_t>(p.offset);
        const double got = grad[i], want = r.reference(p.spec, 0, i, exact);
        // f32 sums of at most 16 N(0, 1) terms: a few ulps of the partial sums.
        if (!(std::fabs(got - want) <= (exact ? 0.0 : 2e-5)) && bad++ == 0)
          first_bad = p.spec.name + "[" + std::to_string(i) + "]: got " + std::to_string(got) +
                      ", want " + std::to_string(want);
        ++checked;
      }
    }
    EXPECT_EQ(bad, 0) << first_bad;
    // ZeRO-0 checks everything everywhere; ZeRO-1 each element on exactly one dp rank.
    const double total =
        r.ctx->host_comm(Group::dp).all_reduce_scalar(double(checked), ReduceOp::sum);
    const double n = double(r.store.num_elements());
    EXPECT_EQ(total, dc.zero == 1 ? n : n * s.dp);
  }
}

void check_steps_match_adamw(const DpCase& dc) {
  AdamWConfig acfg;
  acfg.weight_decay = 0.03f;
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank r(dc, s, 4 * 23, acfg);
    if (dc.zero == 1 && s.dp > 1) {  // the small buckets must cut parameters into pieces
      int cut = 0;
      for (const ShardPiece& pc : r.opt->pieces())
        cut += pc.numel() != r.store[pc.param_idx].grad.numel();
      EXPECT_GT(r.ctx->host_comm(Group::dp).all_reduce_scalar(cut, ReduceOp::sum), 0);
    }
    Serial serial(r, acfg);
    r.opt->load_state(r.store, serial.initial_state(r.store.padded_num_elements()));
    const float lrs[] = {1e-2f, 4e-3f, 2e-2f};
    const float scales[] = {1.0f, 0.6f, 0.9f};
    for (int step = 0; step < 3; ++step) {
      r.backward_and_sync(step, /*exact=*/true);
      const double norm = r.opt->global_grad_norm(r.store);
      const double want = r.serial_norm(step, true);
      EXPECT_NEAR(norm, want, 1e-12 * want);
      Communicator& world = r.ctx->host_comm(Group::world);  // the same clip factor everywhere
      EXPECT_EQ(world.all_reduce_scalar(norm, ReduceOp::max), norm);
      EXPECT_EQ(-world.all_reduce_scalar(-norm, ReduceOp::max), norm);

      serial.step(r, step, lrs[step], scales[step]);
      r.opt->step(r.store, lrs[step], scales[step]);
      EXPECT_TRUE(same_bytes(download(r.store.flat_values()).data(),
                             download(serial.store.flat_values()).data(), r.value_bytes()))
          << "values differ after step " << step;
    }
  }
}

void check_state_round_trip(const DpCase& dc) {
  for (ParallelSizes s : factorizations(world_size())) {
    SCOPED_TRACE(layout_name(s));
    Rank a(dc, s, 4 * 19, AdamWConfig{});
    Serial serial(a, AdamWConfig{});
    a.opt->load_state(a.store, serial.initial_state(a.store.padded_num_elements()));
    for (int step = 0; step < 2; ++step) {
      a.backward_and_sync(step, true);
      serial.step(a, step, 1e-2f, 1.0f);
      a.opt->step(a.store, 1e-2f, 1.0f);
    }
    Communicator& dp_host = a.ctx->host_comm(Group::dp);
    HostOptimizerState saved;
    a.opt->gather_state(a.store, &saved);
    const DType sdt = serial.store.master_dtype();
    const size_t state_bytes = dtype_storage_bytes(sdt, serial.store.num_elements());
    if (a.c.dp_rank == 0) {  // the gathered state is AdamW's, bit for bit
      EXPECT_EQ(saved.numel, a.store.padded_num_elements());
      EXPECT_TRUE(same_bytes(saved.m.data(), download(serial.adamw->m()).data(), state_bytes));
      EXPECT_TRUE(same_bytes(saved.v.data(), download(serial.adamw->v()).data(), state_bytes));
      EXPECT_TRUE(same_bytes(saved.master.data(), download(serial.store.flat_master()).data(),
                             state_bytes));
    } else {
      EXPECT_EQ(saved.numel, 0);  // only dp rank 0 receives it
      saved.allocate(sdt, a.store.padded_num_elements());
    }
    // The caller would read it from a checkpoint on every rank; here dp rank 0 hands it over.
    for (Buffer* b : {&saved.m, &saved.v, &saved.master})
      dp_host.broadcast(Tensor(b->data(), sdt, Device::cpu, {saved.numel}), 0);

    Rank b(dc, s, 4 * 19, AdamWConfig{});
    b.store.init(kSeed + 5);  // different weights: load_state must replace them
    b.opt->load_state(b.store, saved);
    b.opt->set_step_count(a.opt->step_count());
    EXPECT_TRUE(same_bytes(download(b.store.flat_values()).data(),
                           download(a.store.flat_values()).data(), a.value_bytes()));
    HostOptimizerState again;
    b.opt->gather_state(b.store, &again);
    if (b.c.dp_rank == 0) {
      EXPECT_TRUE(same_bytes(again.m.data(), saved.m.data(), state_bytes));
      EXPECT_TRUE(same_bytes(again.v.data(), saved.v.data(), state_bytes));
      EXPECT_TRUE(same_bytes(again.master.data(), saved.master.data(), state_bytes));
    }
    for (Rank* x : {&a, &b}) {  // and both continue identically
      x->backward_and_sync(2, false);
      x->opt->step(x->store, 3e-3f, 0.7f);
    }
    EXPECT_TRUE(same_bytes(download(b.store.flat_values()).data(),
                           download(a.store.flat_values()).data(), a.value_bytes()));
  }
}

}  // namespace tessera::testing
