// Causal GQA attention through cuDNN's fused SDPA engines, written against the cuDNN backend graph
// API: builds the operation graphs those engines recognize (the composite node sequence that
// cudnn-frontend emits for SDPA on cuDNN < 9.21: matmul, scale, causal mask from generated
// row/column indices, softmax with logsumexp stats, matmul; and the matching backward), lets the
// heuristics pick an engine, caches one execution plan per shape and runs it on the context
// stream. No kernels live here. Shape letters: B batch, T time, Hq query heads, Hkv key/value
// heads, D head dim. cuDNN dimension order is always (B, H, T, D) over our (B, T, H, D) memory.
#include <cudnn.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/log.h"
#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/common.cuh"

namespace tessera::cuda {
namespace {

// cuDNN's message for the last failed call of this thread (empty when it kept none).
std::string cudnn_last_error() {
  char buf[2048] = {0};
  cudnnGetLastErrorString(buf, sizeof(buf));
  return buf;
}

// A graph or plan cuDNN refused to build: the shape or graph variant is unsupported (or the graph
// is wrong). Caught by the plan builder, which records the message and tries the next variant.
struct BuildFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace
}  // namespace tessera::cuda

// Every cuDNN call on the run-time path: a failure is a system error with file:line and cuDNN's
// own explanation (cudnnGetLastErrorString).
#define TS_CUDNN_CHECK(call)                                                              \
  do {                                                                                    \
    cudnnStatus_t st_ = (call);                                                           \
    if (st_ != CUDNN_STATUS_SUCCESS)                                                      \
      ::tessera::fail(::tessera::ErrorKind::system,                                       \
                      ::fmt::format("{} failed: {}: {}", #call, cudnnGetErrorString(st_), \
                                    ::tessera::cuda::cudnn_last_error()),                 \
                      __FILE__, __LINE__);                                                \
  } while (0)

// Every cuDNN call while building graphs and plans: a failure throws BuildFailure with file:line,
// the status and cuDNN's explanation, so the builder can report it and try another variant.
#define TS_CUDNN_BUILD(call)                                                                       \
  do {                                                                                             \
    cudnnStatus_t st_ = (call);                                                                    \
    if (st_ != CUDNN_STATUS_SUCCESS)                                                               \
      throw ::tessera::cuda::BuildFailure(::fmt::format("{}:{}: {} failed: {}: {}", __FILE__,      \
                                                        __LINE__, #call, cudnnGetErrorString(st_), \
                                                        ::tessera::cuda::cudnn_last_error()));     \
  } while (0)

namespace tessera::cuda {
namespace {

// ---- descriptors -------------------------------------------------------------------------

// Owns one backend descriptor. Descriptors of cached plans are never destroyed (plans live for
// the process, like the device contexts); temporary ones are destroyed at scope exit.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    TS_CUDNN_BUILD(cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Desc() {
    if (d_ && cudnnBackendDestroyDescriptor(d_) != CUDNN_STATUS_SUCCESS)
      log_warn("cudnnBackendDestroyDescriptor failed: {}", cudnn_last_error());
  }
  Desc(Desc&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  Desc& operator=(Desc&&) = delete;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  void set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count,
           const void* value) {
    TS_CUDNN_BUILD(cudnnBackendSetAttribute(d_, name, type, count, value));
  }
  void set_i64(cudnnBackendAttributeName_t name, int64_t value) {
    set(name, CUDNN_TYPE_INT64, 1, &value);
  }
  void set_type(cudnnBackendAttributeName_t name, cudnnDataType_t value) {
    set(name, CUDNN_TYPE_DATA_TYPE, 1, &value);
  }
  void set_desc(cudnnBackendAttributeName_t name, const Desc& value) {
    cudnnBackendDescriptor_t raw = value.get();
    set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  void finalize() { TS_CUDNN_BUILD(cudnnBackendFinalize(d_)); }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

// Dimensions and strides of a graph tensor, outermost first.
struct Layout {
  std::array<int64_t, 4> dims, strides;
};

// Unique ids of the tensors we pass in variant packs; virtual tensors are numbered from
// kFirstVirtual up.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kDout,
  kDq,
  kDk,
  kDv,
  kScale,
  kMaskValue,
  kPadValue,
  kOne,  // host scalars passed by value
  kSoftmaxSum,
  kDqAccum,  // backward scratch in the workspace
  kSeqLenQ,
  kSeqLenKv,  // backward padding-mask lengths (see GraphOptions)
  kFirstVirtual = 100,
};

// Collects the tensors and operations of one operation graph.
class GraphBuilder {
 public:
  // A tensor of the graph; returns its uid (a fresh one for virtual tensors).
  int64_t tensor(int64_t uid, const Layout& l, cudnnDataType_t type, bool is_virtual = false,
                 bool by_value = false) {
    if (uid < 0) uid = next_virtual_++;
    named(fmt::format("tensor {}", uid).c_str(), [&] {
      Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
      t.set_type(CUDNN_ATTR_TENSOR_DATA_TYPE, type);
      t.set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, l.dims.data());
      t.set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, l.strides.data());
      t.set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid);
      t.set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16);  // checked on every pointer we pass
      t.set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
      if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
      t.finalize();
      tensors_.emplace(uid, std::move(t));
    });
    return uid;
  }
  int64_t virt(const Layout& l, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return tensor(-1, l, type, /*is_virtual=*/true);
  }
  // A host f32 scalar passed by value in the variant pack.
  int64_t scalar(int64_t uid) {
    return tensor(uid, Layout{{1, 1, 1, 1}, {1, 1, 1, 1}}, CUDNN_DATA_FLOAT, false, true);
  }

  // y = mode(x[, b[, t]]). BINARY_SELECT is y = t ? x : b; GEN_INDEX writes the index of `axis`.
  void pointwise(const char* name, cudnnPointwiseMode_t mode, int64_t x, int64_t b, int64_t t,
                 int64_t y, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    named(name, [&] {
      Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
      pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
      pw.set_type(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
      if (axis >= 0) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
      pw.finalize();
      Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
      op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
      op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, at(x));
      if (b >= 0) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, at(b));
      if (t >= 0) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, at(t));
      op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, at(y));
      op.finalize();
      ops_.push_back(std::move(op));
    });
  }
  // y = reduce(x) over the dimensions where y has extent 1 (or over head groups, for GQA).
  void reduction(const char* name, cudnnReduceTensorOp_t mode, int64_t x, int64_t y) {
    named(name, [&] {
      Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
      red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
      red.set_type(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT);
      red.finalize();
      Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
      op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, at(x));
      op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, at(y));
      op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
      op.finalize();
      ops_.push_back(std::move(op));
    });
  }
  // c = a · b, batched over the leading dims (a batch dim of b may divide c's: GQA heads).
  // Overrides (uids or -1) give per-batch actual M/N/K for the padding mask.
  void matmul(const char* name, int64_t a, int64_t b, int64_t c, int64_t m_override = -1,
              int64_t n_override = -1, int64_t k_override = -1) {
    named(name, [&] {
      Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
      mm.set_type(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT);
      mm.finalize();
      Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
      op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, at(a));
      op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, at(b));
      op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, at(c));
      op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
      if (m_override >= 0)
        op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, at(m_override));
      if (n_override >= 0)
        op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, at(n_override));
      if (k_override >= 0)
        op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, at(k_override));
      op.finalize();
      ops_.push_back(std::move(op));
    });
  }
  // y = x seen through y's dims/strides (used as a transpose).
  void reshape(const char* name, int64_t x, int64_t y) {
    named(name, [&] {
      Desc op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
      op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, at(x));
      op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, at(y));
      op.finalize();
      ops_.push_back(std::move(op));
    });
  }

  Desc finalize(cudnnHandle_t handle) {
    Desc graph(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    std::vector<cudnnBackendDescriptor_t> raw;
    for (const Desc& op : ops_) raw.push_back(op.get());
    graph.set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(raw.size()),
              raw.data());
    named("operation graph", [&] { graph.finalize(); });
    return graph;
  }

 private:
  const Desc& at(int64_t uid) const {
    auto it = tensors_.find(uid);
    TS_CHECK(it != tensors_.end(), "attention_cudnn: tensor uid {} used before it was made", uid);
    return it->second;
  }
  template <class F>
  void named(const char* name, F&& f) {
    try {
      f();
    } catch (const BuildFailure& e) {
      throw BuildFailure(fmt::format("op '{}': {}", name, e.what()));
    }
  }

  std::map<int64_t, Desc> tensors_;
  std::vector<Desc> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// ---- the SDPA graphs -------------------------------------------------------------------------

