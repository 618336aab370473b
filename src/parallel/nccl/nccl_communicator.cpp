// NcclCommunicator: NCCL bootstrap over MPI, the stream/event ordering described in the header,
// collectives, point-to-point and grouped point-to-point, and teardown.
#include "parallel/nccl/nccl_communicator.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>

#include "core/log.h"
#include "parallel/comm_util.h"
#include "parallel/mpi_runtime.h"
#include "parallel/nccl/nccl_check.h"

namespace tessera {

namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    default: break;
  }
  TS_BUG("no NCCL datatype for {}", dtype_name(t));
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : ncclMax; }

size_t count_of(const Tensor& t) { return static_cast<size_t>(t.numel()); }

// An operation queued on the communicator's stream; `done_` was recorded right after it, so
// waiting orders the compute stream after this operation only, not after later ones.
class NcclRequest final : public CommRequest {
 public:
  NcclRequest(NcclCommunicator* comm, cudaEvent_t done, const char* op)
      : comm_(comm), done_(done), op_(op) {}
  ~NcclRequest() override {
    if (waited_) return;
    if (std::uncaught_exceptions() > 0) {  // see CommRequest: never wait while unwinding
      comm_->give_event(done_);
      return;
    }
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      abort_job(1);
    }
  }

  void wait() override {
    if (waited_) return;
    waited_ = true;
    // Enqueues the dependency only: the host does not block. The event can go back to the pool
    // at once, because a wait binds to the record that precedes it.
    TS_PAR_CUDA_CHECK(cudaStreamWaitEvent(comm_->compute_stream(), done_, 0),
                      "ordering the compute stream after {} on group '{}'", op_, comm_->name());
    comm_->give_event(done_);
  }

 private:
  NcclCommunicator* comm_;
  cudaEvent_t done_;
  const char* op_;
  bool waited_ = false;
};

}  // namespace

NcclCommunicator::NcclCommunicator(const MpiCommunicator& bootstrap, cudaStream_t compute_stream,
                                   FlightRecorder* recorder)
    : recorder_(recorder),
      compute_(compute_stream),
      name_(bootstrap.name()),
      rank_(bootstrap.rank()),
      size_(bootstrap.size()) {
  // NCCL's environment (NCCL_NVLS_ENABLE and the rest) is the user's and the site's: Tessera sets
  // none of it. Where NVLink SHARP multicast must stay off, the launch scripts say how
  // (launch/README.md).
  TS_PAR_CUDA_CHECK(cudaGetDevice(&cuda_device_), "querying the device for group '{}'", name_);
  ncclUniqueId id{};
  if (rank_ == 0) {
    TS_NCCL_CHECK(ncclGetUniqueId(&id), nullptr, "creating the unique id of group '{}'", name_);
  }
  TS_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, bootstrap.mpi_comm()),
               "broadcasting the NCCL unique id of group '{}'", name_);
  TS_PAR_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                    "creating the stream of group '{}'", name_);
  TS_PAR_CUDA_CHECK(cudaEventCreateWithFlags(&compute_ready_, cudaEventDisableTiming),
                    "creating an event for group '{}'", name_);
  TS_PAR_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(float)), "allocating barrier scratch");
  TS_PAR_CUDA_CHECK(cudaMemset(scratch_, 0, sizeof(float)), "clearing barrier scratch");
  TS_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_), nullptr,
                "joining group '{}' as rank {} of {} on GPU {}", name_, rank_, size_, cuda_device_);
  if (recorder_) group_ = recorder_->add_group(name_, "nccl");
}

