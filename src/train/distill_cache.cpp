// `tessera distill-cache`: the windows to cache, the teacher run over them a micro-batch at a
// time, and its top-k rows written in window order.
#include "train/distill_cache.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "config/recipe.h"
#include "core/error.h"
#include "core/log.h"
#include "data/data_blend.h"
#include "data/dataset.h"
#include "data/teacher_cache.h"
#include "kernels/ops.h"
#include "parallel/mpi_runtime.h"
#include "train/run_options.h"
#include "train/teacher.h"

namespace tessera {

namespace {

constexpr const char* kWho = "tessera distill-cache";

Device cache_device(DeviceChoice c) {
  if (c == DeviceChoice::cpu) return Device::cpu;
  if (c == DeviceChoice::cuda && !cuda_available())
    TS_USER_ERROR("{}: --device cuda but no CUDA device is usable here", kWho);
  return cuda_available() ? Device::cuda : Device::cpu;
}

// What to cache: windows (increasing), seq_len, temperatures and precision.
struct CachePlan {
  std::vector<int64_t> windows;
  int seq_len = 0;
  std::vector<float> temperatures;
  TeacherPrecision precision = TeacherPrecision::bf16;
  // An FP8 teacher's delayed scaling: --windows-of's precision.fp8, else its defaults
  // (TransformerEngine's DelayedScaling ones).
  Fp8ScalingConfig fp8_scaling;
};

// The windows a student recipe's run trains on, and its seq_len, temperatures and precision.
void plan_from_recipe(const DistillCacheOptions& o, const TokenDataset& data, CachePlan& p) {
  const Recipe r = load_recipe(o.windows_of, o.overrides);
  if (r.data.mock() || r.data.path.size() != 1 ||
      TokenDataset::open(r.data.path[0].path).content_key() != data.content_key())
    TS_USER_ERROR("{}: --windows-of {} trains on data.path other than --data {}", kWho, r.file,
                  o.data);
  if (o.seq_len > 0 && o.seq_len != r.data.seq_len)
    TS_USER_ERROR("{}: --seq-len {} but --windows-of {} has data.seq_len {}", kWho, o.seq_len,
                  r.file, r.data.seq_len);
  p.seq_len = r.data.seq_len;
  if (!o.precision_given) p.precision = r.distill.teacher_precision;
  p.fp8_scaling = fp8_scaling_config(r.precision.fp8);
  const DataBlend blend = open_data_blend({{r.data.path[0].path, 1.0}}, r.train.seed);
  const Loader loader(blend.train, {r.data.seq_len, r.global_batch(), r.train.seed, 0, 1});
  std::set<int64_t> windows;
  std::set<float> temps;
  for (int64_t step = 0; step < r.train.steps; ++step) {
    const DistillWeights w = curriculum_at(r.distill, step, r.train.steps);
    if (w.alpha <= 0.0f) continue;  // steps without KD read no teacher rows
    temps.insert(w.temperature);
    for (int64_t j = 0; j < r.global_batch(); ++j)
      windows.insert(loader.window_of(step * r.global_batch() + j).window);
  }
  if (windows.empty())
    TS_USER_ERROR("{}: --windows-of {}: no step of its curriculum distils (alpha > 0)", kWho,
                  r.file);
  p.windows.assign(windows.begin(), windows.end());
  if (o.temperatures.empty()) p.temperatures.assign(temps.begin(), temps.end());
}

CachePlan plan_cache(const DistillCacheOptions& o, const TokenDataset& data, const TeacherSpec& t) {
  CachePlan p;
  p.precision = o.precision;
  p.temperatures = o.temperatures;
  if (!o.windows_of.empty()) {
    plan_from_recipe(o, data, p);
  } else {
    p.seq_len = o.seq_len > 0 ? o.seq_len : t.model.max_seq_len;
    const int64_t n = (data.num_tokens("train") - 1) / p.seq_len;
    for (int64_t w = 0; w < n; ++w) p.windows.push_back(w);
  }
  if (p.temperatures.empty()) p.temperatures = {1.0f, 2.0f};
  std::sort(p.temperatures.begin(), p.temperatures.end());
  p.temperatures.erase(std::unique(p.temperatures.begin(), p.temperatures.end()),
                       p.temperatures.end());
  if (p.seq_len > t.model.max_seq_len)
    TS_USER_ERROR("{}: seq_len {} is longer than teacher {}'s model.max_seq_len {}", kWho,
                  p.seq_len, t.dir, t.model.max_seq_len);
  if (p.windows.empty())
    TS_USER_ERROR("{}: --data {} has no train window of {} tokens", kWho, o.data, p.seq_len + 1);
  if (o.top_k < 1 || o.top_k > t.model.vocab_size)
    TS_USER_ERROR("{}: --top-k {} is not in [1, {}] (the vocabulary)", kWho, o.top_k,
                  t.model.vocab_size);
  return p;
}

}  // namespace

void write_teacher_cache(const DistillCacheOptions& o) {
  if (mpi_active() && world_size() > 1)
    TS_USER_ERROR("{} runs as one process (got {} MPI ranks)", kWho, world_size());
  const TokenDataset data = TokenDataset::open(o.data);
  TeacherSpec t = read_teacher_checkpoint(o.teacher, data.tokenizer_hash(), DType::bf16,
                                          fmt::format("{}: --teacher", kWho));
  if (t.model.vocab_size != data.vocab_size())
    TS_USER_ERROR("{}: --teacher {} has model.vocab_size {}, --data {} has {}", kWho, t.dir,
                  t.model.vocab_size, o.data, data.vocab_size());
  const CachePlan p = plan_cache(o, data, t);
  // As the online teacher's (read_teacher_spec): FP8 is bf16 with FP8 block linears.
  t.dtype = p.precision == TeacherPrecision::fp32 ? DType::f32 : DType::bf16;
  t.fp8 = p.precision == TeacherPrecision::fp8;
  t.fp8_scaling = p.fp8_scaling;
  const Device device = cache_device(o.device);
  const int B = o.micro_batch, T = p.seq_len, K = o.top_k, V = t.model.vocab_size;
  const int64_t N = int64_t(B) * T, nT = int64_t(p.temperatures.size());

  TeacherCacheMeta meta;
  meta.top_k = K;
  meta.seq_len = T;
  meta.vocab_size = V;
  meta.dataset_windows = (data.num_tokens("train") - 1) / T;
  meta.temperatures = p.temperatures;
  meta.tokenizer_hash = data.tokenizer_hash();
  meta.dataset_key = data.content_key();
  meta.dataset = o.data;
  meta.teacher = t.dir;
  meta.teacher_precision = to_string(p.precision);
  meta.created_by = "tessera distill-cache";
  const int64_t W = int64_t(p.windows.size());
  log_info("{}: teacher {} ({} parameters, {}) over {} of {} windows of {} tokens, top {}, on {}",
           kWho, t.dir, t.model.num_params(), teacher_precision_name(t), W, meta.dataset_windows, T,
           K, device_name(device));

  Teacher teacher(t, ModelShard{}, device, B, T, ops::AttentionImpl::cudnn);
  const ModelConfig& m = t.model;
  const size_t workspace =
      device == Device::cuda
          ? ops::cuda_workspace_bytes(B, T, m.num_heads, m.num_kv_heads, m.resolved_head_dim(),
                                      t.dtype, ops::AttentionImpl::cudnn)
          : 0;
  Arena arena(device,
              2 * Arena::aligned(size_t(N) * K * 4) + Arena::aligned(size_t(N) * 4) +
                  Arena::aligned(size_t(nT * 2 * N) * 4) + Arena::aligned(workspace),
              "distill-cache rows");
  if (workspace > 0) ops::use_cuda_workspace(arena.alloc_bytes(workspace), workspace);
  const Tensor values = arena.alloc(DType::f32, {N, K}), ids = arena.alloc(DType::i32, {N, K});
  const Tensor tokens = arena.alloc(DType::i32, {B, T}), lse = arena.alloc(DType::f32, {nT, 2, N});
  const std::shared_ptr<const TokenSource> source = data.source("train");
  std::vector<int32_t> host_tokens(static_cast<size_t>(N));
  TeacherRows rows, part;
  TeacherCache::resize(rows, meta, B);
  TeacherCacheWriter writer(o.out, meta, p.windows);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t first = 0; first < W; first += B) {
    const int count = int(std::min<int64_t>(B, W - first));
    std::fill(host_tokens.begin(), host_tokens.end(), 0);  // a short last batch: padding rows
    for (int b = 0; b < count; ++b)
      source->read(p.windows[size_t(first + b)] * T, T, host_tokens.data() + int64_t(b) * T);
    copy_bytes(tokens.data, device, host_tokens.data(), Device::cpu, tokens.nbytes());
    teacher.forward(tokens, Tensor());
    ops::topk_logits(values, ids, lse, teacher.logits(), V, p.temperatures);
    copy_bytes(rows.topk_logits.data(), Device::cpu, values.data, device, values.nbytes());
    copy_bytes(rows.topk_ids.data(), Device::cpu, ids.data, device, ids.nbytes());
    copy_bytes(rows.lse.data(), Device::cpu, lse.data, device, lse.nbytes());
    if (count == B) {
      writer.write(count, rows);
      continue;
    }
    // (nT, 2, B, T) -> (nT, 2, count, T): the padding rows dropped.
    part.topk_logits = rows.topk_logits;
    part.topk_ids = rows.topk_ids;
    part.lse.clear();
    for (int64_t i = 0; i < nT * 2; ++i)
      part.lse.insert(part.lse.end(), rows.lse.begin() + i * N,
                      rows.lse.begin() + i * N + int64_t(count) * T);
    writer.write(count, part);
  }
  writer.commit();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log_info("{}: wrote {} ({} windows, {:.0f} tokens/s)", kWho, o.out, W, double(W) * T / secs);
}

}  // namespace tessera
