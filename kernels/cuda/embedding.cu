// CUDA token embedding plus optional learned positions (GPT-2 wte/wpe), forward and backward,
// also vocabulary-parallel: wte may be the rows [vocab_start, vocab_start + Vl) of a
// (vocab_total, C) table; tokens of other shards read as a zero row and add nothing to dwte.
// Shapes: B batch, T time, C channels, Vl rows of wte, maxT rows of wpe (T <= maxT).
// The backward is deterministic without float atomics: positions are stably sorted by token id
// (CUB radix sort in the workspace), then one block per distinct token sums its positions' rows
// in position order and adds the sum to that dwte row once; dwpe sums over the batch in order.
// Token ids stay on the device and are not checked on the host (that would synchronize): an id
// outside [0, vocab_total) makes its output row NaN in the forward and is skipped by the backward.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/memory_bound.cuh"

namespace tessera::cuda {

namespace {

// ---- kernels ---------------------------------------------------------------------------------

// One pack of kWidth channels per item: out[row, :] = wte[tokens[row], :] + wpe[row % T, :],
// with a zero wte row for tokens of other shards.
template <class T, int kWidth>
__global__ void __launch_bounds__(kBlock)
    embedding_forward_kernel(T* out, const int32_t* tokens, const T* wte, const T* wpe,
                             int64_t num_rows, int64_t num_t, int num_c, int64_t vocab_start,
                             int64_t num_local, int64_t vocab_total) {
  const int packs_per_row = num_c / kWidth;
  const int64_t total = num_rows * packs_per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs_per_row;
    const int c = static_cast<int>(i % packs_per_row) * kWidth;
    const int32_t token = tokens[row];
    const int64_t local = int64_t(token) - vocab_start;
    Pack<T, kWidth> y;
    if (token < 0 || token >= vocab_total) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y.v[j] = from_f32<T>(NAN);
    } else if (local < 0 || local >= num_local) {  // another tp rank's row: zero, plus wpe
      if (wpe != nullptr) {
        y = load_pack<T, kWidth>(wpe + (row % num_t) * num_c + c);
      } else {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) y.v[j] = from_f32<T>(0.0f);
      }
    } else {
      y = load_pack<T, kWidth>(wte + local * num_c + c);
      if (wpe != nullptr) {
        const Pack<T, kWidth> p = load_pack<T, kWidth>(wpe + (row % num_t) * num_c + c);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) y.v[j] = from_f32<T>(to_f32(y.v[j]) + to_f32(p.v[j]));
      }
    }
    store_pack<T, kWidth>(out + row * num_c + c, y);
  }
}

// dst[0, kWidth) += acc in TW (the gradient's dtype: T, or float for an FP32 main gradient), in
// 16-byte packs of TW: kWidth T values are one pack, kWidth floats beside 16-bit T are two.
template <class TW, int kWidth>
__device__ __forceinline__ void add_to_row(TW* dst, const float (&acc)[kWidth]) {
  constexpr int kSub = kWidth * int(sizeof(TW)) > kPackBytes ? kVecWidth<TW> : kWidth;
#pragma unroll
  for (int s = 0; s < kWidth; s += kSub) {
    Pack<TW, kSub> w = load_pack<TW, kSub>(dst + s);
#pragma unroll
    for (int k = 0; k < kSub; ++k) w.v[k] = from_f32<TW>(to_f32(w.v[k]) + acc[s + k]);
    store_pack<TW, kSub>(dst + s, w);
  }
}

__global__ void __launch_bounds__(kBlock) iota_kernel(int32_t* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = static_cast<int32_t>(i);
}

// Block i handles the group of equal tokens that starts at sorted index i (other blocks exit):
// dwte[token - vocab_start, :] += sum of dout[positions of the group, :], summed in position
// order in f32. Groups of other shards' tokens (and of invalid ids) exit at once.
template <class T, class TW, int kWidth>
__global__ void __launch_bounds__(kBlock)
    embedding_backward_wte_kernel(TW* dwte, const T* dout, const int32_t* sorted_tokens,
                                  const int32_t* sorted_rows, int64_t num_rows, int num_c,
                                  int64_t vocab_start, int64_t num_local) {
  const int64_t begin = blockIdx.x;
  const int32_t token = sorted_tokens[begin];
  if (begin > 0 && sorted_tokens[begin - 1] == token) return;
  const int64_t local = int64_t(token) - vocab_start;
  if (local < 0 || local >= num_local) return;
  int64_t end = begin + 1;
  while (end < num_rows && sorted_tokens[end] == token) ++end;
  const int packs_per_row = num_c / kWidth;
  TW* dw_row = dwte + local * num_c;
  for (int p = threadIdx.x; p < packs_per_row; p += kBlock) {
    float acc[kWidth] = {};
#pragma unroll 4
    for (int64_t j = begin; j < end; ++j) {
      const Pack<T, kWidth> d =
          load_pack<T, kWidth>(dout + int64_t(sorted_rows[j]) * num_c + p * kWidth);
#pragma unroll
      for (int k = 0; k < kWidth; ++k) acc[k] += to_f32(d.v[k]);
    }
    add_to_row<TW, kWidth>(dw_row + p * kWidth, acc);
  }
}

