// make_token_dataset OUT.h5 NUM_TRAIN_TOKENS TOKENIZER.json [SEED]: a synthetic HDF5 token dataset
// of uniform random ids below the tokenizer's vocabulary (documents of 8192 tokens ending in its
// eot), written through TokenDatasetWriter like `tessera prepare` output, with a val split of
// 2^20 tokens. For benchmarks of the data path at sizes no corpus here reaches (bench/data_rss.sh).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "core/sha256.h"
#include "data/dataset.h"
#include "data/progress.h"
#include "data/text_normalize.h"
#include "data/tokenizer.h"

namespace {

constexpr int64_t kDocTokens = 8192;
constexpr int64_t kValTokens = int64_t(1) << 20;

void write_split(tessera::TokenDatasetWriter& w, tessera::Split split, int64_t num_tokens,
                 const tessera::CounterRng& rng, int64_t vocab, int eot) {
  std::vector<uint32_t> doc;
  tessera::ProgressLine progress = tessera::ProgressLine::for_stderr();
  for (int64_t begin = 0; begin < num_tokens; begin += kDocTokens) {
    const int64_t n = std::min(kDocTokens, num_tokens - begin);
    doc.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i)
      doc[size_t(i)] = rng.bits(uint64_t(begin + i)) % uint32_t(vocab);
    if (eot >= 0) doc.back() = uint32_t(eot);
    w.add_document(split, doc);
    progress.update(fmt::format("make_token_dataset: {} {:.3f} G tokens",
                                tessera::split_name(split), (begin + n) / 1e9),
                    begin + n == num_tokens);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr,
                 "usage: make_token_dataset OUT.h5 NUM_TRAIN_TOKENS TOKENIZER.json [SEED]\n");
    return 2;
  }
  try {
    const std::string out = argv[1];
    const int64_t num_tokens = std::atoll(argv[2]);
    const uint64_t seed = argc > 4 ? std::strtoull(argv[4], nullptr, 10) : 1;
    const tessera::Tokenizer tok = tessera::Tokenizer::load_hf_json(argv[3]);
    tessera::TokenDatasetMeta meta;
    meta.tokenizer_json = tok.to_hf_json();
    meta.tokenizer_hash = tok.hash();
    meta.vocab_size = tok.vocab_size();
    meta.eot_id = tok.eot_id();
    meta.split_rule = "synthetic: uniform random ids, documents of 8192 tokens";
    meta.created_by = fmt::format("make_token_dataset {} {} seed {}", num_tokens, argv[3], seed);
    tessera::TokenDatasetWriter w(out, meta.vocab_size);
    write_split(w, tessera::Split::train, num_tokens, tessera::CounterRng(seed, "synthetic/train"),
                meta.vocab_size, meta.eot_id);
    write_split(w, tessera::Split::val, kValTokens, tessera::CounterRng(seed, "synthetic/val"),
                meta.vocab_size, meta.eot_id);
    w.commit(meta);
    std::printf("wrote %s: %lld train tokens, vocab %lld\n", out.c_str(),
                static_cast<long long>(num_tokens), static_cast<long long>(meta.vocab_size));
    return 0;
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return e.exit_code();
  }
}