struct AttnDims {
  int64_t num_b, num_t, num_hq, num_hkv, head_dim;
  DType dtype;  // of q, k, v, out and the gradients: bf16 or f16 (lse and scratch are f32)
};

// The cuDNN type of the 16-bit I/O tensors and of the probabilities / dS fed to second GEMMs.
cudnnDataType_t io_type(const AttnDims& s) {
  if (s.dtype == DType::bf16) return CUDNN_DATA_BFLOAT16;
  TS_CHECK(s.dtype == DType::f16, "attention_cudnn: dtype {} (bf16 or f16)", dtype_name(s.dtype));
  return CUDNN_DATA_HALF;
}

// The (B, H, T, D) view of a (B, T, H, D) tensor, and its transpose (B, H, D, T).
Layout heads_view(const AttnDims& s, int64_t heads) {
  const int64_t t = s.num_t, d = s.head_dim;
  return {{s.num_b, heads, t, d}, {t * heads * d, d, heads * d, 1}};
}
Layout heads_view_t(const AttnDims& s, int64_t heads) {
  const int64_t t = s.num_t, d = s.head_dim;
  return {{s.num_b, heads, d, t}, {t * heads * d, d, 1, heads * d}};
}
// Packed (B, Hq, T, D) and the score matrix (B, Hq, T, T), row-major and transposed.
Layout packed_heads(const AttnDims& s) {
  const int64_t h = s.num_hq, t = s.num_t, d = s.head_dim;
  return {{s.num_b, h, t, d}, {h * t * d, t * d, d, 1}};
}
Layout scores(const AttnDims& s) {
  const int64_t h = s.num_hq, t = s.num_t;
  return {{s.num_b, h, t, t}, {h * t * t, t * t, t, 1}};
}
Layout scores_t(const AttnDims& s) {
  const int64_t h = s.num_hq, t = s.num_t;
  return {{s.num_b, h, t, t}, {h * t * t, t * t, 1, t}};
}
// Per-row statistics (B, Hq, T, 1): exactly the memory of our lse (B, Hq, T).
Layout row_stats(const AttnDims& s) {
  const int64_t h = s.num_hq, t = s.num_t;
  return {{s.num_b, h, t, 1}, {h * t, t, 1, 1}};
}