NcclCommunicator::~NcclCommunicator() {
  if (aborted_.load()) return;  // the watchdog aborted it and is ending the job
  if (std::uncaught_exceptions() > 0) {
    // An error is on its way to abort the job: a peer may be gone, so neither synchronize nor
    // run the (possibly waiting) regular teardown.
    if (comm_) ncclCommAbort(comm_);
    return;
  }
  // A destructor cannot throw: failures are reported and teardown goes on.
  const auto warn = [this](cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      log_warn("group '{}': {} failed: {}", name_, what, cudaGetErrorString(err));
    }
  };
  if (stream_) warn(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  if (comm_) {
    const ncclResult_t res = ncclCommDestroy(comm_);
    if (res != ncclSuccess) {
      log_warn("group '{}': ncclCommDestroy failed: {}", name_, ncclGetErrorString(res));
    }
  }
  for (cudaEvent_t e : free_events_) warn(cudaEventDestroy(e), "cudaEventDestroy");
  for (cudaEvent_t e : watch_free_) warn(cudaEventDestroy(e), "cudaEventDestroy");
  for (size_t i = in_flight_head_; i < in_flight_.size(); ++i)
    if (in_flight_[i].done) warn(cudaEventDestroy(in_flight_[i].done), "cudaEventDestroy");
  if (compute_ready_) warn(cudaEventDestroy(compute_ready_), "cudaEventDestroy");
  if (stream_) warn(cudaStreamDestroy(stream_), "cudaStreamDestroy");
  if (scratch_) warn(cudaFree(scratch_), "cudaFree");
}

// The last event of `pool`, or a new one when it is empty.
cudaEvent_t NcclCommunicator::pop_event(std::vector<cudaEvent_t>& pool) {
  if (!pool.empty()) {
    const cudaEvent_t e = pool.back();
    pool.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  TS_PAR_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                    "creating an event for group '{}'", name_);
  return e;
}

cudaEvent_t NcclCommunicator::take_event() { return pop_event(free_events_); }

void NcclCommunicator::give_event(cudaEvent_t event) { free_events_.push_back(event); }

OpTicket NcclCommunicator::track(const char* op, int64_t count, int peer) {
  if (!recorder_) return {};
  const OpTicket t = recorder_->begin(group_, op, count, peer);
  if (t.skipped) return t;
  {
    std::lock_guard lock(watch_mu_);
    in_flight_.push_back({t, op, count, peer, recorder_->now_ns(), nullptr});
  }
  maybe_injected_sleep(*recorder_, t, name_);
  return t;
}

void NcclCommunicator::retire_finished() {
  while (in_flight_head_ < in_flight_.size()) {
    const InFlight& f = in_flight_[in_flight_head_];
    // Not yet enqueued, not yet finished, or an error (which the training thread will meet in
    // its own CUDA calls): all count as unfinished.
    if (!f.done || cudaEventQuery(f.done) != cudaSuccess) break;
    recorder_->done(f.ticket);
    watch_free_.push_back(f.done);
    ++in_flight_head_;
  }
  // Compacts in place once the retired front is most of the vector: amortized O(1), and the
  // vector's capacity is kept, so steady state allocates nothing.
  if (in_flight_head_ > 64 && in_flight_head_ * 2 > in_flight_.size()) {
    in_flight_.erase(in_flight_.begin(), in_flight_.begin() + ptrdiff_t(in_flight_head_));
    in_flight_head_ = 0;
  }
}

cudaEvent_t NcclCommunicator::take_watch_event() {
  if (watch_free_.empty()) retire_finished();  // one query in steady state: the GPU keeps up
  return pop_event(watch_free_);
}

void NcclCommunicator::record_watch_event(const OpTicket& ticket) {
  if (ticket.id == 0) return;
  std::lock_guard lock(watch_mu_);
  const cudaEvent_t e = take_watch_event();
  TS_PAR_CUDA_CHECK(cudaEventRecord(e, stream_), "recording a watch event on group '{}'", name_);
  // Batched p2p tracks several operations before enqueueing them: search from the newest.
  for (size_t i = in_flight_.size(); i-- > in_flight_head_;) {
    if (in_flight_[i].ticket.id == ticket.id) {
      in_flight_[i].done = e;
      return;
    }
  }
  TS_BUG("group '{}': operation {} missing from the watchdog's list", name_, ticket.seq);
}

std::optional<PendingOp> NcclCommunicator::oldest_pending() {
  if (!recorder_ || aborted_.load()) return std::nullopt;
  // The watchdog's thread has no current device of its own; events are queried in theirs.
  cudaSetDevice(cuda_device_);
  std::lock_guard lock(watch_mu_);
  retire_finished();
  if (in_flight_head_ == in_flight_.size()) return std::nullopt;
  const InFlight& f = in_flight_[in_flight_head_];
  return PendingOp{f.op, f.ticket.seq, f.count, f.peer, f.since_ns};
}