// dwpe[t, :] += sum over b of dout[b, t, :], in batch order; one pack per item.
template <class T, class TW, int kWidth>
__global__ void __launch_bounds__(kBlock)
    embedding_backward_wpe_kernel(TW* dwpe, const T* dout, int64_t num_b, int64_t num_t,
                                  int num_c) {
  const int packs_per_row = num_c / kWidth;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_t * packs_per_row) return;
  const int64_t t = i / packs_per_row;
  const int c = static_cast<int>(i % packs_per_row) * kWidth;
  float acc[kWidth] = {};
  for (int64_t b = 0; b < num_b; ++b) {
    const Pack<T, kWidth> d = load_pack<T, kWidth>(dout + (b * num_t + t) * num_c + c);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) acc[k] += to_f32(d.v[k]);
  }
  add_to_row<TW, kWidth>(dwpe + t * num_c + c, acc);
}

// ---- launchers ------------------------------------------------------------------------------

// Checks shared by forward and backward; `table` is wte or dwte, `pos` is wpe or dwpe, `acts` out
// or dout. In the backward the gradients dwte and dwpe may be f32 beside 16-bit dout (FP32 main
// gradients). Returns the size of the whole vocabulary (vocab_total, or Vl when it is -1).
int64_t check_embedding(const Tensor& acts, const Tensor& tokens, const Tensor& table,
                        const Tensor& pos, int64_t vocab_start, int64_t vocab_total, const char* op,
                        const char* acts_name, const char* table_name, const char* pos_name,
                        bool backward) {
  expect_compute_dtype(table, op, table_name);
  const DType acts_dtype = backward && table.dtype == DType::f32 ? acts.dtype : table.dtype;
  if (backward) expect_compute_dtype(acts, op, acts_name);
  TS_CHECK(table.ndim() == 2, "{}: {} must be (V, C), got {}", op, table_name, table.str());
  TS_CHECK(!tokens.empty() && tokens.device == Device::cuda && tokens.dtype == DType::i32 &&
               tokens.ndim() == 2,
           "{}: tokens must be an i32 cuda tensor (B, T), got {}", op, tokens.str());
  const int64_t num_b = tokens.dim(0), num_t = tokens.dim(1), num_c = table.dim(1);
  TS_CHECK(num_c < (int64_t(1) << 30), "{}: C = {} is too large", op, num_c);
  expect_tensor(acts, acts_dtype, Shape{num_b, num_t, num_c}, op, acts_name);
  if (!pos.empty()) {
    TS_CHECK(pos.device == Device::cuda && pos.dtype == table.dtype && pos.ndim() == 2 &&
                 pos.dim(1) == num_c && pos.dim(0) >= num_t,
             "{}: {} must be ({}, maxT, C={}) with maxT >= T={}, got {}", op, pos_name,
             dtype_name(table.dtype), num_c, num_t, pos.str());
  }
  const int64_t num_local = table.dim(0);
  if (vocab_total == -1) vocab_total = num_local;
  TS_CHECK(vocab_start >= 0 && vocab_total >= 1 && vocab_start + num_local <= vocab_total,
           "{}: the shard [vocab_start = {}, + Vl = {}) does not fit in vocab_total = {}", op,
           vocab_start, num_local, vocab_total);
  return vocab_total;
}

bool use_packs(int64_t num_c, int width, std::initializer_list<const Tensor*> tensors) {
  if (num_c % width != 0) return false;
  for (const Tensor* t : tensors)
    if (!t->empty() && !is_aligned(t->data)) return false;
  return true;
}