// How the causal mask's index nodes are typed: cudnn-frontend has emitted INT32 indices with INT32
// math, INT32 indices with FLOAT math, and (cuDNN 8.9 samples) FLOAT indices and comparisons.
enum class IndexStyle { kInt32, kFloatMath, kFloat };

// Knobs that distinguish the graph variants we try, in order, until one builds.
struct GraphOptions {
  IndexStyle index_style = IndexStyle::kInt32;
  // cudnn-frontend adds a padding mask with per-batch lengths = T (and GEMM overrides) to the
  // backward graph when T % 128 != 0 on cuDNN <= 9.15, working around a backend bug there.
  bool padding_mask = false;
  std::string name() const {
    const char* index = index_style == IndexStyle::kInt32       ? "int32"
                        : index_style == IndexStyle::kFloatMath ? "int32 with float math"
                                                                : "float";
    return fmt::format("causal index {}, padding mask {}", index, padding_mask ? "on" : "off");
  }
};

// scores_out = scores_in where key index <= query index, else the lowest float (top-left
// aligned causal mask; -FLT_MAX rather than -inf keeps exp() and max() free of NaN).
int64_t causal_mask(GraphBuilder& g, const AttnDims& s, const GraphOptions& o, int64_t in) {
  const bool float_index = o.index_style == IndexStyle::kFloat;
  const cudnnDataType_t index_type = float_index ? CUDNN_DATA_FLOAT : CUDNN_DATA_INT32;
  const cudnnDataType_t index_math =
      o.index_style == IndexStyle::kInt32 ? CUDNN_DATA_INT32 : CUDNN_DATA_FLOAT;
  const cudnnDataType_t compare_math = float_index ? CUDNN_DATA_FLOAT : CUDNN_DATA_BOOLEAN;
  const int64_t row = g.virt(scores(s), index_type);
  g.pointwise("causal_row_index", CUDNN_POINTWISE_GEN_INDEX, in, -1, -1, row, index_math, 2);
  const int64_t col = g.virt(scores(s), index_type);
  g.pointwise("causal_col_index", CUDNN_POINTWISE_GEN_INDEX, in, -1, -1, col, index_math, 3);
  const int64_t keep = g.virt(scores(s), CUDNN_DATA_BOOLEAN);
  g.pointwise("causal_row_ge_col", CUDNN_POINTWISE_CMP_GE, row, col, -1, keep, compare_math);
  const int64_t out = g.virt(scores(s));
  g.pointwise("causal_select", CUDNN_POINTWISE_BINARY_SELECT, in, kMaskValue, keep, out);
  return out;
}

// scores_out = scores_in where row < seq_len_q[b] and column < seq_len_kv[b], else lowest.
int64_t padding_mask(GraphBuilder& g, const AttnDims& s, int64_t in) {
  const int64_t row = g.virt(scores(s), CUDNN_DATA_INT32);
  g.pointwise("pad_row_index", CUDNN_POINTWISE_GEN_INDEX, in, -1, -1, row, CUDNN_DATA_INT32, 2);
  const int64_t col = g.virt(scores(s), CUDNN_DATA_INT32);
  g.pointwise("pad_col_index", CUDNN_POINTWISE_GEN_INDEX, in, -1, -1, col, CUDNN_DATA_INT32, 3);
  const int64_t row_ok = g.virt(scores(s), CUDNN_DATA_BOOLEAN);
  g.pointwise("pad_row_lt", CUDNN_POINTWISE_CMP_LT, row, kSeqLenQ, -1, row_ok, CUDNN_DATA_BOOLEAN);
  const int64_t col_ok = g.virt(scores(s), CUDNN_DATA_BOOLEAN);
  g.pointwise("pad_col_lt", CUDNN_POINTWISE_CMP_LT, col, kSeqLenKv, -1, col_ok, CUDNN_DATA_BOOLEAN);
  const int64_t keep = g.virt(scores(s), CUDNN_DATA_BOOLEAN);
  g.pointwise("pad_and", CUDNN_POINTWISE_LOGICAL_AND, row_ok, col_ok, -1, keep, CUDNN_DATA_BOOLEAN);
  const int64_t out = g.virt(scores(s));
  g.pointwise("pad_select", CUDNN_POINTWISE_BINARY_SELECT, in, kPadValue, keep, out);
  return out;
}

