// ParallelContext: one rank's place in the job: the topology, its coordinates, and a communicator
// per parallel group, split from MPI_COMM_WORLD (and, on CUDA, NCCL communicators bootstrapped
// with a unique id broadcast over each MPI group). Built once by the trainer and passed to
// whatever needs to communicate; nothing reads it from a global.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/flight_recorder.h"
#include "parallel/topology.h"

namespace tessera {

// The groups a rank belongs to. `embedding` joins the first and last pipeline stage of one
// pipeline (the two copies of a tied embedding); with pp == 1, and on the middle stages, it holds
// the rank alone. `model` is every rank of one model replica (tp x pp: the ranks with the same dp
// coordinate). `ep` shards experts (ep ranks of one dp group) and `expert_dp` replicates them
// (the dp ranks at the same ep position); with ep = 1 they are the rank alone and its dp group
// (the same communicator as dp, not a second one).
enum class Group { world, tp, dp, pp, embedding, model, ep, expert_dp };
inline constexpr int kNumGroups = 8;
// "world", "tp", "dp", "pp", "embedding", "model", "ep", "expert_dp"
const char* group_name(Group g);

// The global ranks of `rank`'s group g, in group-rank order: tp/dp/pp as Topology::group (so a
// rank's position is its coordinate on that axis), world 0..n-1, embedding {first stage, last
// stage} of rank's pipeline, model ordered by tp_rank + tp * pp_rank, ep and expert_dp as
// Topology::ep_group / expert_dp_group. Pure (no MPI).
std::vector<int> group_ranks(const Topology& topology, Group g, int rank);

class ParallelContext {
 public:
  // Collective over MPI_COMM_WORLD (MPI must be initialized: see mpi_runtime.h). User error when
  // the world size is not tp*dp*pp. With device == cuda, each rank must already have selected its
  // GPU (select_local_gpu) and NCCL communicators are created for every group of more than one
  // rank, in the fixed order of Group, each ordered after the compute stream of
  // kernels/cuda/context.h. Groups of one rank are SelfCommunicators on every backend.
  ParallelContext(ParallelSizes sizes, Device device, const std::string& order = "tp-dp-pp");
  // A single process without MPI: every group is this rank alone (serial runs and unit tests).
  static std::unique_ptr<ParallelContext> single(Device device);
  ~ParallelContext();

  const Topology& topology() const;
  int rank() const;  // global rank
  int world_size() const;
  RankCoord coord() const;
  Device device() const;

  // Moves tensors on the run's device: NCCL on cuda, MPI on cpu.
  Communicator& comm(Group g) const;
  // MPI on host memory whatever the device: scalars, flags, checkpoint gathers.
  Communicator& host_comm(Group g) const;
  // Every distinct communicator of this rank (host and device), for the watchdog (watchdog.h).
  std::vector<Communicator*> communicators() const;
  // Where every communicator of this context records its operations.
  const FlightRecorder& recorder() const;

 private:
  ParallelContext() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera
