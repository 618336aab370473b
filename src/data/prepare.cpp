// `tessera prepare`: sources -> documents -> train/val -> tokens -> HDF5 (rules in prepare.h).
#include "data/prepare.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <filesystem>
#include <map>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "core/sha256.h"
#include "data/bpe_trainer.h"
#include "data/dataset.h"
#include "data/text_normalize.h"
#include "data/tokenizer.h"
#include "data/tokenizer_spec.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;

constexpr int kMaxThreads = 16;
constexpr const char* kEotText = "<|endoftext|>";

enum SplitIdx { kTrain = 0, kVal = 1 };
constexpr const char* kSplitNames[2] = {"train", "val"};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool has_source_extension(const fs::path& p) {
  return p.extension() == ".txt" || p.extension() == ".json";
}

struct Document {
  std::string_view text;  // a view into its file's normalized text
  int64_t chunk_idx = 0;
  int file_idx = 0;
};

// Encodes every document with `tok` (documents are independent, so they are spread over threads)
// and lays them out as dataset.h documents: tokens then the eot separator.
TokenSplit encode_documents(const Tokenizer& tok, const std::vector<Document>& docs,
                            int num_threads) {
  std::vector<std::vector<int32_t>> ids(docs.size());
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(num_threads));
  const auto work = [&](int thread_idx) {
    try {
      for (size_t d = next++; d < docs.size(); d = next++) {
        // allow_special = false: corpus text that happens to spell "<|endoftext|>" stays text.
        ids[d] = tok.encode(docs[d].text, /*allow_special=*/false);
      }
    } catch (...) {
      errors[static_cast<size_t>(thread_idx)] = std::current_exception();
      next = docs.size();  // stop the others early
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < num_threads; ++t) threads.emplace_back(work, t);
  work(0);
  for (auto& th : threads) th.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }

  const int eot = tok.eot_id();
  const int64_t vocab = tok.vocab_size();
  TokenSplit split;
  size_t total = 0;
  for (const auto& v : ids) total += v.size() + (eot >= 0 ? 1 : 0);
  split.tokens.reserve(total);
  split.doc_offsets.reserve(docs.size() + 1);
  split.doc_offsets.push_back(0);
  for (const auto& v : ids) {
    for (const int32_t id : v) {
      TS_CHECK(id >= 0 && id < vocab, "tokenizer produced id {} outside [0, {})", id, vocab);
      split.tokens.push_back(static_cast<uint32_t>(id));
    }
    if (eot >= 0) split.tokens.push_back(static_cast<uint32_t>(eot));
    split.doc_offsets.push_back(static_cast<int64_t>(split.tokens.size()));
  }
  return split;
}

void make_parent_dirs(const std::string& path) {
  const fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) TS_USER_ERROR("prepare: cannot create directory '{}': {}", dir.string(), ec.message());
}

std::string created_by_text(const PrepareOptions& opt) {
  std::string tok = opt.train_vocab > 0 ? fmt::format("--train-tokenizer {}", opt.train_vocab)
                                        : fmt::format("--tokenizer {}", opt.tokenizer_spec);
  return fmt::format("tessera prepare {} --val-fraction {} --doc-chars {}", tok, opt.val_fraction,
                     opt.doc_chars);
}

