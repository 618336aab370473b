// Tokenizer files: GPT-2's encoder.json + vocab.bpe, Hugging Face tokenizer.json (byte-level BPE
// only; every other model, normalizer, pre-tokenizer or decoder is rejected by name), and the
// canonical tokenizer.json that to_hf_json writes. Encoding itself is in tokenizer.cpp.
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "data/byte_level.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_impl.h"

namespace tessera {

namespace {

using nlohmann::json;

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) TS_USER_ERROR("cannot open {} '{}': {}", what, path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) TS_USER_ERROR("cannot read {} '{}': {}", what, path, std::strerror(errno));
  return ss.str();
}

json parse_json(const std::string& text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    TS_USER_ERROR("{}: malformed JSON: {}", source, e.what());
  }
}

// Typed access to tokenizer.json fields; `path` is the dotted field name used in messages.
struct Reader {
  const std::string& source;

  const json* find(const json& obj, const char* key) const {
    const auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }
  [[noreturn]] void bad(const std::string& path, const json& v, const char* expected) const {
    std::string shown = v.dump();
    if (shown.size() > 120) shown = shown.substr(0, 117) + "...";
    TS_USER_ERROR("{}: field '{}' = {} is {}", source, path, shown, expected);
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) bad(path, v, "not a string");
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, const std::string& path, bool fallback) const {
    const json* v = find(obj, key);
    if (!v || v->is_null()) return fallback;
    if (!v->is_boolean()) bad(path + "." + key, *v, "not a boolean");
    return v->get<bool>();
  }
  // A token id: an integer in [0, 2^31 - 1) (so that max id + 1 still fits an int32).
  int32_t id(const json& v, const std::string& path) const {
    if (!v.is_number_integer()) bad(path, v, "not an integer id");
    const int64_t x = v.get<int64_t>();
    if (v.is_number_unsigned() ? v.get<uint64_t>() >= uint64_t(INT32_MAX)
                               : (x < 0 || x >= INT32_MAX))
      bad(path, v, "not an id in [0, 2147483647)");
    return int32_t(x);
  }
  std::string type_of(const json& obj, const std::string& path) const {
    if (!obj.is_object()) bad(path, obj, "not an object");
    const json* t = find(obj, "type");
    if (!t) TS_USER_ERROR("{}: field '{}.type' is missing", source, path);
    return str(*t, path + ".type");
  }
  [[noreturn]] void unsupported(const std::string& path, const std::string& value,
                                const char* supported) const {
    TS_USER_ERROR("{}: field '{}' = '{}' is not supported by Tessera's tokenizer (supported: {})",
                  source, path, value, supported);
  }
  std::string bytes_of(const std::string& token, const std::string& path) const {
    auto bytes = byte_level_to_bytes(token);
    if (!bytes)
      TS_USER_ERROR(
          "{}: field '{}': token '{}' is not written in the byte-level alphabet (only "
          "byte-level BPE is supported)",
          source, path, token);
    return *bytes;
  }
};

void read_normalizer(const Reader& r, const json& root, TokenizerSpec& spec) {
  const json* n = r.find(root, "normalizer");
  if (!n || n->is_null()) return;
  const std::string type = r.type_of(*n, "normalizer");
  if (type == "NFC") {
    spec.nfc = true;
  } else if (type == "Sequence") {
    const json* list = r.find(*n, "normalizers");
    if (!list || !list->is_array())
      r.bad("normalizer.normalizers", list ? *list : json(), "not a list");
    for (size_t k = 0; k < list->size(); ++k) {
      const std::string path = fmt::format("normalizer.normalizers[{}]", k);
      const std::string t = r.type_of((*list)[k], path);
      if (t != "NFC") r.unsupported(path + ".type", t, "NFC");
      spec.nfc = true;
    }
  } else {
    r.unsupported("normalizer.type", type, "null, NFC, or a Sequence of NFC");
  }
}

// ByteLevel as a pre-tokenizer: returns use_regex (true means the GPT-2 split is built in).
bool read_byte_level(const Reader& r, const json& obj, const std::string& path) {
  if (r.boolean(obj, "add_prefix_space", path, false))
    r.unsupported(path + ".add_prefix_space", "true", "false");
  return r.boolean(obj, "use_regex", path, true);
}

