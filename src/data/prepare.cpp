// `tessera prepare`: sources -> documents -> train/val -> tokens -> HDF5 (rules in prepare.h).
#include "data/prepare.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#include "core/sha256.h"
#include "data/bpe_trainer.h"
#include "data/dataset.h"
#include "data/ordered_pool.h"
#include "data/progress.h"
#include "data/text_normalize.h"
#include "data/tokenizer.h"
#include "data/tokenizer_spec.h"

namespace tessera {

namespace {

namespace fs = std::filesystem;

constexpr int kMaxThreads = 16;
constexpr const char* kEotText = "<|endoftext|>";

// Encoded files waiting for the writer, per thread: bounds memory to a few files per thread.
constexpr int64_t kFilesAheadPerThread = 2;

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool has_source_extension(const fs::path& p) {
  return p.extension() == ".txt" || p.extension() == ".json";
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

namespace {

// Calls on_doc(split, text) for each document of one file's normalized text, in chunk order;
// chunks of only whitespace are dropped (their index still counts).
template <class F>
void for_each_document(std::string_view text, std::string_view name, const PrepareOptions& opt,
                       F&& on_doc) {
  const std::vector<Chunk> chunks = chunk_text(text, opt.doc_chars);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const std::string_view piece =
        text.substr(size_t(chunks[i].begin), size_t(chunks[i].end - chunks[i].begin));
    if (piece.find_first_not_of(" \t\n\v\f") == std::string_view::npos) continue;
    on_doc(chunk_is_val(name, int64_t(i), opt.val_fraction) ? Split::val : Split::train, piece);
  }
}

std::string base_name(const std::string& path) { return fs::path(path).filename().string(); }

int thread_count(const PrepareOptions& opt) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return opt.num_threads > 0 ? opt.num_threads : std::min(hw, kMaxThreads);
}

std::string rate_text(double bytes, Clock::time_point t0) {
  return fmt::format("{:.1f} MB/s", bytes / 1e6 / std::max(seconds_since(t0), 1e-9));
}

// --- pass 1 (with --train-tokenizer): pre-token counts of the train documents -----------------

struct CountedFile {
  PreTokenCounts counts;
  int64_t num_docs = 0, num_bytes = 0;
};

CountedFile count_file(const std::string& path, const PrepareOptions& opt,
                       const BpeTrainOptions& bpe) {
  CountedFile out{PreTokenCounts(bpe)};
  const NormalizedText norm = load_source_text(path);
  out.num_bytes = int64_t(norm.text.size());
  for_each_document(norm.text, base_name(path), opt, [&](Split s, std::string_view doc) {
    if (s != Split::train) return;  // val stays unseen by the tokenizer
    out.counts.add_text(doc);
    ++out.num_docs;
  });
  return out;
}

// Trains the BPE vocabulary on the train documents, streaming the files: what stays in memory is
// the pre-token counts (they grow with the distinct words, not with the corpus) and the text of the
// files being counted.
Tokenizer train_tokenizer(const std::vector<std::string>& files, const PrepareOptions& opt,
                          int num_threads, PrepareSummary* summary) {
  const auto t0 = Clock::now();
  BpeTrainOptions bpe;
  bpe.vocab_size = opt.train_vocab;
  bpe.special_tokens = {kEotText};
  bpe.pre = PreTokenizer::gpt2;
  PreTokenCounts counts(bpe);
  int64_t num_docs = 0, num_bytes = 0;
  ProgressLine progress = ProgressLine::for_stderr();
  run_ordered<CountedFile>(
      int64_t(files.size()), num_threads, kFilesAheadPerThread * num_threads,
      [&](int64_t f) { return count_file(files[size_t(f)], opt, bpe); },
      [&](int64_t f, CountedFile&& c) {
        counts.merge(std::move(c.counts));
        num_docs += c.num_docs;
        num_bytes += c.num_bytes;
        progress.update(fmt::format("prepare: counting pre-tokens {}/{} files | {:.1f} MB | {}",
                                    f + 1, files.size(), num_bytes / 1e6, rate_text(num_bytes, t0)),
                        f + 1 == int64_t(files.size()));
      });
  progress.finish();
  if (num_docs == 0)
    TS_USER_ERROR("prepare: no train documents: the inputs hold no text outside the val split");
  summary->tokenizer_path = !opt.tokenizer_out.empty()
                                ? opt.tokenizer_out
                                : (fs::path(opt.out).parent_path() / "tokenizer.json").string();
  make_parent_dirs(summary->tokenizer_path);
  Tokenizer tok = train_bpe(counts, bpe);
  tok.save_hf_json(summary->tokenizer_path);
  log_info(
      "prepare: trained a {}-token BPE vocabulary on {} train documents ({} distinct "
      "pre-tokens) in {:.1f} s -> {}",
      tok.vocab_size(), num_docs, counts.counts().size(), seconds_since(t0),
      summary->tokenizer_path);
  return tok;
}

// --- pass 2: encode files in parallel, write them in order --------------------------------------

struct EncodedFile {
  SourceFile source;
  int64_t num_bytes = 0;           // normalized text
  std::vector<std::string> notes;  // what decoding changed, logged in file order
  std::vector<uint32_t> tokens[2];
  std::vector<int64_t> doc_lengths[2];
};

EncodedFile encode_file(const std::string& path, const Tokenizer& tok, const PrepareOptions& opt) {
  EncodedFile out;
  const std::string bytes = read_file_bytes(path);
  out.source = {base_name(path), sha256_hex(bytes)};
  const NormalizedText norm = decode_source(bytes, path);
  out.num_bytes = int64_t(norm.text.size());
  if (norm.encoding == SourceEncoding::latin1) out.notes.push_back(path + ": read as Latin-1");
  if (norm.num_crlf + norm.num_lone_cr > 0)
    out.notes.push_back(fmt::format("{}: {} CRLF and {} lone CR line endings turned into LF", path,
                                    norm.num_crlf, norm.num_lone_cr));
  const int eot = tok.eot_id();
  for_each_document(norm.text, out.source.name, opt, [&](Split s, std::string_view doc) {
    // allow_special = false: corpus text that happens to spell "<|endoftext|>" stays text.
    const std::vector<int32_t> ids = tok.encode(doc, /*allow_special=*/false);
    std::vector<uint32_t>& dst = out.tokens[int(s)];
    for (const int32_t id : ids) {
      TS_CHECK(id >= 0, "tokenizer produced id {}", id);
      dst.push_back(uint32_t(id));
    }
    if (eot >= 0) dst.push_back(uint32_t(eot));
    out.doc_lengths[int(s)].push_back(int64_t(ids.size()) + (eot >= 0 ? 1 : 0));
  });
  return out;
}

// Appends one encoded file's documents to the dataset (files in order, documents in chunk order).
void write_file(const EncodedFile& e, TokenDatasetWriter& writer) {
  for (const Split s : kSplits) {
    const std::span<const uint32_t> all(e.tokens[int(s)]);
    size_t begin = 0;
    for (const int64_t len : e.doc_lengths[int(s)]) {
      writer.add_document(s, all.subspan(begin, size_t(len)));
      begin += size_t(len);
    }
  }
}

std::vector<SourceFile> encode_all(const std::vector<std::string>& files, const Tokenizer& tok,
                                   const PrepareOptions& opt, int num_threads,
                                   TokenDatasetWriter& writer, PrepareSummary* summary) {
  const auto t0 = Clock::now();
  std::vector<SourceFile> sources;
  ProgressLine progress = ProgressLine::for_stderr();
  run_ordered<EncodedFile>(
      int64_t(files.size()), num_threads, kFilesAheadPerThread * num_threads,
      [&](int64_t f) { return encode_file(files[size_t(f)], tok, opt); },
      [&](int64_t f, EncodedFile&& e) {
        for (const std::string& note : e.notes) log_info("{}", note);
        write_file(e, writer);
        sources.push_back(e.source);
        summary->num_bytes += e.num_bytes;
        const int64_t tokens = writer.num_tokens(Split::train) + writer.num_tokens(Split::val);
        progress.update(fmt::format("prepare: encoding {}/{} files | {:.2f} M tokens | {}", f + 1,
                                    files.size(), tokens / 1e6, rate_text(summary->num_bytes, t0)),
                        f + 1 == int64_t(files.size()));
      });
  progress.finish();
  for (const Split s : kSplits) {
    summary->num_docs[int(s)] = writer.num_docs(s);
    summary->num_tokens[int(s)] = writer.num_tokens(s);
  }
  summary->encode_seconds = seconds_since(t0);
  return sources;
}

TokenDatasetMeta dataset_meta(const Tokenizer& tok, const PrepareOptions& opt,
                              std::vector<SourceFile> sources) {
  TokenDatasetMeta meta;
  meta.tokenizer_json = tok.to_hf_json();
  meta.tokenizer_hash = tok.hash();
  TS_CHECK(meta.tokenizer_hash == sha256_hex(meta.tokenizer_json),
           "Tokenizer::hash() is not the sha256 of to_hf_json()");
  meta.vocab_size = tok.vocab_size();
  meta.eot_id = tok.eot_id();
  meta.sources = std::move(sources);
  meta.val_fraction = opt.val_fraction;
  meta.doc_chars = opt.doc_chars;
  meta.split_rule = fmt::format(
      "chunks of ~doc_chars bytes cut at paragraph boundaries; chunk i of file f is val iff "
      "CounterRng(0, \"tessera/prepare/split/\" + f).bits(i) % 1000 < {}",
      std::lround(opt.val_fraction * 1000.0));
  meta.created_by = created_by_text(opt);
  return meta;
}

}  // namespace

PrepareSummary prepare_dataset(const PrepareOptions& opt) {
  validate_options(opt);
  const auto t_start = Clock::now();
  PrepareSummary summary;
  const std::vector<std::string> files = list_source_files(opt.inputs);
  summary.num_files = int64_t(files.size());
  const int num_threads = thread_count(opt);

  // The tokenizer: trained on the train documents only (val stays unseen), or loaded.
  const Tokenizer tok = opt.train_vocab > 0 ? train_tokenizer(files, opt, num_threads, &summary)
                                            : load_tokenizer_spec(opt.tokenizer_spec);
  summary.tokenizer_hash = tok.hash();
  make_parent_dirs(opt.out);
  TokenDatasetWriter writer(opt.out, tok.vocab_size());  // an error below removes its temp file
  std::vector<SourceFile> sources = encode_all(files, tok, opt, num_threads, writer, &summary);
  if (summary.num_docs[int(Split::train)] == 0)
    TS_USER_ERROR("prepare: no train documents: the inputs hold no text outside the val split");
  if (summary.num_docs[int(Split::val)] == 0 && opt.val_fraction > 0.0f)
    log_warn("prepare: val_fraction {} but no document landed in val (too little text?)",
             opt.val_fraction);
  writer.commit(dataset_meta(tok, opt, std::move(sources)));
  summary.seconds = seconds_since(t_start);

  for (const Split s : kSplits)
    log_info("prepare: {:5s}: {} documents, {} tokens", split_name(s), summary.num_docs[int(s)],
             summary.num_tokens[int(s)]);
  const int64_t total_tokens = summary.num_tokens[0] + summary.num_tokens[1];
  log_info("prepare: {} files, {:.2f} MB of text, tokenizer {} (vocab {}, hash {})",
           summary.num_files, summary.num_bytes / 1e6,
           opt.train_vocab > 0 ? summary.tokenizer_path : opt.tokenizer_spec, tok.vocab_size(),
           summary.tokenizer_hash.substr(0, 16));
  log_info("prepare: encoded in {:.2f} s on {} threads ({:.2f} MB/s, {:.0f} tokens/s)",
           summary.encode_seconds, num_threads,
           summary.num_bytes / 1e6 / std::max(summary.encode_seconds, 1e-9),
           total_tokens / std::max(summary.encode_seconds, 1e-9));
  log_info("prepare: wrote {}; total {:.2f} s", opt.out, summary.seconds);
  return summary;
}

}  // namespace tessera
