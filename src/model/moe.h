// Mixture-of-Experts layer, in place of a block's MLP: an FP32 router (linear -> softmax -> top-k),
// the dispatch plan (tokens sorted by expert, dropped past the capacity), routed expert FFNs as
// grouped GEMMs, the weighted combine, optional shared experts, and the router's load-balancing
// and z losses (their gradients enter in backward, scaled like the micro-batch's loss).
// Shape letters: N rows (= B*T), C width, E experts, K top-k, R = N*K permuted rows, Fe expert FFN
// width, Fs shared FFN width (all shared experts side by side, split over tp). Expert parallelism
// (ep > 1): P = ep ranks, El = E/P local experts, Re = P*N*K rows on the expert side: the rows
// this rank's experts receive from the whole ep group, sized for the worst case (every token of
// every rank routed here; dropless). With ep = 1, Re = R.
#pragma once
#include <vector>

#include "config/model_config.h"
#include "core/memory.h"
#include "model/mlp.h"

namespace tessera {

// What forward keeps for backward (and for the step's MoE metrics).
struct MoeActs {
  Tensor x32;                // (N,C) f32 router input, under 16-bit compute only
  Tensor logits, probs;      // (N,E) f32 (f64 for f64 models)
  Tensor lse;                // (N)
  Tensor topk_idx, topk_w;   // (N,K) i32, (N,K) f32
  Tensor tokens_per_expert;  // (E) i32, before dropping
  Tensor offsets;            // (E+1) i32 kept rows per expert, cumulative
  Tensor slot_row;           // (N,K) i32 permuted row of each slot, -1 dropped
  Tensor row_slot;           // (R) i32 slot of each permuted row, -1 unused
  Tensor loss;               // (2) f32: aux, z (coefficients included)
  Tensor xp;                 // (R,C) permuted input
  Tensor h, up, act;         // (Re,Fe) gate (gelu: fc) output, up output (swiglu), activation
  Tensor yp;                 // (R,C) expert outputs
  MlpActs shared;            // shared experts
  // ep > 1 only. Received rows come in (source rank, local expert) order; `ep_map` regroups them
  // to (local expert, source rank) order, `ep_inv` back (both built on the host, -1 past Rr).
  Tensor xg;                     // (Re,C) received input rows, grouped by local expert
  Tensor ep_offsets;             // (El+1) i32 received rows per local expert, cumulative
  Tensor ep_map, ep_inv;         // (Re) i32 grouped row -> received row, and its inverse
  std::vector<int64_t> ep_send;  // (P) rows sent to each ep rank (the forward's dispatch)
  std::vector<int64_t> ep_recv;  // (P) rows received from each ep rank
};

// Backward's temporaries, shared by every MoE block of a stage.
struct MoeScratch {
  Tensor w32;               // (E,C) f32 router weight, under 16-bit compute only
  Tensor d_logits;          // (N,E) f32
  Tensor d_topk_w;          // (N,K) f32
  Tensor d_x32;             // (N,C) f32 router input gradient (16-bit compute)
  Tensor d_dw32, d_dw;      // (E,C) f32 and the model dtype: 16-bit gradients only
  Tensor d_yp, d_xp;        // (R,C)
  Tensor d_xp2;             // (Re,C)
  Tensor d_act, d_h, d_up;  // (Re,Fe)
  Tensor ep_a, ep_b;        // (Re,C) ep > 1: received rows and their gradients, forward and back
  Tensor d_x;               // (N,C) a branch's input gradient before it is summed
  Tensor y;                 // (N,C) shared experts' output
  MlpScratch shared;
};

// Another way to run the routed experts' grouped GEMMs: QAT's fake quantization
// (optim/qat_linear.h). The model only calls through this interface, as Linear does LinearCompute.
class ExpertCompute {
 public:
  virtual ~ExpertCompute() = default;
  // What the grouped GEMMs read in place of ps[param].value (same shape and dtype): in the forward
  // and for the input gradient. The weight gradient still accumulates into ps[param].grad.
  virtual Tensor expert_weight(const ParamStore& ps, int param) = 0;
  // Transforms x (R,K), the rows a grouped GEMM is about to read, in place. Nothing else reads
  // them afterwards but that GEMM and its weight gradient (the activations' own backward reads h
  // and up, never the activation).
  virtual void expert_input(Tensor x) = 0;
};

class Moe {
 public:
  // cfg is the whole model (cfg.moe set); shared experts are split over tp like the dense MLP,
  // the router and routed experts are replicated over tp (expert tensor parallelism is not
  // built); routed experts are split over ep (shard.ep_size > 1), the router replicated.
  void declare(ParamStore& ps, const std::string& name, const ModelConfig& cfg,
               const ModelShard& shard = {});
  // Sizes from a LOCAL config (Transformer::local_config) and the ep size. grad_dtype: the
  // parameter gradients'.
  static MoeActs alloc_acts(Arena& arena, const ModelConfig& cfg, DType dt, int64_t N, int ep);
  static MoeScratch alloc_scratch(Arena& arena, const ModelConfig& cfg, DType dt, DType grad_dtype,
                                  int64_t N, int ep);
  static size_t acts_bytes(const ModelConfig& cfg, DType dt, int64_t N, int ep);
  static size_t scratch_bytes(const ModelConfig& cfg, DType dt, DType grad_dtype, int64_t N,
                              int ep);

