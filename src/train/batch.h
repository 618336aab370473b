// Batch: one micro-batch of token ids, filled on the host by the loader and placed on the model's
// device (on the CPU the device tensors are views of the host vectors); when distilling from a
// teacher cache, also the teacher's cached rows of those windows (last pipeline stage).
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "data/teacher_cache.h"

namespace tessera {

// The cached teacher's rows a last-stage batch carries (distill.teacher_cache): K ids per
// position and the lse at each of num_temps temperatures. top_k 0: none.
struct CachedRowsDims {
  int top_k = 0;
  int num_temps = 0;
};

struct Batch {
  std::vector<int32_t> inputs, targets;  // (B, T) host
  Tensor tokens, labels;                 // (B, T) i32 on the model's device
  Tensor topk_logits, topk_ids;          // (B*T, K) f32 / i32 on the device (cache only)
  Tensor teacher_lse;                    // (nT, 2, B*T) f32 on the device

  Batch(int B, int T, Device device, Arena& arena, CachedRowsDims cache = {})
      : inputs(size_t(B) * T), targets(size_t(B) * T) {
    const int64_t N = int64_t(B) * T, K = cache.top_k, nT = cache.num_temps;
    if (K > 0 && device == Device::cpu) {  // the tensors view host rows of the batch's own
      teacher.topk_logits.resize(size_t(N * K));
      teacher.topk_ids.resize(size_t(N * K));
      teacher.lse.resize(size_t(nT * 2 * N));
    }
    if (device == Device::cpu) {
      tokens = Tensor(inputs.data(), DType::i32, device, {B, T});
      labels = Tensor(targets.data(), DType::i32, device, {B, T});
      if (K > 0) {
        topk_logits = Tensor(teacher.topk_logits.data(), DType::f32, device, {N, K});
        topk_ids = Tensor(teacher.topk_ids.data(), DType::i32, device, {N, K});
        teacher_lse = Tensor(teacher.lse.data(), DType::f32, device, {nT, 2, N});
      }
    } else {
      tokens = arena.alloc(DType::i32, {B, T});
      labels = arena.alloc(DType::i32, {B, T});
      if (K > 0) {
        topk_logits = arena.alloc(DType::f32, {N, K});
        topk_ids = arena.alloc(DType::i32, {N, K});
        teacher_lse = arena.alloc(DType::f32, {nT, 2, N});
      }
    }
  }
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;
  static size_t bytes_needed(int B, int T, Device device, CachedRowsDims cache = {}) {
    if (device == Device::cpu) return 0;
    const size_t N = size_t(B) * T;
    size_t bytes = 2 * Arena::aligned(sizeof(int32_t) * N);
    if (cache.top_k > 0)
      bytes +=
          2 * Arena::aligned(4 * N * cache.top_k) + Arena::aligned(4 * 2 * N * cache.num_temps);
    return bytes;
  }
  bool has_teacher_rows() const { return !topk_ids.empty(); }
  // The teacher rows of this micro-batch (sized for it), held by the caller until upload(): on
  // the CPU copied into the batch (its tensors are views, read later by the loss), on a device
  // uploaded from `rows` directly.
  void stage(const TeacherRows& rows) {
    if (topk_ids.device == Device::cpu)
      teacher = rows;
    else
      staged_ = &rows;
  }
  void upload() {
    if (tokens.data == inputs.data()) return;
    copy_bytes(tokens.data, tokens.device, inputs.data(), Device::cpu, tokens.nbytes());
    copy_bytes(labels.data, labels.device, targets.data(), Device::cpu, labels.nbytes());
    if (!staged_) return;
    copy_bytes(topk_logits.data, topk_logits.device, staged_->topk_logits.data(), Device::cpu,
               topk_logits.nbytes());
    copy_bytes(topk_ids.data, topk_ids.device, staged_->topk_ids.data(), Device::cpu,
               topk_ids.nbytes());
    copy_bytes(teacher_lse.data, teacher_lse.device, staged_->lse.data(), Device::cpu,
               teacher_lse.nbytes());
    staged_ = nullptr;
  }
  int64_t num_valid() const {
    int64_t n = 0;
    for (int32_t t : targets) n += t >= 0;
    return n;
  }

 private:
  TeacherRows teacher;                   // CPU: the rows the tensors view
  const TeacherRows* staged_ = nullptr;  // a device batch: rows to upload next
};

}  // namespace tessera
