// Tessera's side of checking an export: a CPU f32 Transformer built from an ExportModel, its 2-D
// weights optionally replaced by what a quantized export stores (read back), evaluated for
// perplexity over a token sequence and greedy generation. `tessera perplexity` runs it; the
// llama.cpp comparison (tests/export) evaluates the same tokens through the GGUF file.
// Shape letters: P scored positions, V vocabulary.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "export/export_model.h"

namespace tessera {
class Transformer;
class Activations;
}  // namespace tessera

namespace tessera::exporting {

// Which weights are evaluated:
//   f32                    the checkpoint's own;
//   f16 bf16 q8_0 q4_0     exactly those of the GGUF file of that type (gguf_storage_type: block
//                          linears in that type, embeddings / LM head F16 in Q8_0/Q4_0 files,
//                          vectors and routers F32), each dequantized to f32;
//   int8 int4              block linears quantized row-wise in groups of group_size (int8
//                          default: one group per row, i.e. per output channel; int4 default 32)
//                          by quant::quantize_rows and dequantized; the rest f32.
enum class WeightQuant { f32, f16, bf16, q8_0, q4_0, int8, int4 };
const char* weight_quant_name(WeightQuant q);

// The f32 weights evaluated for `quant`, by Tessera name. A group_size that does not divide a
// block linear's input width is a user error naming it and `where`.
std::map<std::string, ExportTensor> reference_weights(const ExportModel& m, WeightQuant quant,
                                                      int group_size, const std::string& where);

struct PerplexityResult {
  int64_t tokens_scored = 0;  // P: every position but the first of each window
  double nll_sum = 0.0;       // sum of -log p(token) in nats, accumulated in double
  std::vector<float> nll;     // (P) each position's -log p(token)
  std::vector<int32_t> top1;  // (P) each position's argmax (the greedy choice)
  double perplexity() const;  // exp(nll_sum / tokens_scored)
};

class ReferenceModel {
 public:
  // ctx: the window (<= max_seq_len); 0 takes max_seq_len.
  ReferenceModel(const ExportModel& m, WeightQuant quant, int group_size, int ctx,
                 const std::string& where);
  ~ReferenceModel();
  int ctx() const { return ctx_; }
  int vocab_size() const { return vocab_; }

  // The sequence in consecutive windows of ctx tokens (the last one shorter, if at least 2
  // tokens remain); in each, position t predicts token t + 1 from tokens 0..t of the window only.
  // With `logits_out`, the logits of every scored position are appended, (P, V) row-major.
  PerplexityResult perplexity(const std::vector<int32_t>& tokens,
                              std::vector<float>* logits_out = nullptr) const;
  // Greedy (argmax) continuation of `prompt` by num_tokens tokens; prompt + num_tokens <= ctx.
  std::vector<int32_t> greedy(const std::vector<int32_t>& prompt, int num_tokens) const;

 private:
  int ctx_ = 0, vocab_ = 0;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<Activations> acts_;  // batch 1, ctx
};

// Writes (rows, cols) f32 as a NumPy .npy file (format 1.0, '<f4', C order), atomically.
void write_npy_f32(const std::string& path, const std::vector<float>& values, int64_t rows,
                   int64_t cols);

}  // namespace tessera::exporting
