// MpiCommunicator: the Communicator over an MPI communicator, for host memory (the CPU backend,
// CI, and host-side scalars and flags of GPU runs). Non-blocking MPI calls behind every *_async;
// a handle's wait() is MPI_Wait. bf16 and f16, which MPI has no types for, travel as 16-bit words
// and are reduced by user-defined MPI ops that compute in f32 and round to nearest even.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace tessera {

class MpiCommunicator final : public Communicator {
 public:
  // Wraps `comm` (which must use MPI_ERRORS_RETURN, as MpiRuntime sets on MPI_COMM_WORLD and
  // splits inherit). `owned`: this object frees it (a split or dup; never MPI_COMM_WORLD).
  // `recorder` (may be null: no tracking) numbers and records every operation for the watchdog.
  MpiCommunicator(MPI_Comm comm, std::string name, bool owned, FlightRecorder* recorder = nullptr);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::cpu; }
  const std::string& name() const override { return name_; }
  MPI_Comm mpi_comm() const { return comm_; }

  CommHandle all_reduce_async(Tensor t, ReduceOp op) override;
  CommHandle reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) override;
  CommHandle all_gather_async(Tensor out, Tensor in) override;
  // MPI_Ialltoallv: int counts and displacements, so each side holds at most INT_MAX elements.
  CommHandle all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                                const std::vector<int64_t>& send_counts) override;
  CommHandle send_async(Tensor t, int peer, int tag) override;
  CommHandle recv_async(Tensor t, int peer, int tag) override;
  void broadcast(Tensor t, int root) override;
  void barrier() override;
  std::optional<PendingOp> oldest_pending() override { return track_.blocked(); }
  OpTracker& tracker() { return track_; }  // for the requests this communicator hands out

 private:
  MPI_Op mpi_op(DType dtype, ReduceOp op) const;
  int mpi_count(const Tensor& t, const char* what) const;

  MPI_Comm comm_;
  std::string name_;
  bool owned_;
  int rank_ = 0;
  int size_ = 1;
  OpTracker track_;
  // User-defined reductions for the 16-bit floats (created per communicator, freed with it).
  MPI_Op bf16_sum_ = MPI_OP_NULL;
  MPI_Op bf16_max_ = MPI_OP_NULL;
  MPI_Op f16_sum_ = MPI_OP_NULL;
  MPI_Op f16_max_ = MPI_OP_NULL;
};

// The element-wise reductions behind the 16-bit MPI ops, exposed for tests: inout[i] =
// inout[i] (+ or max) in[i], computed in f32 and rounded to nearest even (max is exact). max
// returns the canonical quiet NaN when either side is NaN and +0 for (+0, -0), so it is
// commutative bit for bit, as an MPI op declared commutative must be.
void reduce_bf16(const uint16_t* in, uint16_t* inout, int64_t n, ReduceOp op);
void reduce_f16(const uint16_t* in, uint16_t* inout, int64_t n, ReduceOp op);

}  // namespace tessera