// Forward: O = softmax(mask(scale · Q K^T)) V, Stats = max + log(sum exp(· - max)) per row, i.e.
// the natural-log logsumexp of the masked scaled scores, which is our lse.
void build_forward(GraphBuilder& g, const AttnDims& s, const GraphOptions& o) {
  const cudnnDataType_t io = io_type(s);
  g.tensor(kQ, heads_view(s, s.num_hq), io);
  g.tensor(kK, heads_view_t(s, s.num_hkv), io);  // K^T by strides
  g.tensor(kV, heads_view(s, s.num_hkv), io);
  g.tensor(kO, heads_view(s, s.num_hq), io);
  g.tensor(kStats, row_stats(s), CUDNN_DATA_FLOAT);
  g.scalar(kScale);
  g.scalar(kMaskValue);

  const int64_t qk = g.virt(scores(s));
  g.matmul("bmm1", kQ, kK, qk);
  const int64_t scaled = g.virt(scores(s));
  g.pointwise("attn_scale", CUDNN_POINTWISE_MUL, qk, kScale, -1, scaled);
  const int64_t masked = causal_mask(g, s, o, scaled);
  const int64_t row_max = g.virt(row_stats(s));
  g.reduction("softmax_max", CUDNN_REDUCE_TENSOR_MAX, masked, row_max);
  const int64_t shifted = g.virt(scores(s));
  g.pointwise("softmax_sub", CUDNN_POINTWISE_SUB, masked, row_max, -1, shifted);
  const int64_t exps = g.virt(scores(s));
  g.pointwise("softmax_exp", CUDNN_POINTWISE_EXP, shifted, -1, -1, exps);
  const int64_t row_sum = g.virt(row_stats(s));
  g.reduction("softmax_sum", CUDNN_REDUCE_TENSOR_ADD, exps, row_sum);
  const int64_t log_sum = g.virt(row_stats(s));
  g.pointwise("softmax_log", CUDNN_POINTWISE_LOG, row_sum, -1, -1, log_sum);
  g.pointwise("softmax_stats", CUDNN_POINTWISE_ADD, row_max, log_sum, -1, kStats);
  // The probabilities enter the second GEMM in the I/O type, as the engines require.
  const int64_t probs = g.virt(scores(s), io);
  g.pointwise("softmax_div", CUDNN_POINTWISE_DIV, exps, row_sum, -1, probs);
  g.matmul("bmm2", probs, kV, kO);
}

