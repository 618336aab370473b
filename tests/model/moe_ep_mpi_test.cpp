// Expert parallelism under mpirun (ep = the world): each rank runs an f64 MoE Transformer holding
// E/ep experts on its own tokens and must match a serial model (ep = 1, same seed) on those tokens:
// the loss and the replicated parameters' gradients per rank; an expert's gradient equals the sum
// over ranks of the serial gradients of that expert (every rank's tokens reach its owner).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "model/transformer.h"
#include "parallel/mpi_runtime.h"
#include "parallel/parallel_context.h"
#include "tests/common/tiny_models.h"

namespace tessera {
namespace {

constexpr int kB = 2, kT = 8;

class MoeEp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const int w = world_size();
    ctx_ = new ParallelContext(ParallelSizes{1, w, 1, w}, Device::cpu);
  }
  static void TearDownTestSuite() {
    delete ctx_;
    ctx_ = nullptr;
  }
  static ModelShard ep_shard() {
    ModelShard s;
    s.ep_size = ctx_->comm(Group::ep).size();
    s.ep_rank = ctx_->comm(Group::ep).rank();
    s.ep_comm = &ctx_->comm(Group::ep);
    s.ep_host_comm = &ctx_->host_comm(Group::ep);
    return s;
  }
  static ParallelContext* ctx_;
};
ParallelContext* MoeEp::ctx_ = nullptr;

struct Tokens {
  std::vector<int32_t> inputs, targets;
  Tensor in() { return Tensor(inputs.data(), DType::i32, Device::cpu, {kB, kT}); }
  Tensor tg() { return Tensor(targets.data(), DType::i32, Device::cpu, {kB, kT}); }
};
// Random tokens, different on every rank: routing is not balanced by construction.
Tokens rank_tokens(const ModelConfig& cfg, int rank) {
  std::mt19937 rng(1234 + 17 * rank);
  Tokens t{std::vector<int32_t>(kB * kT), std::vector<int32_t>(kB * kT)};
  for (int i = 0; i < kB * kT; ++i) {
    t.inputs[i] = int32_t(rng() % cfg.vocab_size);
    t.targets[i] = int32_t(rng() % cfg.vocab_size);
  }
  return t;
}

// One forward and backward (loss scale 1) from zeroed gradients; returns the loss.
// The activation plan (the ep receive buffers included) is exact: the arena ends full.
double run(Transformer& model, Tokens& t) {
  const size_t bytes = Activations::bytes_needed(model.config(), model.dtype(), kB, kT, true,
                                                 model.shard(), model.exec());
  Arena arena(Device::cpu, bytes, "activations");
  Activations acts(model, kB, kT, true, &arena);
  EXPECT_EQ(arena.used(), bytes);
  model.params().zero_grad();
  const double loss = model.forward(acts, t.in(), t.tg());
  model.backward(acts, t.in(), t.tg(), 1.0f);
  return loss;
}

const double* grad_of(const Param& p) { return p.grad.ptr<double>(); }

void expect_close(const double* got, const double* want, int64_t n, const std::string& name) {
  double scale = 0.0, err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    scale = std::max(scale, std::fabs(want[i]));
    err = std::max(err, std::fabs(got[i] - want[i]));
  }
  EXPECT_GT(scale, 0.0) << name << ": no gradient at all";
  // The floor: gradients that are zero in exact arithmetic (a key bias) are round-off, ~1e-17.
  EXPECT_LE(err, 1e-11 * scale + 1e-14) << name << " (max |grad| " << scale << ")";
}

void check_model(const ModelConfig& cfg, Communicator& world, const ModelShard& shard) {
  Transformer serial(cfg, DType::f64, Device::cpu);
  Transformer ep(cfg, DType::f64, Device::cpu, nullptr, shard);
  serial.init_weights(7);
  ep.init_weights(7);
  Tokens tok = rank_tokens(cfg, world.rank());
  const double serial_loss = run(serial, tok);
  const double ep_loss = run(ep, tok);
  EXPECT_NEAR(ep_loss, serial_loss, 1e-12 * std::fabs(serial_loss));
  // The serial gradients summed over the ranks (what every expert owner accumulates).
  std::vector<double> sum(size_t(serial.params().flat_grads().numel()));
  std::copy_n(serial.params().flat_grads().ptr<double>(), sum.size(), sum.data());
  world.all_reduce(Tensor(sum.data(), DType::f64, Device::cpu, {int64_t(sum.size())}),
                   ReduceOp::sum);
  const ParamStore &ps = ep.params(), &ss = serial.params();
  ASSERT_EQ(ps.size(), ss.size());
  int experts = 0;
  for (int i = 0; i < ps.size(); ++i) {
    const Param &p = ps[i], &q = ss[i];
    ASSERT_EQ(p.spec.name, q.spec.name);
    const int64_t n = p.spec.shape.numel();
    if (!p.spec.expert_parallel) {
      ASSERT_EQ(n, q.spec.shape.numel());
      expect_close(grad_of(p), grad_of(q), n, p.spec.name);
      continue;
    }
    ++experts;
    EXPECT_EQ(p.spec.full_shape(), q.spec.shape) << p.spec.name;
    const int64_t offset = p.spec.shard_offset * (n / p.spec.shape[0]);  // dim-0 slice: contiguous
    std::vector<double> value(n);
    std::copy_n(q.value.ptr<double>() + offset, n, value.data());
    EXPECT_EQ(std::vector<double>(p.value.ptr<double>(), p.value.ptr<double>() + n), value)
        << p.spec.name << ": the slice's initial values";
    expect_close(grad_of(p), sum.data() + q.offset + offset, n, p.spec.name);
  }
  const int per_layer = cfg.activation == ActivationKind::swiglu ? 3 : 2;
  EXPECT_EQ(experts, per_layer * cfg.moe.num_moe_layers(cfg.num_layers));
}

struct EpCase {
  const char* name;
  bool llama;      // SwiGLU experts and a shared expert; else GELU experts
  float capacity;  // 0: dropless
};

class MoeEpCases : public MoeEp, public ::testing::WithParamInterface<EpCase> {};

TEST_P(MoeEpCases, MatchesSerial) {
  ModelConfig cfg = GetParam().llama ? testing::tiny_llama_moe() : testing::tiny_gpt2_moe();
  cfg.moe.capacity_factor = GetParam().capacity;  // > 0 drops slots
  check_model(cfg, ctx_->host_comm(Group::world), ep_shard());
}

INSTANTIATE_TEST_SUITE_P(Models, MoeEpCases,
                         ::testing::Values(EpCase{"gpt2_dropless", false, 0.0f},
                                           EpCase{"gpt2_capacity", false, 0.5f},
                                           EpCase{"llama_shared_dropless", true, 0.0f},
                                           EpCase{"llama_shared_capacity", true, 0.75f}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace tessera
