// MpiCommunicator: non-blocking MPI collectives and point-to-point on host tensors, the 16-bit
// float reductions as user-defined MPI ops, and in-place variants through MPI_IN_PLACE.
#include "parallel/mpi_communicator.h"

#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "parallel/comm_util.h"
#include "parallel/mpi_runtime.h"

namespace tessera {

namespace {

constexpr uint16_t kBf16QuietNan = 0x7FC0;
constexpr uint16_t kF16QuietNan = 0x7E00;

template <float (*ToF32)(uint16_t), uint16_t (*FromF32)(float), uint16_t kQuietNan>
void reduce_16bit(const uint16_t* in, uint16_t* inout, int64_t n, ReduceOp op) {
  if (op == ReduceOp::sum) {
    // One rounding per pairwise add, as NCCL does for bf16: the f32 sum of two 16-bit values is
    // exact unless their exponents differ by more than f32 can span, so this is round(a + b).
    for (int64_t i = 0; i < n; ++i) inout[i] = FromF32(ToF32(in[i]) + ToF32(inout[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float x = ToF32(in[i]);
    const float y = ToF32(inout[i]);
    if (std::isnan(x) || std::isnan(y)) {
      inout[i] = kQuietNan;
    } else if (x > y || (x == y && std::signbit(y))) {  // equal: prefer +0 over -0
      inout[i] = in[i];
    }
  }
}

// MPI_User_function signatures for MPI_Op_create; the datatype is always MPI_UINT16_T.
template <ReduceOp kOp>
void mpi_bf16(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_bf16(static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), *len, kOp);
}
template <ReduceOp kOp>
void mpi_f16(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_f16(static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), *len, kOp);
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::bf16:
    case DType::f16: return MPI_UINT16_T;  // bit patterns; reduced by the user-defined ops
    default: break;
  }
  TS_BUG("no MPI datatype for {}", dtype_name(t));
}

// A posted non-blocking operation. The context (operation, group, count) is kept unformatted and
// only formatted if MPI_Wait fails. An in-place reduce-scatter leaves its result in chunk 0;
// `move_*` then names the copy to chunk r that completes it.
class MpiRequest final : public CommRequest {
 public:
  MpiRequest(MPI_Request request, const char* op, MpiCommunicator& comm, const OpTicket& ticket,
             const Tensor& t, int peer = -1)
      : request_(request),
        op_(op),
        group_(comm.name()),
        track_(comm.tracker()),
        ticket_(ticket),
        dtype_(t.dtype),
        count_(t.numel()),
        peer_(peer) {}
  ~MpiRequest() override {
    if (done_ || std::uncaught_exceptions() > 0) return;  // see CommRequest
    try {
      wait();
    } catch (const std::exception& e) {
      // A destructor cannot throw; the job cannot go on with a failed transfer either.
      std::fprintf(stderr, "%s\n", e.what());
      abort_job(1);
    }
  }

  void expect_received(MPI_Datatype type, int count) {
    recv_type_ = type;
    recv_count_ = count;
  }
  // Arrays MPI reads until the operation completes (a non-blocking v-collective's counts).
  void keep_until_done(std::vector<int> a, std::vector<int> b, std::vector<int> c,
                       std::vector<int> d) {
    kept_ = {std::move(a), std::move(b), std::move(c), std::move(d)};
  }
  void move_after_wait(void* dst, const void* src, size_t bytes) {
    move_dst_ = dst;
    move_src_ = src;
    move_bytes_ = bytes;
  }

  void wait() override {
    if (done_) return;
    done_ = true;
    MPI_Status status;
    track_.wait_begin(ticket_, op_, count_, peer_);
    const int rc = MPI_Wait(&request_, &status);
    track_.wait_end(ticket_);
    TS_MPI_CHECK(rc, "{} of {} {} elements on group '{}'", op_, count_, dtype_name(dtype_), group_);
    if (recv_count_ >= 0) {
      // MPI accepts a shorter message than the buffer; a pipeline that sent the wrong shape
      // must not go on with stale data in the tail.
      int got = 0;
      TS_MPI_CHECK(MPI_Get_count(&status, recv_type_, &got), "{} on group '{}'", op_, group_);
      TS_CHECK(got == recv_count_, "{} on group '{}': received {} elements, expected {}", op_,
               group_, got, recv_count_);
    }
    if (move_bytes_ > 0) std::memcpy(move_dst_, move_src_, move_bytes_);
  }

