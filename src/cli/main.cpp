// `tessera`: entry point. Dispatches to a registered subcommand and maps errors to exit status:
// 0 success, 2 user error (recipe, data, paths), 1 anything else; under MPI a failing rank
// aborts the job with that status.
#include <cstdio>
#include <exception>

#include "cli/command.h"
#include "core/error.h"
#include "parallel/mpi_runtime.h"

namespace tessera::cli {

namespace {
std::vector<CommandInfo>& registry() {
  static std::vector<CommandInfo> r;
  return r;
}
}  // namespace

Command::Command(std::string name, std::string summary, CommandFn run) {
  registry().push_back({std::move(name), std::move(summary), std::move(run)});
}
const std::vector<CommandInfo>& commands() { return registry(); }

}  // namespace tessera::cli

namespace {
// Under MPI with several ranks, a rank that fails ends the whole job (MPI_Abort): its peers would
// otherwise wait forever in their next collective. The MpiRuntime of the command has not
// finalized MPI while the error unwound (see mpi_runtime.h). A lone process just returns.
int fail_job(int code) {
  if (tessera::mpi_active() && tessera::world_size() > 1) tessera::abort_job(code);
  return code;
}

void usage() {
  std::fprintf(stderr, "usage: tessera <command> [args]\n\ncommands:\n");
  for (const auto& c : tessera::cli::commands())
    std::fprintf(stderr, "  %-10s %s\n", c.name.c_str(), c.summary.c_str());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& c : tessera::cli::commands()) {
    if (c.name != name) continue;
    try {
      return c.run(args);
    } catch (const tessera::Error& e) {
      std::fprintf(stderr, "%s\n", e.what());  // already tagged with the rank under MPI
      return fail_job(e.exit_code());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return fail_job(1);
    }
  }
  std::fprintf(stderr, "error: unknown command '%s'\n", name.c_str());
  usage();
  return 2;
}