void NcclCommunicator::abort_for_watchdog() {
  if (comm_ && !aborted_.exchange(true)) ncclCommAbort(comm_);
}

void NcclCommunicator::order_after_compute() {
  // Reusing one event is safe: cudaStreamWaitEvent binds to the record made just before it.
  TS_PAR_CUDA_CHECK(cudaEventRecord(compute_ready_, compute_), "recording the compute stream");
  TS_PAR_CUDA_CHECK(cudaStreamWaitEvent(stream_, compute_ready_, 0),
                    "ordering group '{}' after the compute stream", name_);
}

CommHandle NcclCommunicator::finish(const char* op, const OpTicket& ticket) {
  const cudaEvent_t done = take_event();
  TS_PAR_CUDA_CHECK(cudaEventRecord(done, stream_), "recording the end of {} on group '{}'", op,
                    name_);
  record_watch_event(ticket);
  return std::make_unique<NcclRequest>(this, done, op);
}

CommHandle NcclCommunicator::all_reduce_async(Tensor t, ReduceOp op) {
  comm_detail::check_tensor(*this, t, "all_reduce");
  const OpTicket ticket = track("all_reduce", t.numel());
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(
      ncclAllReduce(t.data, t.data, count_of(t), nccl_type(t.dtype), nccl_op(op), comm_, stream_),
      comm_, "all_reduce {} of {} {} elements on group '{}'", reduce_op_name(op), t.numel(),
      dtype_name(t.dtype), name_);
  return finish("all_reduce", ticket);
}

CommHandle NcclCommunicator::reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) {
  // NCCL's in-place form is exactly ours: recvbuff == sendbuff + rank * recvcount.
  comm_detail::check_reduce_scatter(*this, out, in);
  const OpTicket ticket = track("reduce_scatter", out.numel());
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(ncclReduceScatter(in.data, out.data, count_of(out), nccl_type(in.dtype),
                                  nccl_op(op), comm_, stream_),
                comm_, "reduce_scatter {} of {} {} elements per rank on group '{}'",
                reduce_op_name(op), out.numel(), dtype_name(in.dtype), name_);
  return finish("reduce_scatter", ticket);
}

CommHandle NcclCommunicator::all_gather_async(Tensor out, Tensor in) {
  // In place when sendbuff == recvbuff + rank * sendcount, as ours.
  comm_detail::check_all_gather(*this, out, in);
  const OpTicket ticket = track("all_gather", in.numel());
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(ncclAllGather(in.data, out.data, count_of(in), nccl_type(in.dtype), comm_, stream_),
                comm_, "all_gather of {} {} elements per rank on group '{}'", in.numel(),
                dtype_name(in.dtype), name_);
  return finish("all_gather", ticket);
}

CommHandle NcclCommunicator::all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts,
                                                Tensor in,
                                                const std::vector<int64_t>& send_counts) {
  // Checks first: an error thrown inside a group would leave it open.
  comm_detail::check_all_to_all_v(*this, out, recv_counts, in, send_counts);
  const size_t elem = dtype_size(in.dtype);
  const ncclDataType_t type = nccl_type(in.dtype);
  const OpTicket ticket = track("all_to_all_v", in.numel());
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(ncclGroupStart(), comm_, "starting all_to_all_v on group '{}'", name_);
  int64_t sent = 0, received = 0;
  for (int p = 0; p < size_; ++p) {
    if (send_counts[p] > 0) {
      TS_NCCL_CHECK(ncclSend(static_cast<char*>(in.data) + sent * elem, size_t(send_counts[p]),
                             type, p, comm_, stream_),
                    comm_, "all_to_all_v: send of {} elements to rank {} on group '{}'",
                    send_counts[p], p, name_);
    }
    if (recv_counts[p] > 0) {
      TS_NCCL_CHECK(ncclRecv(static_cast<char*>(out.data) + received * elem, size_t(recv_counts[p]),
                             type, p, comm_, stream_),
                    comm_, "all_to_all_v: receive of {} elements from rank {} on group '{}'",
                    recv_counts[p], p, name_);
    }
    sent += send_counts[p];
    received += recv_counts[p];
  }
  TS_NCCL_CHECK(ncclGroupEnd(), comm_, "ending all_to_all_v on group '{}'", name_);
  return finish("all_to_all_v", ticket);
}

