// `tessera`: entry point. Builds the CLI11 app from the registered subcommands, parses, runs the
// chosen one and maps errors to exit status: 0 success (and --help), 2 user error (bad arguments,
// recipe, data, paths), 1 anything else; under MPI a failing rank aborts the job with that status.
#include <cstdio>
#include <exception>
#include <map>
#include <memory>

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

Command::Command(std::string name, std::string summary, SetupFn setup) {
  registry().push_back({std::move(name), std::move(summary), std::move(setup)});
}
const std::vector<CommandInfo>& commands() { return registry(); }

void add_recipe_options(CLI::App& sub, std::string& recipe_path,
                        std::vector<std::string>& overrides, const std::string& verb) {
  sub.add_option("RECIPE", recipe_path, "the YAML recipe to " + verb + " (see docs/RECIPES.md)")
      ->required();
  sub.add_option("--set", overrides,
                 "override one recipe key (section.key=value), e.g. --set train.steps=100; "
                 "repeatable, applied in order after the file")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false);
}

CLI::Validator integer_at_least(long long min) {
  return CLI::Validator(
      [min](std::string& text) -> std::string {
        long long v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return fmt::format("'{}' is not an integer", text);
        if (v < min) return fmt::format("{} is below the minimum {}", text, min);
        return "";
      },
      fmt::format(">= {}", min));
}

CLI::Validator fraction_below_one() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return fmt::format("'{}' is not a number", text);
        if (!(v >= 0.0 && v < 1.0)) return fmt::format("{} is not in [0, 1)", text);
        return "";
      },
      "in [0, 1)");
}

}  // namespace tessera::cli

namespace {

namespace cli = tessera::cli;

// Under MPI with several ranks, a rank that fails ends the whole job (MPI_Abort): its peers would
// otherwise wait forever in their next collective. The MpiRuntime of the command has not
// finalized MPI while the error unwound (see mpi_runtime.h). A lone process just returns.
int fail_job(int code) {
  if (tessera::mpi_active() && tessera::world_size() > 1) tessera::abort_job(code);
  return code;
}

// The innermost subcommand that was given ("tessera tokenizer train" -> train).
const CLI::App* selected(const CLI::App& app) {
  const CLI::App* at = &app;
  while (!at->get_subcommands().empty()) at = at->get_subcommands().front();
  return at;
}

std::string command_path(const CLI::App& app) {
  std::string path;
  for (const CLI::App* at = &app; at; at = at->get_parent())
    path = at->get_name() + (path.empty() ? "" : " " + path);
  return path;
}

// A bad command line: the message names the option and the value (CLI11's or our validators'
// wording), then where the options are listed. User error, exit status 2.
int parse_failure(const CLI::App& app, const CLI::ParseError& e) {
  const std::string where = command_path(*selected(app));
  std::string what = e.what();
  // A mistyped nested command ("tessera tokenizer trian") is left over as an argument while CLI11
  // reports the command as missing: name the word it did not take.
  const std::vector<std::string> left = app.remaining(true);
  if (!left.empty() && dynamic_cast<const CLI::RequiredError*>(&e))
    what += fmt::format(" ('{}' is not one)", left.front());
  std::fprintf(stderr, "%s: %s\nRun '%s --help' for the options.\n", where.c_str(), what.c_str(),
               where.c_str());
  return 2;
}

int run_guarded(const cli::RunFn& run) {
  try {
    return run();
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());  // already tagged with the rank under MPI
    return fail_job(e.exit_code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return fail_job(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("tessera: a distributed trainer for Transformer language models.", "tessera");
  app.require_subcommand(1);
  std::map<const CLI::App*, cli::RunFn> runs;
  for (const cli::CommandInfo& c : cli::commands()) {
    CLI::App* sub = app.add_subcommand(c.name, c.summary);
    runs[sub] = c.setup(*sub);
  }
  // After the subcommands, which would otherwise inherit it.
  app.footer(
      "Exit status: 0 on success, 2 for user errors (arguments, recipe, data, paths), 1 for "
      "anything else.\nRun 'tessera COMMAND --help' for a command's options.");
  // CLI11 reports an unknown command as a missing one; say which word it did not know.
  const auto known = [&](const std::string& name) {
    for (const cli::CommandInfo& c : cli::commands())
      if (c.name == name) return true;
    return false;
  };
  if (argc < 2 || (argv[1][0] != '-' && !known(argv[1]))) {
    if (argc >= 2) std::fprintf(stderr, "tessera: unknown command '%s'\n\n", argv[1]);
    std::fputs(app.help().c_str(), stderr);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);  // the help of the innermost command given
    return 0;
  } catch (const CLI::ParseError& e) {
    return parse_failure(app, e);
  }
  return run_guarded(runs.at(app.get_subcommands().front()));
}
