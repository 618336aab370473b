// NarrowScope (kernels/cpu/narrow.h): exact widening of bf16/f16 operands to f32 scratch copies
// and one round-to-nearest-even narrowing of the written ones, via core/dtype.h's convert_buffer.
#include "kernels/cpu/narrow.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_common.h"

namespace tessera::cpu {

namespace {

// Element-wise, so the chunking (and the thread count) cannot change a single bit.
void convert_parallel(const void* src, DType src_type, void* dst, DType dst_type, int64_t n) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  const size_t src_elem = dtype_size(src_type), dst_elem = dtype_size(dst_type);
#pragma omp parallel for schedule(static) if (n > kMinParallelWork)
  for (int64_t chunk_idx = 0; chunk_idx < num_chunks; ++chunk_idx) {
    const int64_t begin = chunk_idx * kChunk;
    const int64_t count = std::min(kChunk, n - begin);
    convert_buffer(static_cast<const char*>(src) + begin * src_elem, src_type,
                   static_cast<char*>(dst) + begin * dst_elem, dst_type, count);
  }
}

// Scratch copies outlive their scope in a small pool per thread. A fresh allocation per op call
// would be, for the large operands (the logits: tens of MB), new pages from the kernel zeroed on
// first touch every time: a quarter of a bf16 CPU training step, measured with perf.
class ScratchPool {
 public:
  // A buffer of at least n floats: the smallest pooled one that fits, else a new one.
  std::unique_ptr<float[]> take(size_t n, size_t* capacity) {
    int best = -1;
    for (int i = 0; i < int(free_.size()); ++i)
      if (free_[i].first >= n && (best < 0 || free_[i].first < free_[best].first)) best = i;
    if (best < 0) {
      *capacity = n;
      return std::unique_ptr<float[]>(new float[n]);
    }
    *capacity = free_[best].first;
    std::unique_ptr<float[]> out = std::move(free_[best].second);
    free_.erase(free_.begin() + best);
    return out;
  }
  // Keeps the kMaxPooled largest buffers.
  void give(std::unique_ptr<float[]> buf, size_t capacity) {
    free_.emplace_back(capacity, std::move(buf));
    if (free_.size() <= kMaxPooled) return;
    auto smallest = std::min_element(
        free_.begin(), free_.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    free_.erase(smallest);
  }

 private:
  static constexpr size_t kMaxPooled = 16;
  std::vector<std::pair<size_t, std::unique_ptr<float[]>>> free_;
};

ScratchPool& scratch_pool() {
  thread_local ScratchPool pool;
  return pool;
}

bool same_buffer(const Tensor& a, const Tensor& b) {
  return a.data == b.data && a.dtype == b.dtype && a.nbytes() == b.nbytes();
}

}  // namespace

Tensor NarrowScope::add(const Tensor& t, const char* name, bool written, bool read) {
  if (t.empty()) return t;
  TS_CHECK(!finished_, "{}: operand {} registered after finish()", op_, name);
  check_host(t, op_, name);
  const bool narrow = is_narrow_float(t.dtype);
  Entry* entry = nullptr;
  for (int idx = 0; idx < num_entries_; ++idx) {
    Entry& e = entries_[idx];
    if (same_buffer(e.orig, t)) {
      entry = &e;
      continue;
    }
    // Disjoint scratch copies would turn a partial overlap into "no aliasing" (or write back
    // twice); between two f32 operands the kernel sees the real memory and checks it itself.
    TS_CHECK(!overlaps(e.orig, t) || !(narrow || e.narrow) || !(written || e.written),
             "{}: {} ({}) partially overlaps operand {}; only exact aliasing is supported", op_,
             name, t.str(), e.orig.str());
  }
  if (entry == nullptr) {
    TS_CHECK(num_entries_ < kMaxOperands, "{}: more than {} operands", op_, kMaxOperands);
    entry = &entries_[num_entries_++];
    *entry = Entry{t, false, narrow, false, nullptr, 0};
    if (narrow) {
      // An output the kernel overwrites starts from zeros, so the result never depends on
      // leftover contents; an input is filled by the widening just below.
      entry->scratch = scratch_pool().take(static_cast<size_t>(t.numel()), &entry->capacity);
      if (!read) std::fill_n(entry->scratch.get(), t.numel(), 0.0f);
    }
  }
  entry->written = entry->written || written;
  if (!narrow) return t;
  if (read && !entry->filled) {
    convert_parallel(t.data, t.dtype, entry->scratch.get(), DType::f32, t.numel());
    entry->filled = true;
  }
  return Tensor(entry->scratch.get(), DType::f32, Device::cpu, t.shape);
}

Tensor NarrowScope::stat(const Tensor& t, const char* name, bool written) {
  if (t.empty()) return t;
  TS_CHECK(!is_narrow_float(t.dtype),
           "{}: {} is {}; saved statistics stay f32 (f64 in f64 tests), never 16-bit", op_, name,
           t.str());
  return add(t, name, written, !written);
}

NarrowScope::~NarrowScope() {
  for (int idx = 0; idx < num_entries_; ++idx) {
    Entry& e = entries_[idx];
    if (e.scratch) scratch_pool().give(std::move(e.scratch), e.capacity);
  }
}

void NarrowScope::finish() {
  TS_CHECK(!finished_, "{}: finish() called twice", op_);
  finished_ = true;
  for (int idx = 0; idx < num_entries_; ++idx) {
    const Entry& e = entries_[idx];
    if (!e.narrow || !e.written) continue;
    convert_parallel(e.scratch.get(), DType::f32, e.orig.data, e.orig.dtype, e.orig.numel());
  }
}

}  // namespace tessera::cpu