CommHandle NcclCommunicator::send_async(Tensor t, int peer, int tag) {
  comm_detail::check_tensor(*this, t, "send");
  comm_detail::check_peer(*this, peer, tag, "send");
  const OpTicket ticket = track("send", t.numel(), peer);
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(ncclSend(t.data, count_of(t), nccl_type(t.dtype), peer, comm_, stream_), comm_,
                "send of {} {} elements to rank {} on group '{}'", t.numel(), dtype_name(t.dtype),
                peer, name_);
  return finish("send", ticket);
}

CommHandle NcclCommunicator::recv_async(Tensor t, int peer, int tag) {
  comm_detail::check_tensor(*this, t, "recv");
  comm_detail::check_peer(*this, peer, tag, "recv");
  const OpTicket ticket = track("recv", t.numel(), peer);
  if (ticket.skipped) return comm_detail::done();
  order_after_compute();
  TS_NCCL_CHECK(ncclRecv(t.data, count_of(t), nccl_type(t.dtype), peer, comm_, stream_), comm_,
                "receive of {} {} elements from rank {} on group '{}'", t.numel(),
                dtype_name(t.dtype), peer, name_);
  return finish("recv", ticket);
}

std::vector<CommHandle> NcclCommunicator::batch_p2p(const std::vector<P2POp>& ops) {
  // Every check runs before ncclGroupStart: an error thrown inside a group would leave it open.
  for (const P2POp& op : ops) {
    comm_detail::check_tensor(*this, op.tensor, op.send ? "send" : "recv");
    comm_detail::check_peer(*this, op.peer, op.tag, op.send ? "send" : "recv");
  }
  std::vector<CommHandle> handles;
  if (ops.empty()) return handles;
  std::vector<OpTicket> tickets;
  tickets.reserve(ops.size());
  for (const P2POp& op : ops)
    tickets.push_back(track(op.send ? "send" : "recv", op.tensor.numel(), op.peer));
  order_after_compute();
  TS_NCCL_CHECK(ncclGroupStart(), comm_, "starting a group of {} p2p ops on group '{}'", ops.size(),
                name_);
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& op = ops[i];
    const Tensor& t = op.tensor;
    if (tickets[i].skipped) continue;
    if (op.send) {
      TS_NCCL_CHECK(ncclSend(t.data, count_of(t), nccl_type(t.dtype), op.peer, comm_, stream_),
                    comm_, "grouped send of {} {} elements to rank {} on group '{}'", t.numel(),
                    dtype_name(t.dtype), op.peer, name_);
    } else {
      TS_NCCL_CHECK(ncclRecv(t.data, count_of(t), nccl_type(t.dtype), op.peer, comm_, stream_),
                    comm_, "grouped receive of {} {} elements from rank {} on group '{}'",
                    t.numel(), dtype_name(t.dtype), op.peer, name_);
    }
  }
  TS_NCCL_CHECK(ncclGroupEnd(), comm_, "ending a group of {} p2p ops on group '{}'", ops.size(),
                name_);
  for (size_t i = 0; i < ops.size(); ++i)
    handles.push_back(tickets[i].skipped ? comm_detail::done()
                                         : finish(ops[i].send ? "send" : "recv", tickets[i]));
  return handles;
}

void NcclCommunicator::broadcast(Tensor t, int root) {
  comm_detail::check_tensor(*this, t, "broadcast");
  comm_detail::check_root(*this, root);
  const OpTicket ticket = track("broadcast", t.numel());
  if (ticket.skipped) return;
  order_after_compute();
  TS_NCCL_CHECK(
      ncclBroadcast(t.data, t.data, count_of(t), nccl_type(t.dtype), root, comm_, stream_), comm_,
      "broadcast of {} {} elements from rank {} on group '{}'", t.numel(), dtype_name(t.dtype),
      root, name_);
  finish("broadcast", ticket)->wait();
}

void NcclCommunicator::barrier() {
  const OpTicket ticket = track("barrier", 1);
  if (ticket.skipped) return;
  TS_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_), comm_,
                "barrier (one-element all_reduce) on group '{}'", name_);
  record_watch_event(ticket);
  TS_PAR_CUDA_CHECK(cudaStreamSynchronize(stream_), "waiting for the barrier on group '{}'", name_);
}

}  // namespace tessera