void validate_options(const PrepareOptions& opt) {
  if (opt.inputs.empty()) TS_USER_ERROR("prepare: no inputs given (text files or directories)");
  if (opt.out.empty()) TS_USER_ERROR("prepare: no output file given (--out)");
  const bool have_spec = !opt.tokenizer_spec.empty();
  if (have_spec == (opt.train_vocab > 0)) {
    TS_USER_ERROR(
        "prepare: give exactly one of --tokenizer SPEC or --train-tokenizer N "
        "(got tokenizer '{}', train_vocab {})",
        opt.tokenizer_spec, opt.train_vocab);
  }
  if (opt.train_vocab < 0)
    TS_USER_ERROR("prepare: --train-tokenizer {} is negative", opt.train_vocab);
  if (!opt.tokenizer_out.empty() && opt.train_vocab <= 0) {
    TS_USER_ERROR("prepare: --tokenizer-out '{}' only applies with --train-tokenizer",
                  opt.tokenizer_out);
  }
  if (!(opt.val_fraction >= 0.0f && opt.val_fraction < 1.0f)) {
    TS_USER_ERROR("prepare: --val-fraction {} is outside [0, 1)", opt.val_fraction);
  }
  if (opt.doc_chars < 1) TS_USER_ERROR("prepare: --doc-chars {} must be at least 1", opt.doc_chars);
  if (opt.num_threads < 0) TS_USER_ERROR("prepare: --threads {} is negative", opt.num_threads);
}

}  // namespace

std::vector<std::string> list_source_files(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const auto& input : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(input, ec);
    if (ec || !fs::exists(st)) TS_USER_ERROR("prepare: input '{}' does not exist", input);
    if (fs::is_regular_file(st)) {
      files.push_back(input);
      continue;
    }
    if (!fs::is_directory(st)) {
      TS_USER_ERROR("prepare: input '{}' is neither a file nor a directory", input);
    }
    std::vector<fs::path> found;
    for (const auto& entry : fs::directory_iterator(input, ec)) {
      if (entry.is_regular_file() && has_source_extension(entry.path())) found.push_back(entry);
    }
    if (ec) TS_USER_ERROR("prepare: cannot list directory '{}': {}", input, ec.message());
    std::sort(found.begin(), found.end());
    size_t num_added = 0;
    for (const auto& p : found) {
      if (p.extension() == ".json") {
        fs::path twin = p;
        twin.replace_extension(".txt");
        if (std::binary_search(found.begin(), found.end(), twin)) continue;
      }
      files.push_back(p.string());
      ++num_added;
    }
    if (num_added == 0)
      TS_USER_ERROR("prepare: directory '{}' holds no .txt or .json files", input);
  }
  std::map<std::string, std::string> by_name;
  for (const auto& f : files) {
    const std::string name = fs::path(f).filename().string();
    const auto [it, inserted] = by_name.emplace(name, f);
    if (!inserted) {
      TS_USER_ERROR(
          "prepare: two inputs share the file name '{}' ({} and {}); file names identify "
          "sources in the dataset and must be unique",
          name, it->second, f);
    }
  }
  return files;
}

std::vector<Chunk> chunk_text(std::string_view text, int64_t doc_chars) {
  TS_CHECK(doc_chars >= 1, "doc_chars {}", doc_chars);
  const int64_t n = static_cast<int64_t>(text.size());
  const auto npos = std::string_view::npos;
  std::vector<Chunk> chunks;
  int64_t start = 0;
  while (start < n) {
    const int64_t target = start + doc_chars;
    int64_t end = n;
    if (target < n) {
      const int64_t limit = std::min(n, start + 2 * doc_chars);
      // Searches stop at the limit: on text without the separator (a SOTU speech is one line) an
      // unbounded find would rescan the rest of the file for every chunk.
      const std::string_view window = text.substr(0, static_cast<size_t>(limit));
      end = -1;
      // A paragraph boundary: the end of a run of >= 2 newlines, at or after target. The search
      // starts 2 bytes early so a run that ends at or straddles target is seen.
      for (int64_t from = std::max(start, target - 2); end < 0;) {
        const size_t i = window.find("\n\n", static_cast<size_t>(from));
        if (i == npos) break;
        int64_t e = static_cast<int64_t>(i);
        while (e < n && text[static_cast<size_t>(e)] == '\n') ++e;
        if (e >= target && e <= limit) end = e;
        if (e > limit) break;
        from = e;
      }
      if (end < 0) {
        if (size_t i = window.find('\n', static_cast<size_t>(target));
            i != npos && static_cast<int64_t>(i) + 1 <= limit) {
          end = static_cast<int64_t>(i) + 1;
        }
      }
      if (end < 0) {
        if (size_t i = window.find_first_of(" \t", static_cast<size_t>(target));
            i != npos && static_cast<int64_t>(i) + 1 <= limit) {
          end = static_cast<int64_t>(i) + 1;
        }
      }
      if (end < 0) {
        end = limit;
        // Never split a UTF-8 sequence: back up over continuation bytes.
        while (end < n && end > start + 1 &&
               (static_cast<unsigned char>(text[static_cast<size_t>(end)]) & 0xC0) == 0x80) {
          --end;
        }
      }
      if (n - end < doc_chars / 4) end = n;
    }
    chunks.push_back({start, end});
    start = end;
  }
  return chunks;
}

