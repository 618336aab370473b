// ParallelContext: builds one communicator per Group from the pure Topology. Each group becomes
// an MPI_Comm_split of MPI_COMM_WORLD (color = the group's first member, key = the rank's
// position in group_ranks, so MPI's group ranks equal the topology's coordinates); on CUDA an NCCL
// communicator is bootstrapped over each MPI group of more than one rank.
#include "parallel/parallel_context.h"

#include <mpi.h>

#include <algorithm>
#include <array>
#include <utility>

#include "core/error.h"
#include "core/log.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_runtime.h"
#include "parallel/self_communicator.h"
#ifdef TESSERA_CUDA
#include "kernels/op_types.h"
#include "parallel/nccl/nccl_communicator.h"
#endif

namespace tessera {

namespace {

constexpr std::array<Group, kNumGroups> kGroups = {Group::world, Group::tp,        Group::dp,
                                                   Group::pp,    Group::embedding, Group::model,
                                                   Group::ep,    Group::expert_dp};

int idx(Group g) { return static_cast<int>(g); }

// With ep = 1 the expert-dp group is the dp group: its communicators serve both.
bool aliases_dp(const Topology& t, Group g) { return g == Group::expert_dp && t.ep_size() == 1; }

}  // namespace

const char* group_name(Group g) {
  switch (g) {
    case Group::world: return "world";
    case Group::tp: return "tp";
    case Group::dp: return "dp";
    case Group::pp: return "pp";
    case Group::embedding: return "embedding";
    case Group::model: return "model";
    case Group::ep: return "ep";
    case Group::expert_dp: return "expert_dp";
  }
  TS_BUG("unknown Group value {}", static_cast<int>(g));
}

std::vector<int> group_ranks(const Topology& topology, Group g, int rank) {
  switch (g) {
    case Group::world: {
      std::vector<int> all(topology.world_size());
      for (int r = 0; r < topology.world_size(); ++r) all[r] = r;
      return all;
    }
    case Group::tp: return topology.group(Axis::tp, rank);
    case Group::dp: return topology.group(Axis::dp, rank);
    case Group::pp: return topology.group(Axis::pp, rank);
    case Group::embedding: {
      const bool middle = !topology.is_first_stage(rank) && !topology.is_last_stage(rank);
      if (topology.size(Axis::pp) == 1 || middle) return {rank};
      const std::vector<int> pipeline = topology.group(Axis::pp, rank);
      return {pipeline.front(), pipeline.back()};
    }
    case Group::model: {
      // One replica: every (tp, pp) cell with rank's dp coordinate, tp innermost.
      const RankCoord c = topology.coord(rank);
      const int tp = topology.size(Axis::tp);
      std::vector<int> members(tp * topology.size(Axis::pp));
      for (int pp_rank = 0; pp_rank < topology.size(Axis::pp); ++pp_rank) {
        for (int tp_rank = 0; tp_rank < tp; ++tp_rank) {
          members[tp_rank + tp * pp_rank] = topology.rank({tp_rank, c.dp_rank, pp_rank});
        }
      }
      return members;
    }
    case Group::ep: return topology.ep_group(rank);
    case Group::expert_dp: return topology.expert_dp_group(rank);
  }
  TS_BUG("unknown Group value {}", static_cast<int>(g));
}

struct ParallelContext::Impl {
  Impl(Topology t, int r, Device d) : topology(std::move(t)), rank(r), device(d), recorder(r) {}

  Topology topology;
  int rank;
  Device device;
  FlightRecorder recorder;  // before the communicators, which record into it
  // MPI (or self) communicators over host memory, indexed by Group.
  std::array<std::unique_ptr<Communicator>, kNumGroups> host;
  // Device communicators (NCCL or self on cuda); null on the CPU, where host ones serve. Declared
  // after `host` so they are destroyed first: NCCL teardown must not outlive its MPI groups.
  std::array<std::unique_ptr<Communicator>, kNumGroups> dev;
};

ParallelContext::ParallelContext(ParallelSizes sizes, Device device, const std::string& order) {
  TS_CHECK(mpi_active(), "ParallelContext needs MPI initialized (create an MpiRuntime first)");
  int rank = 0;
  int world = 1;
  TS_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank on world");
  TS_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world), "MPI_Comm_size on world");
  // Validates world == tp * dp * pp (a user error naming every size) before any collective, so
  // every rank fails alike and none waits in a split.
  impl_ = std::make_unique<Impl>(Topology(world, sizes, order), rank, device);
  const Topology& topo = impl_->topology;
