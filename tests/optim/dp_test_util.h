// Shared by the data-parallel tests: a small synthetic model (parameter specs per tp/pp position,
// with awkward sizes, every decay class, tp-sharded, tp-replicated, tp_partial_grad and a tied
// embedding) and per-rank gradients that are a pure function of (rank coordinates, step, name,
// element), so any process can compute what every other rank contributed.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/params.h"

namespace tessera::testing {

// The tied embedding "wte" sits first on stage 0 and last on the last stage (the LM head's copy,
// not its owner); with one stage it appears once. Two blocks per stage. 574 elements with pp = 1.
inline std::vector<ParamSpec> synthetic_specs(int tp_rank, int tp_size, int pp_rank, int pp_size) {
  std::vector<ParamSpec> specs;
  const auto add = [&](std::string name, Shape shape, ParamClass cls, int shard_dim = -1,
                       bool tp_partial = false) {
    ParamSpec s;
    s.name = std::move(name);
    s.shape = shape;
    s.cls = cls;
    s.init = InitKind::normal;
    s.init_std = 0.5f;
    s.shard_dim = shard_dim;
    s.tp_partial_grad = tp_partial;
    s.owner = shard_dim >= 0 || tp_rank == 0;  // replicated over tp: tp rank 0 owns it
    specs.push_back(s);
    return specs.size() - 1;
  };
  const auto add_wte = [&](bool owner) {
    const size_t i = add("wte", {37, 5}, ParamClass::embedding, 0);
    specs[i].embedding_group = true;
    specs[i].owner = owner;
  };
  if (pp_rank == 0) add_wte(true);
  for (int l = 2 * pp_rank; l < 2 * pp_rank + 2; ++l) {
    // Appended, not "h" + std::string: g++ 12 -O3 warns falsely (-Wrestrict) on that form.
    std::string h = "h";
    h += std::to_string(l) + ".";
    add(h + "ln.weight", {6}, ParamClass::norm);
    add(h + "qk_norm.weight", {5}, ParamClass::norm, -1, /*tp_partial=*/true);
    add(h + "w1.weight", {13, 6}, ParamClass::weight, 0);
    add(h + "w1.bias", {13}, ParamClass::bias, 0);
    add(h + "w2.weight", {6, 13}, ParamClass::weight, 1);
    add(h + "w2.bias", {6}, ParamClass::bias);
    add(h + "one", {1}, ParamClass::weight);  // a parameter smaller than any dp size
  }
  if (pp_rank == pp_size - 1) {
    add("ln_f.weight", {6}, ParamClass::norm);
    add("ln_f.bias", {6}, ParamClass::norm);
    // Odd-sized, so the LM head's copy of wte (odd-sized too) starts at an odd offset: its ZeRO-1
    // chunks are not aligned with those of stage 0's copy (a sum over the embedding group after
    // the dp reduce-scatter would mix stale elements, and the tests would see it).
    add("ln_f.extra", {3}, ParamClass::weight);
    if (pp_size > 1) add_wte(false);
  }
  return specs;
}

inline void add_specs(ParamStore& store, const std::vector<ParamSpec>& specs) {
  for (const ParamSpec& s : specs) store.add(s);
}

// What rank (tp, dp, pp) contributes at `step` to element i of parameter `spec`. A gradient that
// every tp rank computes in full (replicated, not tp_partial) is the same on all of them.
// exact: multiples of 1/8 in [-1, 1], so sums over up to 16 ranks are exact even in bf16 (at
// most 8 significant bits) whatever the reduction order; otherwise N(0, 1) values, whose sums
// round.
inline double grad_contribution(const ParamSpec& spec, int tp, int dp, int pp, int step, int64_t i,
                                bool exact) {
  const int t = spec.tp_sharded() || spec.tp_partial_grad ? tp : 0;
  const CounterRng rng(uint64_t(1000 + step), spec.name + "/" + std::to_string(t) + "/" +
                                                  std::to_string(dp) + "/" + std::to_string(pp));
  if (!exact) return rng.normal(uint64_t(i));
  return (double(rng.bits(uint64_t(i)) % 17) - 8.0) / 8.0;
}

// Which pipeline stages hold a copy of `spec` whose gradients are summed (the tied embedding).
inline std::vector<int> summed_stages(const ParamSpec& spec, int pp_rank, int pp_size) {
  if (spec.embedding_group && pp_size > 1) return {0, pp_size - 1};
  return {pp_rank};
}

// The fully reduced gradient of element i as every rank (tp, *, pp) must see it, in double.
inline double reduced_grad(const ParamSpec& spec, int tp, int tp_size, int dp_size, int pp,
                           int pp_size, int step, int64_t i, bool exact) {
  double sum = 0.0;
  for (int s : summed_stages(spec, pp, pp_size))
    for (int d = 0; d < dp_size; ++d)
      for (int t = 0; t < tp_size; ++t)
        if (t == tp || spec.tp_partial_grad)
          sum += grad_contribution(spec, t, d, s, step, i, exact);
  return sum;
}

}  // namespace tessera::testing
