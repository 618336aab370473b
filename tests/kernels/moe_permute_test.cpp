// Tests of the MoE dispatch plan and token permute/unpermute (kernels/cpu/moe_permute.cpp,
// kernels/cuda/moe_permute.cu; kernels/ops_moe.h defines them): hand-computed plans (capacity
// drops, dropless, an idle expert, spare rows) and a brute-force check on random routings, hand
// examples of the row moves (the K = 1 gather too), adjointness and finite differences in f64,
// bf16/f16 on the CPU, bounds and thread counts, and GPU parity (plans equal, copies bit for bit).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/ops_moe.h"
#include "tests/common/cpu_checks.h"
#include "tests/common/errors.h"
#include "tests/common/gpu.h"
#include "tests/common/narrow.h"
#include "tests/common/op_cases.h"
#include "tests/common/tensors.h"

namespace tessera::testing {
namespace {

// ---- helpers ----------------------------------------------------------------------------------

HostTensor values(DType dtype, Shape s, const std::vector<double>& v) {
  HostTensor h(dtype, s);
  EXPECT_EQ(h.size(), int64_t(v.size()));
  for (int64_t i = 0; i < h.size(); ++i) h.set(i, v[i]);
  return h;
}

std::vector<double> contents(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i)
    v[i] = t.dtype == DType::i32   ? t.ptr<int32_t>()[i]
           : t.dtype == DType::f32 ? t.ptr<float>()[i]
                                   : t.ptr<double>()[i];
  return v;
}

// The four outputs of a dispatch plan (CPU reference).
struct Plan {
  HostTensor tokens_per_expert, offsets, slot_row, row_slot;
};

Plan make_plan(const HostTensor& topk_idx, int64_t num_e, int64_t capacity, int64_t num_rows) {
  Plan p{HostTensor(DType::i32, {num_e}), HostTensor(DType::i32, {num_e + 1}),
         HostTensor(DType::i32, topk_idx.t.shape), HostTensor(DType::i32, {num_rows})};
  cpu::moe_dispatch_plan(p.tokens_per_expert, p.offsets, p.slot_row, p.row_slot, topk_idx,
                         capacity);
  return p;
}

// A skewed random routing (N, K): expert e is drawn with weight 1 + (7e mod 13), so a capacity
// of N*K/E drops slots; a token's K experts are distinct when K <= E, as the router makes them.
HostTensor random_routing(int64_t num_t, int topk, int num_e, std::mt19937_64& rng) {
  std::vector<double> weights(num_e);
  for (int e = 0; e < num_e; ++e) weights[e] = 1 + (7 * e) % 13;
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  HostTensor idx(DType::i32, {num_t, topk});
  for (int64_t t = 0; t < num_t; ++t) {
    for (int j = 0; j < topk; ++j) {
      int e = pick(rng);
      while (topk <= num_e &&
             std::find(&idx.i32[t * topk], &idx.i32[t * topk + j], e) != &idx.i32[t * topk + j])
        e = pick(rng);
      idx.i32[t * topk + j] = e;
    }
  }
  return idx;
}

// Capacity factor 1: what an expert would get under perfect balance.
int64_t tight_capacity(int64_t num_t, int topk, int num_e) {
  return std::max<int64_t>(1, num_t * topk / num_e);
}

// ---- dispatch plan: hand-computed cases ---------------------------------------------------------

// N=3, K=2, E=3: slots 0..5 route to experts 0 2 | 0 1 | 0 2. Expert 0 gets slots 0, 2, 4,
// expert 1 slot 3, expert 2 slots 1, 5.
const std::vector<double> kRouting = {0, 2, 0, 1, 0, 2};

TEST(MoeDispatchPlan, CapacityDropsTheLatePositions) {
  const HostTensor idx = values(DType::i32, {3, 2}, kRouting);
  // Capacity 2: slot 4 (expert 0's third) is dropped. Rows: e0 = {s0, s2}, e1 = {s3},
  // e2 = {s1, s5}; R = 6 leaves row 5 unused.
  const Plan p = make_plan(idx, 3, 2, 6);
  EXPECT_EQ(contents(p.tokens_per_expert), (std::vector<double>{3, 1, 2}));
  EXPECT_EQ(contents(p.offsets), (std::vector<double>{0, 2, 3, 5}));
  EXPECT_EQ(contents(p.slot_row), (std::vector<double>{0, 3, 1, 2, -1, 4}));
  EXPECT_EQ(contents(p.row_slot), (std::vector<double>{0, 2, 3, 1, 5, -1}));
}

TEST(MoeDispatchPlan, DroplessKeepsEverySlotInSlotOrder) {
  const HostTensor idx = values(DType::i32, {3, 2}, kRouting);
  for (int64_t capacity : {0, -1, 3, 100}) {  // <= 0 is dropless; >= the largest count too
    const Plan p = make_plan(idx, 3, capacity, 6);
    EXPECT_EQ(contents(p.tokens_per_expert), (std::vector<double>{3, 1, 2})) << capacity;
    EXPECT_EQ(contents(p.offsets), (std::vector<double>{0, 3, 4, 6})) << capacity;
    EXPECT_EQ(contents(p.slot_row), (std::vector<double>{0, 4, 1, 3, 2, 5})) << capacity;
    EXPECT_EQ(contents(p.row_slot), (std::vector<double>{0, 2, 4, 3, 1, 5})) << capacity;
  }
}

TEST(MoeDispatchPlan, IdleExpertAndSpareRows) {
  // E=4, expert 2 gets nothing: slots route to 3 0 | 1 3 | 0 3.
  const HostTensor idx = values(DType::i32, {3, 2}, {3, 0, 1, 3, 0, 3});
  const Plan dropless = make_plan(idx, 4, 0, 8);  // R = 8 > 6 kept rows
  EXPECT_EQ(contents(dropless.tokens_per_expert), (std::vector<double>{2, 1, 0, 3}));
  EXPECT_EQ(contents(dropless.offsets), (std::vector<double>{0, 2, 3, 3, 6}));
  EXPECT_EQ(contents(dropless.slot_row), (std::vector<double>{3, 0, 2, 4, 1, 5}));
  EXPECT_EQ(contents(dropless.row_slot), (std::vector<double>{1, 4, 2, 0, 3, 5, -1, -1}));
  const Plan one = make_plan(idx, 4, 1, 6);  // each expert keeps its first slot
  EXPECT_EQ(contents(one.tokens_per_expert), (std::vector<double>{2, 1, 0, 3}));
  EXPECT_EQ(contents(one.offsets), (std::vector<double>{0, 1, 2, 2, 3}));
  EXPECT_EQ(contents(one.slot_row), (std::vector<double>{2, 0, 1, -1, -1, -1}));
  EXPECT_EQ(contents(one.row_slot), (std::vector<double>{1, 2, 0, -1, -1, -1}));
}

TEST(MoeDispatchPlan, SingleTokenSingleExpert) {
  const Plan p = make_plan(values(DType::i32, {1, 1}, {0}), 1, 0, 1);
  EXPECT_EQ(contents(p.offsets), (std::vector<double>{0, 1}));
  EXPECT_EQ(contents(p.slot_row), (std::vector<double>{0}));
  EXPECT_EQ(contents(p.row_slot), (std::vector<double>{0}));
}

TEST(MoeDispatchPlan, RejectsBadRoutingAndTooFewRows) {
  HostTensor tpe(DType::i32, {3}), off(DType::i32, {4}), sr(DType::i32, {3, 2});
  HostTensor rs(DType::i32, {6}), short_rs(DType::i32, {5});
  const HostTensor bad = values(DType::i32, {3, 2}, {0, 2, 0, 3, 0, 2});
  expect_error([&] { cpu::moe_dispatch_plan(tpe, off, sr, rs, bad, 0); }, ErrorKind::bug,
               {"topk_idx[3] = 3", "[0, E = 3)"});
  const HostTensor idx = values(DType::i32, {3, 2}, kRouting);
  expect_error([&] { cpu::moe_dispatch_plan(tpe, off, sr, short_rs, idx, 0); }, ErrorKind::bug,
               {"6 slots are kept", "R = 5"});
  HostTensor off_f32(DType::f32, {4});
  expect_error([&] { cpu::moe_dispatch_plan(tpe, off_f32, sr, rs, idx, 0); }, ErrorKind::bug,
               {"offsets", "expected i32"});
}

// p(s) by its definition (the slots before s with the same expert, O(S^2)) and the dropped count
// from the expert totals, against the plan on skewed random routings.
TEST(MoeDispatchPlan, MatchesBruteForceOnRandomRoutings) {
  std::mt19937_64 rng(81);
  struct Case {
    int64_t n;
    int k, e;
  };
  for (const Case& c : {Case{1, 1, 1}, Case{7, 2, 3}, Case{50, 8, 16}, Case{300, 4, 5},
                        Case{200, 8, 128}, Case{97, 3, 2}}) {
    const HostTensor idx = random_routing(c.n, c.k, c.e, rng);
    const int64_t num_slots = c.n * c.k;
    for (int64_t capacity : {int64_t(0), int64_t(1), tight_capacity(c.n, c.k, c.e)}) {
      const std::string what = "N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
                               " E=" + std::to_string(c.e) + " cap=" + std::to_string(capacity);
      const Plan p = make_plan(idx, c.e, capacity, num_slots + 3);
      std::vector<int64_t> count(c.e, 0);
      for (int64_t s = 0; s < num_slots; ++s) ++count[idx.i32[s]];
      int64_t expected_dropped = 0;
      for (int e = 0; e < c.e; ++e) {
        EXPECT_EQ(p.tokens_per_expert.i32[e], count[e]) << what;
        if (capacity > 0) expected_dropped += std::max<int64_t>(0, count[e] - capacity);
      }
      int64_t dropped = 0;
      for (int64_t s = 0; s < num_slots; ++s) {
        int64_t pos = 0;
        for (int64_t q = 0; q < s; ++q) pos += idx.i32[q] == idx.i32[s];
        const bool kept = capacity <= 0 || pos < capacity;
        dropped += !kept;
        const int64_t want = kept ? p.offsets.i32[idx.i32[s]] + pos : -1;
        ASSERT_EQ(p.slot_row.i32[s], want) << what << " slot " << s;
        if (kept) {
          ASSERT_EQ(p.row_slot.i32[want], s) << what << " slot " << s;
        }
      }
      EXPECT_EQ(dropped, expected_dropped) << what;
      EXPECT_EQ(p.offsets.i32[c.e], num_slots - dropped) << what;
      for (int64_t r = num_slots - dropped; r < p.row_slot.size(); ++r)
        EXPECT_EQ(p.row_slot.i32[r], -1) << what << " row " << r;
      if (capacity == 1 && c.n * c.k > c.e) {
        EXPECT_GT(dropped, 0) << what << ": the case should drop";
      }
    }
  }
}

// ---- permute / unpermute: hand examples ---------------------------------------------------------

// x (N=3, C=2): token t holds (t+1, -(t+1)). With the capacity-2 plan of kRouting, rows 0..4 hold
// slots 0 2 3 1 5, i.e. tokens 0 1 1 0 2, and row 5 is unused.
TEST(MoePermute, GathersTokenRowsAndZerosUnusedRows) {
  const Plan p = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 2, 6);
  const HostTensor x = values(DType::f32, {3, 2}, {1, -1, 2, -2, 3, -3});
  Guarded xp({6, 2});  // starts as sentinels, so row 5 must be written
  cpu::moe_permute(xp, x, p.row_slot, 2);
  EXPECT_EQ(contents(xp.t()), (std::vector<double>{1, -1, 2, -2, 2, -2, 1, -1, 3, -3, 0, 0}));
  xp.expect_guards_intact("moe_permute");
}

