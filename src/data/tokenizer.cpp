// Tokenizer: construction from a validated TokenizerSpec, encode (added tokens -> NFC ->
// pre-tokenizer -> byte-level BPE with a cache), decode, and the hash. Reading and writing
// tokenizer.json / GPT-2 files is in tokenizer_json.cpp; training in bpe_trainer.cpp.
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <climits>
#include <queue>

#include "core/error.h"
#include "core/sha256.h"
#include "data/byte_level.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_impl.h"

namespace tessera {

// ---- BPE cache ----

bool BpeCache::lookup(std::string_view word, std::vector<int32_t>& out) const {
  Shard& shard = shards_[std::hash<std::string_view>{}(word) % kNumShards];
  std::lock_guard<std::mutex> lock(shard.mutex);
  const auto it = shard.map.find(word);
  if (it == shard.map.end()) return false;
  out.insert(out.end(), it->second.begin(), it->second.end());
  return true;
}

void BpeCache::insert(std::string_view word, std::span<const int32_t> ids) const {
  Shard& shard = shards_[std::hash<std::string_view>{}(word) % kNumShards];
  std::lock_guard<std::mutex> lock(shard.mutex);
  if (shard.map.size() >= kMaxEntriesPerShard) shard.map.clear();
  shard.map.emplace(std::string(word), std::vector<int32_t>(ids.begin(), ids.end()));
}

// ---- merges ----

namespace {

constexpr int32_t kNoRank = INT32_MAX;

inline MergeRule find_rule(const Tokenizer::Impl& impl, int32_t left, int32_t right) {
  const auto it = impl.merge_rules.find(pair_key(left, right));
  return it == impl.merge_rules.end() ? MergeRule{kNoRank, -1} : it->second;
}

// Words up to this many bytes use the quadratic scan (no allocation beyond two small vectors);
// longer ones (long digit or punctuation runs) the heap, which is O(n log n).
constexpr size_t kQuadraticMaxSymbols = 48;
// Pre-tokens longer than this are not cached: rare, and they would bloat the cache.
constexpr size_t kMaxCachedBytes = 128;

}  // namespace

void bpe_merge_quadratic(const Tokenizer::Impl& impl, std::vector<int32_t>& symbols) {
  if (symbols.size() < 2) return;
  // rules[k] is the rule for the pair (symbols[k], symbols[k + 1]).
  std::vector<MergeRule> rules(symbols.size() - 1);
  for (size_t k = 0; k + 1 < symbols.size(); ++k)
    rules[k] = find_rule(impl, symbols[k], symbols[k + 1]);
  while (!rules.empty()) {
    size_t best = 0;
    for (size_t k = 1; k < rules.size(); ++k)
      if (rules[k].rank < rules[best].rank) best = k;  // strict: the leftmost wins ties
    if (rules[best].rank == kNoRank) break;
    symbols[best] = rules[best].merged_id;
    symbols.erase(symbols.begin() + best + 1);
    rules.erase(rules.begin() + best);
    if (best > 0) rules[best - 1] = find_rule(impl, symbols[best - 1], symbols[best]);
    if (best < rules.size()) rules[best] = find_rule(impl, symbols[best], symbols[best + 1]);
  }
}

void bpe_merge_heap(const Tokenizer::Impl& impl, std::vector<int32_t>& symbols) {
  const int n = int(symbols.size());
  if (n < 2) return;
  // A doubly linked list over the original positions; a merged symbol keeps its left position,
  // so (rank, position) orders candidates exactly as the quadratic scan's leftmost-first rule.
  std::vector<int> prev(n), next(n);
  for (int k = 0; k < n; ++k) {
    prev[k] = k - 1;
    next[k] = k + 1 < n ? k + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int pos) {
    const int nx = next[pos];
    if (nx < 0) return;
    const MergeRule r = find_rule(impl, symbols[pos], symbols[nx]);
    if (r.rank != kNoRank) heap.push({r.rank, pos, symbols[pos], symbols[nx]});
  };
  for (int k = 0; k + 1 < n; ++k) push(k);
  std::vector<uint8_t> alive(n, 1);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    // Stale entries: a side was merged away or changed since the entry was pushed.
    const int nx = next[c.pos];
    if (!alive[c.pos] || nx < 0 || symbols[c.pos] != c.left || symbols[nx] != c.right) continue;
    symbols[c.pos] = find_rule(impl, c.left, c.right).merged_id;
    alive[nx] = 0;
    next[c.pos] = next[nx];
    if (next[nx] >= 0) prev[next[nx]] = c.pos;
    if (prev[c.pos] >= 0) push(prev[c.pos]);
    push(c.pos);
  }
  int out = 0;
  for (int k = 0; k >= 0; k = next[k]) symbols[out++] = symbols[k];
  symbols.resize(out);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_ids[static_cast<unsigned char>(word[0])]);
    return;
  }
  const bool cacheable = word.size() <= kMaxCachedBytes;
  if (cacheable && cache.lookup(word, out)) return;
  if (spec.ignore_merges) {
    const auto it = vocab_ids.find(std::string(word));
    if (it != vocab_ids.end()) {
      out.push_back(it->second);
      return;
    }
  }
  thread_local std::vector<int32_t> symbols;
  symbols.clear();
  for (unsigned char c : word) symbols.push_back(byte_ids[c]);
  if (symbols.size() <= kQuadraticMaxSymbols)
    bpe_merge_quadratic(*this, symbols);
  else
    bpe_merge_heap(*this, symbols);
  out.insert(out.end(), symbols.begin(), symbols.end());
  if (cacheable) cache.insert(word, symbols);
}

