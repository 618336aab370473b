// NcclCommunicator: the Communicator over one NCCL communicator, for device memory. Compiled only
// with TESSERA_CUDA (like everything under src/parallel/nccl). Each communicator owns a
// non-blocking CUDA stream; every operation is ordered after the compute stream with an event,
// and a handle's wait() orders the compute stream after the operation with another event, so the
// host never blocks except in barrier(). For the hang watchdog, each operation also records a
// watch event, which the watchdog's thread queries (cudaEventQuery never blocks): the host never
// waits on it either.
#pragma once
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/mpi_communicator.h"

namespace tessera {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over bootstrap's group: its rank 0 creates the NCCL unique id, MPI broadcasts it,
  // and every member joins with ncclCommInitRank on its current CUDA device (one GPU per rank:
  // NCCL refuses two ranks of one communicator on one GPU). compute_stream is where the tensors
  // are produced and consumed (the legacy default stream of kernels/cuda/context.h). `recorder`
  // (may be null: no tracking) numbers and records every operation for the watchdog.
  NcclCommunicator(const MpiCommunicator& bootstrap, cudaStream_t compute_stream,
                   FlightRecorder* recorder = nullptr);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::cuda; }
  const std::string& name() const override { return name_; }
  cudaStream_t stream() const { return stream_; }

  CommHandle all_reduce_async(Tensor t, ReduceOp op) override;
  CommHandle reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) override;
  CommHandle all_gather_async(Tensor out, Tensor in) override;
  // One group of ncclSend/ncclRecv, a pair per peer with a nonzero count (NCCL's own alltoall
  // pattern); the counts live on the host, so a caller with device-side counts copies them first.
  CommHandle all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                                const std::vector<int64_t>& send_counts) override;
  // NCCL has no tags (checked for range only) and no message sizes: a receive whose size differs
  // from the matching send is undefined, so shapes must agree by construction.
  CommHandle send_async(Tensor t, int peer, int tag) override;
  CommHandle recv_async(Tensor t, int peer, int tag) override;
  // One ncclGroupStart/End around all ops: they progress together, whatever the peers' order.
  std::vector<CommHandle> batch_p2p(const std::vector<P2POp>& ops) override;
  void broadcast(Tensor t, int root) override;
  void barrier() override;
  // From the watchdog's thread: retires the operations whose watch events have fired and returns
  // the oldest one left (enqueued, or still being enqueued when the host blocks inside NCCL).
  std::optional<PendingOp> oldest_pending() override;
  // ncclCommAbort from the watchdog's thread, NCCL's intended use: the kernels waiting on a dead
  // peer return. The job is ended right after, so this communicator is never used again.
  void abort_for_watchdog() override;

  // Used by handles: an event recorded on this stream, returned to the pool after use.
  cudaEvent_t take_event();
  cudaEvent_t pop_event(std::vector<cudaEvent_t>& pool);  // its last event, or a new one
  void give_event(cudaEvent_t event);
  cudaStream_t compute_stream() const { return compute_; }

 private:
  // An operation in the watchdog's list (before it is enqueued: a host that blocks inside the
  // NCCL call is a hang too). May sleep for good under fault injection (op=comm_sleep).
  OpTicket track(const char* op, int64_t count, int peer = -1);
  void order_after_compute();  // the comm stream waits for work queued so far on compute
  // Records the completion event (the handle owns it) and the operation's watch event.
  CommHandle finish(const char* op, const OpTicket& ticket);
  void record_watch_event(const OpTicket& ticket);
  cudaEvent_t take_watch_event();  // under watch_mu_
  void retire_finished();          // under watch_mu_: drops finished entries from the front

  // Watchdog bookkeeping, guarded by watch_mu_ (the training thread takes it for nanoseconds per
  // operation, the watchdog once per poll). Operations of one communicator run in stream order,
  // so they finish in list order and only the front needs querying.
  struct InFlight {
    OpTicket ticket;
    const char* op;
    int64_t count;
    int peer;
    int64_t since_ns;
    cudaEvent_t done;  // null until the operation is enqueued
  };
  FlightRecorder* recorder_ = nullptr;
  std::mutex watch_mu_;
  std::vector<InFlight> in_flight_;  // [in_flight_head_, end) are unfinished
  size_t in_flight_head_ = 0;
  std::vector<cudaEvent_t> watch_free_;
  std::atomic<bool> aborted_{false};

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;  // non-blocking: no implicit sync with the legacy stream
  cudaStream_t compute_ = nullptr;
  cudaEvent_t compute_ready_ = nullptr;
  std::vector<cudaEvent_t> free_events_;
  void* scratch_ = nullptr;  // one float for barrier()
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  int cuda_device_ = 0;
  int group_ = -1;  // in recorder_
};

}  // namespace tessera