 private:
  MPI_Request request_;
  const char* op_;
  const std::string& group_;  // the communicator's name; a handle never outlives it
  OpTracker& track_;
  OpTicket ticket_;
  DType dtype_;
  int64_t count_;
  int peer_;
  bool done_ = false;
  MPI_Datatype recv_type_ = MPI_DATATYPE_NULL;
  int recv_count_ = -1;
  void* move_dst_ = nullptr;
  const void* move_src_ = nullptr;
  size_t move_bytes_ = 0;
  std::vector<std::vector<int>> kept_;
};

// Counts and their running offsets as MPI's ints; false when a count or the total does not fit.
bool to_mpi_counts(const std::vector<int64_t>& counts, std::vector<int>& n, std::vector<int>& at) {
  int64_t offset = 0;
  for (const int64_t c : counts) {
    if (offset > INT_MAX || c > INT_MAX - offset) return false;
    n.push_back(int(c));
    at.push_back(int(offset));
    offset += c;
  }
  return true;
}

}  // namespace

void reduce_bf16(const uint16_t* in, uint16_t* inout, int64_t n, ReduceOp op) {
  reduce_16bit<bf16_bits_to_f32, f32_to_bf16_bits, kBf16QuietNan>(in, inout, n, op);
}

void reduce_f16(const uint16_t* in, uint16_t* inout, int64_t n, ReduceOp op) {
  reduce_16bit<f16_bits_to_f32, f32_to_f16_bits, kF16QuietNan>(in, inout, n, op);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, bool owned,
                                 FlightRecorder* recorder)
    : comm_(comm), name_(std::move(name)), owned_(owned), track_(recorder, name_, "mpi") {
  TS_CHECK(comm_ != MPI_COMM_NULL, "MpiCommunicator '{}' over MPI_COMM_NULL", name_);
  TS_MPI_CHECK(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank on group '{}'", name_);
  TS_MPI_CHECK(MPI_Comm_size(comm_, &size_), "MPI_Comm_size on group '{}'", name_);
  // Commutative (1): MPI may then combine in any order, e.g. along a tree; the ops are
  // commutative bit for bit (see reduce_bf16), so every rank still ends with identical bits.
  TS_MPI_CHECK(MPI_Op_create(&mpi_bf16<ReduceOp::sum>, 1, &bf16_sum_), "creating the bf16 sum op");
  TS_MPI_CHECK(MPI_Op_create(&mpi_bf16<ReduceOp::max>, 1, &bf16_max_), "creating the bf16 max op");
  TS_MPI_CHECK(MPI_Op_create(&mpi_f16<ReduceOp::sum>, 1, &f16_sum_), "creating the f16 sum op");
  TS_MPI_CHECK(MPI_Op_create(&mpi_f16<ReduceOp::max>, 1, &f16_max_), "creating the f16 max op");
}

MpiCommunicator::~MpiCommunicator() {
  // After MPI_Finalize nothing may be freed, and while an error unwinds MPI_Comm_free (collective
  // in the standard) could wait on a failed peer; the process is ending in both cases.
  if (!mpi_active() || std::uncaught_exceptions() > 0) return;
  for (MPI_Op* op : {&bf16_sum_, &bf16_max_, &f16_sum_, &f16_max_}) {
    if (*op != MPI_OP_NULL) MPI_Op_free(op);
  }
  if (owned_) MPI_Comm_free(&comm_);
}

MPI_Op MpiCommunicator::mpi_op(DType dtype, ReduceOp op) const {
  const bool sum = op == ReduceOp::sum;
  if (dtype == DType::bf16) return sum ? bf16_sum_ : bf16_max_;
  if (dtype == DType::f16) return sum ? f16_sum_ : f16_max_;
  return sum ? MPI_SUM : MPI_MAX;
}

int MpiCommunicator::mpi_count(const Tensor& t, const char* what) const {
  // MPI counts are int. Larger host transfers would need chunking; nothing sends that much
  // through host memory (gradients of big models go through NCCL).
  TS_CHECK(t.numel() <= INT_MAX, "{} on group '{}': {} elements exceed MPI's int count", what,
           name_, t.numel());
  return static_cast<int>(t.numel());
}

CommHandle MpiCommunicator::all_reduce_async(Tensor t, ReduceOp op) {
  comm_detail::check_tensor(*this, t, "all_reduce");
  const int count = mpi_count(t, "all_reduce");
  const OpTicket ticket = track_.begin("all_reduce", count);
  if (ticket.skipped) return comm_detail::done();
  MPI_Request request;
  TS_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, t.data, count, mpi_type(t.dtype), mpi_op(t.dtype, op),
                              comm_, &request),
               "all_reduce {} of {} {} elements on group '{}'", reduce_op_name(op), count,
               dtype_name(t.dtype), name_);
  return std::make_unique<MpiRequest>(request, "all_reduce", *this, ticket, t);
}

CommHandle MpiCommunicator::reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) {
  const bool in_place = comm_detail::check_reduce_scatter(*this, out, in);
  const int count = mpi_count(out, "reduce_scatter");
  mpi_count(in, "reduce_scatter");
  const OpTicket ticket = track_.begin("reduce_scatter", count);
  if (ticket.skipped) return comm_detail::done();
  MPI_Request request;
  // MPI_IN_PLACE takes the whole input from the receive buffer and leaves the result in its
  // first chunk; the request then moves it to chunk r (see communicator.h).
  TS_MPI_CHECK(
      MPI_Ireduce_scatter_block(in_place ? MPI_IN_PLACE : in.data, in_place ? in.data : out.data,
                                count, mpi_type(in.dtype), mpi_op(in.dtype, op), comm_, &request),
      "reduce_scatter {} of {} {} elements per rank on group '{}'", reduce_op_name(op), count,
      dtype_name(in.dtype), name_);
  auto handle = std::make_unique<MpiRequest>(request, "reduce_scatter", *this, ticket, out);
  if (in_place && rank_ != 0) handle->move_after_wait(out.data, in.data, out.nbytes());
  return handle;
}

