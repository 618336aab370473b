// Communicator base pieces: the default device-scalar all-reduce (through a one-element device
// buffer) and the argument checks of comm_util.h that every implementation shares.
#include "parallel/communicator.h"

#include <cstdint>

#include "core/memory.h"
#include "parallel/comm_util.h"

namespace tessera {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::max: return "max";
  }
  TS_BUG("unknown ReduceOp value {}", static_cast<int>(op));
}

double Communicator::all_reduce_scalar_device(double x, ReduceOp op) {
  Buffer buffer(device(), sizeof(double));
  const Tensor t(buffer.data(), DType::f64, device(), {1});
  copy_bytes(buffer.data(), device(), &x, Device::cpu, sizeof(double));
  all_reduce(t, op);
  // On CUDA, wait() ordered the compute (legacy default) stream after the reduction, and this
  // synchronous copy runs on that stream, so it reads the reduced value.
  double result = 0;
  copy_bytes(&result, Device::cpu, buffer.data(), device(), sizeof(double));
  return result;
}

namespace comm_detail {

namespace {

uintptr_t addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  return addr(a.data) < addr(b.data) + b.nbytes() && addr(b.data) < addr(a.data) + a.nbytes();
}

// True when `part` is exactly chunk `idx` of `whole` (same dtype, n = part.numel()).
bool is_chunk(const Tensor& whole, const Tensor& part, int idx) {
  return addr(part.data) == addr(whole.data) + static_cast<uintptr_t>(idx) * part.nbytes();
}

void check_counts(const Communicator& c, const std::vector<int64_t>& counts, const Tensor& t,
                  const char* which) {
  TS_CHECK(int64_t(counts.size()) == c.size(),
           "all_to_all_v on group '{}' (size {}): {} {} counts, expected one per rank", c.name(),
           c.size(), counts.size(), which);
  int64_t total = 0;
  for (const int64_t n : counts) {
    TS_CHECK(n >= 0, "all_to_all_v on group '{}': negative {} count {}", c.name(), which, n);
    total += n;
  }
  TS_CHECK(total == t.numel(), "all_to_all_v on group '{}': {} counts sum to {}, tensor {}",
           c.name(), which, total, t.str());
}

}  // namespace

bool is_comm_dtype(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16 ||
         t == DType::i32;
}

void check_tensor(const Communicator& c, const Tensor& t, const char* op) {
  TS_CHECK(t.device == c.device(), "{} on group '{}': tensor {} is not on {}", op, c.name(),
           t.str(), device_name(c.device()));
  TS_CHECK(is_comm_dtype(t.dtype), "{} on group '{}': dtype {} (f32, f64, bf16, f16, i32)", op,
           c.name(), dtype_name(t.dtype));
  TS_CHECK(!t.empty() || t.numel() == 0, "{} on group '{}': null data for {}", op, c.name(),
           t.str());
}

bool check_reduce_scatter(const Communicator& c, const Tensor& out, const Tensor& in) {
  check_tensor(c, out, "reduce_scatter");
  check_tensor(c, in, "reduce_scatter");
  expect_same_dtype(out, in, "reduce_scatter");
  TS_CHECK(in.numel() == out.numel() * c.size(),
           "reduce_scatter on group '{}' (size {}): in {} is not size x out {}", c.name(), c.size(),
           in.str(), out.str());
  const bool in_place = out.numel() > 0 && is_chunk(in, out, c.rank());
  TS_CHECK(in_place || !overlaps(out, in),
           "reduce_scatter on group '{}': out overlaps in but is not its chunk {}", c.name(),
           c.rank());
  return in_place;
}

bool check_all_gather(const Communicator& c, const Tensor& out, const Tensor& in) {
  check_tensor(c, out, "all_gather");
  check_tensor(c, in, "all_gather");
  expect_same_dtype(out, in, "all_gather");
  TS_CHECK(out.numel() == in.numel() * c.size(),
           "all_gather on group '{}' (size {}): out {} is not size x in {}", c.name(), c.size(),
           out.str(), in.str());
  const bool in_place = in.numel() > 0 && is_chunk(out, in, c.rank());
  TS_CHECK(in_place || !overlaps(out, in),
           "all_gather on group '{}': in overlaps out but is not its chunk {}", c.name(), c.rank());
  return in_place;
}

void check_all_to_all_v(const Communicator& c, const Tensor& out,
                        const std::vector<int64_t>& recv_counts, const Tensor& in,
                        const std::vector<int64_t>& send_counts) {
  check_tensor(c, out, "all_to_all_v");
  check_tensor(c, in, "all_to_all_v");
  expect_same_dtype(out, in, "all_to_all_v");
  check_counts(c, send_counts, in, "send");
  check_counts(c, recv_counts, out, "receive");
  TS_CHECK(!overlaps(out, in), "all_to_all_v on group '{}': in and out overlap", c.name());
}

void check_peer(const Communicator& c, int peer, int tag, const char* op) {
  TS_CHECK(peer >= 0 && peer < c.size() && peer != c.rank(),
           "{} on group '{}' (rank {} of {}): peer {} is not another rank of the group", op,
           c.name(), c.rank(), c.size(), peer);
  TS_CHECK(tag >= 0 && tag <= 32767, "{} on group '{}': tag {} outside [0, 32767]", op, c.name(),
           tag);
}

void check_root(const Communicator& c, int root) {
  TS_CHECK(root >= 0 && root < c.size(), "broadcast on group '{}': root {} outside [0, {})",
           c.name(), root, c.size());
}

}  // namespace comm_detail

}  // namespace tessera
