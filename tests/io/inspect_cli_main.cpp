// Test driver for `tessera inspect`: the command registry and error-to-exit-status mapping of
// src/cli/main.cpp (0 ok, 2 user error, 1 otherwise), linked with cmd_inspect.cpp alone so the io
// tests do not depend on the trainer libraries. Usage: tessera_inspect_cli inspect ARGS...
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cli/command.h"
#include "core/error.h"

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

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& c : tessera::cli::commands()) {
    if (c.name != argv[1]) continue;
    try {
      return c.run(args);
    } catch (const tessera::Error& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return e.exit_code();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "error: unknown command '%s'\n", argv[1]);
  return 2;
}