CommHandle MpiCommunicator::all_gather_async(Tensor out, Tensor in) {
  const bool in_place = comm_detail::check_all_gather(*this, out, in);
  const int count = mpi_count(in, "all_gather");
  mpi_count(out, "all_gather");
  const OpTicket ticket = track_.begin("all_gather", count);
  if (ticket.skipped) return comm_detail::done();
  const MPI_Datatype type = mpi_type(in.dtype);
  MPI_Request request;
  // In place, MPI reads this rank's contribution from its chunk of the receive buffer (and ignores
  // the send count and type).
  TS_MPI_CHECK(MPI_Iallgather(in_place ? MPI_IN_PLACE : in.data, count, type, out.data, count, type,
                              comm_, &request),
               "all_gather of {} {} elements per rank on group '{}'", count, dtype_name(in.dtype),
               name_);
  return std::make_unique<MpiRequest>(request, "all_gather", *this, ticket, in);
}

CommHandle MpiCommunicator::all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts,
                                               Tensor in, const std::vector<int64_t>& send_counts) {
  comm_detail::check_all_to_all_v(*this, out, recv_counts, in, send_counts);
  std::vector<int> sn, sat, rn, rat;
  TS_CHECK(to_mpi_counts(send_counts, sn, sat) && to_mpi_counts(recv_counts, rn, rat),
           "all_to_all_v on group '{}': {} / {} elements exceed MPI's int counts", name_,
           in.numel(), out.numel());
  const OpTicket ticket = track_.begin("all_to_all_v", in.numel());
  if (ticket.skipped) return comm_detail::done();
  const MPI_Datatype type = mpi_type(in.dtype);
  MPI_Request request;
  TS_MPI_CHECK(MPI_Ialltoallv(in.data, sn.data(), sat.data(), type, out.data, rn.data(), rat.data(),
                              type, comm_, &request),
               "all_to_all_v of {} -> {} {} elements on group '{}'", in.numel(), out.numel(),
               dtype_name(in.dtype), name_);
  auto handle = std::make_unique<MpiRequest>(request, "all_to_all_v", *this, ticket, in);
  handle->keep_until_done(std::move(sn), std::move(sat), std::move(rn), std::move(rat));
  return handle;
}

CommHandle MpiCommunicator::send_async(Tensor t, int peer, int tag) {
  comm_detail::check_tensor(*this, t, "send");
  comm_detail::check_peer(*this, peer, tag, "send");
  const int count = mpi_count(t, "send");
  const OpTicket ticket = track_.begin("send", count, peer);
  if (ticket.skipped) return comm_detail::done();
  MPI_Request request;
  TS_MPI_CHECK(MPI_Isend(t.data, count, mpi_type(t.dtype), peer, tag, comm_, &request),
               "send of {} {} elements to rank {} (tag {}) on group '{}'", count,
               dtype_name(t.dtype), peer, tag, name_);
  return std::make_unique<MpiRequest>(request, "send", *this, ticket, t, peer);
}

CommHandle MpiCommunicator::recv_async(Tensor t, int peer, int tag) {
  comm_detail::check_tensor(*this, t, "recv");
  comm_detail::check_peer(*this, peer, tag, "recv");
  const int count = mpi_count(t, "recv");
  const OpTicket ticket = track_.begin("recv", count, peer);
  if (ticket.skipped) return comm_detail::done();
  const MPI_Datatype type = mpi_type(t.dtype);
  MPI_Request request;
  TS_MPI_CHECK(MPI_Irecv(t.data, count, type, peer, tag, comm_, &request),
               "receive of {} {} elements from rank {} (tag {}) on group '{}'", count,
               dtype_name(t.dtype), peer, tag, name_);
  auto handle = std::make_unique<MpiRequest>(request, "recv", *this, ticket, t, peer);
  handle->expect_received(type, count);
  return handle;
}

void MpiCommunicator::broadcast(Tensor t, int root) {
  comm_detail::check_tensor(*this, t, "broadcast");
  comm_detail::check_root(*this, root);
  const int count = mpi_count(t, "broadcast");
  const OpTicket ticket = track_.begin("broadcast", count);
  if (ticket.skipped) return;
  track_.wait_begin(ticket, "broadcast", count);
  const int rc = MPI_Bcast(t.data, count, mpi_type(t.dtype), root, comm_);
  track_.wait_end(ticket);
  TS_MPI_CHECK(rc, "broadcast of {} {} elements from rank {} on group '{}'", count,
               dtype_name(t.dtype), root, name_);
}

void MpiCommunicator::barrier() {
  const OpTicket ticket = track_.begin("barrier", 0);
  if (ticket.skipped) return;
  track_.wait_begin(ticket, "barrier", 0);
  const int rc = MPI_Barrier(comm_);
  track_.wait_end(ticket);
  TS_MPI_CHECK(rc, "barrier on group '{}'", name_);
}

}  // namespace tessera