void read_pre_tokenizer(const Reader& r, const json& root, TokenizerSpec& spec) {
  const json* p = r.find(root, "pre_tokenizer");
  if (!p || p->is_null())
    TS_USER_ERROR(
        "{}: field 'pre_tokenizer' is null; only byte-level BPE (ByteLevel "
        "pre-tokenizer) is supported",
        r.source);
  const std::string type = r.type_of(*p, "pre_tokenizer");
  const char* kSupported = "ByteLevel, or Sequence[Split(GPT-2 or Qwen2 regex), ByteLevel]";
  if (type == "ByteLevel") {
    if (!read_byte_level(r, *p, "pre_tokenizer"))
      r.unsupported("pre_tokenizer.use_regex", "false", "true when ByteLevel stands alone");
    spec.pre = PreTokenizer::gpt2;
    return;
  }
  if (type != "Sequence") r.unsupported("pre_tokenizer.type", type, kSupported);
  const json* list = r.find(*p, "pretokenizers");
  if (!list || !list->is_array() || list->size() != 2)
    r.bad("pre_tokenizer.pretokenizers", list ? *list : json(), "not [Split, ByteLevel]");
  const json& split = (*list)[0];
  const std::string split_type = r.type_of(split, "pre_tokenizer.pretokenizers[0]");
  if (split_type != "Split")
    r.unsupported("pre_tokenizer.pretokenizers[0].type", split_type, kSupported);
  const json* pattern = r.find(split, "pattern");
  const json* regex = pattern && pattern->is_object() ? r.find(*pattern, "Regex") : nullptr;
  if (!regex)
    r.bad("pre_tokenizer.pretokenizers[0].pattern", pattern ? *pattern : json(),
          "not {\"Regex\": ...}");
  const std::string re = r.str(*regex, "pre_tokenizer.pretokenizers[0].pattern.Regex");
  if (re == kGpt2PreTokenizerRegex)
    spec.pre = PreTokenizer::gpt2;
  else if (re == kQwen2PreTokenizerRegex)
    spec.pre = PreTokenizer::qwen2;
  else
    r.unsupported("pre_tokenizer.pretokenizers[0].pattern.Regex", re, "the GPT-2 or Qwen2 regex");
  const json* behavior = r.find(split, "behavior");
  const std::string b = behavior ? r.str(*behavior, "pre_tokenizer.pretokenizers[0].behavior") : "";
  if (b != "Isolated") r.unsupported("pre_tokenizer.pretokenizers[0].behavior", b, "Isolated");
  if (r.boolean(split, "invert", "pre_tokenizer.pretokenizers[0]", false))
    r.unsupported("pre_tokenizer.pretokenizers[0].invert", "true", "false");
  const json& bl = (*list)[1];
  const std::string bl_type = r.type_of(bl, "pre_tokenizer.pretokenizers[1]");
  if (bl_type != "ByteLevel")
    r.unsupported("pre_tokenizer.pretokenizers[1].type", bl_type, kSupported);
  if (read_byte_level(r, bl, "pre_tokenizer.pretokenizers[1]"))
    r.unsupported("pre_tokenizer.pretokenizers[1].use_regex", "true", "false after a Split");
}

void read_decoder_and_post(const Reader& r, const json& root) {
  if (const json* d = r.find(root, "decoder"); d && !d->is_null()) {
    const std::string type = r.type_of(*d, "decoder");
    if (type != "ByteLevel") r.unsupported("decoder.type", type, "null or ByteLevel");
  }
  // The post-processor only adds BOS/EOS-style tokens when a caller asks for them; Tessera's
  // encode never does (datasets insert the document separator themselves), so the common ones
  // are accepted and have no effect.
  if (const json* p = r.find(root, "post_processor"); p && !p->is_null()) {
    const std::string type = r.type_of(*p, "post_processor");
    if (type != "ByteLevel" && type != "TemplateProcessing")
      r.unsupported("post_processor.type", type, "null, ByteLevel or TemplateProcessing");
  }
}

