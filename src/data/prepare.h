// Corpus preparation (`tessera prepare`): text files -> documents -> train/val split -> tokens ->
// the HDF5 token dataset of dataset.h. Optionally trains a BPE vocabulary on the train documents.
// Not here: the HDF5 layout (dataset.h), text decoding (text_normalize.h), tokenization itself.
//
// Inputs: each input is a file or a directory; a directory contributes its *.txt and *.json
// files (not recursive), sorted by name, except a .json whose stem also has a .txt there (the SOTU
// package ships every speech in both forms; the .txt wins). A file is recorded by its base name,
// which must be unique across all inputs.
//
// Documents: each file's normalized text is cut into chunks of roughly doc_chars bytes. From the
// chunk start, the cut goes at the first paragraph boundary (the end of a run of two or more
// newlines) at or after start + doc_chars; failing that, at the first newline; failing that, at
// the first space or tab. A cut must come before start + 2*doc_chars, else the chunk is cut at
// that limit (backed up to a UTF-8 character boundary). A tail shorter than doc_chars / 4 joins
// the chunk before it. Chunks of only whitespace are dropped (their index is still counted).
//
// Split: chunk i of file f goes to val when
//   CounterRng(0, "tessera/prepare/split/" + basename(f)).bits(i) % 1000 < round(val_fraction*1000)
// which depends only on the file's base name, the chunk index and val_fraction (not on the other
// inputs or their order) and spreads val across every book. Documents keep file order, then chunk
// order, in each split.
//
// Streaming: files are read, cut and encoded by a pool of threads and written in file order as
// they finish (tokens go to the HDF5 datasets a chunk at a time), so the output is the same for any
// thread count and memory holds only the files in flight (at most 2 per thread: each file's text
// and tokens), never the corpus or its token stream; a corpus may be larger than memory, one file
// may not. With --train-tokenizer a first pass over the files counts the pre-tokens of the train
// documents: memory then also holds those counts (one entry per distinct pre-token, which grows
// with the vocabulary of words, not the corpus), never the text. Progress goes to stderr.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

struct PrepareOptions {
  std::vector<std::string> inputs;  // files or directories (see above)
  std::string out;                  // the .h5 dataset to write
  std::string tokenizer_spec;       // "gpt2", "qwen3" or a tokenizer.json path
  int train_vocab = 0;              // > 0: train a BPE vocab of this size on the train documents
  std::string tokenizer_out;        // where the trained tokenizer.json goes; default
                                    // <directory of out>/tokenizer.json
  float val_fraction = 0.05f;       // in [0, 1), resolution 0.001
  int doc_chars = 8192;             // target document size in bytes
  int num_threads = 0;              // threads over files; 0 = hardware concurrency (at most 16)
};

struct PrepareSummary {
  int64_t num_files = 0;
  int64_t num_docs[2] = {0, 0};    // train, val
  int64_t num_tokens[2] = {0, 0};  // train, val (eot separators included)
  int64_t num_bytes = 0;           // normalized text bytes
  std::string tokenizer_hash;
  std::string tokenizer_path;  // the trained tokenizer.json, when one was trained
  double encode_seconds = 0.0;
  double seconds = 0.0;
};

// Runs the whole pipeline and logs a summary. Bad options or inputs are user errors. (The command
// line that fills PrepareOptions is src/cli/cmd_prepare.cpp.)
PrepareSummary prepare_dataset(const PrepareOptions& opt);

// --- the pieces, exposed for tests --------------------------------------------------------------

// Expands inputs into the sorted, de-duplicated list of source files described above.
std::vector<std::string> list_source_files(const std::vector<std::string>& inputs);

// Byte ranges [begin, end) of the chunks of `text`, following the rule above (whitespace-only
// chunks included; the caller drops them).
struct Chunk {
  int64_t begin = 0;
  int64_t end = 0;
};
std::vector<Chunk> chunk_text(std::string_view text, int64_t doc_chars);

// Whether chunk `chunk_idx` of the file with base name `file_name` goes to val.
bool chunk_is_val(std::string_view file_name, int64_t chunk_idx, double val_fraction);

}  // namespace tessera
