// Engine: sizing the KV cache, queueing requests, and one iteration (schedule -> rows -> model ->
// sample -> stop checks -> events).
#include "infer/engine.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/ops_infer.h"

namespace tessera {
namespace {

constexpr int64_t kCpuDefaultKvBytes = int64_t{1} << 30;

// The length of the longest prefix of text[0, end) that does not end inside a UTF-8 sequence.
size_t complete_utf8(const std::string& text, size_t end) {
  size_t start = end;
  for (int back = 0; back < 4 && start > 0; ++back) {
    const auto c = static_cast<unsigned char>(text[start - 1]);
    if ((c & 0xC0) != 0x80) {  // a lead byte or ASCII: is its sequence complete?
      const size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : 4;
      return end - (start - 1) >= need ? end : start - 1;
    }
    --start;
  }
  return end;  // not UTF-8 we understand: release as is
}

// A token's bytes; an id the tokenizer does not use (a model may still sample one) adds none.
std::string token_text(const Tokenizer& tok, int32_t token) {
  try {
    return tok.decode(std::span<const int32_t>(&token, 1));
  } catch (const Error&) {
    return {};
  }
}

}  // namespace

Engine::Engine(std::shared_ptr<EngineModel> model, const EngineOptions& options)
    : model_(std::move(model)), options_(options) {
  const ModelConfig& c = model_->config();
  has_tokenizer_ = !model_->tokenizer_json().empty();  // synthetic models have none
  if (has_tokenizer_)
    tokenizer_ = Tokenizer::from_hf_json(model_->tokenizer_json(), model_->source());
  options_.scheduler.validate();
  max_context_ = options.max_context > 0 ? options.max_context : c.max_seq_len;
  if (max_context_ > c.max_seq_len)
    TS_USER_ERROR("max context {} is longer than the model's max_seq_len {} ({})", max_context_,
                  c.max_seq_len, model_->source());
  KvCacheShape shape;
  shape.num_layers = c.num_layers;
  shape.num_kv_heads = c.num_kv_heads;
  shape.head_dim = c.resolved_head_dim();
  shape.block_size = options.block_size;
  shape.dtype = model_->dtype();
  shape.validate();
  const int64_t table_width = shape.blocks_for_tokens(max_context_);
  const SchedulerConfig& sc = options_.scheduler;
  model_->reserve(sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_num_seqs, table_width,
                  max_context_);
  int64_t budget = options.kv_cache_bytes;
  if (budget <= 0) {
    size_t free_bytes = 0, total = 0;
    if (model_->device() == Device::cpu ||
        !device_memory_info(model_->device(), &free_bytes, &total))
      budget = kCpuDefaultKvBytes;
    else
      budget = int64_t(double(free_bytes) * 0.9);
  }
  const int64_t blocks = shape.num_blocks_for_bytes(budget, max_context_);
  kv_ = model_->make_kv_cache(blocks, shape.block_size);
  kv_manager_ = std::make_unique<KvCacheManager>(blocks, shape.block_size);
  scheduler_ = std::make_unique<Scheduler>(options_.scheduler, *kv_manager_);
}

RequestId Engine::add_request(std::vector<int32_t> prompt, const SamplingParams& params) {
  validate(params);
  if (prompt.empty()) TS_USER_ERROR("prompt: empty (at least one token is needed)");
  const int64_t V = model_->vocab_size();
  for (int32_t t : prompt)
    if (t < 0 || t >= V) TS_USER_ERROR("prompt: token id {} outside the vocabulary [0, {})", t, V);
  const int64_t need = int64_t(prompt.size()) + params.max_tokens;
  if (need > max_context_)
    TS_USER_ERROR(
        "prompt of {} tokens + max_tokens {} = {} is longer than the context of {} "
        "tokens",
        prompt.size(), params.max_tokens, need, max_context_);
  const RequestId id = next_id_++;
  Request r;
  r.num_prompt = int64_t(prompt.size());
  r.ids = std::move(prompt);
  r.params = params;
  if (!has_tokenizer_ && !params.stop_strings.empty())
    TS_USER_ERROR("stop: stop strings need a tokenizer, and {} has none", model_->source());
  const int32_t eot = has_tokenizer_ ? tokenizer_.eot_id() : -1;
  if (!options_.ignore_eos && eot >= 0 && eot < V) r.params.stop_token_ids.push_back(eot);
  scheduler_->add_request(id, r.num_prompt, r.params);
  requests_.emplace(id, std::move(r));
  return id;
}

void Engine::abort(RequestId id) {
  if (!requests_.count(id)) return;
  scheduler_->abort(id);
}

std::string Engine::release_text(Request& r, bool final, size_t keep) {
  size_t end = final ? std::min(keep, r.text.size()) : complete_utf8(r.text, r.text.size());
  if (!final) {
    // Hold back a tail that may be the start of a stop string (it is never returned if it is).
    size_t hold = 0;
    for (const std::string& s : r.params.stop_strings) {
      const size_t most = std::min(s.size() - 1, end - std::min(end, r.released));
      for (size_t len = most; len > hold; --len)
        if (r.text.compare(end - len, len, s, 0, len) == 0) {
          hold = len;
          break;
        }
    }
    end -= hold;
  }
  if (end <= r.released) return {};
  std::string out = r.text.substr(r.released, end - r.released);
  r.released = end;
  return out;
}

std::vector<EngineEvent> Engine::step() {
  std::vector<EngineEvent> events = std::move(pending_);
  pending_.clear();
  const StepPlan plan = scheduler_->schedule();
  std::unordered_map<RequestId, size_t> event_of;  // request -> its event this step
  std::unordered_map<RequestId, size_t> keep_of;   // stopped by a stop string: text to keep
  last_rows_ = plan.num_batched_tokens;
  last_seqs_ = int64_t(plan.chunks.size());
  preemptions_ += int64_t(plan.preempted.size());
  if (!plan.empty()) {
    if (!plan.copies.empty()) {
      std::vector<int32_t> pairs;
      for (const BlockCopy& c : plan.copies) pairs.insert(pairs.end(), {c.src, c.dst});
      Buffer dev(model_->device(), pairs.size() * sizeof(int32_t));
      copy_bytes(dev.data(), dev.device(), pairs.data(), Device::cpu, dev.size());
      const Tensor copies(dev.data(), DType::i32, dev.device(), {int64_t(plan.copies.size()), 2});
      for (size_t l = 0; l < kv_.k.size(); ++l)
        ops::kv_cache_copy_blocks(kv_.k[l], kv_.v[l], copies);
    }
    StepRows rows;
    rows.max_context = int(max_context_);
    for (const ScheduledChunk& ch : plan.chunks)
      rows.table_width =
          std::max<int64_t>(rows.table_width, int64_t(kv_manager_->block_table(ch.id).size()));
    const int64_t BS = kv_manager_->block_size();
    for (size_t s = 0; s < plan.chunks.size(); ++s) {
      const ScheduledChunk& ch = plan.chunks[s];
      const Request& r = requests_.at(ch.id);
      const std::vector<BlockId>& table = kv_manager_->block_table(ch.id);
      rows.block_tables.insert(rows.block_tables.end(), table.begin(), table.end());
      rows.block_tables.resize(size_t(s + 1) * size_t(rows.table_width), 0);
      for (int64_t p = ch.start_pos; p < ch.start_pos + ch.num_tokens; ++p) {
        rows.tokens.push_back(r.ids[size_t(p)]);
        rows.positions.push_back(int32_t(p));
        rows.slots.push_back(int32_t(kv_manager_->slot(ch.id, p).flat(BS)));
        rows.seq.push_back(int32_t(s));
      }
      if (ch.samples) rows.logit_rows.push_back(int32_t(rows.tokens.size() - 1));
    }
    const std::vector<float>& logits = model_->forward(rows, kv_);
    const int64_t V = model_->vocab_size();
    std::vector<StepOutput> outputs;
    size_t row = 0;
    for (const ScheduledChunk& ch : plan.chunks) {
      if (!ch.samples) continue;
      Request& r = requests_.at(ch.id);
      const int64_t step = int64_t(r.ids.size()) - r.num_prompt;
      const int32_t token =
          sampler_.sample(logits.data() + row++ * size_t(V), V, r.params, r.ids, step);
      r.ids.push_back(token);
      const std::span<const int32_t> generated(r.ids.data() + r.num_prompt,
                                               r.ids.size() - size_t(r.num_prompt));
      const bool stop_token =
          std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(), token) !=
          r.params.stop_token_ids.end();
      if (!stop_token && has_tokenizer_) r.text += token_text(tokenizer_, token);
      StopCheck stop = check_stop(r.params, generated, r.text);
      // Reaching max_tokens is the scheduler's to see (FinishReason::length), not a stop.
      if (stop.reason == StopReason::max_tokens) stop = StopCheck{};
      if (stop.stop) keep_of[ch.id] = stop.keep_chars;
      EngineEvent e;
      e.id = ch.id;
      e.token = token;
      e.num_prompt = r.num_prompt;
      e.num_generated = int64_t(generated.size());
      if (!stop.stop) e.text = release_text(r, false, 0);
      event_of[ch.id] = events.size();
      events.push_back(std::move(e));
      outputs.push_back(StepOutput{ch.id, stop.stop});
    }
    scheduler_->on_step_done(outputs);
  }
  for (const FinishedRequest& f : scheduler_->take_finished()) {
    const auto it = requests_.find(f.id);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    if (!event_of.count(f.id)) {
      event_of[f.id] = events.size();
      EngineEvent e;
      e.id = f.id;
      e.num_prompt = r.num_prompt;
      e.num_generated = int64_t(r.ids.size()) - r.num_prompt;
      events.push_back(std::move(e));
    }
    EngineEvent& e = events[event_of[f.id]];
    const auto keep = keep_of.find(f.id);
    e.text += release_text(r, true, keep != keep_of.end() ? keep->second : r.text.size());
    e.finished = true;
    e.reason = f.reason;
    e.error = f.error;
    requests_.erase(it);
  }
  return events;
}

}  // namespace tessera