// Backward, with P = exp(scale · Q K^T - Stats) rebuilt from the saved stats:
//   dV = P^T dO,  dP = dO V^T,  Dsum = rowsum(dO * O),  dS = scale · P * (dP - Dsum),
//   dK = dS^T Q,  dQ = dS K (accumulated in f32 scratch, then converted).
// With GQA, dK/dV are formed per query head and summed over each kv head's group.
// Determinism: on Hopper, cuDNN 9.14 is deterministic only for the other backward graph, where
// dS K is written straight into dq and the engine keeps dP in a B·Hq·T²·2-byte workspace (2 GiB
// at B=8, Hq=32, T=2048). We build the f32-accumulator graph instead, as cudnn-frontend does by
// default; its engine carries no NONDETERMINISTIC note, but dq's f32 sums may be ordered
// differently from run to run, so bitwise-reproducible backward is not promised.
void build_backward(GraphBuilder& g, const AttnDims& s, const GraphOptions& o) {
  const bool gqa = s.num_hq != s.num_hkv;
  const cudnnDataType_t io = io_type(s);
  g.tensor(kQ, heads_view(s, s.num_hq), io);
  g.tensor(kK, heads_view_t(s, s.num_hkv), io);  // K^T by strides
  g.tensor(kV, heads_view_t(s, s.num_hkv), io);  // V^T by strides
  g.tensor(kO, heads_view(s, s.num_hq), io);
  g.tensor(kDout, heads_view(s, s.num_hq), io);
  g.tensor(kStats, row_stats(s), CUDNN_DATA_FLOAT);
  g.tensor(kDq, heads_view(s, s.num_hq), io);
  g.tensor(kDk, heads_view(s, s.num_hkv), io);
  g.tensor(kDv, heads_view(s, s.num_hkv), io);
  g.scalar(kScale);
  g.scalar(kMaskValue);
  g.scalar(kOne);
  g.tensor(kSoftmaxSum, row_stats(s), CUDNN_DATA_FLOAT);
  g.tensor(kDqAccum, packed_heads(s), CUDNN_DATA_FLOAT);
  int64_t seq_q = -1, seq_kv = -1;
  if (o.padding_mask) {
    const Layout lengths{{s.num_b, 1, 1, 1}, {1, 1, 1, 1}};
    seq_q = g.tensor(kSeqLenQ, lengths, CUDNN_DATA_INT32);
    seq_kv = g.tensor(kSeqLenKv, lengths, CUDNN_DATA_INT32);
    g.scalar(kPadValue);
  }

  // Dsum = rowsum(dO * O), kept in f32 scratch.
  const int64_t h = s.num_hq, t = s.num_t, d = s.head_dim;
  const int64_t do_o = g.virt(Layout{{s.num_b, h, t, d}, {h * t * d, t * d, h * d, 1}});
  g.pointwise("mul_dO_O", CUDNN_POINTWISE_MUL, kDout, kO, -1, do_o);
  const int64_t do_o_sum = g.virt(row_stats(s));
  g.reduction("reduce_dO_O", CUDNN_REDUCE_TENSOR_ADD, do_o, do_o_sum);
  g.pointwise("softmax_sum", CUDNN_POINTWISE_MUL, do_o_sum, kOne, -1, kSoftmaxSum);

  // P, recomputed.
  const int64_t qk = g.virt(scores(s));
  g.matmul("matmul_Q_KT", kQ, kK, qk, seq_q, seq_kv);
  const int64_t scaled = g.virt(scores(s));
  g.pointwise("mul_s_attn_scale", CUDNN_POINTWISE_MUL, qk, kScale, -1, scaled);
  int64_t logits = g.virt(scores(s));
  g.pointwise("sub_s_stats", CUDNN_POINTWISE_SUB, scaled, kStats, -1, logits);
  if (o.padding_mask) logits = padding_mask(g, s, logits);
  logits = causal_mask(g, s, o, logits);
  const int64_t probs = g.virt(scores(s));
  g.pointwise("exp_s", CUDNN_POINTWISE_EXP, logits, -1, -1, probs);

  // dV = P^T dO.
  const int64_t probs_t = g.virt(scores_t(s), io);
  g.reshape("reshape_p", probs, probs_t);
  if (!gqa) {
    g.matmul("matmul_pT_dO", probs_t, kDout, kDv, seq_kv, -1, seq_q);
  } else {
    const int64_t dv_heads = g.virt(packed_heads(s), io);
    g.matmul("matmul_pT_dO", probs_t, kDout, dv_heads, seq_kv, -1, seq_q);
    g.reduction("red_dV_head", CUDNN_REDUCE_TENSOR_ADD, dv_heads, kDv);
  }

  // dS = scale · P * (dO V^T - Dsum).
  const int64_t dp = g.virt(scores(s));
  g.matmul("matmul_dO_VT", kDout, kV, dp, seq_q, seq_kv);
  const int64_t dp_centered = g.virt(scores(s));
  g.pointwise("sub_dP_softmax_sum", CUDNN_POINTWISE_SUB, dp, kSoftmaxSum, -1, dp_centered);
  const int64_t ds_unscaled = g.virt(scores(s));
  g.pointwise("mul_dP_exp_s", CUDNN_POINTWISE_MUL, dp_centered, probs, -1, ds_unscaled);
  const int64_t ds = g.virt(scores(s));
  g.pointwise("mul_dS_attn_scale", CUDNN_POINTWISE_MUL, ds_unscaled, kScale, -1, ds);

  // dK = dS^T Q.
  const int64_t ds_t = g.virt(scores_t(s), io);
  g.reshape("reshape_dS", ds, ds_t);
  if (!gqa) {
    g.matmul("matmul_dST_Q", ds_t, kQ, kDk, seq_kv, -1, seq_q);
  } else {
    const int64_t dk_heads = g.virt(packed_heads(s), io);
    g.matmul("matmul_dST_Q", ds_t, kQ, dk_heads, seq_kv, -1, seq_q);
    g.reduction("red_dK_head", CUDNN_REDUCE_TENSOR_ADD, dk_heads, kDk);
  }

  // dQ = dS K, accumulated in f32 scratch by the engine, then converted into dq.
  const int64_t k_rows = g.virt(heads_view(s, s.num_hkv));
  g.reshape("reshape_k", kK, k_rows);
  g.matmul("matmul_dS_K", ds, k_rows, kDqAccum, seq_q, -1, seq_kv);
  g.pointwise("identity_dQ", CUDNN_POINTWISE_IDENTITY, kDqAccum, -1, -1, kDq);
}

// ---- plans -------------------------------------------------------------------------------

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A built execution plan and where its scratch lives. Never destroyed (see Desc).
struct Plan {
  bool ok = false;
  std::string info;  // variant, engine and workspace when ok; every failure otherwise
  cudnnBackendDescriptor_t plan = nullptr;
  GraphOptions options;
  // Workspace: [cuDNN's own | softmax_sum (B,Hq,T) f32 | dq_accum (B,Hq,T,D) f32] (backward).
  size_t softmax_sum_offset = 0, dq_accum_offset = 0, workspace_bytes = 0;
  void* own_workspace = nullptr;  // allocated once when the context workspace is too small
  int32_t* seq_len_q = nullptr;   // (B) all T, padding mask only; 16-byte aligned, like
  int32_t* seq_len_kv = nullptr;  // (B)   every pointer the graph declares
  // The graph, heuristics and engine configs the plan came from stay alive with it: the backend
  // API does not promise that a plan outlives the descriptors it was built from.
  std::unique_ptr<GraphBuilder> graph_parts;
  std::vector<Desc> keep_alive;
};