// K = 1: a plain gather by row index (repeats allowed), -1 for a zero row.
TEST(MoePermute, KOneIsAPlainGather) {
  const HostTensor x = values(DType::f64, {3, 2}, {1, 10, 2, 20, 3, 30});
  const HostTensor rows = values(DType::i32, {5}, {2, 0, -1, 2, 1});
  HostTensor xp(DType::f64, {5, 2});
  cpu::moe_permute(xp, x, rows, 1);
  EXPECT_EQ(contents(xp), (std::vector<double>{3, 30, 1, 10, 0, 0, 3, 30, 2, 20}));
  const HostTensor out_of_range = values(DType::i32, {5}, {2, 0, -1, 3, 1});
  expect_error([&] { cpu::moe_permute(xp, x, out_of_range, 1); }, ErrorKind::bug,
               {"row_slot[3] = 3", "N*K = 3"});
}

// dx[t] = sum of its kept rows: token 0 <- rows 0, 3; token 1 <- rows 1, 2; token 2 <- row 4
// (slot 4 dropped); a token with every slot dropped gets zero.
TEST(MoePermute, BackwardSumsKeptRowsPerToken) {
  const Plan p = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 2, 6);
  const HostTensor dxp = values(DType::f32, {6, 1}, {1, 2, 4, 8, 16, 32});
  Guarded dx({3, 1});
  cpu::moe_permute_backward(dx, dxp, p.slot_row);
  EXPECT_EQ(contents(dx.t()), (std::vector<double>{9, 6, 16}));
  // N=2, K=1, E=1, capacity 1: token 1 is dropped entirely.
  const Plan q = make_plan(values(DType::i32, {2, 1}, {0, 0}), 1, 1, 2);
  HostTensor dx2 = filled(DType::f32, {2, 1}, 7.0);
  cpu::moe_permute_backward(dx2, values(DType::f32, {2, 1}, {5, 6}), q.slot_row);
  EXPECT_EQ(contents(dx2), (std::vector<double>{5, 0}));
  dx.expect_guards_intact("moe_permute_backward");
}

