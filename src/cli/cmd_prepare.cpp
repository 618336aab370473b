// `tessera prepare`: tokenizes text files into the HDF5 token dataset that training reads. This
// file declares the command line; the pipeline and the rules it follows are src/data/prepare.h,
// which also checks the combination of options (bad ones are user errors, exit status 2).
#include <memory>

#include "cli/command.h"
#include "data/prepare.h"

namespace tessera::cli {
namespace {

void add_tokenizer_options(CLI::App& sub, PrepareOptions& opt) {
  CLI::Option* spec = sub.add_option("--tokenizer", opt.tokenizer_spec,
                                     "encode with this tokenizer: gpt2, qwen3 (read from "
                                     "data/raw/, see scripts/fetch-data.sh) or a tokenizer.json "
                                     "path; give this or --train-tokenizer")
                          ->type_name("SPEC");
  CLI::Option* train = sub.add_option("--train-tokenizer", opt.train_vocab,
                                      "train a byte-level BPE vocabulary of N tokens (256 bytes + "
                                      "merges + <|endoftext|>) on the train documents and encode "
                                      "with it")
                           ->type_name("N")
                           ->check(integer_at_least(1));
  spec->excludes(train);
  sub.add_option("--tokenizer-out", opt.tokenizer_out,
                 "where the trained tokenizer.json goes [default: tokenizer.json beside --out]")
      ->type_name("PATH")
      ->needs(train);
}

RunFn setup_prepare(CLI::App& sub) {
  auto opt = std::make_shared<PrepareOptions>();
  add_tokenizer_options(sub, *opt);
  sub.add_option("--out", opt->out, "the HDF5 token dataset to write (atomically)")
      ->type_name("FILE")
      ->required();
  sub.add_option("--val-fraction", opt->val_fraction,
                 "share of documents held out for validation (chosen by a hash of file name and "
                 "document index)")
      ->type_name("F")
      ->check(fraction_below_one())
      ->capture_default_str();
  sub.add_option("--doc-chars", opt->doc_chars,
                 "target document size in bytes (cut at the next paragraph boundary)")
      ->type_name("N")
      ->check(integer_at_least(1))
      ->capture_default_str();
  sub.add_option("--threads", opt->num_threads,
                 "worker threads reading and encoding files (0: all cores, at most 16)")
      ->type_name("N")
      ->check(integer_at_least(0))
      ->capture_default_str();
  sub.add_option("INPUTS", opt->inputs,
                 ".txt and .json (SOTU) files, or directories holding them (not recursive); put "
                 "-- before the first input if a name starts with '-'")
      ->required();
  return [opt] {
    prepare_dataset(*opt);
    return 0;
  };
}

const Command kPrepare("prepare", "tokenize text files into an HDF5 token dataset", setup_prepare);

}  // namespace
}  // namespace tessera::cli