void read_model(const Reader& r, const json& root, TokenizerSpec& spec) {
  const json* model = r.find(root, "model");
  if (!model || !model->is_object()) TS_USER_ERROR("{}: field 'model' is missing", r.source);
  if (const json* t = r.find(*model, "type")) {
    const std::string type = r.str(*t, "model.type");
    if (type != "BPE") r.unsupported("model.type", type, "BPE");
  }
  if (const json* d = r.find(*model, "dropout"); d && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0)
      r.unsupported("model.dropout", d->dump(), "null");
  }
  if (const json* u = r.find(*model, "unk_token"); u && !u->is_null())
    r.unsupported("model.unk_token", u->dump(), "null (byte-level BPE has no unknown token)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* v = r.find(*model, key);
    if (v && !v->is_null() && !(v->is_string() && v->get<std::string>().empty()))
      r.unsupported(std::string("model.") + key, v->dump(), "null or \"\"");
  }
  if (r.boolean(*model, "byte_fallback", "model", false))
    r.unsupported("model.byte_fallback", "true", "false");
  spec.ignore_merges = r.boolean(*model, "ignore_merges", "model", false);

  const json* vocab = r.find(*model, "vocab");
  if (!vocab || !vocab->is_object()) r.bad("model.vocab", vocab ? *vocab : json(), "not an object");
  spec.vocab.reserve(vocab->size());
  for (const auto& [token, id] : vocab->items())
    spec.vocab.emplace_back(r.bytes_of(token, "model.vocab"), r.id(id, "model.vocab." + token));
  const json* merges = r.find(*model, "merges");
  if (!merges || !merges->is_array())
    r.bad("model.merges", merges ? *merges : json(), "not a list");
  spec.merges.reserve(merges->size());
  for (size_t k = 0; k < merges->size(); ++k) {
    const json& m = (*merges)[k];
    const std::string path = fmt::format("model.merges[{}]", k);
    std::string left, right;
    if (m.is_string()) {  // "a b" (tokens never contain ' ': it is written 'Ġ')
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        r.bad(path, m, "not \"left right\"");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2) {
      left = r.str(m[0], path + "[0]");
      right = r.str(m[1], path + "[1]");
    } else {
      r.bad(path, m, "neither \"left right\" nor [left, right]");
    }
    spec.merges.emplace_back(r.bytes_of(left, path), r.bytes_of(right, path));
  }
}

void read_added_tokens(const Reader& r, const json& root, TokenizerSpec& spec) {
  const json* list = r.find(root, "added_tokens");
  if (!list || list->is_null()) return;
  if (!list->is_array()) r.bad("added_tokens", *list, "not a list");
  for (size_t k = 0; k < list->size(); ++k) {
    const json& t = (*list)[k];
    const std::string path = fmt::format("added_tokens[{}]", k);
    if (!t.is_object()) r.bad(path, t, "not an object");
    AddedToken a;
    const json* id = r.find(t, "id");
    if (!id) TS_USER_ERROR("{}: field '{}.id' is missing", r.source, path);
    a.id = r.id(*id, path + ".id");
    const json* content = r.find(t, "content");
    if (!content) TS_USER_ERROR("{}: field '{}.content' is missing", r.source, path);
    a.content = r.str(*content, path + ".content");
    a.special = r.boolean(t, "special", path, false);
    a.normalized = r.boolean(t, "normalized", path, !a.special);
    for (const char* key : {"lstrip", "rstrip", "single_word"})
      if (r.boolean(t, key, path, false)) r.unsupported(path + "." + key, "true", "false");
    spec.added.push_back(std::move(a));
  }
}

void append_json_string(std::string& out, const std::string& s) { out += json(s).dump(); }

std::string byte_level_json_object(bool use_regex, bool trim_offsets) {
  return fmt::format(
      "{{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": {}, "
      "\"use_regex\": {}}}",
      trim_offsets, use_regex);
}

}  // namespace

Tokenizer Tokenizer::from_hf_json(const std::string& json_text, const std::string& source_name) {
  const json root = parse_json(json_text, source_name);
  const Reader r{source_name};
  if (!root.is_object()) r.bad("(top level)", root, "not an object");
  TokenizerSpec spec;
  spec.source = source_name;
  read_normalizer(r, root, spec);
  read_pre_tokenizer(r, root, spec);
  read_decoder_and_post(r, root);
  read_model(r, root, spec);
  read_added_tokens(r, root, spec);
  return make_tokenizer(std::move(spec));
}

Tokenizer Tokenizer::load_hf_json(const std::string& tokenizer_json_path) {
  return from_hf_json(read_file(tokenizer_json_path, "tokenizer.json"), tokenizer_json_path);
}

Tokenizer Tokenizer::load_gpt2(const std::string& encoder_json_path,
                               const std::string& vocab_bpe_path) {
  const json encoder =
      parse_json(read_file(encoder_json_path, "GPT-2 encoder.json"), encoder_json_path);
  const Reader r{encoder_json_path};
  if (!encoder.is_object()) r.bad("(top level)", encoder, "not an object of token -> id");
  TokenizerSpec spec;
  spec.source = encoder_json_path;
  spec.pre = PreTokenizer::gpt2;
  spec.vocab.reserve(encoder.size());
  for (const auto& [token, id] : encoder.items())
    spec.vocab.emplace_back(r.bytes_of(token, token), r.id(id, token));
  const auto eot = encoder.find("<|endoftext|>");
  if (eot == encoder.end())
    TS_USER_ERROR("{}: GPT-2 vocabulary lacks '<|endoftext|>'", encoder_json_path);
  spec.added.push_back({"<|endoftext|>", r.id(*eot, "<|endoftext|>"), true, false});

  const std::string merges_text = read_file(vocab_bpe_path, "GPT-2 vocab.bpe");
  const Reader mr{vocab_bpe_path};
  std::istringstream lines(merges_text);
  std::string line;
  for (int line_no = 1; std::getline(lines, line); ++line_no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
      TS_USER_ERROR("{}: line {} = '{}' is not 'left right'", vocab_bpe_path, line_no, line);
    const std::string where = fmt::format("line {}", line_no);
    spec.merges.emplace_back(mr.bytes_of(line.substr(0, space), where),
                             mr.bytes_of(line.substr(space + 1), where));
  }
  return make_tokenizer(std::move(spec));
}