// ---- normalization ----

std::string_view nfc_normalize(std::string_view text, std::string& storage) {
  // ASCII is NFC whatever surrounds it; most text is mostly ASCII.
  if (std::all_of(text.begin(), text.end(), [](char c) { return (c & 0x80) == 0; })) return text;
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) TS_SYSTEM_ERROR("ICU getNFCInstance failed: {}", u_errorName(status));
  // Normalize each maximal valid UTF-8 run on its own and copy invalid bytes through, so that
  // no input byte is lost or replaced by U+FFFD.
  storage.clear();
  bool changed = false;
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const int32_t len = int32_t(text.size());
  TS_CHECK(size_t(len) == text.size(), "text of {} bytes is too long to normalize", text.size());
  auto flush = [&](int32_t begin, int32_t end) {
    if (begin >= end) return;
    const icu::StringPiece run(text.data() + begin, end - begin);
    UErrorCode st = U_ZERO_ERROR;
    if (nfc->isNormalizedUTF8(run, st) && U_SUCCESS(st)) {
      storage.append(text.data() + begin, size_t(end - begin));
      return;
    }
    st = U_ZERO_ERROR;
    icu::StringByteSink<std::string> sink(&storage);
    nfc->normalizeUTF8(0, run, sink, nullptr, st);
    if (U_FAILURE(st)) TS_SYSTEM_ERROR("ICU normalizeUTF8 failed: {}", u_errorName(st));
    changed = true;
  };
  int32_t run_begin = 0, i = 0;
  while (i < len) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(bytes, i, len, c);
    if (c < 0) {
      flush(run_begin, start);
      storage.append(text.data() + start, size_t(i - start));
      run_begin = i;
    }
  }
  flush(run_begin, len);
  return changed ? std::string_view(storage) : text;
}

// ---- Tokenizer ----

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

