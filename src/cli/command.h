// Registry of `tessera` subcommands on CLI11. Each src/cli/cmd_<name>.cpp registers one command
// with a static Command object whose setup function declares the command's options on its CLI11
// subcommand (each with its meaning and default, which `--help` lists) and returns the function
// that runs it with the parsed values. main() builds the app, parses and maps errors to exit codes.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace tessera::cli {

using RunFn = std::function<int()>;
// Declares options and positionals on `sub`; the returned function owns the parsed values.
using SetupFn = std::function<RunFn(CLI::App& sub)>;

struct Command {
  Command(std::string name, std::string summary, SetupFn setup);
};

struct CommandInfo {
  std::string name;
  std::string summary;
  SetupFn setup;
};
const std::vector<CommandInfo>& commands();

// The RECIPE positional and the repeatable --set KEY=VALUE overrides of commands that read a
// recipe (train, plan); `verb` completes "the YAML recipe to ...".
void add_recipe_options(CLI::App& sub, std::string& recipe_path,
                        std::vector<std::string>& overrides, const std::string& verb);

// Validators whose failure messages name the value (CLI11 prefixes the option's name).
CLI::Validator integer_at_least(long long min);  // an integer >= min
CLI::Validator fraction_below_one();             // a number in [0, 1)

}  // namespace tessera::cli