bool chunk_is_val(std::string_view file_name, int64_t chunk_idx, double val_fraction) {
  const auto threshold = static_cast<uint32_t>(std::lround(val_fraction * 1000.0));
  const CounterRng rng(0, fmt::format("tessera/prepare/split/{}", file_name));
  return rng.bits(static_cast<uint64_t>(chunk_idx)) % 1000u < threshold;
}

PrepareSummary prepare_dataset(const PrepareOptions& opt) {
  validate_options(opt);
  const auto t_start = Clock::now();
  PrepareSummary summary;

  // 1. Read, hash and normalize every source.
  const std::vector<std::string> files = list_source_files(opt.inputs);
  std::vector<std::string> texts(files.size());
  std::vector<SourceFile> sources;
  for (size_t f = 0; f < files.size(); ++f) {
    const std::string bytes = read_file_bytes(files[f]);
    NormalizedText norm = decode_source(bytes, files[f]);
    if (norm.encoding == SourceEncoding::latin1) log_info("{}: read as Latin-1", files[f]);
    if (norm.num_crlf + norm.num_lone_cr > 0) {
      log_info("{}: {} CRLF and {} lone CR line endings turned into LF", files[f], norm.num_crlf,
               norm.num_lone_cr);
    }
    sources.push_back({fs::path(files[f]).filename().string(), sha256_hex(bytes)});
    summary.num_bytes += static_cast<int64_t>(norm.text.size());
    texts[f] = std::move(norm.text);
  }
  summary.num_files = static_cast<int64_t>(files.size());
  const double t_read = seconds_since(t_start);

  // 2. Documents and the split.
  std::vector<Document> docs[2];
  for (size_t f = 0; f < files.size(); ++f) {
    const std::string_view text = texts[f];
    const std::vector<Chunk> chunks = chunk_text(text, opt.doc_chars);
    for (size_t i = 0; i < chunks.size(); ++i) {
      const std::string_view piece =
          text.substr(static_cast<size_t>(chunks[i].begin),
                      static_cast<size_t>(chunks[i].end - chunks[i].begin));
      if (piece.find_first_not_of(" \t\n\v\f") == std::string_view::npos) continue;
      const bool val = chunk_is_val(sources[f].name, static_cast<int64_t>(i), opt.val_fraction);
      docs[val ? kVal : kTrain].push_back({piece, static_cast<int64_t>(i), static_cast<int>(f)});
    }
  }
  if (docs[kTrain].empty()) {
    TS_USER_ERROR("prepare: no train documents: the inputs hold no text outside the val split");
  }
  if (docs[kVal].empty() && opt.val_fraction > 0.0f) {
    log_warn("prepare: val_fraction {} but no document landed in val (too little text?)",
             opt.val_fraction);
  }

  // 3. The tokenizer: loaded, or trained on the train documents only (val stays unseen).
  const auto t_tok = Clock::now();
  Tokenizer tok;
  if (opt.train_vocab > 0) {
    summary.tokenizer_path = !opt.tokenizer_out.empty()
                                 ? opt.tokenizer_out
                                 : (fs::path(opt.out).parent_path() / "tokenizer.json").string();
    make_parent_dirs(summary.tokenizer_path);
    std::vector<std::string> train_texts;
    train_texts.reserve(docs[kTrain].size());
    for (const auto& d : docs[kTrain]) train_texts.emplace_back(d.text);
    BpeTrainOptions bpe;
    bpe.vocab_size = opt.train_vocab;
    bpe.special_tokens = {kEotText};
    bpe.pre = PreTokenizer::gpt2;
    tok = train_bpe(train_texts, bpe);
    tok.save_hf_json(summary.tokenizer_path);
    log_info("prepare: trained a {}-token BPE vocabulary on {} train documents in {:.1f} s -> {}",
             tok.vocab_size(), docs[kTrain].size(), seconds_since(t_tok), summary.tokenizer_path);
  } else {
    tok = load_tokenizer_spec(opt.tokenizer_spec);
  }
  const double t_tokenizer = seconds_since(t_tok);

  // 4. Encode.
  const auto t_enc = Clock::now();
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int num_threads = opt.num_threads > 0 ? opt.num_threads : std::min(hw, kMaxThreads);
  TokenSplit splits[2];
  for (int s : {kTrain, kVal}) {
    splits[s] = encode_documents(tok, docs[s], num_threads);
    summary.num_docs[s] = static_cast<int64_t>(docs[s].size());
    summary.num_tokens[s] = static_cast<int64_t>(splits[s].tokens.size());
  }
  const double t_encode = seconds_since(t_enc);

  // 5. Write.
  const auto t_write = Clock::now();
  TokenDatasetMeta meta;
  meta.tokenizer_json = tok.to_hf_json();
  meta.tokenizer_hash = tok.hash();
  TS_CHECK(meta.tokenizer_hash == sha256_hex(meta.tokenizer_json),
           "Tokenizer::hash() is not the sha256 of to_hf_json()");
  meta.vocab_size = tok.vocab_size();
  meta.eot_id = tok.eot_id();
  meta.sources = sources;
  meta.val_fraction = opt.val_fraction;
  meta.doc_chars = opt.doc_chars;
  meta.split_rule = fmt::format(
      "chunks of ~doc_chars bytes cut at paragraph boundaries; chunk i of file f is val iff "
      "CounterRng(0, \"tessera/prepare/split/\" + f).bits(i) % 1000 < {}",
      std::lround(opt.val_fraction * 1000.0));
  meta.created_by = created_by_text(opt);
  make_parent_dirs(opt.out);
  write_token_dataset(opt.out, meta, splits[kTrain], splits[kVal]);
  const double t_written = seconds_since(t_write);

  summary.tokenizer_hash = meta.tokenizer_hash;
  summary.seconds = seconds_since(t_start);
  log_info("prepare: {} files, {:.2f} MB of text read in {:.2f} s", summary.num_files,
           summary.num_bytes / 1e6, t_read);
  for (int s : {kTrain, kVal}) {
    log_info("prepare: {:5s}: {} documents, {} tokens", kSplitNames[s], summary.num_docs[s],
             summary.num_tokens[s]);
  }
  const int64_t total_tokens = summary.num_tokens[kTrain] + summary.num_tokens[kVal];
  log_info("prepare: tokenizer {} (vocab {}, hash {}) ready in {:.2f} s",
           opt.train_vocab > 0 ? summary.tokenizer_path : opt.tokenizer_spec, meta.vocab_size,
           meta.tokenizer_hash.substr(0, 16), t_tokenizer);
  log_info("prepare: encoded in {:.2f} s on {} threads ({:.2f} MB/s, {:.0f} tokens/s)", t_encode,
           num_threads, summary.num_bytes / 1e6 / std::max(t_encode, 1e-9),
           total_tokens / std::max(t_encode, 1e-9));
  log_info("prepare: wrote {} in {:.2f} s; total {:.2f} s", opt.out, t_written, summary.seconds);
  return summary;
}

}  // namespace tessera