  void forward(const ParamStore& ps, MoeActs& a, MoeScratch& s, Tensor y /*(N,C)*/,
               Tensor x /*(N,C)*/) const;
  // dx (N,C) is overwritten. loss_scale multiplies the aux and z losses' gradients as it does the
  // objective's (the micro-batch weight and any FP16 loss scale).
  void backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor dx, Tensor dy, Tensor x,
                float loss_scale) const;
  template <class F>
  void for_each_linear(F&& f) {
    if (has_shared_) shared_.for_each_linear(f);
  }
  int num_experts() const { return cfg_.num_experts; }
  // The routed experts' weights (El, Fe, C) and (El, C, Fe), as parameter indices.
  template <class F>
  void for_each_expert_weight(F&& f) const {
    f(w_in_);
    if (w_up_ >= 0) f(w_up_);
    f(w_out_);
  }
  void set_expert_compute(ExpertCompute* c) { expert_compute_ = c; }

 private:
  void route(const ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor x) const;
  // The local experts on rows grouped by `offsets` (G+1); h/up/act and the scratch use x's rows.
  void experts_forward(const ParamStore& ps, const MoeActs& a, Tensor y, Tensor x,
                       Tensor offsets) const;
  void experts_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor dx, Tensor dy,
                        Tensor x, Tensor offsets) const;
  Tensor expert_weight(const ParamStore& ps, int param) const {
    return expert_compute_ ? expert_compute_->expert_weight(ps, param) : ps[param].value;
  }
  // ep > 1: a.yp from a.xp through the experts of the whole ep group, and its adjoint.
  void ep_forward(const ParamStore& ps, MoeActs& a, MoeScratch& s) const;
  void ep_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s) const;
  void router_backward(ParamStore& ps, const MoeActs& a, MoeScratch& s, Tensor x,
                       float loss_scale) const;

  MoeConfig cfg_;
  ActivationKind kind_ = ActivationKind::gelu;
  int router_ = -1;            // (E,C)
  int w_in_ = -1, w_up_ = -1;  // (E,Fe,C) gelu: fc; swiglu: gate and up
  int w_out_ = -1;             // (E,C,Fe) gelu: proj; swiglu: down
  bool has_shared_ = false;
  Mlp shared_;
  ModelShard shard_;
  ExpertCompute* expert_compute_ = nullptr;  // null: the weights as stored, the inputs as they are
};

}  // namespace tessera