namespace {

const Tokenizer::Impl& checked(const std::shared_ptr<const Tokenizer::Impl>& impl) {
  TS_CHECK(impl != nullptr, "use of a default-constructed (empty) Tokenizer");
  return *impl;
}

// Leftmost-longest matching of added tokens in `text`: calls on_text(span) for the text between
// matches and on_token(id) for each match.
template <class OnText, class OnToken>
void split_on_added(const Tokenizer::Impl& impl, const Tokenizer::Impl::AddedMatcher& matcher,
                    bool allow_special, std::string_view text, OnText&& on_text,
                    OnToken&& on_token) {
  if (matcher.empty) {
    if (!text.empty()) on_text(text);
    return;
  }
  size_t plain_begin = 0, i = 0;
  while (i < text.size()) {
    const auto& candidates = matcher.by_first_byte[static_cast<unsigned char>(text[i])];
    const AddedToken* hit = nullptr;
    for (int32_t idx : candidates) {  // longest first
      const AddedToken& t = impl.spec.added[idx];
      if (t.special && !allow_special) continue;
      if (text.compare(i, t.content.size(), t.content) == 0) {
        hit = &t;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    if (i > plain_begin) on_text(text.substr(plain_begin, i - plain_begin));
    on_token(hit->id);
    i += hit->content.size();
    plain_begin = i;
  }
  if (plain_begin < text.size()) on_text(text.substr(plain_begin));
}

}  // namespace

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  const Impl& m = checked(impl_);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  auto push_id = [&](int32_t id) { out.push_back(id); };
  auto encode_plain = [&](std::string_view piece) {
    for (size_t i = 0; i < piece.size();) {
      const size_t j = next_pre_token_end(m.spec.pre, piece, i);
      m.bpe(piece.substr(i, j - i), out);
      i = j;
    }
  };
  std::string normalized_storage;
  auto encode_segment = [&](std::string_view segment) {
    const std::string_view normalized =
        m.spec.nfc ? nfc_normalize(segment, normalized_storage) : segment;
    split_on_added(m, m.normalized_matcher, allow_special, normalized, encode_plain, push_id);
  };
  split_on_added(m, m.raw_matcher, allow_special, text, encode_segment, push_id);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const Impl& m = checked(impl_);
  std::string out;
  for (const int32_t id : ids) {
    if (id < 0 || id >= m.num_ids || !m.id_used[id])
      TS_USER_ERROR("decode: token id {} is not in the tokenizer from {} (vocabulary size {})", id,
                    m.spec.source, m.num_ids);
    out += m.id_bytes[id];
  }
  return out;
}

TokenizerVocabulary Tokenizer::vocabulary() const {
  const Impl& m = checked(impl_);
  TokenizerVocabulary v;
  v.pre = m.spec.pre;
  v.nfc = m.spec.nfc;
  v.ignore_merges = m.spec.ignore_merges;
  v.tokens.resize(m.num_ids);
  v.kinds.assign(m.num_ids, TokenizerVocabulary::Kind::unused);
  for (int32_t id = 0; id < m.num_ids; ++id) v.tokens[id] = fmt::format("[PAD{}]", id);
  for (const auto& [bytes, id] : m.spec.vocab) {
    v.tokens[id] = bytes_to_byte_level(bytes);
    v.kinds[id] = TokenizerVocabulary::Kind::normal;
  }
  // An added token may also be a vocabulary entry (GPT-2's <|endoftext|>): the added form wins.
  for (const AddedToken& a : m.spec.added) {
    v.tokens[a.id] = a.content;
    v.kinds[a.id] =
        a.special ? TokenizerVocabulary::Kind::special : TokenizerVocabulary::Kind::added;
  }
  v.merges.reserve(m.spec.merges.size());
  for (const auto& [left, right] : m.spec.merges)
    v.merges.push_back(bytes_to_byte_level(left) + " " + bytes_to_byte_level(right));
  return v;
}

int Tokenizer::vocab_size() const { return checked(impl_).num_ids; }
int Tokenizer::eot_id() const { return checked(impl_).eot; }

std::string Tokenizer::hash() const {
  const Impl& m = checked(impl_);
  std::call_once(m.hash_once, [&] { m.hash_hex = sha256_hex(to_hf_json()); });
  return m.hash_hex;
}

// ---- construction ----

Tokenizer make_tokenizer(TokenizerSpec spec) {
  auto impl = std::make_shared<Tokenizer::Impl>();
  impl->spec = std::move(spec);
  Tokenizer::Impl& m = *impl;
  const TokenizerSpec& s = m.spec;
  const std::string& src = s.source;

  int32_t max_id = -1;
  for (const auto& [bytes, id] : s.vocab) max_id = std::max(max_id, id);
  for (const auto& t : s.added) max_id = std::max(max_id, t.id);
  for (const auto& [bytes, id] : s.vocab)
    if (id < 0) TS_USER_ERROR("{}: vocabulary entry has negative id {}", src, id);
  // Ids index dense tables; a stray huge id would allocate gigabytes (real vocabularies stay
  // well under a million).
  constexpr int32_t kMaxIds = 1 << 24;
  if (max_id >= kMaxIds)
    TS_USER_ERROR("{}: token id {} is too large (Tessera allows ids below {})", src, max_id,
                  kMaxIds);
  m.num_ids = max_id + 1;
  m.id_bytes.assign(m.num_ids, {});
  m.id_used.assign(m.num_ids, 0);

  m.vocab_ids.reserve(s.vocab.size());
  for (const auto& [bytes, id] : s.vocab) {
    if (m.id_used[id])
      TS_USER_ERROR("{}: vocabulary id {} is used twice (by '{}' and '{}')", src, id,
                    m.id_bytes[id], bytes);
    if (!m.vocab_ids.emplace(bytes, id).second)
      TS_USER_ERROR("{}: vocabulary token '{}' appears twice", src, bytes);
    m.id_bytes[id] = bytes;
    m.id_used[id] = 1;
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = m.vocab_ids.find(std::string(1, char(b)));
    if (it == m.vocab_ids.end())
      TS_USER_ERROR(
          "{}: the vocabulary lacks the single-byte token for byte 0x{:02X}; a "
          "byte-level BPE vocabulary needs all 256",
          src, b);
    m.byte_ids[b] = it->second;
  }

  m.merge_rules.reserve(s.merges.size());
  for (size_t rank = 0; rank < s.merges.size(); ++rank) {
    const auto& [left, right] = s.merges[rank];
    const auto l = m.vocab_ids.find(left), r = m.vocab_ids.find(right);
    const auto merged = m.vocab_ids.find(left + right);
    if (l == m.vocab_ids.end() || r == m.vocab_ids.end() || merged == m.vocab_ids.end())
      TS_USER_ERROR(
          "{}: merge #{} ('{}' + '{}') uses or makes a token that is not in the "
          "vocabulary",
          src, rank, left, right);
    // A repeated pair takes its last rank, as Hugging Face tokenizers and transformers.js do.
    m.merge_rules[pair_key(l->second, r->second)] = {int32_t(rank), merged->second};
  }

  std::vector<uint8_t> added_seen(m.num_ids, 0);
  for (size_t k = 0; k < s.added.size(); ++k) {
    const AddedToken& t = s.added[k];
    if (t.id < 0) TS_USER_ERROR("{}: added token '{}' has negative id {}", src, t.content, t.id);
    if (t.content.empty()) TS_USER_ERROR("{}: added token with id {} is empty", src, t.id);
    if (added_seen[t.id]) TS_USER_ERROR("{}: added token id {} appears twice", src, t.id);
    added_seen[t.id] = 1;
    if (m.id_used[t.id] && m.id_bytes[t.id] != t.content)
      TS_USER_ERROR("{}: added token '{}' has id {}, which the vocabulary gives to '{}'", src,
                    t.content, t.id, m.id_bytes[t.id]);
    m.id_bytes[t.id] = t.content;
    m.id_used[t.id] = 1;
    auto& matcher = t.normalized ? m.normalized_matcher : m.raw_matcher;
    matcher.by_first_byte[static_cast<unsigned char>(t.content[0])].push_back(int32_t(k));
    matcher.empty = false;
  }
  for (auto* matcher : {&m.raw_matcher, &m.normalized_matcher})
    for (auto& list : matcher->by_first_byte)
      std::stable_sort(list.begin(), list.end(), [&](int32_t a, int32_t b) {
        return s.added[a].content.size() > s.added[b].content.size();
      });

  // The document separator: the first of these names that the tokenizer has (GPT-2 and Qwen use
  // "<|endoftext|>"; Llama 3 "<|end_of_text|>"; SentencePiece-era models "</s>").
  for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"}) {
    for (const auto& t : s.added)
      if (t.content == name && m.eot < 0) m.eot = t.id;
    if (m.eot < 0)
      if (const auto it = m.vocab_ids.find(name); it != m.vocab_ids.end()) m.eot = it->second;
    if (m.eot >= 0) break;
  }
  return Tokenizer(std::shared_ptr<const Tokenizer::Impl>(std::move(impl)));
}

}  // namespace tessera
