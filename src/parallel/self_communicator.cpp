// SelfCommunicator: the one-rank group. Reductions over one rank are the identity; scatter and
// gather are copies unless in and out are the same memory.
#include "parallel/self_communicator.h"

#include <utility>

#include "core/memory.h"
#include "parallel/comm_util.h"

namespace tessera {

using comm_detail::done;

SelfCommunicator::SelfCommunicator(Device device, std::string name)
    : device_(device), name_(std::move(name)) {}

CommHandle SelfCommunicator::all_reduce_async(Tensor t, ReduceOp op) {
  comm_detail::check_tensor(*this, t, "all_reduce");
  return done();
}

CommHandle SelfCommunicator::reduce_scatter_async(Tensor out, Tensor in, ReduceOp op) {
  // With one rank, in (1*n) and out (n) hold the same elements; in place they are one buffer.
  if (!comm_detail::check_reduce_scatter(*this, out, in) && out.numel() > 0) copy_tensor(out, in);
  return done();
}

CommHandle SelfCommunicator::all_gather_async(Tensor out, Tensor in) {
  if (!comm_detail::check_all_gather(*this, out, in) && in.numel() > 0) copy_tensor(out, in);
  return done();
}

CommHandle SelfCommunicator::all_to_all_v_async(Tensor out, const std::vector<int64_t>& recv_counts,
                                                Tensor in,
                                                const std::vector<int64_t>& send_counts) {
  comm_detail::check_all_to_all_v(*this, out, recv_counts, in, send_counts);
  TS_CHECK(in.numel() == out.numel(),
           "all_to_all_v on group '{}' of size 1: sends {} elements to itself but receives {}",
           name_, in.numel(), out.numel());
  if (in.numel() > 0) copy_tensor(out, in);
  return done();
}

CommHandle SelfCommunicator::send_async(Tensor t, int peer, int tag) {
  TS_BUG("send to rank {} on group '{}' of size 1: a one-rank group has no peer", peer, name_);
}

CommHandle SelfCommunicator::recv_async(Tensor t, int peer, int tag) {
  TS_BUG("receive from rank {} on group '{}' of size 1: a one-rank group has no peer", peer, name_);
}

void SelfCommunicator::broadcast(Tensor t, int root) {
  comm_detail::check_tensor(*this, t, "broadcast");
  comm_detail::check_root(*this, root);
}

}  // namespace tessera
