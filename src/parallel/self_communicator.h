// SelfCommunicator: a group of one rank, usable without MPI (serial runs, unit tests, and size-1
// groups of a parallel run). Collectives are copies or no-ops; point-to-point has no peer, so any
// send or receive is a bug. Arguments are checked as strictly as the real implementations do.
#pragma once
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace tessera {

class SelfCommunicator final : public Communicator {
 public:
  SelfCommunicator(Device device, std::string name);

  int rank() const override { return 0; }
  int size() const override { return 1; }
  Device device() const override { return device_; }
  const std::string& name() const override { return name_; }

  CommHandle all_reduce_async(Tensor t, ReduceOp op) override;
  CommHandle reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) override;
  CommHandle all_gather_async(Tensor out, Tensor in) override;
  CommHandle all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                                const std::vector<int64_t>& send_counts) override;
  CommHandle send_async(Tensor t, int peer, int tag) override;
  CommHandle recv_async(Tensor t, int peer, int tag) override;
  void broadcast(Tensor t, int root) override;
  void barrier() override {}

 protected:
  double all_reduce_scalar_device(double x, ReduceOp op) override { return x; }

 private:
  Device device_;
  std::string name_;
};

}  // namespace tessera
