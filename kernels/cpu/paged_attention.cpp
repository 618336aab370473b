// Paged attention, CPU reference (kernels/ops_infer.h): each query row attends causally to its
// sequence's cached keys/values, found through the block table. Scores, softmax and sums in double,
// one row at a time (rows in parallel), so a row's output never depends on the other rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_common.h"
#include "kernels/cpu/infer.h"

namespace tessera::cpu {

void paged_attention_forward(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                             Tensor block_tables, Tensor seq, Tensor pos, float scale,
                             int max_context) {
  constexpr const char* kOp = "paged_attention_forward";
  check_compute_dtype(q, kOp, "q");
  TS_CHECK(q.ndim() == 3, "{}: q must be (M,Hq,D), got {}", kOp, q.str());
  check_like(out, q.dtype, q.shape, kOp, "out");
  TS_CHECK(!overlaps(out, q), "{}: out overlaps q", kOp);
  check_float(k_cache, q.dtype, kOp, "k_cache");
  TS_CHECK(k_cache.ndim() == 4 && k_cache.dim(3) == q.dim(2),
           "{}: k_cache must be (NB,BS,Hkv,{}), got {}", kOp, q.dim(2), k_cache.str());
  check_like(v_cache, q.dtype, k_cache.shape, kOp, "v_cache");
  const int64_t num_m = q.dim(0), num_hq = q.dim(1), head_dim = q.dim(2);
  const int64_t num_blocks = k_cache.dim(0), block_size = k_cache.dim(1), num_hkv = k_cache.dim(2);
  TS_CHECK(num_hkv >= 1 && num_hq % num_hkv == 0, "{}: Hq = {} is not a multiple of Hkv = {}", kOp,
           num_hq, num_hkv);
  for (const auto& [t, name] :
       {std::pair{&block_tables, "block_tables"}, std::pair{&seq, "seq"}, std::pair{&pos, "pos"}}) {
    check_host(*t, kOp, name);
    TS_CHECK(t->dtype == DType::i32, "{}: {} must be i32, got {}", kOp, name, t->str());
  }
  TS_CHECK(block_tables.ndim() == 2, "{}: block_tables must be (S,MB), got {}", kOp,
           block_tables.str());
  check_shape(seq, {num_m}, kOp, "seq");
  check_shape(pos, {num_m}, kOp, "pos");
  const int64_t num_seq = block_tables.dim(0), max_blocks = block_tables.dim(1);
  const int32_t* table = block_tables.ptr<int32_t>();
  const int32_t* seq_of = seq.ptr<int32_t>();
  const int32_t* pos_of = pos.ptr<int32_t>();
  // Every index a row will follow, checked before the parallel loop (which must not throw).
  for (int64_t m = 0; m < num_m; ++m) {
    if (pos_of[m] < 0) continue;
    TS_CHECK(int64_t(pos_of[m]) < max_context, "{}: pos[{}] = {} but max_context is {}", kOp, m,
             pos_of[m], max_context);
    TS_CHECK(seq_of[m] >= 0 && seq_of[m] < num_seq, "{}: seq[{}] = {} is outside [0, {})", kOp, m,
             seq_of[m], num_seq);
    const int64_t used_blocks = pos_of[m] / block_size + 1;
    TS_CHECK(used_blocks <= max_blocks, "{}: pos[{}] = {} needs {} blocks, the table has {}", kOp,
             m, pos_of[m], used_blocks, max_blocks);
    for (int64_t j = 0; j < used_blocks; ++j) {
      const int32_t b = table[seq_of[m] * max_blocks + j];
      TS_CHECK(b >= 0 && b < num_blocks, "{}: block_tables[{}, {}] = {} is outside [0, {})", kOp,
               seq_of[m], j, b, num_blocks);
    }
  }
  const int64_t group = num_hq / num_hkv;
  dispatch_float(q.dtype, kOp, [&](auto zero) {
    using T = decltype(zero);
    const T* kc = k_cache.ptr<T>();
    const T* vc = v_cache.ptr<T>();
#pragma omp parallel for schedule(dynamic, 1) if (num_m > 1)
    for (int64_t m = 0; m < num_m; ++m) {
      T* y = out.ptr<T>() + m * num_hq * head_dim;
      if (pos_of[m] < 0) {
        std::fill(y, y + num_hq * head_dim, T(0));
        continue;
      }
      const int64_t context = int64_t(pos_of[m]) + 1;
      std::vector<int64_t> slot(context);  // (context) cache row of each position
      for (int64_t p = 0; p < context; ++p)
        slot[p] =
            int64_t(table[seq_of[m] * max_blocks + p / block_size]) * block_size + p % block_size;
      std::vector<double> weight(context), acc(head_dim);
      for (int64_t h = 0; h < num_hq; ++h) {
        const T* qh = q.ptr<T>() + (m * num_hq + h) * head_dim;
        const int64_t kv_head = h / group;
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t p = 0; p < context; ++p) {
          const T* k = kc + (slot[p] * num_hkv + kv_head) * head_dim;
          double dot = 0.0;
          for (int64_t d = 0; d < head_dim; ++d) dot += double(qh[d]) * double(k[d]);
          weight[p] = double(scale) * dot;
          max_score = std::max(max_score, weight[p]);
        }
        double sum = 0.0;
        for (int64_t p = 0; p < context; ++p) {
          weight[p] = std::exp(weight[p] - max_score);
          sum += weight[p];
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p = 0; p < context; ++p) {
          const T* v = vc + (slot[p] * num_hkv + kv_head) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) acc[d] += weight[p] * double(v[d]);
        }
        for (int64_t d = 0; d < head_dim; ++d) y[h * head_dim + d] = T(acc[d] / sum);
      }
    }
  });
}

}  // namespace tessera::cpu
