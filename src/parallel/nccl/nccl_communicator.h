// NcclCommunicator: the Communicator over one NCCL communicator, for device memory. Compiled only
// with TESSERA_CUDA (like everything under src/parallel/nccl). Each communicator owns a
// non-blocking CUDA stream; every operation is ordered after the compute stream with an event,
// and a handle's wait() orders the compute stream after the operation with another event, so the
// host never blocks except in barrier().
#pragma once
#include <cuda_runtime.h>
#include <nccl.h>

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
  // are produced and consumed (the legacy default stream of kernels/cuda/context.h).
  NcclCommunicator(const MpiCommunicator& bootstrap, cudaStream_t compute_stream);
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

  // Used by handles: an event recorded on this stream, returned to the pool after use.
  cudaEvent_t take_event();
  void give_event(cudaEvent_t event);
  cudaStream_t compute_stream() const { return compute_; }

 private:
  void order_after_compute();         // the comm stream waits for work queued so far on compute
  CommHandle finish(const char* op);  // records the completion event; the handle owns it

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
};

}  // namespace tessera