TEST(MoePermute, UnpermuteWeighsKeptRows) {
  const Plan p = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 2, 6);
  const HostTensor yp = values(DType::f64, {6, 2}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 99});
  const HostTensor w = values(DType::f64, {3, 2}, {0.5, 0.25, 2, -1, 3, 10});
  HostTensor out(DType::f64, {3, 2});
  cpu::moe_unpermute(out, yp, p.slot_row, w);
  // t0 = 0.5 row0 + 0.25 row3; t1 = 2 row1 - row2; t2 = 10 row4 (slot 4 dropped).
  EXPECT_EQ(contents(out), (std::vector<double>{0.5 + 1.75, 1 + 2, 6 - 5, 8 - 6, 90, 100}));
}

TEST(MoePermute, UnpermuteBackwardHandExample) {
  const Plan p = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 2, 6);
  const HostTensor yp = values(DType::f64, {6, 2}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 99});
  const HostTensor w = values(DType::f64, {3, 2}, {0.5, 0.25, 2, -1, 3, 10});
  const HostTensor dout = values(DType::f64, {3, 2}, {1, -1, 2, 0, -3, 1});
  HostTensor dyp = filled(DType::f64, {6, 2}, 7.0), dw = filled(DType::f64, {3, 2}, 7.0);
  cpu::moe_unpermute_backward(dyp, dw, dout, yp, p.slot_row, p.row_slot, w);
  // Rows hold slots 0 2 3 1 5 -: dyp[r] = w[s] dout[s/2].
  EXPECT_EQ(contents(dyp),
            (std::vector<double>{0.5, -0.5, 4, 0, -2, 0, 0.25, -0.25, -30, 10, 0, 0}));
  // d_topk_w[s] = <dout[s/2], yp[slot_row[s]]>; slot 4 is dropped.
  EXPECT_EQ(contents(dw), (std::vector<double>{1 - 2, 7 - 8, 6, 10, 0, -27 + 10}));
}

