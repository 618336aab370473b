// Registry of `tessera` subcommands. Each src/cli/cmd_<name>.cpp registers one command with a
// static Command object; main() dispatches on argv[1].
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace tessera::cli {

using CommandFn = std::function<int(const std::vector<std::string>& args)>;

struct Command {
  Command(std::string name, std::string summary, CommandFn run);
};

struct CommandInfo {
  std::string name;
  std::string summary;
  CommandFn run;
};
const std::vector<CommandInfo>& commands();

}  // namespace tessera::cli
