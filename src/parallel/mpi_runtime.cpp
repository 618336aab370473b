// MPI runtime: init/finalize, launcher detection from the environment, world and node-local
// ranks, job abort, and the TS_MPI_CHECK failure path. GPU selection is in nccl/local_gpu.cpp.
#include "parallel/mpi_runtime.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iterator>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/error.h"
#include "core/log.h"

namespace tessera {

namespace {

// Set by abort_job: a later ~MpiRuntime must not call the collective MPI_Finalize.
std::atomic<bool> g_aborting{false};

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

// Parses a non-negative decimal environment value; -1 when absent or malformed.
int env_int(const char* name) {
  const char* v = env(name);
  if (!v) return -1;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return (*end == '\0' && x >= 0 && x <= (1 << 30)) ? static_cast<int>(x) : -1;
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  TS_MPI_CHECK(MPI_Initialized(&initialized), "querying MPI state");
  if (!initialized) {
    int provided = 0;
    TS_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "initializing MPI");
    owns_init_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      TS_SYSTEM_ERROR("MPI provides thread level {}, Tessera needs MPI_THREAD_FUNNELED ({})",
                      provided, MPI_THREAD_FUNNELED);
    }
  }
  // The default handler (MPI_ERRORS_ARE_FATAL) would kill the job with MPI's own message, without
  // the operation, group and rank that TS_MPI_CHECK adds. Communicators split or duplicated from
  // MPI_COMM_WORLD inherit this handler.
  TS_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN),
               "setting MPI_ERRORS_RETURN on MPI_COMM_WORLD");
  TS_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank on world");
  TS_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size on world");
  // A lone process keeps untagged messages: "[rank 0]" on every error of a serial run is noise.
  if (size_ > 1) set_error_rank(rank_);
  log_set_rank(rank_, size_, false);
}

MpiRuntime::~MpiRuntime() {
  if (!owns_init_ || g_aborting.load() || std::uncaught_exceptions() > 0) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  // Destructors must not throw: report and go on (the process is ending anyway).
  if (MPI_Finalize() != MPI_SUCCESS) log_warn("MPI_Finalize failed on rank {}", rank_);
}

bool launched_by_mpi_launcher() {
  // Open MPI's mpirun, PMIx-based launchers (Open MPI 5, srun --mpi=pmix), MPICH's Hydra (PMI).
  for (const char* name :
       {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS"}) {
    if (env(name)) return true;
  }
  // A batch script also sees SLURM_PROCID (= 0); only a step of several tasks is a parallel launch.
  return env("SLURM_PROCID") && env_int("SLURM_NTASKS") > 1;
}

bool mpi_active() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

int world_rank() {
  if (!mpi_active()) return 0;
  int rank = 0;
  TS_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank on world");
  return rank;
}

int world_size() {
  if (!mpi_active()) return 1;
  int size = 1;
  TS_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size), "MPI_Comm_size on world");
  return size;
}

int local_rank() {
  static int cached = -1;
  if (cached >= 0) return cached;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    const int v = env_int(name);
    if (v >= 0) return cached = v;
  }
  if (!mpi_active()) return 0;
  MPI_Comm node = MPI_COMM_NULL;
  TS_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
               "splitting world by node (MPI_COMM_TYPE_SHARED) to find the local rank");
  int rank = 0;
  TS_MPI_CHECK(MPI_Comm_rank(node, &rank), "MPI_Comm_rank on the node communicator");
  TS_MPI_CHECK(MPI_Comm_free(&node), "freeing the node communicator");
  return cached = rank;
}

std::string process_placement() {
  std::array<char, 256> host{};
  if (gethostname(host.data(), host.size() - 1) != 0 || host[0] == '\0') host = {'?'};
  fmt::memory_buffer cpus;
  int count = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    // Runs of consecutive CPUs as "a-b", joined by commas: "0-3,8".
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (!CPU_ISSET(c, &set)) continue;
      int end = c;
      while (end + 1 < CPU_SETSIZE && CPU_ISSET(end + 1, &set)) ++end;
      fmt::format_to(std::back_inserter(cpus), "{}{}", count > 0 ? "," : "", c);
      if (end > c) fmt::format_to(std::back_inserter(cpus), "-{}", end);
      count += end - c + 1;
      c = end;
    }
  } else {
    fmt::format_to(std::back_inserter(cpus), "?");
  }
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  return fmt::format("host {} cpus {} ({}) omp {}", host.data(), fmt::to_string(cpus), count,
                     threads);
}

std::string gather_placements(int max_ranks) {
  const std::string mine = process_placement();
  if (!mpi_active()) return mine;
  const int rank = world_rank();
  const int size = world_size();
  constexpr int kWidth = 256;  // a fixed slot per rank: one MPI_Gather, no size exchange
  std::array<char, kWidth> slot{};
  std::memcpy(slot.data(), mine.data(), std::min<size_t>(mine.size(), kWidth - 1));
  std::vector<char> all(rank == 0 ? static_cast<size_t>(size) * kWidth : 0);
  TS_MPI_CHECK(
      MPI_Gather(slot.data(), kWidth, MPI_CHAR, all.data(), kWidth, MPI_CHAR, 0, MPI_COMM_WORLD),
      "gathering the ranks' placements (host, CPUs, OpenMP threads)");
  if (rank != 0) return "";
  fmt::memory_buffer out;
  const int shown = std::min(size, max_ranks);
  for (int r = 0; r < shown; ++r) {
    fmt::format_to(std::back_inserter(out), "{}rank {} {}", r > 0 ? "; " : "", r,
                   all.data() + static_cast<size_t>(r) * kWidth);
  }
  if (shown < size)
    fmt::format_to(std::back_inserter(out), "; ({} more ranks not shown)", size - shown);
  return fmt::to_string(out);
}

void abort_job(int code) {
  g_aborting.store(true);
  std::fflush(stdout);
  std::fflush(stderr);
  if (mpi_active() && world_size() > 1) {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this is for an MPI that does
  }
  std::exit(code);
}

void await_job_end_by_rank0(int code, double timeout_s) {
  if (mpi_active() && world_size() > 1) {
    MPI_Request request;
    MPI_Ibarrier(MPI_COMM_WORLD, &request);  // rank 0 never joins: it aborts
    const auto start = std::chrono::steady_clock::now();
    int done = 0;
    while (!done &&
           std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() <
               timeout_s) {
      MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  abort_job(code);
}

#ifndef TESSERA_CUDA
int select_local_gpu() {
  TS_USER_ERROR(
      "a CUDA device was requested but this build has no CUDA backend (configure with "
      "-DTESSERA_CUDA=ON where nvcc is installed)");
}
#endif

void mpi_fail(int code, const char* call, const std::string& context, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  std::string reason;
  if (MPI_Error_string(code, text, &len) == MPI_SUCCESS) {
    reason.assign(text, len);
  } else {
    reason = fmt::format("MPI error code {}", code);
  }
  fail(ErrorKind::system, fmt::format("MPI: {} failed: {} [{}]", context, reason, call), file,
       line);
}

}  // namespace tessera
