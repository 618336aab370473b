// Communicator test cases shared by the MPI (host) and NCCL (device) test executables: each case
// stages deterministic per-rank inputs on the communicator's device (with guard bytes around every
// buffer), runs one operation, and compares with a reference that every rank computes from all
// ranks' inputs. Pure data movement must be bit-exact; reductions get a justified tolerance.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "parallel/communicator.h"
#include "parallel/parallel_context.h"

namespace tessera::testing {

using Bytes = std::vector<uint8_t>;

// Every dtype a Communicator must move and reduce.
inline constexpr DType kCommDTypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16,
                                        DType::i32};

// Deterministic inputs for (seed, rank, element): `values` are numbers in [-1, 1) rounded to the
// dtype (ints in [-1000, 1000]); `bits` are uniformly random bit patterns (NaNs and all).
Bytes make_values(DType t, uint64_t seed, int rank, int64_t n);
Bytes make_bits(DType t, uint64_t seed, int rank, int64_t n);
double load(DType t, const Bytes& b, int64_t i);

// n elements on a device, with kGuard bytes of a fixed pattern before and after them.
class Staged {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr uint8_t kGuardByte = 0xA5;
  Staged(Device d, DType t, int64_t n);
  Tensor tensor() const;
  void upload(const Bytes& host);
  Bytes download() const;
  bool guards_intact() const;

 private:
  Device device_;
  DType dtype_;
  int64_t n_;
  size_t bytes_;
  Buffer buffer_;
};

void check_all_reduce(Communicator& c, DType t, ReduceOp op, int64_t n, uint64_t seed);
void check_reduce_scatter(Communicator& c, DType t, ReduceOp op, int64_t n, bool in_place,
                          uint64_t seed);
void check_all_gather(Communicator& c, DType t, int64_t n, bool in_place, uint64_t seed);
void check_broadcast(Communicator& c, DType t, int64_t n, uint64_t seed);
// all_to_all_v with uneven per-pair counts in [0, max_count] (zeros included: some pairs send
// nothing), bit-exact against the chunks every rank can compute, then the adjoint call (counts
// swapped) on the result, which must give back the input exactly.
void check_all_to_all_v(Communicator& c, DType t, int64_t max_count, uint64_t seed);
// A ring shift repeated size() + 1 times with two alternating buffers: after step s rank r holds
// rank (r - s) mod size's data. `batched` posts each step's send and receive with batch_p2p;
// otherwise with send_async/recv_async, even group ranks sending first (needed on NCCL, where a
// lone send blocks its stream until the receive is posted).
void check_ring(Communicator& c, DType t, int64_t n, bool batched, uint64_t seed);
// Every group of ctx (comm() when `device_comms`, else host_comm()): size and rank as the
// topology says, and an all_reduce that sums exactly the group's members, in group-rank order.
void check_groups(const ParallelContext& ctx, bool device_comms);

}  // namespace tessera::testing