TEST(MoePermute, RejectsMismatchedOperands) {
  const Plan p = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 2, 6);
  HostTensor yp(DType::f32, {6, 4}), out(DType::f32, {3, 4}), w32(DType::f32, {3, 2});
  HostTensor w64(DType::f64, {3, 2}), out_wide(DType::f32, {3, 5});
  expect_error([&] { cpu::moe_unpermute(out, yp, p.slot_row, w64); }, ErrorKind::bug, {"topk_w"});
  expect_error([&] { cpu::moe_unpermute(out_wide, yp, p.slot_row, w32); }, ErrorKind::bug,
               {"out has shape (3, 5)"});
  // slot_row and row_slot of different plans.
  const Plan dropless = make_plan(values(DType::i32, {3, 2}, kRouting), 3, 0, 6);
  HostTensor dyp(DType::f32, {6, 4}), dw(DType::f32, {3, 2});
  expect_error(
      [&] { cpu::moe_unpermute_backward(dyp, dw, out, yp, p.slot_row, dropless.row_slot, w32); },
      ErrorKind::bug, {"slot_row[1] = 3 but row_slot[3] = 3"});
  // topk_w stays f32 beside 16-bit rows: a bf16 one is refused, not widened.
  std::vector<uint16_t> yp16(24), out16(12), w16(6);
  const Tensor yp_bf16(yp16.data(), DType::bf16, Device::cpu, {6, 4});
  const Tensor out_bf16(out16.data(), DType::bf16, Device::cpu, {3, 4});
  const Tensor w_bf16(w16.data(), DType::bf16, Device::cpu, {3, 2});
  expect_error([&] { ops::moe_unpermute(out_bf16, yp_bf16, p.slot_row, w_bf16); }, ErrorKind::bug,
               {"topk_w", "never 16-bit"});
  EXPECT_NO_THROW(ops::moe_unpermute(out_bf16, yp_bf16, p.slot_row, w32));
}

// ---- adjointness and finite differences (f64) ---------------------------------------------------

struct RowCase {
  int64_t n;
  int k, e;
  int64_t c, capacity, spare_rows;
};
// Dropless, tight, a fully dropped token (N=2, K=1, E=1, capacity 1), spare rows.
const RowCase kFdCases[] = {{1, 1, 1, 1, 0, 0},  {2, 1, 1, 3, 1, 1}, {5, 2, 3, 4, 2, 0},
                            {16, 4, 8, 6, 3, 2}, {9, 8, 3, 5, 0, 0}, {30, 2, 16, 7, 2, 5}};

TS_FD_TEST(MoePermute, PermuteBackwardIsTheAdjoint, "moe_permute", "moe_permute_backward") {
  std::mt19937_64 rng(82);
  for (const RowCase& c : kFdCases) {
    const int64_t num_rows = c.n * c.k + c.spare_rows;
    const Plan p = make_plan(random_routing(c.n, c.k, c.e, rng), c.e, c.capacity, num_rows);
    HostTensor x = randn(DType::f64, {c.n, c.c}, rng);
    const HostTensor dxp = randn(DType::f64, {num_rows, c.c}, rng);
    HostTensor xp(DType::f64, {num_rows, c.c}), dx(DType::f64, {c.n, c.c});
    cpu::moe_permute_backward(dx, dxp, p.slot_row);
    cpu::moe_permute(xp, x, p.row_slot, c.k);
    // <permute(x), dxp> = <x, permute_backward(dxp)>: the same products, summed in another order.
    double scale = 0.0;
    for (int64_t i = 0; i < xp.size(); ++i) scale += std::fabs(xp.get(i) * dxp.get(i));
    EXPECT_NEAR(dot(xp, dxp), dot(x, dx), 1e-13 * (1.0 + scale)) << "N=" << c.n << " K=" << c.k;
    const auto loss = fd_loss(dxp, xp, [&] { cpu::moe_permute(xp, x, p.row_slot, c.k); });
    expect_grad_matches(x, dx, loss, kFdTol, "dx", kFdStep);
  }
}

