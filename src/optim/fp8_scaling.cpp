// Fp8ScalingState: the device buffers of FP8 delayed scaling, their all-reduce over the groups
// sharing the tensors, the per-step update, and checkpoint snapshots with validation.
#include "optim/fp8_scaling.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "parallel/communicator.h"

namespace tessera {

void validate_fp8_scaling_config(const Fp8ScalingConfig& cfg, const char* where) {
  if (cfg.amax_history_len < 1)
    TS_USER_ERROR("{}.amax_history_len must be at least 1, got {}", where, cfg.amax_history_len);
  if (cfg.margin < 0 || cfg.margin > 64)
    TS_USER_ERROR("{}.margin must lie in [0, 64], got {}", where, cfg.margin);
  if (cfg.amax_compute != ops::Fp8AmaxCompute::max &&
      cfg.amax_compute != ops::Fp8AmaxCompute::most_recent)
    TS_USER_ERROR("{}.amax_compute must be max or most_recent, got {}", where,
                  static_cast<int>(cfg.amax_compute));
}

namespace {
// One block, in order: history (L*n), scale, scale_inv, amax, fp8_max (n each), and the aligned
// scale_inv copies (4n; len * n + 4n is rounded up to a multiple of 4 floats first).
int64_t aligned_copies_at(int64_t n, int64_t len) { return (len * n + 4 * n + 3) / 4 * 4; }
int64_t block_floats(int64_t n, int64_t len) { return aligned_copies_at(n, len) + 4 * n; }
}  // namespace

size_t Fp8ScalingState::bytes_for(int64_t num_tensors, const Fp8ScalingConfig& cfg) {
  return size_t(std::max<int64_t>(block_floats(num_tensors, cfg.amax_history_len), 1)) *
         sizeof(float);
}

Fp8ScalingState::Fp8ScalingState(Device device, std::vector<DType> formats,
                                 const Fp8ScalingConfig& cfg, Arena* arena)
    : cfg_(cfg), formats_(std::move(formats)), device_(device) {
  validate_fp8_scaling_config(cfg_, "fp8 scaling");
  const int64_t n = num_tensors(), len = cfg_.amax_history_len;
  const int64_t aligned_at = aligned_copies_at(n, len);
  const int64_t total = block_floats(n, len);
  std::vector<float> host(total, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    TS_CHECK(formats_[j] == DType::e4m3 || formats_[j] == DType::e5m2,
             "Fp8ScalingState: tensor {} has format {}, expected e4m3 or e5m2", j,
             dtype_name(formats_[j]));
    host[len * n + j] = 1.0f;      // scale
    host[len * n + n + j] = 1.0f;  // scale_inv
    host[len * n + 4 * n - n + j] = ops::fp8_max_of(formats_[j]);
  }
  if (arena != nullptr) {
    TS_CHECK(arena->device() == device, "Fp8ScalingState on {} carved from an arena on {}",
             device_name(device), device_name(arena->device()));
  } else {
    buffer_ = Buffer(device, bytes_for(n, cfg_));
  }
  auto* base = static_cast<float*>(arena != nullptr ? arena->alloc_bytes(bytes_for(n, cfg_))
                                                    : buffer_.data());
  history_ = Tensor(base, DType::f32, device, {len, n});
  scale_ = Tensor(base + len * n, DType::f32, device, {n});
  scale_inv_ = Tensor(base + len * n + n, DType::f32, device, {n});
  amax_ = Tensor(base + len * n + 2 * n, DType::f32, device, {n});
  fp8_max_ = Tensor(base + len * n + 3 * n, DType::f32, device, {n});
  scale_inv_aligned_ = Tensor(base + aligned_at, DType::f32, device, {4 * n});
  if (total > 0) copy_bytes(base, device, host.data(), Device::cpu, total * sizeof(float));
  refresh_aligned();
}

void Fp8ScalingState::refresh_aligned() {
  copy_bytes_2d(scale_inv_aligned_.data, 4 * sizeof(float), scale_inv_.data, sizeof(float),
                sizeof(float), size_t(num_tensors()), device());
}

void Fp8ScalingState::reduce_amax(Communicator* comm) {
  if (comm == nullptr || comm->size() == 1 || num_tensors() == 0) return;
  TS_CHECK(comm->device() == device(),
           "Fp8ScalingState::reduce_amax: communicator {} moves {} tensors, the state is on {}",
           comm->name(), device_name(comm->device()), device_name(device()));
  comm->all_reduce(amax_, ReduceOp::max);
}

void Fp8ScalingState::update() {
  if (num_tensors() == 0) return;
  ops::Fp8UpdateParams params;
  params.fp8_max = fp8_max_;
  params.amax_compute = cfg_.amax_compute;
  params.margin = cfg_.margin;
  ops::fp8_update_scales(history_, scale_, scale_inv_, amax_, params);
  refresh_aligned();
}

Fp8ScalingState::State Fp8ScalingState::gather() const {
  State s;
  s.formats = formats_;
  s.history_len = cfg_.amax_history_len;
  const int64_t n = num_tensors();
  s.amax_history.resize(s.history_len * n);
  s.scale.resize(n);
  s.scale_inv.resize(n);
  if (n == 0) return s;
  copy_bytes(s.amax_history.data(), Device::cpu, history_.data, device(), history_.nbytes());
  copy_bytes(s.scale.data(), Device::cpu, scale_.data, device(), scale_.nbytes());
  copy_bytes(s.scale_inv.data(), Device::cpu, scale_inv_.data, device(), scale_inv_.nbytes());
  return s;
}

void Fp8ScalingState::load(const State& s) {
  const int64_t n = num_tensors();
  constexpr const char* kWhat = "checkpoint's fp8 scaling state";
  if (s.formats != formats_) {
    std::string have, want;
    for (DType t : s.formats) have += fmt::format(" {}", dtype_name(t));
    for (DType t : formats_) want += fmt::format(" {}", dtype_name(t));
    TS_USER_ERROR(
        "{}: {} scaled tensors with formats [{} ] do not match the model's {} [{} ] "
        "(a different model or precision recipe?)",
        kWhat, s.formats.size(), have, n, want);
  }
  if (s.history_len < 1 || int64_t(s.amax_history.size()) != s.history_len * n ||
      int64_t(s.scale.size()) != n || int64_t(s.scale_inv.size()) != n)
    TS_USER_ERROR(
        "{}: inconsistent sizes: history_len {}, amax_history {} values, scale {}, "
        "scale_inv {}, for {} tensors",
        kWhat, s.history_len, s.amax_history.size(), s.scale.size(), s.scale_inv.size(), n);
  for (size_t i = 0; i < s.amax_history.size(); ++i)
    if (!(std::isfinite(s.amax_history[i]) && s.amax_history[i] >= 0.0f))
      TS_USER_ERROR("{}: amax_history[{}, {}] = {}, expected finite and >= 0", kWhat,
                    i / std::max<int64_t>(n, 1), i % std::max<int64_t>(n, 1), s.amax_history[i]);
  for (int64_t j = 0; j < n; ++j) {
    if (!(std::isfinite(s.scale[j]) && s.scale[j] > 0.0f))
      TS_USER_ERROR("{}: scale[{}] = {}, expected finite and > 0", kWhat, j, s.scale[j]);
    if (s.scale_inv[j] != 1.0f / s.scale[j])
      TS_USER_ERROR("{}: scale_inv[{}] = {} is not 1 / scale[{}] = {}", kWhat, j, s.scale_inv[j], j,
                    1.0f / s.scale[j]);
  }
  if (n == 0) return;
  // Row i of the snapshot is i steps old; keep the newest rows that fit.
  const int64_t len = cfg_.amax_history_len;
  std::vector<float> hist(len * n, 0.0f);
  const int64_t rows = std::min(len, s.history_len);
  std::copy(s.amax_history.begin(), s.amax_history.begin() + rows * n, hist.begin());
  const std::vector<float> zeros(n, 0.0f);
  copy_bytes(history_.data, device(), hist.data(), Device::cpu, history_.nbytes());
  copy_bytes(scale_.data, device(), s.scale.data(), Device::cpu, scale_.nbytes());
  copy_bytes(scale_inv_.data, device(), s.scale_inv.data(), Device::cpu, scale_inv_.nbytes());
  copy_bytes(amax_.data, device(), zeros.data(), Device::cpu, amax_.nbytes());
  refresh_aligned();
}

}  // namespace tessera
