// Internal to src/parallel: argument checks shared by every Communicator implementation (device,
// dtype, shapes, which overlaps between in and out are allowed) and trivial handles. Not part of
// the public interface: callers include communicator.h.
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/communicator.h"

namespace tessera::comm_detail {

// The dtypes every implementation moves and reduces.
bool is_comm_dtype(DType t);

// t lives on c.device() and has a communication dtype; `op` names the operation in the message.
void check_tensor(const Communicator& c, const Tensor& t, const char* op);

// in (size*n) -> out (n). Returns true when out is exactly chunk rank() of in (in place); any
// other overlap of the two is a bug.
bool check_reduce_scatter(const Communicator& c, const Tensor& out, const Tensor& in);
// in (n) -> out (size*n). Returns true when in is exactly chunk rank() of out (in place).
bool check_all_gather(const Communicator& c, const Tensor& out, const Tensor& in);
// in (sum of send_counts) -> out (sum of recv_counts), one non-negative count per rank, no
// overlap between in and out.
void check_all_to_all_v(const Communicator& c, const Tensor& out,
                        const std::vector<int64_t>& recv_counts, const Tensor& in,
                        const std::vector<int64_t>& send_counts);
// peer is inside the group and is not this rank; tag is in [0, 32767] (MPI's guaranteed range).
void check_peer(const Communicator& c, int peer, int tag, const char* op);
void check_root(const Communicator& c, int root);

// A handle with nothing left to wait for (size-1 groups, empty tensors).
class DoneRequest final : public CommRequest {
 public:
  void wait() override {}
};
inline CommHandle done() { return std::make_unique<DoneRequest>(); }

}  // namespace tessera::comm_detail