TS_FD_TEST(MoePermute, UnpermuteBackwardMatchesFiniteDifferences, "moe_unpermute",
           "moe_unpermute_backward") {
  std::mt19937_64 rng(83);
  for (const RowCase& c : kFdCases) {
    const int64_t num_rows = c.n * c.k + c.spare_rows;
    const Plan p = make_plan(random_routing(c.n, c.k, c.e, rng), c.e, c.capacity, num_rows);
    HostTensor yp = randn(DType::f64, {num_rows, c.c}, rng);
    HostTensor w = randn(DType::f64, {c.n, c.k}, rng);
    const HostTensor dout = randn(DType::f64, {c.n, c.c}, rng);  // the random linear functional
    HostTensor out(DType::f64, {c.n, c.c}), dyp(DType::f64, {num_rows, c.c});
    HostTensor dw(DType::f64, {c.n, c.k});
    cpu::moe_unpermute_backward(dyp, dw, dout, yp, p.slot_row, p.row_slot, w);
    const auto loss = fd_loss(dout, out, [&] { cpu::moe_unpermute(out, yp, p.slot_row, w); });
    expect_grad_matches(yp, dyp, loss, kFdTol, "dyp", kFdStep);
    expect_grad_matches(w, dw, loss, kFdTol, "d_topk_w", kFdStep);
  }
}

// ---- bf16/f16 on the CPU: the f32 kernel rounded once (tests/common/narrow.h) ------------------

namespace narrow_cases {
using namespace n16;

TEST(NarrowDtype, MoePermute) {
  const int64_t n = 37, c = 65;
  const int k = 4;
  std::mt19937_64 rng(84);
  const Plan p = make_plan(random_routing(n, k, 5, rng), 5, tight_capacity(n, k, 5), n * k);
  const Shape rows{n * k, c}, tokens{n, c}, slots{n, k};
  for (DType dt : kNarrowTypes) {
    for (bool specials : {false, true}) {
      const uint64_t seed = specials ? 110 : 90;
      const std::string tag = specials ? " with NaN/Inf" : "";
      // Index operands drawn at random are valid for the first three ops (any entry in range);
      // moe_unpermute_backward needs a consistent plan, passed beside the drawn operands.
      expect_contract(
          "moe_permute" + tag, dt, {narrow(rows), narrow(tokens), ints({n * k}, -1, n * k)},
          [&](const auto& t) { ops::moe_permute(t[0], t[1], t[2], k); }, seed, specials);
      expect_contract(
          "moe_permute_backward" + tag, dt, {narrow(tokens), narrow(rows), ints(slots, -1, n * k)},
          [](const auto& t) { ops::moe_permute_backward(t[0], t[1], t[2]); }, seed + 1, specials);
      expect_contract(
          "moe_unpermute" + tag, dt,
          {narrow(tokens), narrow(rows), ints(slots, -1, n * k), f32(slots)},
          [](const auto& t) { ops::moe_unpermute(t[0], t[1], t[2], t[3]); }, seed + 2, specials);
      expect_contract(
          "moe_unpermute_backward" + tag, dt,
          {narrow(rows), f32(slots), narrow(tokens), narrow(rows), f32(slots)},
          [&](const auto& t) {
            ops::moe_unpermute_backward(t[0], t[1], t[2], t[3], p.slot_row, p.row_slot, t[4]);
          },
          seed + 3, specials);
    }
  }
}

}  // namespace narrow_cases

// ---- bounds and thread counts (tests/common/cpu_checks.h) ---------------------------------------

TEST(MoePermute, WritesOnlyItsOutputs) {
  std::mt19937_64 rng(85);
  const int64_t n = 11, c = 13, num_rows = n * 3 + 2;
  const HostTensor idx = random_routing(n, 3, 4, rng);
  Guarded tpe({4}, DType::i32), off({5}, DType::i32), sr({n, 3}, DType::i32);
  Guarded rs({num_rows}, DType::i32);
  cpu::moe_dispatch_plan(tpe, off, sr, rs, idx, 7);
  expect_guards_intact({&tpe, &off, &sr, &rs}, "moe_dispatch_plan");
  const HostTensor x = randn(DType::f32, {n, c}, rng), yp = randn(DType::f32, {num_rows, c}, rng);
  const HostTensor dout = randn(DType::f32, {n, c}, rng), w = randn(DType::f32, {n, 3}, rng);
  Guarded xp({num_rows, c}), dx({n, c}), out({n, c}), dyp({num_rows, c}), dw({n, 3});
  cpu::moe_permute(xp, x, rs.t(), 3);
  cpu::moe_permute_backward(dx, yp, sr.t());
  cpu::moe_unpermute(out, yp, sr.t(), w);
  cpu::moe_unpermute_backward(dyp, dw, dout, yp, sr.t(), rs.t(), w);
  expect_guards_intact({&xp, &dx, &out, &dyp, &dw}, "moe permute ops");
}

