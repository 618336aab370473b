// `tessera prepare`: tokenizes text files into the HDF5 token dataset that training reads.
// Argument parsing and the pipeline live in src/data/prepare.h; this file only registers the
// command. Bad arguments are user errors (exit status 2, via main()).
#include <cstdio>

#include "cli/command.h"
#include "data/prepare.h"

namespace tessera::cli {

namespace {

int run_prepare(const std::vector<std::string>& args) {
  const std::optional<PrepareOptions> opt = parse_prepare_args(args);
  if (!opt) {
    std::fputs(prepare_usage().c_str(), stdout);
    return 0;
  }
  prepare_dataset(*opt);
  return 0;
}

const Command kPrepareCommand("prepare", "tokenize text files into an HDF5 token dataset",
                              run_prepare);

}  // namespace

}  // namespace tessera::cli