// Engine index and numerical notes of an engine config, for the plan's description (a failure
// to describe is reported in the text, never a reason to drop a plan that built).
std::string describe_engine(cudnnBackendDescriptor_t cfg) try {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  cudnnBackendDescriptor_t raw = engine.get();
  int64_t n = 0;
  TS_CUDNN_BUILD(cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE,
                                          CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &raw));
  int64_t index = -1;
  TS_CUDNN_BUILD(cudnnBackendGetAttribute(raw, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1,
                                          &n, &index));
  std::array<cudnnBackendNumericalNote_t, CUDNN_NUMERICAL_NOTE_TYPE_COUNT> notes{};
  int64_t num_notes = 0;
  TS_CUDNN_BUILD(cudnnBackendGetAttribute(raw, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                          CUDNN_TYPE_NUMERICAL_NOTE, int64_t(notes.size()),
                                          &num_notes, notes.data()));
  std::string note_names;
  bool nondeterministic = false;
  for (int64_t i = 0; i < num_notes; ++i) {
    if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) nondeterministic = true;
    note_names += fmt::format("{}{}", i ? "," : "", int(notes[i]));
  }
  return fmt::format("engine {} (numerical notes [{}]{})", index, note_names,
                     nondeterministic ? ", nondeterministic" : "");
} catch (const BuildFailure& e) {
  return fmt::format("engine not described ({})", e.what());
}

// Heuristics (mode A, then the fallback list), first engine config whose plan finalizes wins.
// Returns false with the reasons appended to `failures`.
bool choose_engine(cudnnHandle_t handle, const Desc& graph, Plan* plan, std::string* failures) {
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    const char* mode_name = mode == CUDNN_HEUR_MODE_A ? "heuristics A" : "fallback heuristics";
    try {
      Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
      heur.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
      heur.finalize();
      int64_t num_cfgs = 0;
      TS_CUDNN_BUILD(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                              CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &num_cfgs,
                                              nullptr));
      std::vector<Desc> cfgs;
      std::vector<cudnnBackendDescriptor_t> raw;
      for (int64_t i = 0; i < num_cfgs; ++i) {
        cfgs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
        raw.push_back(cfgs.back().get());
      }
      int64_t got = 0;
      if (num_cfgs > 0)
        TS_CUDNN_BUILD(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_TYPE_BACKEND_DESCRIPTOR, num_cfgs, &got,
                                                raw.data()));
      *failures += fmt::format("    {}: {} engine configs\n", mode_name, got);
      for (int64_t i = 0; i < got; ++i) {
        try {
          Desc p(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
          p.set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
          p.set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[i]);
          p.finalize();
          int64_t n = 0, workspace = 0;
          TS_CUDNN_BUILD(cudnnBackendGetAttribute(p.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                  CUDNN_TYPE_INT64, 1, &n, &workspace));
          plan->info = fmt::format("{}, config {} of {}: {}, cuDNN workspace {} bytes", mode_name,
                                   i, got, describe_engine(cfgs[i].get()), workspace);
          plan->workspace_bytes = align_up(size_t(workspace));
          plan->plan = p.get();
          plan->keep_alive.push_back(std::move(p));
          plan->keep_alive.push_back(std::move(heur));
          for (Desc& cfg : cfgs) plan->keep_alive.push_back(std::move(cfg));
          return true;
        } catch (const BuildFailure& e) {
          if (i < 3) *failures += fmt::format("    config {}: {}\n", i, e.what());
        }
      }
    } catch (const BuildFailure& e) {
      *failures += fmt::format("    {}: {}\n", mode_name, e.what());
    }
  }
  return false;
}

// cuDNN's version at run time (e.g. 91400 for 9.14.0).
size_t cudnn_runtime_version() { return cudnnGetVersion(); }

// The variants to try for a shape, most faithful to cudnn-frontend first.
std::vector<GraphOptions> graph_variants(const AttnDims& s, bool backward) {
  const bool frontend_padding = backward && s.num_t % 128 != 0 && cudnn_runtime_version() <= 91500;
  std::vector<GraphOptions> v;
  for (IndexStyle style : {IndexStyle::kInt32, IndexStyle::kFloatMath, IndexStyle::kFloat})
    v.push_back({style, frontend_padding});
  if (backward) v.push_back({IndexStyle::kInt32, !frontend_padding});
  return v;
}

cudnnHandle_t cudnn_handle() {
  static std::mutex mutex;
  Context& ctx = context();
  std::lock_guard<std::mutex> lock(mutex);
  if (!ctx.cudnn) {
    cudnnHandle_t h = nullptr;
    TS_CUDNN_CHECK(cudnnCreate(&h));
    ctx.cudnn = h;
  }
  return ctx.cudnn;
}