TEST(MoePermute, IsThreadCountIndependent) {
  std::mt19937_64 rng(86);
  const int64_t n = 300, c = 200;
  const int k = 4;
  const Plan p = make_plan(random_routing(n, k, 8, rng), 8, tight_capacity(n, k, 8), n * k);
  const HostTensor x = randn(DType::f32, {n, c}, rng), yp = randn(DType::f32, {n * k, c}, rng);
  const HostTensor dout = randn(DType::f32, {n, c}, rng), w = randn(DType::f32, {n, k}, rng);
  HostTensor xp(DType::f32, {n * k, c}), dx(DType::f32, {n, c}), out(DType::f32, {n, c});
  HostTensor dyp(DType::f32, {n * k, c}), dw(DType::f32, {n, k});
  expect_thread_independent("moe_permute", {&xp}, [&] { cpu::moe_permute(xp, x, p.row_slot, k); });
  expect_thread_independent("moe_permute_backward", {&dx},
                            [&] { cpu::moe_permute_backward(dx, yp, p.slot_row); });
  expect_thread_independent("moe_unpermute", {&out},
                            [&] { cpu::moe_unpermute(out, yp, p.slot_row, w); });
  expect_thread_independent("moe_unpermute_backward", {&dyp, &dw}, [&] {
    cpu::moe_unpermute_backward(dyp, dw, dout, yp, p.slot_row, p.row_slot, w);
  });
}

// ---- GPU parity (kernels/cuda/moe_permute.cu) ---------------------------------------------------

using testing::DeviceTensor;
using testing::host;
using testing::settle;

