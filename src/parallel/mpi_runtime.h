// MPI process runtime: RAII initialization (MpiRuntime), launcher detection, world/local rank
// helpers, job-wide abort, GPU selection per local rank, and TS_MPI_CHECK. Communicators live in
// mpi_communicator.h; nothing here keeps a communicator.
#pragma once
#include <fmt/format.h>
#include <mpi.h>

#include <string>

namespace tessera {

// Initializes MPI unless it is already initialized, asking for MPI_THREAD_MULTIPLE and needing at
// least MPI_THREAD_FUNNELED: the training thread makes every communication call, but the hang
// watchdog (watchdog.h) calls MPI_Abort from its own thread while the training thread is blocked
// inside MPI, which only MULTIPLE allows (with less, the watchdog ends its process with _Exit and
// the launcher ends the job). Open MPI 4.1 and MPICH provide MULTIPLE. Then it switches
// MPI_COMM_WORLD to MPI_ERRORS_RETURN so every failure reaches TS_MPI_CHECK, and tags errors and
// log lines with the world rank when the world has more than one rank. The destructor calls
// MPI_Finalize when this object initialized MPI, except while an exception unwinds or after
// abort_job: MPI_Finalize is collective and would hang on a peer that failed, so main() aborts the
// job instead (see src/cli/main.cpp).
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  bool owns_init_ = false;
  int rank_ = 0;
  int size_ = 1;
};

// True when an MPI launcher (mpirun/mpiexec of Open MPI or MPICH, srun with several tasks)
// started this process, read from the environment the launchers set; MPI need not be initialized.
bool launched_by_mpi_launcher();

// MPI_Init has run and MPI_Finalize has not.
bool mpi_active();
// Rank and size in MPI_COMM_WORLD; 0 and 1 when MPI is not active.
int world_rank();
int world_size();

// This process's rank among the ranks on its node. Read from OMPI_COMM_WORLD_LOCAL_RANK (Open MPI),
// MPI_LOCALRANKID (MPICH's Hydra), then SLURM_LOCALID (srun); else computed with
// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), which is collective over MPI_COMM_WORLD, so every
// rank must call local_rank() at the same point. 0 when MPI is not active. Cached after the first
// call.
int local_rank();

// Where this process runs: "host H cpus L (n) omp T": its host name, the CPUs it may run on
// (sched_getaffinity, as a list like "0-3,8", and their count) and its OpenMP threads
// (omp_get_max_threads; 1 in a build without OpenMP). What a launcher's binding and
// OMP_NUM_THREADS gave the process (srun --cpus-per-task, mpirun --bind-to).
std::string process_placement();

// One line for rank 0's log: "rank 0 <placement>; rank 1 <placement>; ..." for the first
// `max_ranks` ranks of MPI_COMM_WORLD (then how many are not shown). Collective over
// MPI_COMM_WORLD when MPI is active (every rank must call it); "" on ranks other than 0. Without
// MPI, this process's placement.
std::string gather_placements(int max_ranks = 64);

// Ends the whole job: MPI_Abort on MPI_COMM_WORLD when MPI is active with more than one rank (so
// no peer waits forever in a collective), else std::exit(code). Flushes stdout/stderr first.
[[noreturn]] void abort_job(int code);

// For an error every rank meets in the same way (a bad recipe: each rank parses the same text),
// which rank 0 reports and ends the job with: ranks > 0 call this instead of reporting, so the
// message is printed once. Waits (MPI_Ibarrier, polled) for rank 0's abort to end this process;
// if rank 0 has not ended the job after `timeout_s` seconds it ends it itself with `code`.
[[noreturn]] void await_job_end_by_rank0(int code, double timeout_s = 60.0);

// CUDA builds: cudaSetDevice(local_rank() % device count) and returns that device. Warns when
// this rank must share its GPU with a lower local rank (NCCL refuses two ranks of one
// communicator on one GPU, so such a layout fails later for groups joining them). User error when
// no GPU is visible, or in a build without CUDA. Defined in nccl/local_gpu.cpp for CUDA builds.
int select_local_gpu();

// The failure path of TS_MPI_CHECK: a system error with MPI's error string and `context`.
[[noreturn]] void mpi_fail(int code, const char* call, const std::string& context, const char* file,
                           int line);

}  // namespace tessera

// Checks an MPI return code. The variadic part is a fmt format for the context (operation, group,
// element count); it is formatted only on failure.
#define TS_MPI_CHECK(call, ...)                                                               \
  do {                                                                                        \
    const int ts_mpi_rc_ = (call);                                                            \
    if (ts_mpi_rc_ != MPI_SUCCESS) [[unlikely]]                                               \
      ::tessera::mpi_fail(ts_mpi_rc_, #call, ::fmt::format(__VA_ARGS__), __FILE__, __LINE__); \
  } while (0)