Plan* build_plan(const AttnDims& s, bool backward) {
  auto* plan = new Plan();
  const cudnnHandle_t handle = cudnn_handle();
  std::string failures;
  for (const GraphOptions& o : graph_variants(s, backward)) {
    failures += fmt::format("  variant ({}):\n", o.name());
    try {
      auto g = std::make_unique<GraphBuilder>();
      if (backward)
        build_backward(*g, s, o);
      else
        build_forward(*g, s, o);
      Desc graph = g->finalize(handle);
      if (choose_engine(handle, graph, plan, &failures)) {
        plan->ok = true;
        plan->options = o;
        plan->graph_parts = std::move(g);
        plan->keep_alive.push_back(std::move(graph));
        break;
      }
    } catch (const BuildFailure& e) {
      failures += fmt::format("    {}\n", e.what());
    }
  }
  const std::string what =
      fmt::format("cuDNN {} SDPA {} B={} T={} Hq={} Hkv={} D={} {}", cudnn_runtime_version(),
                  backward ? "backward" : "forward", s.num_b, s.num_t, s.num_hq, s.num_hkv,
                  s.head_dim, dtype_name(s.dtype));
  if (!plan->ok) {
    plan->info = fmt::format("{}: no engine; attempts:\n{}", what, failures);
    log_warn("{}", plan->info);
    return plan;
  }
  plan->info = fmt::format("{}: variant ({}), {}", what, plan->options.name(), plan->info);
  if (backward) {
    plan->softmax_sum_offset = plan->workspace_bytes;
    const size_t rows = size_t(s.num_b * s.num_hq * s.num_t);
    plan->dq_accum_offset = plan->softmax_sum_offset + align_up(rows * sizeof(float));
    plan->workspace_bytes =
        plan->dq_accum_offset + align_up(rows * size_t(s.head_dim) * sizeof(float));
  }
  // Once per plan, never per call: the lengths. The scratch comes from the context workspace,
  // which the trainer sizes for its shapes (attention_workspace_bytes); see plan_workspace().
  if (plan->options.padding_mask) {
    const std::vector<int32_t> lengths(s.num_b, int32_t(s.num_t));
    const size_t bytes = lengths.size() * sizeof(int32_t);
    for (int32_t** dst : {&plan->seq_len_q, &plan->seq_len_kv}) {
      TS_CUDA_CHECK(cudaMalloc(dst, bytes));
      TS_CUDA_CHECK(cudaMemcpy(*dst, lengths.data(), bytes, cudaMemcpyHostToDevice));
    }
  }
  plan->info += fmt::format(", total workspace {} bytes", plan->workspace_bytes);
  log_debug("{}", plan->info);
  return plan;
}

// Plans by (device, B, T, Hq, Hkv, D, dtype, backward), failures included (so a shape cuDNN
// cannot do is tried once).
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool>;

Plan* get_plan(const AttnDims& s, bool backward) {
  static std::mutex mutex;
  static std::map<PlanKey, Plan*> plans;
  const PlanKey key{context().device, s.num_b,    s.num_t,      s.num_hq,
                    s.num_hkv,        s.head_dim, int(s.dtype), backward};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, build_plan(s, backward)).first;
  return it->second;
}

// The plan's scratch: the context workspace when it is large enough (the trainer makes it so, from
// its arena, with attention_workspace_bytes), else a buffer of the plan's own, allocated once on
// first use — outside the arena, so it is logged.
void* plan_workspace(Plan* plan) {
  if (plan->workspace_bytes <= context().workspace_bytes) return context().workspace;
  if (!plan->own_workspace) {
    log_warn(
        "cuDNN attention: {} bytes of workspace allocated outside the arena (context "
        "workspace {} bytes): {}",
        plan->workspace_bytes, context().workspace_bytes, plan->info);
    TS_CUDA_CHECK(cudaMalloc(&plan->own_workspace, plan->workspace_bytes));
  }
  return plan->own_workspace;
}

// Runs a plan: one variant pack per call (cheap next to the kernels), on the op's stream. The
// handle is the device's one, so its stream is set on every call (ops of a device are issued by
// one host thread, so the set-then-execute pair is not raced).
void execute(const Plan& plan, void* workspace, const std::vector<int64_t>& uids,
             const std::vector<void*>& ptrs, ops::Stream stream) {
  try {
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, int64_t(uids.size()),
             uids.data());
    pack.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()),
             ptrs.data());
    pack.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
    pack.finalize();
    const cudnnHandle_t handle = cudnn_handle();
    TS_CUDNN_CHECK(cudnnSetStream(handle, cuda_stream(stream)));
    TS_CUDNN_CHECK(cudnnBackendExecute(handle, plan.plan, pack.get()));
  } catch (const BuildFailure& e) {
    TS_SYSTEM_ERROR("attention_cudnn: variant pack: {}", e.what());
  }
}

// Shapes, dtypes and devices every call shares; returns the sizes.
AttnDims check_args(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                    const Tensor& v, const char* op) {
  for (const Tensor* t : {&out, &lse, &q, &k, &v}) expect_cuda(*t, op);
  TS_CHECK(q.dtype == DType::bf16 || q.dtype == DType::f16,
           "{}: cuDNN SDPA takes bf16 or f16 (f32 goes to the native kernel), got q {}", op,
           q.str());
  for (const Tensor* t : {&out, &k, &v})
    TS_CHECK(t->dtype == q.dtype, "{}: expected {} like q, got {}", op, dtype_name(q.dtype),
             t->str());
  TS_CHECK(lse.dtype == DType::f32, "{}: lse must be f32, got {}", op, lse.str());
  TS_CHECK(q.ndim() == 4 && k.ndim() == 4, "{}: q {} and k {} must be (B, T, H, D)", op, q.str(),
           k.str());
  const AttnDims s{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), q.dtype};
  TS_CHECK(s.num_hkv >= 1 && s.num_hq % s.num_hkv == 0,
           "{}: Hq = {} must be a multiple of Hkv = {}", op, s.num_hq, s.num_hkv);
  expect_shape(k, Shape{s.num_b, s.num_t, s.num_hkv, s.head_dim}, op);
  expect_shape(v, k.shape, op);
  expect_shape(out, q.shape, op);
  expect_shape(lse, Shape{s.num_b, s.num_hq, s.num_t}, op);
  return s;
}

