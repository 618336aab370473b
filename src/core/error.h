// Three error tiers funnelling into one [[noreturn]] function (tessera::fail):
//   user   — bad recipe, data, path or layout: names the field, the value and the file; exit
//   status 2. bug    — a broken internal invariant (TS_CHECK); says "bug"; exit status 1. system —
//   a failed CUDA/cuBLAS/NCCL/MPI/HDF5/OS call, with file:line and rank; exit status 1.
// Errors are thrown as tessera::Error so tests can catch them; main() maps the tier to the exit
// status, and under MPI a failing rank calls MPI_Abort so no peer hangs. Never use assert().
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace tessera {

enum class ErrorKind { user, bug, system };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const { return kind_; }
  int exit_code() const { return kind_ == ErrorKind::user ? 2 : 1; }

 private:
  ErrorKind kind_;
};

// The one funnel. `where` is "file:line" for bug and system errors, empty for user errors.
[[noreturn]] void fail(ErrorKind kind, const std::string& message, const char* file = nullptr,
                       int line = 0);

// The rank prefixed to system and bug messages (set once MPI is up; -1 = single process).
void set_error_rank(int rank);
int error_rank();

}  // namespace tessera

// User error: the message must name the field/key, the offending value and the file.
#define TS_USER_ERROR(...) ::tessera::fail(::tessera::ErrorKind::user, ::fmt::format(__VA_ARGS__))

// Internal invariant: active in every build type (unlike assert).
#define TS_CHECK(cond, ...)                                                                     \
  do {                                                                                          \
    if (!(cond)) [[unlikely]]                                                                   \
      ::tessera::fail(::tessera::ErrorKind::bug,                                                \
                      ::fmt::format("check failed: {}: {}", #cond, ::fmt::format(__VA_ARGS__)), \
                      __FILE__, __LINE__);                                                      \
  } while (0)

#define TS_BUG(...) \
  ::tessera::fail(::tessera::ErrorKind::bug, ::fmt::format(__VA_ARGS__), __FILE__, __LINE__)

// System call failure (OS, HDF5, MPI, CUDA ...). Library-specific wrappers live beside their users
// (e.g. TS_CUDA_CHECK in kernels/cuda, TS_MPI_CHECK in parallel, TS_H5_CHECK in io).
#define TS_SYSTEM_ERROR(...) \
  ::tessera::fail(::tessera::ErrorKind::system, ::fmt::format(__VA_ARGS__), __FILE__, __LINE__)