// T: dout's type; TW: dwte's and dwpe's (T, or float for FP32 main gradients).
template <class T, class TW, int kWidth>
void backward_impl(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                   int64_t vocab_start, cudaStream_t stream) {
  const int64_t num_b = tokens.dim(0), num_t = tokens.dim(1), num_rows = tokens.numel();
  const int num_c = static_cast<int>(dwte.dim(1));
  const auto* d = static_cast<const T*>(dout.data);

  // Workspace: rows (N), sorted tokens (N), sorted rows (N), then CUB's temporary storage.
  Context& ctx = context();
  auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t ids_bytes = align(sizeof(int32_t) * num_rows);
  auto* base = static_cast<char*>(ctx.workspace);
  auto* rows = reinterpret_cast<int32_t*>(base);
  auto* sorted_tokens = reinterpret_cast<int32_t*>(base + ids_bytes);
  auto* sorted_rows = reinterpret_cast<int32_t*>(base + 2 * ids_bytes);
  void* temp = base + 3 * ids_bytes;
  size_t temp_bytes = 0;
  const auto* tok = static_cast<const int32_t*>(tokens.data);
  TS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, tok, sorted_tokens, rows,
                                                sorted_rows, num_rows, 0, 32, stream));
  TS_CHECK(3 * ids_bytes + temp_bytes <= ctx.workspace_bytes,
           "embedding_backward: {} tokens need {} bytes of workspace, have {}", num_rows,
           3 * ids_bytes + temp_bytes, ctx.workspace_bytes);
  iota_kernel<<<ceil_div(num_rows, kBlock), kBlock, 0, stream>>>(rows, num_rows);
  TS_CUDA_CHECK_LAUNCH();
  // Radix sort is stable: equal tokens keep position order, the order the sums are taken in.
  TS_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tok, sorted_tokens, rows,
                                                sorted_rows, num_rows, 0, 32, stream));
  embedding_backward_wte_kernel<T, TW, kWidth>
      <<<num_rows, kBlock, 0, stream>>>(static_cast<TW*>(dwte.data), d, sorted_tokens, sorted_rows,
                                        num_rows, num_c, vocab_start, dwte.dim(0));
  TS_CUDA_CHECK_LAUNCH();
  if (!dwpe.empty()) {
    const int64_t work = num_t * (num_c / kWidth);
    embedding_backward_wpe_kernel<T, TW, kWidth><<<ceil_div(work, kBlock), kBlock, 0, stream>>>(
        static_cast<TW*>(dwpe.data), d, num_b, num_t, num_c);
    TS_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe, int64_t vocab_start,
                       int64_t vocab_total, ops::Stream stream) {
  constexpr const char* kOp = "embedding_forward";
  vocab_total = check_embedding(out, tokens, wte, wpe, vocab_start, vocab_total, kOp, "out", "wte",
                                "wpe", /*backward=*/false);
  TS_CHECK(!overlaps(out, wte) && !overlaps(out, wpe) && !overlaps(out, tokens),
           "{}: out must not alias an input", kOp);
  const int64_t num_rows = tokens.numel(), num_c = wte.dim(1);
  if (num_rows == 0 || num_c == 0) return;
  dispatch_float(wte, kOp, [&]<class T>() {
    auto launch = [&]<int kWidth>() {
      embedding_forward_kernel<T, kWidth>
          <<<grid_for(num_rows * (num_c / kWidth)), kBlock, 0, cuda_stream(stream)>>>(
              static_cast<T*>(out.data), static_cast<const int32_t*>(tokens.data),
              static_cast<const T*>(wte.data),
              wpe.empty() ? nullptr : static_cast<const T*>(wpe.data), num_rows, tokens.dim(1),
              int(num_c), vocab_start, wte.dim(0), vocab_total);
      TS_CUDA_CHECK_LAUNCH();
    };
    if (use_packs(num_c, kVecWidth<T>, {&out, &wte, &wpe}))
      launch.template operator()<kVecWidth<T>>();
    else
      launch.template operator()<1>();
  });
}

void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens, int64_t vocab_start,
                        int64_t vocab_total, ops::Stream stream) {
  constexpr const char* kOp = "embedding_backward";
  check_embedding(dout, tokens, dwte, dwpe, vocab_start, vocab_total, kOp, "dout", "dwte", "dwpe",
                  /*backward=*/true);
  TS_CHECK(!overlaps(dwte, dwpe) && !overlaps(dwte, dout) && !overlaps(dwpe, dout),
           "{}: dwte, dwpe and dout must be distinct buffers", kOp);
  TS_CHECK(tokens.numel() < (int64_t(1) << 31), "{}: {} tokens are too many for one call", kOp,
           tokens.numel());
  if (tokens.numel() == 0 || dwte.dim(1) == 0) return;
  dispatch_float(dout, kOp, [&]<class T>() {
    dispatch_param_grad<T>(dwte, [&]<class TW>() {
      if (use_packs(dwte.dim(1), kVecWidth<T>, {&dwte, &dwpe, &dout}))
        backward_impl<T, TW, kVecWidth<T>>(dwte, dwpe, dout, tokens, vocab_start,
                                           cuda_stream(stream));
      else
        backward_impl<T, TW, 1>(dwte, dwpe, dout, tokens, vocab_start, cuda_stream(stream));
    });
  });
}

}  // namespace tessera::cuda