std::string Tokenizer::to_hf_json() const {
  TS_CHECK(impl_ != nullptr, "use of a default-constructed (empty) Tokenizer");
  const TokenizerSpec& s = impl_->spec;
  // Written by hand (not through a json object) so that the vocabulary stays in id order and
  // 150k-entry files serialize in well under a second. Field order is fixed: the text, and
  // therefore hash(), depends only on the tokenizer's content.
  std::string out;
  out.reserve(s.vocab.size() * 24 + s.merges.size() * 24 + 4096);
  out += "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n";
  out += "  \"added_tokens\": [";
  std::vector<const AddedToken*> added;
  for (const auto& t : s.added) added.push_back(&t);
  std::stable_sort(added.begin(), added.end(), [](auto* a, auto* b) { return a->id < b->id; });
  for (size_t k = 0; k < added.size(); ++k) {
    out += k ? ",\n    " : "\n    ";
    out += fmt::format("{{\"id\": {}, \"content\": ", added[k]->id);
    append_json_string(out, added[k]->content);
    out += fmt::format(
        ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": {}, "
        "\"special\": {}}}",
        added[k]->normalized, added[k]->special);
  }
  out += added.empty() ? "],\n" : "\n  ],\n";
  out += s.nfc ? "  \"normalizer\": {\"type\": \"NFC\"},\n" : "  \"normalizer\": null,\n";
  if (s.pre == PreTokenizer::gpt2) {
    // Hugging Face's ByteLevel with use_regex applies exactly the GPT-2 pattern.
    out += "  \"pre_tokenizer\": " + byte_level_json_object(true, false) + ",\n";
  } else {
    out +=
        "  \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", "
        "\"pattern\": {\"Regex\": ";
    append_json_string(out, std::string(pre_tokenizer_regex(s.pre)));
    out += "}, \"behavior\": \"Isolated\", \"invert\": false}, " +
           byte_level_json_object(false, false) + "]},\n";
  }
  out += "  \"post_processor\": " + byte_level_json_object(false, false) + ",\n";
  out += "  \"decoder\": " + byte_level_json_object(false, false) + ",\n";
  out += fmt::format(
      "  \"model\": {{\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n"
      "    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n"
      "    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": {},\n"
      "    \"vocab\": {{",
      s.ignore_merges);
  std::vector<const std::pair<std::string, int32_t>*> vocab;
  for (const auto& v : s.vocab) vocab.push_back(&v);
  std::sort(vocab.begin(), vocab.end(), [](auto* a, auto* b) { return a->second < b->second; });
  for (size_t k = 0; k < vocab.size(); ++k) {
    out += k ? ",\n      " : "\n      ";
    append_json_string(out, bytes_to_byte_level(vocab[k]->first));
    out += ": ";
    out += std::to_string(vocab[k]->second);
  }
  out += vocab.empty() ? "},\n" : "\n    },\n";
  // Merges as "left right" strings: byte-level tokens never contain ' ', and every version of
  // Hugging Face tokenizers reads this form.
  out += "    \"merges\": [";
  for (size_t k = 0; k < s.merges.size(); ++k) {
    out += k ? ",\n      " : "\n      ";
    append_json_string(out, bytes_to_byte_level(s.merges[k].first) + " " +
                                bytes_to_byte_level(s.merges[k].second));
  }
  out += s.merges.empty() ? "]\n" : "\n    ]\n";
  out += "  }\n}\n";
  return out;
}

void Tokenizer::save_hf_json(const std::string& path) const {
  const std::string text = to_hf_json();
  // Write beside the target and rename, so a reader never sees a half-written file.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) TS_USER_ERROR("cannot write tokenizer to '{}': {}", tmp, std::strerror(errno));
    f.write(text.data(), std::streamsize(text.size()));
    f.flush();
    if (!f) TS_SYSTEM_ERROR("writing '{}' failed: {}", tmp, std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    TS_SYSTEM_ERROR("rename '{}' -> '{}' failed: {}", tmp, path, std::strerror(errno));
}

}  // namespace tessera
