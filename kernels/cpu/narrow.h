// NarrowScope: runs an f32 CPU reference kernel on bf16/f16 operands with the CUDA kernels'
// numerics (kernels/ops.h): each bf16/f16 operand is widened exactly to an f32 scratch copy, the
// f32 kernel runs on the copies, and finish() rounds each written copy ONCE (nearest even) back to
// its storage dtype. f32, f64 and integer operands pass through untouched, so a call without a
// narrow operand costs nothing. fp8 operands are not widened (the fp8 ops live in ops_fp8).
//
// Usage (kernels/ops.cpp):  NarrowScope n("gelu_forward");
//                           cpu::gelu_forward(n.out(out, "out"), n.in(inp, "inp"));
//                           n.finish();
// Aliasing: operands registered with the same buffer, dtype and size share ONE scratch copy, in
// whatever order the arguments are evaluated, so exact aliasing (out == inp, dinp == dout,
// dlogits == logits, dweight += ...) behaves as it does on f32 memory. Partial overlap involving
// a narrow operand and a written one is rejected here, because the disjoint copies would hide it
// from the kernel's own checks. If the kernel throws, nothing is written back.
#pragma once
#include <array>
#include <memory>

#include "core/tensor.h"

namespace tessera::cpu {

class NarrowScope {
 public:
  explicit NarrowScope(const char* op) : op_(op) {}
  ~NarrowScope();  // hands the scratch copies back to this thread's pool
  NarrowScope(const NarrowScope&) = delete;
  NarrowScope& operator=(const NarrowScope&) = delete;

  // A read-only operand (may be empty: returned as is).
  Tensor in(const Tensor& t, const char* name) { return add(t, name, false, true); }
  // An overwritten output: the copy is not filled from t unless t is also read (aliasing).
  Tensor out(const Tensor& t, const char* name) { return add(t, name, true, false); }
  // Read and written: accumulated gradients (+=) and in-place updates.
  Tensor inout(const Tensor& t, const char* name) { return add(t, name, true, true); }
  // Saved statistics (mean, rstd, lse, losses, ...): f32 by contract (f64 in f64 tests), never
  // narrowed; a bf16/f16 statistic is rejected rather than silently rounded.
  Tensor stat_in(const Tensor& t, const char* name) { return stat(t, name, false); }
  Tensor stat_out(const Tensor& t, const char* name) { return stat(t, name, true); }

  // Rounds every written narrow copy back to its storage (after the kernel returned).
  void finish();

 private:
  struct Entry {
    Tensor orig;  // the caller's tensor
    bool written = false;
    bool narrow = false;               // bf16/f16: has a scratch copy
    bool filled = false;               // scratch holds the widened contents of orig
    std::unique_ptr<float[]> scratch;  // >= numel f32 values when narrow (from the pool)
    size_t capacity = 0;               // of scratch
  };

  Tensor add(const Tensor& t, const char* name, bool written, bool read);
  Tensor stat(const Tensor& t, const char* name, bool written);

  // The most operands an op of kernels/ops.h takes is 10 (attention_backward). A fixed array keeps
  // the f32 path free of allocations and the scratch pointers handed out stable.
  static constexpr int kMaxOperands = 12;

  const char* op_;
  std::array<Entry, kMaxOperands> entries_;
  int num_entries_ = 0;
  bool finished_ = false;
};

// True for the storage dtypes NarrowScope widens (bf16, f16).
inline bool is_narrow_float(DType t) { return t == DType::bf16 || t == DType::f16; }

}  // namespace tessera::cpu
