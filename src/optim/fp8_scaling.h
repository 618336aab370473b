// FP8 delayed scaling (TransformerEngine's DelayedScaling recipe): per-tensor scales derived from
// a history of amaxes, kept on the device so a training step never waits for the host.
// Per step: fp8_quantize accumulates amax(i) while quantizing tensor i with scale(i); gemm_fp8
// unscales with scale_inv(i); at the step's end reduce_amax() over every group that shares the
// tensors, then update() (kernels/ops_fp8.h fp8_update_scales: history shift, reduction, scale).
// Not here: which tensors are scaled and when (the model), parsing the recipe (src/train).
// Shape letters: L amax history length, n number of scaled tensors.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "kernels/ops_fp8.h"

namespace tessera {

class Communicator;

// The recipe's knobs, as TransformerEngine names them.
struct Fp8ScalingConfig {
  int amax_history_len = 1024;  // L >= 1
  ops::Fp8AmaxCompute amax_compute = ops::Fp8AmaxCompute::max;
  int margin = 0;  // scale = fp8_max / amax / 2^margin, 0 <= margin <= 64
};
// User error naming the field (under `where`, e.g. "precision.fp8") when a knob is out of range.
void validate_fp8_scaling_config(const Fp8ScalingConfig& cfg, const char* where);

class Fp8ScalingState {
 public:
  // One scaled tensor per entry of `formats` (e4m3 or e5m2 each). Starts with an all-zero
  // history and amax, scale = scale_inv = 1. Its buffers are an allocation of its own, or, given
  // `arena`, bytes_for(formats.size(), cfg) bytes carved from it (a frozen model's arena).
  Fp8ScalingState(Device device, std::vector<DType> formats, const Fp8ScalingConfig& cfg,
                  Arena* arena = nullptr);
  static size_t bytes_for(int64_t num_tensors, const Fp8ScalingConfig& cfg);

  int64_t num_tensors() const { return static_cast<int64_t>(formats_.size()); }
  const std::vector<DType>& formats() const { return formats_; }
  const Fp8ScalingConfig& config() const { return cfg_; }
  Device device() const { return device_; }

  // (1) f32 views of tensor i's entries, for the ops: amax is what fp8_quantize accumulates into
  // this step, scale what it multiplies by, scale_inv what gemm_fp8 multiplies by.
  Tensor amax(int64_t i) const { return amax_.slice(i, i + 1); }
  Tensor scale(int64_t i) const { return scale_.slice(i, i + 1); }
  // gemm_fp8's copy of scale_inv[i], 16-byte aligned (cuBLASLt wants aligned scale pointers),
  // refreshed by update() and load().
  Tensor scale_inv(int64_t i) const { return scale_inv_aligned_.slice(4 * i, 4 * i + 1); }
  // Whole buffers.
  Tensor amax_history() const { return history_; }  // (L, n), row 0 the most recent step
  Tensor amaxes() const { return amax_; }           // (n)
  Tensor scales() const { return scale_; }          // (n)
  Tensor scale_invs() const { return scale_inv_; }  // (n)

  // Max-all-reduces this step's amaxes over `comm`, before update(). Every rank holding a shard
  // or a replica of the same tensors must end with the same scales, so call it for the tensor-
  // parallel group, and for the data-parallel group too if replicas are to stay identical (max is
  // idempotent: one call per group gives the max over their product). nullptr or a group of one:
  // nothing to do. The communicator must move tensors on this state's device.
  // NaN: MPI's and NCCL's max may drop or keep a NaN amax, but every rank gets the same value.
  void reduce_amax(Communicator* comm);
  // Rolls this step's amaxes into the history, recomputes scale and scale_inv, zeroes the amaxes.
  void update();

  // Host snapshot for checkpoints, taken at a step boundary (after update(), when the amaxes are
  // zero, so they are not part of it).
  struct State {
    std::vector<DType> formats;       // (n)
    int64_t history_len = 0;          // L of the snapshot
    std::vector<float> amax_history;  // (L, n)
    std::vector<float> scale;         // (n)
    std::vector<float> scale_inv;     // (n)
  };
  State gather() const;
  // Restores a snapshot; zeroes the amaxes. The formats must match this state's (user error
  // otherwise); a different history length is allowed (a recipe change): the most recent
  // min(L_old, L_new) rows are kept, the rest start at zero. Values are validated: history
  // entries finite and >= 0, scales finite and > 0, scale_inv == 1 / scale.
  void load(const State& state);

 private:
  Fp8ScalingConfig cfg_;
  std::vector<DType> formats_;
  Device device_;
  Buffer buffer_;             // empty when carved from an arena
  Tensor history_;            // (L, n) f32
  Tensor scale_;              // (n) f32
  Tensor scale_inv_;          // (n) f32
  Tensor scale_inv_aligned_;  // (4n) f32: scale_inv[i] at 4i, 16-byte aligned
  Tensor amax_;               // (n) f32
  Tensor fp8_max_;            // (n) f32: 448 or 57344 per tensor's format

  void refresh_aligned();  // scale_inv_ -> scale_inv_aligned_
};

}  // namespace tessera