#ifndef TESSERA_CUDA
  if (device == Device::cuda) {
    TS_USER_ERROR(
        "a CUDA device was requested but this build has no CUDA backend "
        "(configure with -DTESSERA_CUDA=ON)");
  }
#endif

  std::array<MpiCommunicator*, kNumGroups> mpi_groups{};
  for (Group g : kGroups) {
    if (aliases_dp(topo, g)) continue;
    const std::vector<int> members = group_ranks(topo, g, rank);
    const auto it = std::find(members.begin(), members.end(), rank);
    TS_CHECK(it != members.end(), "rank {} missing from its {} group", rank, group_name(g));
    const int key = static_cast<int>(it - members.begin());
    const int num = static_cast<int>(members.size());
    MPI_Comm comm = MPI_COMM_NULL;
    if (g == Group::world) {
      if (num > 1) TS_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "duplicating world");
    } else {
      // Collective over the world even for ranks alone in their group (MPI_UNDEFINED).
      const int color = num > 1 ? members.front() : MPI_UNDEFINED;
      TS_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm),
                   "splitting world into {} groups (color {}, key {})", group_name(g), color, key);
    }
    if (num == 1) {
      impl_->host[idx(g)] = std::make_unique<SelfCommunicator>(Device::cpu, group_name(g));
      continue;
    }
    auto mpi =
        std::make_unique<MpiCommunicator>(comm, group_name(g), /*owned=*/true, &impl_->recorder);
    TS_CHECK(mpi->size() == num && mpi->rank() == key,
             "{} group of rank {}: MPI gave rank {} of {}, topology says {} of {}", group_name(g),
             rank, mpi->rank(), mpi->size(), key, num);
    mpi_groups[idx(g)] = mpi.get();
    impl_->host[idx(g)] = std::move(mpi);
  }

  if (device == Device::cuda) {
#ifdef TESSERA_CUDA
    // The compute stream: the default stream ops run on when given none (ops::Stream{}, the
    // legacy default stream). NCCL calls wait on it and waited handles order it after them.
    const auto compute = static_cast<cudaStream_t>(ops::Stream{}.handle);
    for (Group g : kGroups) {
      if (aliases_dp(topo, g)) continue;
      if (mpi_groups[idx(g)]) {
        impl_->dev[idx(g)] =
            std::make_unique<NcclCommunicator>(*mpi_groups[idx(g)], compute, &impl_->recorder);
      } else {
        impl_->dev[idx(g)] = std::make_unique<SelfCommunicator>(Device::cuda, group_name(g));
      }
    }
#endif
  }
  log_debug("parallel context: rank {} of {}, tp {} dp {} pp {} ep {} (order {}), device {}", rank,
            world, sizes.tp, sizes.dp, sizes.pp, sizes.ep, order, device_name(device));
}

std::unique_ptr<ParallelContext> ParallelContext::single(Device device) {
  std::unique_ptr<ParallelContext> ctx(new ParallelContext());
  ctx->impl_ = std::make_unique<Impl>(Topology(1, ParallelSizes{}), 0, device);
  for (Group g : kGroups) {
    ctx->impl_->host[idx(g)] = std::make_unique<SelfCommunicator>(Device::cpu, group_name(g));
    if (device != Device::cpu) {
      ctx->impl_->dev[idx(g)] = std::make_unique<SelfCommunicator>(device, group_name(g));
    }
  }
  return ctx;
}

ParallelContext::~ParallelContext() = default;

const Topology& ParallelContext::topology() const { return impl_->topology; }
int ParallelContext::rank() const { return impl_->rank; }
int ParallelContext::world_size() const { return impl_->topology.world_size(); }
RankCoord ParallelContext::coord() const { return impl_->topology.coord(impl_->rank); }
Device ParallelContext::device() const { return impl_->device; }

Communicator& ParallelContext::comm(Group g) const {
  if (aliases_dp(impl_->topology, g)) g = Group::dp;
  const auto& dev = impl_->dev[idx(g)];
  return dev ? *dev : *impl_->host[idx(g)];
}

Communicator& ParallelContext::host_comm(Group g) const {
  if (aliases_dp(impl_->topology, g)) g = Group::dp;
  return *impl_->host[idx(g)];
}

std::vector<Communicator*> ParallelContext::communicators() const {
  std::vector<Communicator*> all;
  for (const auto* set : {&impl_->host, &impl_->dev})
    for (const auto& c : *set)
      if (c) all.push_back(c.get());  // null: a device slot on the CPU, or expert_dp aliasing dp
  return all;
}

const FlightRecorder& ParallelContext::recorder() const { return impl_->recorder; }

}  // namespace tessera
