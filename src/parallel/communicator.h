// Communicator: the one interface every collective and point-to-point transfer goes through.
// Two implementations: MPI (host memory, the CPU backend, CI) and NCCL (device memory, GPUs).
//
// Ordering on the GPU: NCCL operations run on the communicator's own stream. Each call first
// makes that stream wait for the work already queued on the compute stream (an event), so the
// data it reads is ready; CommHandle::wait() makes the compute stream wait for the operation (an
// event again), without blocking the host. On MPI every wait() blocks the calling thread.
// Point-to-point: sends and receives between two ranks must be posted in the same order on both
// sides (NCCL has no tags); the tag is checked by MPI and is a debugging aid only. On NCCL a lone
// send blocks its stream until the peer's receive runs, so an exchange where both sides send
// first deadlocks: post such pairs with batch_p2p, which NCCL runs as one group.
// Implementations: mpi_communicator.h, self_communicator.h, nccl/nccl_communicator.h.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/flight_recorder.h"

namespace tessera {

enum class ReduceOp { sum, max };
const char* reduce_op_name(ReduceOp op);  // "sum", "max"

// An operation in flight. wait() is idempotent; destroying an unwaited handle waits, except while
// an exception unwinds (an error is on its way to abort the job, and the wait could hang on a peer
// that failed too). A handle must not outlive its communicator.
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;
};
using CommHandle = std::unique_ptr<CommRequest>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // rank inside this group
  virtual int size() const = 0;
  virtual Device device() const = 0;            // where the tensors it moves live
  virtual const std::string& name() const = 0;  // group name for messages: "tp", "dp", "pp", ...

  // For the hang watchdog (watchdog.h), called from its own thread: this communicator's oldest
  // operation that has not finished (MPI: the one the host is blocked in; NCCL: the oldest whose
  // completion event has not fired), if any. Groups of one rank never wait.
  virtual std::optional<PendingOp> oldest_pending() { return std::nullopt; }
  // The watchdog calls this on every communicator just before it ends the job: release whatever
  // waits on this one (NCCL: ncclCommAbort stops its kernels). MPI's waits end with MPI_Abort.
  virtual void abort_for_watchdog() {}

  // Tensors are contiguous; dtypes f32, f64, bf16, f16, i32 (sum and max on every one of them).
  // all_reduce: in place, every rank ends with the reduction over the group.
  virtual CommHandle all_reduce_async(Tensor t, ReduceOp op) = 0;
  // in (size*n) -> out (n): rank r gets the reduction of chunk r. out may alias chunk r of in
  // (in place); the other chunks of in are then undefined afterwards (MPI reduces in place into
  // chunk 0 and the result is moved to chunk r). Otherwise in is left unchanged.
  virtual CommHandle reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) = 0;
  // in (n) -> out (size*n), chunk r = rank r's in. in may alias chunk rank() of out.
  virtual CommHandle all_gather_async(Tensor out, Tensor in) = 0;
  // All-to-all with per-peer counts (MoE token dispatch and combine). `in` holds size() chunks
  // in rank order, chunk p (send_counts[p] elements) going to rank p; `out` receives size()
  // chunks in rank order, chunk p (recv_counts[p] elements) coming from rank p. Rank r's
  // send_counts[p] must equal rank p's recv_counts[r] (callers exchange counts first); in and out
  // are contiguous, do not overlap and hold exactly the sums. The same call with in/out and the
  // counts swapped is its adjoint, which is how combine undoes dispatch and backward runs.
  virtual CommHandle all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts,
                                        Tensor in, const std::vector<int64_t>& send_counts) = 0;
  // peer is a rank inside this group.
  virtual CommHandle send_async(Tensor t, int peer, int tag) = 0;
  virtual CommHandle recv_async(Tensor t, int peer, int tag) = 0;
  // root's t is copied into every rank's t. On NCCL it is ordered on the compute stream like a
  // waited handle (the host does not block); on MPI it returns when this rank's copy is done.
  virtual void broadcast(Tensor t, int root) = 0;
  // Returns once every rank of the group has called it (the host blocks on every backend).
  virtual void barrier() = 0;

  // Several sends and receives posted together, one handle per op in order (Megatron's
  // batch_isend_irecv). On NCCL they form one ncclGroupStart/End group, which is what keeps a
  // pipeline's "send forward + receive backward" pairs from waiting on each other in stream
  // order (two stages each blocked in a send the other has not yet received: a deadlock).
  struct P2POp {
    bool send = true;
    Tensor tensor;
    int peer = 0;
    int tag = 0;
  };
  virtual std::vector<CommHandle> batch_p2p(const std::vector<P2POp>& ops) {
    std::vector<CommHandle> out;
    for (const P2POp& op : ops)
      out.push_back(op.send ? send_async(op.tensor, op.peer, op.tag)
                            : recv_async(op.tensor, op.peer, op.tag));
    return out;
  }

  void all_reduce(Tensor t, ReduceOp op) { all_reduce_async(t, op)->wait(); }
  void reduce_scatter(Tensor out, Tensor in, ReduceOp op) {
    reduce_scatter_async(out, in, op)->wait();
  }
  void all_gather(Tensor out, Tensor in) { all_gather_async(out, in)->wait(); }
  void all_to_all_v(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                    const std::vector<int64_t>& send_counts) {
    all_to_all_v_async(out, recv_counts, in, send_counts)->wait();
  }
  void send(Tensor t, int peer, int tag) { send_async(t, peer, tag)->wait(); }
  void recv(Tensor t, int peer, int tag) { recv_async(t, peer, tag)->wait(); }
  // Host-side scalar reduction (one double); exact and cheap on MPI. NCCL implementations may
  // route it through a one-element device buffer.
  double all_reduce_scalar(double x, ReduceOp op) {
    Tensor t(&x, DType::f64, Device::cpu, {1});
    if (device() == Device::cpu) {
      all_reduce(t, op);
      return x;
    }
    return all_reduce_scalar_device(x, op);
  }

 protected:
  virtual double all_reduce_scalar_device(double x, ReduceOp op);
};

}  // namespace tessera