// Conditions under which we do not even ask cuDNN; empty when none holds.
std::string precondition_failure(const AttnDims& s, std::initializer_list<const Tensor*> ts) {
  if (s.head_dim % 8 != 0 || s.head_dim > 256)
    return fmt::format("head dim {} (cuDNN SDPA needs a multiple of 8, at most 256)", s.head_dim);
  for (const Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)
      return fmt::format("tensor {} at {} is not 16-byte aligned", t->str(), t->data);
  return {};
}

bool refuse(const std::string& why, const char* op) {
  static std::mutex mutex;
  static std::map<std::string, bool> warned;
  std::lock_guard<std::mutex> lock(mutex);
  if (!warned[why]) log_warn("{}: not using cuDNN: {}", op, why);
  warned[why] = true;
  return false;
}

}  // namespace

bool attention_cudnn_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, float scale,
                             ops::Stream stream) {
  constexpr const char* kOp = "attention_cudnn_forward";
  const AttnDims s = check_args(out, lse, q, k, v, kOp);
  const std::string why = precondition_failure(s, {&out, &lse, &q, &k, &v});
  if (!why.empty()) return refuse(why, kOp);
  Plan* plan = get_plan(s, /*backward=*/false);
  if (!plan->ok) return false;
  float scale_value = scale;
  float mask_value = std::numeric_limits<float>::lowest();
  execute(*plan, plan_workspace(plan), {kQ, kK, kV, kO, kStats, kScale, kMaskValue},
          {q.data, k.data, v.data, out.data, lse.data, &scale_value, &mask_value}, stream);
  return true;
}

bool attention_cudnn_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                              Tensor v, Tensor out, Tensor lse, float scale, ops::Stream stream) {
  constexpr const char* kOp = "attention_cudnn_backward";
  const AttnDims s = check_args(out, lse, q, k, v, kOp);
  for (const Tensor* t : {&dq, &dk, &dv, &dout}) {
    expect_cuda(*t, kOp);
    TS_CHECK(t->dtype == q.dtype, "{}: expected {} like q, got {}", kOp, dtype_name(q.dtype),
             t->str());
  }
  expect_shape(dout, q.shape, kOp);
  expect_shape(dq, q.shape, kOp);
  expect_shape(dk, k.shape, kOp);
  expect_shape(dv, k.shape, kOp);
  const std::string why = precondition_failure(s, {&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse});
  if (!why.empty()) return refuse(why, kOp);
  Plan* plan = get_plan(s, /*backward=*/true);
  if (!plan->ok) return false;
  void* workspace = plan_workspace(plan);
  char* scratch = static_cast<char*>(workspace);
  float scale_value = scale, one = 1.0f;
  float mask_value = std::numeric_limits<float>::lowest(), pad_value = mask_value;
  std::vector<int64_t> uids = {kQ,  kK,  kV,     kO,         kDout, kStats,      kDq,
                               kDk, kDv, kScale, kMaskValue, kOne,  kSoftmaxSum, kDqAccum};
  std::vector<void*> ptrs = {q.data,
                             k.data,
                             v.data,
                             out.data,
                             dout.data,
                             lse.data,
                             dq.data,
                             dk.data,
                             dv.data,
                             &scale_value,
                             &mask_value,
                             &one,
                             scratch + plan->softmax_sum_offset,
                             scratch + plan->dq_accum_offset};
  if (plan->options.padding_mask) {
    uids.insert(uids.end(), {kSeqLenQ, kSeqLenKv, kPadValue});
    ptrs.insert(ptrs.end(), {plan->seq_len_q, plan->seq_len_kv, &pad_value});
  }
  execute(*plan, workspace, uids, ptrs, stream);
  return true;
}

std::string attention_cudnn_describe(int64_t num_b, int64_t num_t, int64_t num_hq, int64_t num_hkv,
                                     int64_t head_dim, bool backward, DType dtype) {
  return get_plan(AttnDims{num_b, num_t, num_hq, num_hkv, head_dim, dtype}, backward)->info;
}

size_t attention_cudnn_workspace_bytes(int64_t num_b, int64_t num_t, int64_t num_hq,
                                       int64_t num_hkv, int64_t head_dim, bool backward,
                                       DType dtype) {
  const Plan* plan = get_plan(AttnDims{num_b, num_t, num_hq, num_hkv, head_dim, dtype}, backward);
  return plan->ok ? plan->workspace_bytes : 0;
}

}  // namespace tessera::cuda