std::vector<int32_t> download_i32(const DeviceTensor& t) {
  const auto bytes = t.download_bytes();
  std::vector<int32_t> v(bytes.size() / sizeof(int32_t));
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

// Equal vectors, reporting the first difference (not the whole of two large vectors).
template <class V>
void expect_equal(const std::vector<V>& got, const std::vector<V>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const auto diff = std::mismatch(got.begin(), got.end(), want.begin());
  EXPECT_TRUE(diff.first == got.end()) << what << ": element " << (diff.first - got.begin())
                                       << " is " << +*diff.first << ", expected " << +*diff.second;
}

// The plan on the GPU, uploaded from a CPU routing; returns its four outputs downloaded. The
// outputs start as 0x7F7F7F7F, not the kit's 0xFF poison, which reads as a plausible -1.
struct GpuPlan {
  std::vector<int32_t> tokens_per_expert, offsets, slot_row, row_slot;
};
GpuPlan run_gpu_plan(const HostTensor& idx, int64_t num_e, int64_t capacity, int64_t num_rows) {
  DeviceTensor g_idx(DType::i32, idx.t.shape), g_tpe(DType::i32, {num_e});
  DeviceTensor g_off(DType::i32, {num_e + 1}), g_sr(DType::i32, idx.t.shape);
  DeviceTensor g_rs(DType::i32, {num_rows});
  g_idx.upload_i32(idx.i32);
  for (DeviceTensor* out : {&g_tpe, &g_off, &g_sr, &g_rs})
    out->upload_i32(std::vector<int32_t>(out->t().numel(), 0x7F7F7F7F));
  settle();
  ops::moe_dispatch_plan(g_tpe, g_off, g_sr, g_rs, g_idx, capacity);
  EXPECT_TRUE(g_tpe.guards_intact() && g_off.guards_intact() && g_sr.guards_intact() &&
              g_rs.guards_intact());
  return {download_i32(g_tpe), download_i32(g_off), download_i32(g_sr), download_i32(g_rs)};
}

// Plans must equal the CPU's exactly (integers; stable positions). Every N, K, E of the brief,
// dropless, tight and capacity 1; the training size (16K tokens x top-8 = 128K slots); and E
// large enough for the kernel's fewer-warps tiles (E = 2000: 6 warps; 12288: 1 warp).
TS_GPU_PARITY_TEST(MoeDispatchPlan, MatchesCpuExactly, "moe_dispatch_plan") {
  std::mt19937_64 rng(87);
  struct Case {
    int64_t n;
    int k, e;
  };
  std::vector<Case> cases;
  for (int64_t n : {1, 3, 1000, 4099})
    for (int k : {1, 2, 8})
      for (int e : {1, 3, 16, 128, 256}) cases.push_back({n, k, e});
  cases.push_back({16384, 8, 128});
  cases.push_back({16384, 8, 256});
  cases.push_back({1000, 8, 2000});
  cases.push_back({1000, 8, 12288});
  for (const Case& c : cases) {
    const HostTensor idx = random_routing(c.n, c.k, c.e, rng);
    for (int64_t capacity : {int64_t(0), int64_t(1), tight_capacity(c.n, c.k, c.e)}) {
      const int64_t num_rows = c.n * c.k + (c.n % 2);  // spare rows for odd N
      const std::string what = "N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
                               " E=" + std::to_string(c.e) + " cap=" + std::to_string(capacity);
      const Plan want = make_plan(idx, c.e, capacity, num_rows);
      const GpuPlan got = run_gpu_plan(idx, c.e, capacity, num_rows);
      expect_equal(got.tokens_per_expert, want.tokens_per_expert.i32, "tokens_per_expert " + what);
      expect_equal(got.offsets, want.offsets.i32, "offsets " + what);
      expect_equal(got.slot_row, want.slot_row.i32, "slot_row " + what);
      expect_equal(got.row_slot, want.row_slot.i32, "row_slot " + what);
    }
  }
}

// Expert ids outside [0, E) are a caller bug; the GPU must still stay in bounds and route them
// nowhere.
TS_GPU_TEST(MoeDispatchPlan, OutOfRangeExpertsRouteNowhere) {
  const HostTensor idx = values(DType::i32, {3, 2}, {0, 5, -2, 1, 0, 2});
  const GpuPlan got = run_gpu_plan(idx, 3, 0, 6);
  EXPECT_EQ(got.tokens_per_expert, (std::vector<int32_t>{2, 1, 1}));
  EXPECT_EQ(got.slot_row, (std::vector<int32_t>{0, -1, -1, 2, 1, 3}));
  EXPECT_EQ(got.row_slot, (std::vector<int32_t>{0, 4, 3, 5, -1, -1}));
}

// Copies (moe_permute, dyp: one product rounded once) are bit-exact against the CPU's f32 result
// rounded to the row dtype. The sums are not: the GPU adds K terms (or C products for d_topk_w)
// in f32, the CPU in double. f32 rows: at most K = 8 roundings of terms of the size of the
// output, ~1e-7 relative in L2, bound 2e-6. 16-bit rows: the output rounding (2^-9 relative) can
// fall on the other side of a tie between the two f32-vs-double sums, 2^-8 relative on those few
// elements: bound 4e-3 (bf16) and 1e-3 (f16) in L2. d_topk_w is f32 for every row dtype, a dot
// of C products (exact in f32 for 16-bit inputs) summed in 32 lane partials then a butterfly:
// ~C/8 ulp of the partial sums at worst, 1e-5 relative in L2.
double sum_tolerance(DType dtype) {
  constexpr double kBound[3] = {2e-6, 4e-3, 1e-3};  // f32, bf16, f16
  return kBound[testing::dtype_index(dtype)];
}
constexpr double kDotTolerance = 1e-5;

// A routing of N tokens, its plan on R rows, and float inputs rounded to the row dtype.
struct RowParity {
  int64_t n, c, num_rows;
  int k;
  Plan plan;
  std::vector<float> x, dxp, yp, w, dout;
};

RowParity make_row_parity(const RowCase& c, DType dtype, std::mt19937_64& rng) {
  const int64_t num_rows = c.n * c.k + c.spare_rows;
  RowParity r{c.n, c.c, num_rows, c.k,
              make_plan(random_routing(c.n, c.k, c.e, rng), c.e, c.capacity, num_rows)};
  r.x = testing::round_to(dtype, testing::random_vector(c.n * c.c, rng));
  r.dxp = testing::round_to(dtype, testing::random_vector(num_rows * c.c, rng));
  r.yp = testing::round_to(dtype, testing::random_vector(num_rows * c.c, rng));
  r.w = testing::random_vector(c.n * c.k, rng, 0.5f);
  r.dout = testing::round_to(dtype, testing::random_vector(c.n * c.c, rng));
  return r;
}

void expect_sums_close(const std::vector<float>& got, const std::vector<float>& want,
                       double tolerance, const std::string& what) {
  EXPECT_LE(testing::rel_l2(got, want), tolerance) << what;
  testing::expect_same_nonfinite(got, want, what);
}

class MoePermuteGpu : public testing::GpuCaseP<DType> {};

// Shapes from the brief: N = 1, 3, 1000, 4099; K = 1, 2, 8; E = 1, 3, 16, 128, 256; C = 1, 7, 64,
// 2048 (C = 1 and 7 take the scalar path); dropless and tight capacities; spare rows.
const RowCase kGpuCases[] = {
    {1, 1, 1, 1, 0, 0},      {1, 8, 16, 7, 0, 3},       {3, 2, 3, 64, 1, 1},
    {3, 8, 3, 2048, 2, 0},   {1000, 8, 128, 64, 62, 0}, {1000, 2, 256, 2048, 7, 5},
    {1000, 1, 3, 7, 333, 0}, {4099, 8, 16, 7, 0, 0},    {4099, 2, 256, 2048, 32, 1},
    {4099, 1, 1, 64, 0, 0},
};

TS_GPU_PARITY_TEST_P(MoePermuteGpu, RowsMatchCpu, "moe_permute", "moe_permute_backward",
                     "moe_unpermute", "moe_unpermute_backward") {
  const DType dtype = GetParam();
  std::mt19937_64 rng(88);
  for (const RowCase& rc : kGpuCases) {
    RowParity r = make_row_parity(rc, dtype, rng);
    const Shape tokens{r.n, r.c}, rows{r.num_rows, r.c}, slots{r.n, r.k};
    const std::string what = std::string(dtype_name(dtype)) + " N=" + std::to_string(r.n) +
                             " K=" + std::to_string(r.k) + " C=" + std::to_string(r.c) +
                             " cap=" + std::to_string(rc.capacity);
    // CPU reference in f32 on the rounded inputs.
    std::vector<float> xp(r.num_rows * r.c), dx(r.n * r.c), out(r.n * r.c);
    std::vector<float> dyp(r.num_rows * r.c), dw(r.n * r.k);
    cpu::moe_permute(host(xp, rows), host(r.x, tokens), r.plan.row_slot, r.k);
    cpu::moe_permute_backward(host(dx, tokens), host(r.dxp, rows), r.plan.slot_row);
    cpu::moe_unpermute(host(out, tokens), host(r.yp, rows), r.plan.slot_row, host(r.w, slots));
    cpu::moe_unpermute_backward(host(dyp, rows), host(dw, slots), host(r.dout, tokens),
                                host(r.yp, rows), r.plan.slot_row, r.plan.row_slot,
                                host(r.w, slots));

    DeviceTensor g_x(dtype, tokens), g_dxp(dtype, rows), g_yp(dtype, rows), g_dout(dtype, tokens);
    DeviceTensor g_w(DType::f32, slots), g_sr(DType::i32, slots), g_rs(DType::i32, {r.num_rows});
    DeviceTensor g_xp(dtype, rows), g_dx(dtype, tokens), g_out(dtype, tokens), g_dyp(dtype, rows);
    DeviceTensor g_dw(DType::f32, slots);
    g_x.upload(r.x);
    g_dxp.upload(r.dxp);
    g_yp.upload(r.yp);
    g_dout.upload(r.dout);
    g_w.upload(r.w);
    g_sr.upload_i32(r.plan.slot_row.i32);
    g_rs.upload_i32(r.plan.row_slot.i32);
    settle();
    ops::moe_permute(g_xp, g_x, g_rs, r.k);
    ops::moe_permute_backward(g_dx, g_dxp, g_sr);
    ops::moe_unpermute(g_out, g_yp, g_sr, g_w);
    ops::moe_unpermute_backward(g_dyp, g_dw, g_dout, g_yp, g_sr, g_rs, g_w);
    expect_equal(g_xp.download(), xp, "moe_permute " + what);
    expect_equal(g_dyp.download(), testing::round_to(dtype, dyp), "dyp " + what);
    const double tol = sum_tolerance(dtype);
    expect_sums_close(g_dx.download(), dx, tol, "moe_permute_backward " + what);
    expect_sums_close(g_out.download(), out, tol, "moe_unpermute " + what);
    expect_sums_close(g_dw.download(), dw, kDotTolerance, "d_topk_w " + what);
    // Deterministic: a second run gives the same bits.
    const auto dx_first = g_dx.download_bytes(), out_first = g_out.download_bytes();
    const auto dw_first = g_dw.download_bytes();
    ops::moe_permute_backward(g_dx, g_dxp, g_sr);
    ops::moe_unpermute(g_out, g_yp, g_sr, g_w);
    ops::moe_unpermute_backward(g_dyp, g_dw, g_dout, g_yp, g_sr, g_rs, g_w);
    expect_equal(g_dx.download_bytes(), dx_first, "rerun dx " + what);
    expect_equal(g_out.download_bytes(), out_first, "rerun out " + what);
    expect_equal(g_dw.download_bytes(), dw_first, "rerun d_topk_w " + what);
    for (const DeviceTensor* t : {&g_xp, &g_dx, &g_out, &g_dyp, &g_dw})
      EXPECT_TRUE(t->guards_intact()) << what;
  }
}

// K = 1 as a plain gather (repeats, -1 rows), on views one element off 16-byte alignment (the
// scalar path) and aligned, C = 64.
TEST_P(MoePermuteGpu, GatherOnMisalignedViews) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(89);
  const int64_t n = 37, c = 64, num_rows = 50;
  auto x = testing::round_to(dtype, testing::random_vector(n * c + 1, rng));
  std::vector<int32_t> rows(num_rows);
  for (int64_t r = 0; r < num_rows; ++r) rows[r] = r % 9 == 4 ? -1 : int32_t((r * 17) % n);
  DeviceTensor g_x(dtype, {n * c + 1}), g_xp(dtype, {num_rows * c + 1}),
      g_rows(DType::i32, {num_rows});
  g_x.upload(x);
  g_rows.upload_i32(rows);
  settle();
  for (int64_t shift : {0, 1}) {
    auto view = [&](const DeviceTensor& t, int64_t num) {
      return Tensor(static_cast<char*>(t.t().data) + shift * dtype_size(dtype), dtype, Device::cuda,
                    Shape{num, c});
    };
    ops::moe_permute(view(g_xp, num_rows), view(g_x, n), g_rows, 1);
    const auto all = g_xp.download();
    for (int64_t r = 0; r < num_rows; ++r)
      for (int64_t col = 0; col < c; ++col) {
        const float want = rows[r] < 0 ? 0.0f : x[shift + rows[r] * c + col];
        ASSERT_EQ(all[shift + r * c + col], want) << "shift " << shift << " row " << r;
      }
  }
  EXPECT_TRUE(g_xp.guards_intact());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MoePermuteGpu,
                         ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace tessera::testing
