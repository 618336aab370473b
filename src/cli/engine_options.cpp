// Declaring and resolving the engine and sampling options of `generate` and `serve`.
#include "cli/engine_options.h"

#include "cli/command.h"
#include "core/error.h"
#include "core/memory.h"

namespace tessera::cli {

void add_engine_options(CLI::App& sub, EngineArgs& a) {
  sub.add_option("--device", a.device, "cpu, cuda, or auto (cuda when a GPU is visible)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  sub.add_option("--dtype", a.dtype,
                 "activations, float weights and KV cache: fp32, bf16, fp16, or auto (bf16 on "
                 "cuda, fp32 on the cpu, which computes in fp32 only)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}));
  sub.add_option("--kv-cache-gb", a.kv_cache_gb,
                 "KV cache size in GiB; default: 1 on the cpu, 90% of the free GPU memory")
      ->check(CLI::NonNegativeNumber);
  sub.add_option("--block-size", a.block_size, "tokens per KV cache block")
      ->capture_default_str()
      ->check(integer_at_least(1));
  sub.add_option("--max-context", a.max_context,
                 "tokens per sequence (prompt + generated); default: the model's max_seq_len")
      ->check(integer_at_least(1));
  sub.add_option("--max-num-seqs", a.max_num_seqs, "requests in the running batch at most")
      ->capture_default_str()
      ->check(integer_at_least(1));
  sub.add_option("--max-batched-tokens", a.max_batched_tokens,
                 "tokens per engine step (decodes + prefill chunks) at most")
      ->capture_default_str()
      ->check(integer_at_least(1));
  sub.add_flag("--ignore-eos", a.ignore_eos,
               "keep generating after the tokenizer's end-of-text token");
}

void add_sampling_options(CLI::App& sub, SamplingArgs& a) {
  sub.add_option("--max-tokens", a.max_tokens, "tokens to generate at most")
      ->capture_default_str()
      ->check(integer_at_least(1));
  sub.add_option("--temperature", a.temperature, "0: greedy")->capture_default_str();
  sub.add_option("--top-k", a.top_k, "keep the k most likely tokens; 0: off")
      ->capture_default_str();
  sub.add_option("--top-p", a.top_p, "nucleus mass in (0, 1]; 1: off")->capture_default_str();
  sub.add_option("--min-p", a.min_p, "keep tokens with p >= min_p * p_max; 0: off")
      ->capture_default_str();
  sub.add_option("--repetition-penalty", a.repetition_penalty, "1: off")->capture_default_str();
  sub.add_option("--seed", a.seed, "seed of the random draws")->capture_default_str();
  sub.add_option("--stop", a.stop, "stop before this text (repeatable)");
  sub.add_option("--stop-token-id", a.stop_token_ids, "stop after this token id (repeatable)");
}

std::shared_ptr<EngineModel> load_engine_model(const EngineArgs& a, const std::string& path) {
  EngineModelOptions o;
  o.device =
      a.device == "cuda" || (a.device == "auto" && cuda_available()) ? Device::cuda : Device::cpu;
  if (o.device == Device::cuda && !cuda_available())
    TS_USER_ERROR("--device cuda: no GPU is visible (or this build has no CUDA backend)");
  if (a.dtype == "auto")
    o.dtype = o.device == Device::cuda ? DType::bf16 : DType::f32;
  else if (!parse_dtype(a.dtype, &o.dtype))
    TS_BUG("--dtype {} passed the option check", a.dtype);
  return std::shared_ptr<EngineModel>(EngineModel::load(path, o));
}

EngineOptions engine_options(const EngineArgs& a) {
  EngineOptions o;
  o.kv_cache_bytes = int64_t(a.kv_cache_gb * double(int64_t{1} << 30));
  o.block_size = a.block_size;
  o.max_context = a.max_context;
  o.scheduler.max_num_seqs = a.max_num_seqs;
  o.scheduler.max_num_batched_tokens = a.max_batched_tokens;
  o.ignore_eos = a.ignore_eos;
  return o;
}

SamplingParams sampling_params(const SamplingArgs& a) {
  SamplingParams p;
  p.max_tokens = a.max_tokens;
  p.temperature = a.temperature;
  p.top_k = a.top_k;
  p.top_p = a.top_p;
  p.min_p = a.min_p;
  p.repetition_penalty = a.repetition_penalty;
  p.seed = a.seed;
  p.stop_strings = a.stop;
  p.stop_token_ids = a.stop_token_ids;
  validate(p);
  return p;
}

}  // namespace tessera::cli
